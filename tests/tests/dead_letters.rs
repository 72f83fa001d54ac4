//! Dead letters that tell (issues 13 and 18): a dead-lettered task gets a FAILURE state naming the
//! reason, so its sender's `get` fails at once instead of waiting out its timeout; and a final state that
//! can never be stored (a permanent backend error such as Redis `WRONGTYPE`) dead-letters the message
//! instead of running the task again for ever.

mod redis_common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use machinery::backend::memory::MemoryBackend;
use machinery::broker::memory::MemoryBroker;
use machinery::broker::Outgoing;
use machinery::{task, Config, ResultError, Server, Signature, TaskError, Worker};
use machinery_tests::{eventually, require, Service};
use redis::AsyncCommands as _;
use redis_common::{raw, Names};

/// How long a sender is willing to wait: the error must come well before.
const PATIENCE: Duration = Duration::from_secs(30);
/// How soon it must come.
const PROMPTLY: Duration = Duration::from_secs(5);

#[task]
async fn dl_known(a: i64) -> Result<i64, TaskError> {
    Ok(a)
}

fn memory_server(config: Config) -> Server {
    Server::from_parts(
        config,
        Arc::new(MemoryBroker::new("memory://", "machinery_tasks")),
        Arc::new(MemoryBackend::new("memory://", Duration::from_secs(600))),
    )
}

/// Sends a task no worker knows and checks that `get` fails promptly with the dead-letter reason.
async fn unknown_task_fails_promptly(server: &Server) {
    let running = Worker::new(server)
        .register(dl_known::task())
        .start()
        .await
        .unwrap();
    let unknown = server
        .send(Signature::new("dl_nobody_knows"))
        .await
        .unwrap();
    let started = Instant::now();
    let error = unknown
        .get(PATIENCE)
        .await
        .expect_err("an unknown task cannot succeed");
    let took = started.elapsed();
    match &error {
        ResultError::Failed { error, .. } => assert!(
            error.contains("unknown task name \"dl_nobody_knows\""),
            "the reason is named: {error}"
        ),
        other => panic!("expected the dead-letter FAILURE, got {other:?}"),
    }
    assert!(took < PROMPTLY, "failed after {took:?}, not at once");
    // The worker still serves known tasks.
    let known = dl_known::send(server, 7).await.unwrap();
    assert_eq!(known.get(PROMPTLY).await.unwrap(), 7);
    running.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn an_unknown_task_fails_at_once_on_memory() {
    let mut config = Config::default();
    config.unknown_task_requeues = 2;
    unknown_task_fails_promptly(&memory_server(config)).await;
}

#[tokio::test]
async fn an_unknown_task_fails_at_once_on_redis() {
    if !require(Service::Redis, "an_unknown_task_fails_at_once_on_redis") {
        return;
    }
    let names = Names::new("dl_unknown");
    let mut config = names.config();
    config.unknown_task_requeues = 2;
    unknown_task_fails_promptly(&Server::new(config).await.unwrap()).await;
    names.cleanup().await;
}

#[tokio::test]
async fn a_message_that_does_not_decode_fails_its_task_when_its_id_can_be_read() {
    let server = memory_server(Config::default());
    let running = Worker::new(&server)
        .register(dl_known::task())
        .start()
        .await
        .unwrap();
    // Args is not a list: not a signature, but the UUID is there.
    let body = br#"{"UUID":"task_dl_undecodable","Name":"dl_known","Args":"oops"}"#.to_vec();
    server
        .broker()
        .publish(Outgoing {
            uuid: "",
            name: "",
            routing_key: "machinery_tasks",
            body,
            eta: None,
            priority: 0,
            headers: Default::default(),
        })
        .await
        .unwrap();
    let result = server.result::<i64>("task_dl_undecodable");
    match result.get(PROMPTLY).await {
        Err(ResultError::Failed { error, .. }) => {
            assert!(
                error.contains("cannot decode"),
                "the reason is named: {error}"
            )
        }
        other => panic!("expected the dead-letter FAILURE, got {other:?}"),
    }
    let dead = server
        .broker()
        .inspect()
        .unwrap()
        .dead_letters("machinery_tasks", 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    running.shutdown(Duration::from_secs(5)).await.unwrap();
}

static COUNTED_RUNS: AtomicUsize = AtomicUsize::new(0);

/// Counts its runs, sleeps `ms`, returns `a`.
#[task]
async fn dl_counted(a: i64, ms: i64) -> Result<i64, TaskError> {
    COUNTED_RUNS.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(ms.max(0) as u64)).await;
    Ok(a)
}

/// A task id that names a list (created here), so that Redis refuses to store a state there
/// (`WRONGTYPE`), every time.
async fn id_naming_a_list(names: &Names, conn: &mut redis::aio::MultiplexedConnection) -> String {
    let victim = format!("{}_victim", names.id);
    let _: () = conn.rpush(&victim, "x").await.unwrap();
    victim
}

/// Up to ten dead letters of `queue`.
async fn dead_letters(server: &Server, queue: &str) -> Vec<machinery::broker::DeadLetter> {
    server
        .broker()
        .inspect()
        .unwrap()
        .dead_letters(queue, 10)
        .await
        .unwrap()
}

/// A valid message of `task(a)` with id `uuid`, as a Go sender writes it onto the queue list.
fn go_message(task: &str, uuid: &str, a: i64) -> Vec<u8> {
    Signature::with_args(
        task,
        vec![machinery::Arg::new("", "int64", serde_json::json!(a))],
    )
    .with_uuid(uuid)
    .to_json()
    .unwrap()
}

/// The task's id comes to name a list while it runs (its STARTED was stored): Redis refuses its final
/// state (`WRONGTYPE`), and the message is dead-lettered rather than run again for ever.
#[tokio::test]
async fn a_final_state_redis_refuses_dead_letters_the_task_instead_of_running_it_again() {
    if !require(
        Service::Redis,
        "a_final_state_redis_refuses_dead_letters_the_task_instead_of_running_it_again",
    ) {
        return;
    }
    let names = Names::new("dl_wrongtype");
    let mut conn = raw().await;
    let victim = format!("{}_victim", names.id);
    let server = Server::new(names.config()).await.unwrap();
    let running = Worker::new(&server)
        .register(dl_counted::task())
        .start()
        .await
        .unwrap();
    server
        .send(dl_counted::signature(5, 600).with_uuid(&victim))
        .await
        .unwrap();
    let started = eventually(PROMPTLY, || async {
        server
            .backend()
            .get_state(&victim)
            .await
            .is_ok_and(|s| s.is_some_and(|s| s.state == machinery::State::Started))
    })
    .await;
    assert!(started, "the task starts");
    let _: () = conn.del(&victim).await.unwrap();
    let _: () = conn.rpush(&victim, "x").await.unwrap();

    let inspect = server.broker();
    let dead_lettered = eventually(PROMPTLY, || async {
        let dead = dead_letters(&server, &names.queue).await;
        dead.len() == 1
    })
    .await;
    assert!(
        dead_lettered,
        "the task is dead-lettered within {PROMPTLY:?}"
    );
    let dead = dead_letters(&server, &names.queue).await;
    assert!(
        dead[0].reason.contains("final state cannot be stored")
            && dead[0].reason.contains("WRONGTYPE"),
        "the reason names the refusal: {}",
        dead[0].reason
    );
    assert_eq!(
        Signature::from_json(&dead[0].body).unwrap().uuid,
        victim,
        "the dead letter is the task's message"
    );
    // Nothing is left to run it again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = inspect
        .inspect()
        .unwrap()
        .queue_stats(&names.queue)
        .await
        .unwrap();
    assert_eq!((stats.pending, stats.in_flight), (0, Some(0)));
    assert_eq!(COUNTED_RUNS.load(Ordering::SeqCst), 1, "the task ran once");
    // The worker goes on serving.
    let normal = dl_counted::send(&server, 9, 0).await.unwrap();
    assert_eq!(normal.get(PROMPTLY).await.unwrap(), 9);
    assert_eq!(COUNTED_RUNS.load(Ordering::SeqCst), 2);
    let kept: Vec<String> = conn.lrange(&victim, 0, -1).await.unwrap();
    assert_eq!(kept, ["x"], "the list the id names is untouched");
    running.shutdown(Duration::from_secs(5)).await.unwrap();
    names.cleanup().await;
}

/// A task whose state Redis refuses (its id names a list) is dead-lettered alone, without running (its
/// outcome could not be stored either): the tasks fetched and started in the same batch run and store
/// their results.
#[tokio::test]
async fn a_refused_state_dead_letters_only_its_own_task_not_its_batch() {
    if !require(
        Service::Redis,
        "a_refused_state_dead_letters_only_its_own_task_not_its_batch",
    ) {
        return;
    }
    let names = Names::new("dl_batch");
    let mut conn = raw().await;
    let victim = id_naming_a_list(&names, &mut conn).await;
    let server = Server::new(names.config()).await.unwrap();
    let message = |uuid: &str, a: i64| go_message("dl_known", uuid, a);
    let good = [format!("{}_a", names.id), format!("{}_b", names.id)];
    // One push before the worker starts: its first fetch takes all three into one batch.
    let bodies = vec![
        message(&good[0], 1),
        message(&victim, 2),
        message(&good[1], 3),
    ];
    let _: () = conn.rpush(&names.queue, bodies).await.unwrap();
    let running = Worker::new(&server)
        .register(dl_known::task())
        .concurrency(10)
        .start()
        .await
        .unwrap();
    let inspect = server.broker();
    let settled = eventually(PROMPTLY, || async {
        let dead = dead_letters(&server, &names.queue).await;
        let stats = inspect
            .inspect()
            .unwrap()
            .queue_stats(&names.queue)
            .await
            .unwrap();
        !dead.is_empty() && (stats.pending, stats.in_flight) == (0, Some(0))
    })
    .await;
    assert!(settled, "the batch is settled within {PROMPTLY:?}");
    let dead = dead_letters(&server, &names.queue).await;
    let dead_ids: Vec<String> = dead
        .iter()
        .map(|d| Signature::from_json(&d.body).unwrap().uuid.clone())
        .collect();
    assert_eq!(dead_ids, [victim], "only the refused task is dead-lettered");
    assert!(
        dead[0].reason.starts_with("the task's state cannot be stored") // refused at its start
            && dead[0].reason.contains("WRONGTYPE"),
        "{}",
        dead[0].reason
    );
    for uuid in &good {
        let state = server.backend().get_state(uuid).await.unwrap();
        assert_eq!(
            state.map(|s| s.state),
            Some(machinery::State::Success),
            "task {uuid} of the same batch ran and stored its result"
        );
    }
    running.shutdown(Duration::from_secs(5)).await.unwrap();
    let _: () = conn.del(&good).await.unwrap();
    names.cleanup().await;
}
