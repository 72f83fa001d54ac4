//! Worker behaviour on the in-memory broker and backend: state sequence, panics, concurrency, retries,
//! bad input (malformed JSON, unknown task names, wrong arguments), time limits and shutdown.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use machinery::backend::memory::MemoryBackend;
use machinery::backend::{Backend, BackendError};
use machinery::broker::memory::MemoryBroker;
use machinery::broker::Outgoing;
use machinery::{
    task, Arg, Config, GroupMeta, ResultError, Server, Signature, State, TaskContext, TaskError,
    TaskState, Worker, WorkerError,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

fn memory_server() -> Server {
    Server::from_parts(
        Config::default(),
        Arc::new(MemoryBroker::new("memory://", "machinery_tasks")),
        Arc::new(MemoryBackend::new("memory://", Duration::from_secs(600))),
    )
}

/// A backend that records every state written, in order.
#[derive(Debug)]
struct Recording {
    inner: MemoryBackend,
    states: Mutex<Vec<(String, State)>>,
}

impl Recording {
    fn states_of(&self, uuid: &str) -> Vec<State> {
        self.states
            .lock()
            .unwrap()
            .iter()
            .filter(|(u, _)| u == uuid)
            .map(|(_, s)| s.clone())
            .collect()
    }
}

#[async_trait]
impl Backend for Recording {
    fn kind(&self) -> &'static str {
        "recording"
    }
    async fn set_state(&self, state: &TaskState) -> Result<(), BackendError> {
        self.states
            .lock()
            .unwrap()
            .push((state.task_uuid.clone(), state.state.clone()));
        self.inner.set_state(state).await
    }
    async fn get_state(&self, uuid: &str) -> Result<Option<TaskState>, BackendError> {
        self.inner.get_state(uuid).await
    }
    async fn wait_for_completion(
        &self,
        uuid: &str,
        timeout: Duration,
    ) -> Result<Option<TaskState>, BackendError> {
        self.inner.wait_for_completion(uuid, timeout).await
    }
    async fn init_group(&self, meta: &GroupMeta) -> Result<(), BackendError> {
        self.inner.init_group(meta).await
    }
    async fn get_group(&self, uuid: &str) -> Result<Option<GroupMeta>, BackendError> {
        self.inner.get_group(uuid).await
    }
    async fn complete_group_member(&self, g: &str, t: &str, n: u32) -> Result<bool, BackendError> {
        self.inner.complete_group_member(g, t, n).await
    }
    async fn purge_state(&self, uuid: &str) -> Result<(), BackendError> {
        self.inner.purge_state(uuid).await
    }
    async fn purge_group(&self, uuid: &str) -> Result<(), BackendError> {
        self.inner.purge_group(uuid).await
    }
}

#[task]
async fn add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

#[task]
async fn hello_world(arg: String) -> Result<String, TaskError> {
    Ok(format!("Hi, {arg}"))
}

#[task]
async fn boom() -> Result<i64, TaskError> {
    panic!("kaboom at the worker")
}

#[task]
async fn pair(name: String) -> Result<(String, i64), String> {
    Ok((name.to_uppercase(), name.len() as i64))
}

#[task]
async fn nothing() -> Result<(), String> {
    Ok(())
}

#[task]
async fn fails_with_string(reason: String) -> Result<i64, String> {
    Err(format!("refused: {reason}"))
}

#[task]
async fn describe(ctx: &TaskContext, tag: String) -> Result<String, TaskError> {
    let tenant = ctx
        .headers()
        .get("tenant")
        .and_then(|v| v.as_str())
        .unwrap_or("-");
    Ok(format!(
        "{}|{}|{}|{}|{tag}",
        ctx.uuid(),
        ctx.name(),
        ctx.retry_count(),
        tenant
    ))
}

#[tokio::test]
async fn a_task_goes_pending_received_started_success() {
    let recording = Arc::new(Recording {
        inner: MemoryBackend::new("memory://", Duration::from_secs(600)),
        states: Mutex::new(Vec::new()),
    });
    let server = Server::from_parts(
        Config::default(),
        Arc::new(MemoryBroker::new("memory://", "machinery_tasks")),
        recording.clone(),
    );
    let running = Worker::new(&server)
        .register(add::task())
        .start()
        .await
        .unwrap();
    let result = add::send(&server, 1, 2).await.unwrap();
    assert_eq!(result.get(WAIT).await.unwrap(), 3);
    assert_eq!(
        recording.states_of(result.uuid()),
        [
            State::Pending,
            State::Received,
            State::Started,
            State::Success
        ]
    );
    let stored = result.state().await.unwrap().unwrap();
    assert_eq!(stored.task_name, "add");
    running.shutdown(WAIT).await.unwrap();
}

#[tokio::test]
async fn string_parameters_take_str_and_outputs_come_back_typed() {
    let server = memory_server();
    let running = Worker::new(&server)
        .register(hello_world::task())
        .register(pair::task())
        .register(nothing::task())
        .start()
        .await
        .unwrap();
    assert_eq!(
        hello_world::send(&server, "task1")
            .await
            .unwrap()
            .get(WAIT)
            .await
            .unwrap(),
        "Hi, task1"
    );
    let (upper, len) = pair::send(&server, "go")
        .await
        .unwrap()
        .get(WAIT)
        .await
        .unwrap();
    assert_eq!((upper.as_str(), len), ("GO", 2));
    let unit = nothing::send(&server).await.unwrap();
    unit.get(WAIT).await.unwrap();
    assert_eq!(unit.state().await.unwrap().unwrap().results, Some(vec![]));
    running.shutdown(WAIT).await.unwrap();
}

#[tokio::test]
async fn a_panic_becomes_failure_with_its_message() {
    let server = memory_server();
    let running = Worker::new(&server)
        .register(boom::task())
        .register(add::task())
        .start()
        .await
        .unwrap();
    let err = boom::send(&server)
        .await
        .unwrap()
        .get(WAIT)
        .await
        .unwrap_err();
    match err {
        ResultError::Failed { task, error, .. } => {
            assert_eq!(task, "boom");
            assert_eq!(error, "kaboom at the worker");
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    // The worker survived the panic.
    assert_eq!(
        add::send(&server, 2, 2)
            .await
            .unwrap()
            .get(WAIT)
            .await
            .unwrap(),
        4
    );
    running.shutdown(WAIT).await.unwrap();
}

#[tokio::test]
async fn any_display_error_type_becomes_the_failure_text() {
    let server = memory_server();
    let running = Worker::new(&server)
        .register(fails_with_string::task())
        .start()
        .await
        .unwrap();
    let state = fails_with_string::send(&server, "no")
        .await
        .unwrap()
        .wait(WAIT)
        .await
        .unwrap();
    assert_eq!(
        (state.state, state.error.as_str()),
        (State::Failure, "refused: no")
    );
    running.shutdown(WAIT).await.unwrap();
}

#[tokio::test]
async fn the_context_gives_uuid_name_retries_and_headers() {
    let server = memory_server();
    let running = Worker::new(&server)
        .register(describe::task())
        .start()
        .await
        .unwrap();
    let sig = describe::signature("x").retries(2).header("tenant", "acme");
    let result = server.send(sig).await.unwrap();
    let text = result.get(WAIT).await.unwrap();
    assert_eq!(text, format!("{}|describe|2|acme|x", result.uuid()));
    running.shutdown(WAIT).await.unwrap();
}

static RUNNING: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

#[task]
async fn slow_counted() -> Result<(), TaskError> {
    let now = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
    PEAK.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(50)).await;
    RUNNING.fetch_sub(1, Ordering::SeqCst);
    Ok(())
}

#[tokio::test]
async fn no_more_tasks_run_at_once_than_the_concurrency() {
    let server = memory_server();
    let mut results = Vec::new();
    for _ in 0..12 {
        results.push(slow_counted::send(&server).await.unwrap());
    }
    let running = Worker::new(&server)
        .register(slow_counted::task())
        .concurrency(3)
        .start()
        .await
        .unwrap();
    for r in &results {
        r.get(WAIT).await.unwrap();
    }
    assert_eq!(
        PEAK.load(Ordering::SeqCst),
        3,
        "the worker should use, and never exceed, its 3 slots"
    );
    // Fetch-ahead is bounded by free slots: nothing was taken that could not run.
    running.shutdown(WAIT).await.unwrap();
}

static FLAKY_CALLS: AtomicUsize = AtomicUsize::new(0);

#[task]
async fn flaky() -> Result<usize, TaskError> {
    let call = FLAKY_CALLS.fetch_add(1, Ordering::SeqCst) + 1;
    if call < 3 {
        return Err(TaskError::new(format!("attempt {call} failed")));
    }
    Ok(call)
}

#[tokio::test]
async fn failures_are_retried_with_fibonacci_back_off() {
    let server = memory_server();
    let running = Worker::new(&server)
        .register(flaky::task())
        .start()
        .await
        .unwrap();
    let started = Instant::now();
    let result = server.send(flaky::signature().retries(2)).await.unwrap();
    assert_eq!(result.get(WAIT).await.unwrap(), 3);
    // Delays of 1 s then 2 s (Go's Fibonacci sequence from RetryTimeout 0).
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(2900),
        "retried too early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(6),
        "retried too late: {elapsed:?}"
    );
    running.shutdown(WAIT).await.unwrap();
}

#[tokio::test]
async fn retries_run_out_and_the_last_error_is_the_failure() {
    let server = memory_server();
    let running = Worker::new(&server)
        .register(fails_with_string::task())
        .start()
        .await
        .unwrap();
    let result = server
        .send(fails_with_string::signature("again").retries(1))
        .await
        .unwrap();
    let state = result.wait(WAIT).await.unwrap();
    assert_eq!(
        (state.state, state.error.as_str()),
        (State::Failure, "refused: again")
    );
    running.shutdown(WAIT).await.unwrap();
}

fn raw<'a>(queue: &'a str, body: &[u8]) -> Outgoing<'a> {
    Outgoing {
        uuid: "",
        name: "",
        routing_key: queue,
        body: body.to_vec(),
        eta: None,
        priority: 0,
        headers: Default::default(),
    }
}

#[tokio::test]
async fn malformed_json_is_dead_lettered_and_the_worker_keeps_serving() {
    let server = memory_server();
    let running = Worker::new(&server)
        .register(add::task())
        .start()
        .await
        .unwrap();
    server
        .broker()
        .publish(raw("machinery_tasks", b"{not json"))
        .await
        .unwrap();
    assert_eq!(
        add::send(&server, 20, 22)
            .await
            .unwrap()
            .get(WAIT)
            .await
            .unwrap(),
        42
    );
    let dead = server
        .broker()
        .inspect()
        .unwrap()
        .dead_letters("machinery_tasks", 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body, b"{not json");
    assert!(
        dead[0].reason.starts_with("malformed message:"),
        "{}",
        dead[0].reason
    );
    running.shutdown(WAIT).await.unwrap();
}

#[tokio::test]
async fn unknown_task_names_are_requeued_a_bounded_number_of_times_then_dead_lettered() {
    let mut config = Config::default();
    config.unknown_task_requeues = 3;
    let server = Server::from_parts(
        config,
        Arc::new(MemoryBroker::new("memory://", "machinery_tasks")),
        Arc::new(MemoryBackend::new("memory://", Duration::from_secs(600))),
    );
    let running = Worker::new(&server)
        .register(add::task())
        .start()
        .await
        .unwrap();
    let unknown = server.send(Signature::new("no_such_task")).await.unwrap();
    assert_eq!(
        add::send(&server, 1, 1)
            .await
            .unwrap()
            .get(WAIT)
            .await
            .unwrap(),
        2
    );
    let broker = server.broker().clone();
    let dead_lettered = machinery_tests::eventually(WAIT, || {
        let broker = broker.clone();
        async move {
            broker
                .inspect()
                .unwrap()
                .dead_letters("machinery_tasks", 10)
                .await
                .unwrap()
                .len()
                == 1
        }
    })
    .await;
    assert!(dead_lettered, "the unknown task was never dead-lettered");
    let dead = server
        .broker()
        .inspect()
        .unwrap()
        .dead_letters("machinery_tasks", 10)
        .await
        .unwrap();
    assert!(
        dead[0]
            .reason
            .contains("unknown task name \"no_such_task\""),
        "{}",
        dead[0].reason
    );
    assert!(
        dead[0].reason.contains("requeued 3 times"),
        "{}",
        dead[0].reason
    );
    let parked = Signature::from_json(&dead[0].body).unwrap();
    assert_eq!(parked.uuid, unknown.uuid());
    assert_eq!(
        parked.header_value(machinery::UNKNOWN_TASK_REQUEUES_HEADER),
        Some(&json!(3))
    );
    // Nothing is left spinning in the queue.
    let stats = server
        .broker()
        .inspect()
        .unwrap()
        .queue_stats("machinery_tasks")
        .await
        .unwrap();
    assert_eq!((stats.pending, stats.in_flight), (0, Some(0)));
    running.shutdown(WAIT).await.unwrap();
}

#[tokio::test]
async fn wrong_arguments_fail_naming_task_index_expected_and_found() {
    let server = memory_server();
    let running = Worker::new(&server)
        .register(add::task())
        .start()
        .await
        .unwrap();

    let wrong_type = Signature::with_args(
        "add",
        vec![
            Arg::new("", "int64", json!(1)),
            Arg::new("", "string", json!("x")),
        ],
    );
    let state = server
        .send(wrong_type)
        .await
        .unwrap()
        .wait(WAIT)
        .await
        .unwrap();
    assert_eq!(state.state, State::Failure);
    assert_eq!(
        state.error,
        "task add: argument 2: expected int64, got string \"x\""
    );

    let too_many = Signature::with_args("add", vec![Arg::new("", "int64", json!(1)); 3]);
    let state = server
        .send(too_many)
        .await
        .unwrap()
        .wait(WAIT)
        .await
        .unwrap();
    assert_eq!(state.error, "task add: expected 2 arguments, got 3");

    let too_few = Signature::with_args("add", vec![Arg::new("", "int64", json!(1))]);
    let state = server
        .send(too_few.retries(3))
        .await
        .unwrap()
        .wait(WAIT)
        .await
        .unwrap();
    assert_eq!(
        state.error, "task add: expected 2 arguments, got 1",
        "bad arguments are never retried"
    );

    assert_eq!(
        add::send(&server, 5, 5)
            .await
            .unwrap()
            .get(WAIT)
            .await
            .unwrap(),
        10
    );
    running.shutdown(WAIT).await.unwrap();
}

#[task(timeout = "100ms")]
async fn sleepy() -> Result<(), TaskError> {
    tokio::time::sleep(Duration::from_secs(30)).await;
    Ok(())
}

#[tokio::test]
async fn a_task_past_its_time_limit_fails_and_frees_its_slot() {
    let server = memory_server();
    let running = Worker::new(&server)
        .register(sleepy::task())
        .register(add::task())
        .concurrency(1)
        .start()
        .await
        .unwrap();
    let state = sleepy::send(&server)
        .await
        .unwrap()
        .wait(WAIT)
        .await
        .unwrap();
    assert_eq!(state.state, State::Failure);
    assert!(
        state.error.contains("exceeded its time limit of 100ms"),
        "{}",
        state.error
    );
    // With one slot, this only runs if the slot was freed.
    assert_eq!(
        add::send(&server, 1, 1)
            .await
            .unwrap()
            .get(WAIT)
            .await
            .unwrap(),
        2
    );
    running.shutdown(WAIT).await.unwrap();
}

#[task]
async fn half_second() -> Result<i64, TaskError> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(7)
}

#[tokio::test]
async fn graceful_shutdown_finishes_running_tasks() {
    let server = memory_server();
    let running = Worker::new(&server)
        .register(half_second::task())
        .start()
        .await
        .unwrap();
    let result = half_second::send(&server).await.unwrap();
    let started = machinery_tests::eventually(WAIT, || {
        let result = result.clone();
        async move {
            result
                .state()
                .await
                .unwrap()
                .is_some_and(|s| s.state == State::Started)
        }
    })
    .await;
    assert!(started);
    running.shutdown(WAIT).await.unwrap();
    assert_eq!(result.state().await.unwrap().unwrap().state, State::Success);
    let stats = server
        .broker()
        .inspect()
        .unwrap()
        .queue_stats("machinery_tasks")
        .await
        .unwrap();
    assert_eq!(
        (stats.pending, stats.in_flight),
        (0, Some(0)),
        "the message was acknowledged"
    );
}

#[tokio::test]
async fn a_missed_shutdown_deadline_cancels_tasks_and_returns_their_messages() {
    let server = memory_server();
    let running = Worker::new(&server)
        .register(sleepy::task())
        .register(half_second::task())
        .start()
        .await
        .unwrap();
    let result = half_second::send(&server).await.unwrap();
    let started = machinery_tests::eventually(WAIT, || {
        let result = result.clone();
        async move {
            result
                .state()
                .await
                .unwrap()
                .is_some_and(|s| s.state == State::Started)
        }
    })
    .await;
    assert!(started);
    let err = running
        .shutdown(Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(
        matches!(err, WorkerError::ShutdownDeadline { aborted: 1, .. }),
        "{err}"
    );
    let stats = server
        .broker()
        .inspect()
        .unwrap()
        .queue_stats("machinery_tasks")
        .await
        .unwrap();
    assert_eq!(
        (stats.pending, stats.in_flight),
        (1, Some(0)),
        "the cut-off task is back in the queue"
    );
    // Another worker runs it to completion (at-least-once).
    let again = Worker::new(&server)
        .register(half_second::task())
        .start()
        .await
        .unwrap();
    assert_eq!(result.get(WAIT).await.unwrap(), 7);
    again.shutdown(WAIT).await.unwrap();
}

#[tokio::test]
async fn an_idle_worker_shuts_down_at_once() {
    let server = memory_server();
    let running = Worker::new(&server)
        .register(add::task())
        .start()
        .await
        .unwrap();
    let started = Instant::now();
    running.shutdown(WAIT).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_worker_without_tasks_does_not_start() {
    let server = memory_server();
    let err = Worker::new(&server).start().await.unwrap_err();
    assert!(matches!(err, WorkerError::NoTasks));
}

#[tokio::test]
async fn on_success_callbacks_get_results_appended_and_on_error_callbacks_the_error_first() {
    let server = memory_server();
    let running = Worker::new(&server)
        .register(add::task())
        .register(hello_world::task())
        .register(fails_with_string::task())
        .start()
        .await
        .unwrap();
    let then = Signature::with_args("add", vec![Arg::new("", "int64", json!(10))])
        .with_uuid("task_then_callback");
    let first = server
        .send(add::signature(1, 2).on_success(then))
        .await
        .unwrap();
    assert_eq!(first.get(WAIT).await.unwrap(), 3);
    assert_eq!(
        server
            .result::<i64>("task_then_callback")
            .get(WAIT)
            .await
            .unwrap(),
        13
    );

    let on_error = hello_world::signature("unused").with_uuid("task_on_error_callback");
    let mut on_error = on_error.erase();
    on_error.args.clear();
    let failing = server
        .send(fails_with_string::signature("x").on_error(on_error))
        .await
        .unwrap();
    assert!(failing.get(WAIT).await.is_err());
    let text = server
        .result::<String>("task_on_error_callback")
        .get(WAIT)
        .await
        .unwrap();
    assert_eq!(text, "Hi, refused: x");
    running.shutdown(WAIT).await.unwrap();
}
