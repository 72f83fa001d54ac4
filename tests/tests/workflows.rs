//! Workflows and task control, on every broker/backend setup of this build: groups, chords and chains
//! (typed, and in Go's wire form), retries and back-off, ETAs, time limits, revocation and hooks.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use machinery::args::encode_arg;
use machinery::broker::Outgoing;
use machinery::retry::Fixed;
use machinery::{
    task, Chain, Chord, Group, ResultError, Server, Signature, State, TaskContext, TaskError,
    Worker,
};
use machinery_tests::setups::Setup;

#[task(variadic)]
async fn add(args: Vec<i64>) -> Result<i64, TaskError> {
    Ok(args.iter().sum())
}

#[task(variadic)]
async fn multiply(args: Vec<i64>) -> Result<i64, TaskError> {
    Ok(args.iter().product())
}

#[task]
async fn add2(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

#[task]
async fn times(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a * b)
}

#[task]
async fn sum(xs: Vec<i64>) -> Result<i64, TaskError> {
    Ok(xs.iter().sum())
}

#[task]
async fn fail_if_negative(x: i64) -> Result<i64, TaskError> {
    if x < 0 {
        return Err(TaskError::new(format!("{x} is negative")));
    }
    Ok(x)
}

#[task]
async fn echo(text: String) -> Result<String, TaskError> {
    Ok(text)
}

/// Records what the chord error callbacks receive, keyed by a test-chosen marker.
static ERRORS_SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());

#[task]
async fn record_error(error: String, marker: String) -> Result<(), TaskError> {
    ERRORS_SEEN
        .lock()
        .unwrap()
        .push(format!("{marker}: {error}"));
    Ok(())
}

/// Counts calls per marker, to prove what ran (or did not).
static CALLS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn calls_of(marker: &str) -> usize {
    CALLS
        .lock()
        .unwrap()
        .iter()
        .filter(|m| m.as_str() == marker)
        .count()
}

#[task]
async fn count_call(marker: String) -> Result<String, TaskError> {
    CALLS.lock().unwrap().push(marker.clone());
    Ok(marker)
}

#[task]
async fn retry_twice_via_context(ctx: &TaskContext, marker: String) -> Result<u32, TaskError> {
    CALLS.lock().unwrap().push(marker.clone());
    if calls_of(&marker) < 3 {
        return Err(ctx.retry_after(Duration::from_millis(100)));
    }
    Ok(ctx.retry_count())
}

const QUICK: Fixed = Fixed(Duration::from_millis(50));

#[task(backoff = QUICK)]
async fn always_fails(marker: String) -> Result<(), TaskError> {
    CALLS.lock().unwrap().push(marker.clone());
    Err(TaskError::new("always"))
}

#[task]
async fn sleep_ms(ms: u64) -> Result<u64, TaskError> {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(ms)
}

#[task]
async fn now_ms() -> Result<i64, TaskError> {
    Ok(chrono::Utc::now().timestamp_millis())
}

async fn worker(server: &Server) -> machinery::RunningWorker {
    Worker::auto(server)
        .concurrency(8)
        .start()
        .await
        .expect("worker starts")
}

fn marker(name: &str) -> String {
    machinery_tests::unique(name)
}

async fn group_results_come_back_in_group_order(server: &Server, setup: Setup) {
    let running = worker(server).await;
    let group = Group::new([
        add2::signature(1, 1),
        add2::signature(2, 2),
        add2::signature(5, 6),
    ]);
    let result = server.send_group(group).await.unwrap();
    assert_eq!(result.members().len(), 3);
    assert_eq!(result.get(setup.timeout()).await.unwrap(), vec![2, 4, 11]);
    running.shutdown(setup.timeout()).await.unwrap();
}

async fn a_failed_group_member_is_named_in_the_error(server: &Server, setup: Setup) {
    let running = worker(server).await;
    let group = Group::new([
        fail_if_negative::signature(1),
        fail_if_negative::signature(-7),
    ]);
    let result = server.send_group(group).await.unwrap();
    let err = result.get(setup.timeout()).await.unwrap_err();
    match &err {
        ResultError::GroupMember { index, source, .. } => {
            assert_eq!(*index, 1);
            assert!(
                matches!(**source, ResultError::Failed { ref task, ref error, .. } if task == "fail_if_negative" && error == "-7 is negative"),
                "{source}"
            );
        }
        other => panic!("expected a group member error, got {other}"),
    }
    assert!(
        err.to_string()
            .contains(&result.members()[1].uuid().to_string()),
        "{err}"
    );
    running.shutdown(setup.timeout()).await.unwrap();
}

async fn a_chord_collects_member_results_in_order(server: &Server, setup: Setup) {
    let running = worker(server).await;
    let group = Group::new([
        add2::signature(1, 1),
        add2::signature(2, 2),
        add2::signature(5, 6),
    ]);
    let result = server
        .send_chord(Chord::new(group, sum::partial()))
        .await
        .unwrap();
    assert_eq!(result.get(setup.timeout()).await.unwrap(), 17);
    // Go's example chord: variadic multiply gets one scalar argument per member.
    let group = Group::new([
        add::signature(vec![1, 1]),
        add::signature(vec![2, 2]),
        add::signature(vec![5, 6]),
    ]);
    let result = server
        .send_chord(Chord::new(group, multiply::partial()))
        .await
        .unwrap();
    assert_eq!(result.get(setup.timeout()).await.unwrap(), 88);
    running.shutdown(setup.timeout()).await.unwrap();
}

async fn a_chord_with_a_failed_member_reports_it_and_runs_its_error_callback(
    server: &Server,
    setup: Setup,
) {
    let running = worker(server).await;
    let marker = marker("chord_error");
    let group = Group::new([
        fail_if_negative::signature(3),
        fail_if_negative::signature(-1),
    ]);
    // `record_error(error, marker)`: like Go's OnError callbacks it gets the error text prepended, so the
    // message carries only the marker.
    let on_error =
        Signature::with_args("record_error", vec![encode_arg("marker", &marker).unwrap()]);
    let chord = Chord::new(group, sum::partial()).on_error(on_error);
    let started = Instant::now();
    let result = server.send_chord(chord).await.unwrap();
    let err = result.get(setup.timeout()).await.unwrap_err();
    assert!(
        started.elapsed() < setup.timeout(),
        "the caller must not wait for the timeout"
    );
    let text = err.to_string();
    assert!(text.contains("not run: group member 1"), "{text}");
    assert!(text.contains("-1 is negative"), "{text}");
    let seen = machinery_tests::eventually(setup.timeout(), || {
        let marker = marker.clone();
        async move {
            ERRORS_SEEN
                .lock()
                .unwrap()
                .iter()
                .any(|e| e.starts_with(&marker))
        }
    })
    .await;
    assert!(seen, "the chord's error callback did not run");
    running.shutdown(setup.timeout()).await.unwrap();
}

async fn a_chain_feeds_each_output_to_the_next_step(server: &Server, setup: Setup) {
    let running = worker(server).await;
    let chain = Chain::new(add2::signature(1, 1))
        .then(add2::partial(5))
        .then(times::partial(4));
    let result = server.send_chain(chain).await.unwrap();
    assert_eq!(result.get(setup.timeout()).await.unwrap(), 28);
    // Go's example chain through variadic tasks: (((1 + 1) + (2 + 2)) + (5 + 6)) * 4.
    let chain = Chain::new(add::signature(vec![1, 1]))
        .then(add::partial_with(vec![2, 2]))
        .then(add::partial_with(vec![5, 6]))
        .then(multiply::partial_with(vec![4]));
    assert_eq!(
        server
            .send_chain(chain)
            .await
            .unwrap()
            .get(setup.timeout())
            .await
            .unwrap(),
        68
    );
    running.shutdown(setup.timeout()).await.unwrap();
}

async fn a_complete_signature_in_a_chain_takes_no_previous_result(server: &Server, setup: Setup) {
    let running = worker(server).await;
    let chain = Chain::new(add2::signature(1, 1))
        .then(times::signature(3, 3))
        .then(add2::partial(1));
    assert_eq!(
        server
            .send_chain(chain)
            .await
            .unwrap()
            .get(setup.timeout())
            .await
            .unwrap(),
        10
    );
    running.shutdown(setup.timeout()).await.unwrap();
}

async fn a_failed_chain_step_stops_the_chain_and_is_named(server: &Server, setup: Setup) {
    let running = worker(server).await;
    let chain = Chain::new(fail_if_negative::signature(-2)).then(add2::partial(1));
    let err = server
        .send_chain(chain)
        .await
        .unwrap()
        .get(setup.timeout())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ResultError::ChainStep { index: 0, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("-2 is negative"), "{err}");
    running.shutdown(setup.timeout()).await.unwrap();
}

/// The first message of Go's example chain, exactly as a Go client publishes it (fixture), with fresh ids.
async fn a_go_style_chain_runs_on_our_worker(server: &Server, setup: Setup) {
    let running = worker(server).await;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/go/signature_chain.json"
    );
    let mut body = String::from_utf8(std::fs::read(path).unwrap()).unwrap();
    let ids = [
        "task_df5d794a-6b32-41bb-81f3-fdde1d742539",
        "task_68fb3609-a739-44a2-9a2a-a8677ccd0ce7",
        "task_dace2095-f214-450c-8fdf-9aa65160e62c",
        "task_c5006a0f-2875-410d-a953-e89354437e63",
    ];
    let fresh: Vec<String> = ids
        .iter()
        .map(|_| machinery::signature::new_task_uuid())
        .collect();
    for (old, new) in ids.iter().zip(&fresh) {
        body = body.replace(old, new);
    }
    let queue = server.broker().route("");
    body = body.replace(
        "\"RoutingKey\":\"ref_q\"",
        &format!("\"RoutingKey\":\"{queue}\""),
    );
    let sig = Signature::from_json(body.as_bytes()).unwrap();
    server
        .broker()
        .publish(Outgoing {
            uuid: &sig.uuid,
            name: &sig.name,
            routing_key: &queue,
            body: body.into_bytes(),
            eta: None,
            priority: 0,
            headers: Default::default(),
        })
        .await
        .unwrap();
    let last = server.result::<i64>(fresh[3].clone());
    assert_eq!(last.get(setup.timeout()).await.unwrap(), 68);
    running.shutdown(setup.timeout()).await.unwrap();
}

async fn a_retry_requested_through_the_context_counts_against_retry_count(
    server: &Server,
    setup: Setup,
) {
    let running = worker(server).await;
    let marker = marker("ctx_retry");
    let ok = server
        .send(retry_twice_via_context::signature(marker.clone()).retries(5))
        .await
        .unwrap();
    assert_eq!(
        ok.get(setup.timeout()).await.unwrap(),
        3,
        "two of five retries used"
    );
    assert_eq!(calls_of(&marker), 3);

    let limited = marker + "_limited";
    let r = server
        .send(retry_twice_via_context::signature(limited.clone()).retries(1))
        .await
        .unwrap();
    let state = r.wait(setup.timeout()).await.unwrap();
    assert_eq!(
        state.state,
        State::Failure,
        "unlike Go, a requested retry does not go on forever"
    );
    assert_eq!(calls_of(&limited), 2);
    running.shutdown(setup.timeout()).await.unwrap();
}

async fn a_custom_back_off_sets_the_retry_delay(server: &Server, setup: Setup) {
    let running = worker(server).await;
    let marker = marker("backoff");
    let started = Instant::now();
    let r = server
        .send(always_fails::signature(marker.clone()).retries(3))
        .await
        .unwrap();
    let state = r.wait(setup.timeout()).await.unwrap();
    assert_eq!(
        (state.state, state.error.as_str()),
        (State::Failure, "always")
    );
    assert_eq!(calls_of(&marker), 4);
    // Go's Fibonacci back-off would take 1 + 2 + 3 = 6 s; the fixed 50 ms strategy far less.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    running.shutdown(setup.timeout()).await.unwrap();
}

async fn a_task_with_an_eta_does_not_run_early(server: &Server, setup: Setup) {
    let running = worker(server).await;
    let sent_at = chrono::Utc::now();
    let r = server
        .send(now_ms::signature().countdown(Duration::from_millis(1500)))
        .await
        .unwrap();
    let ran_at = r.get(setup.timeout()).await.unwrap();
    let early_ms = 1500 - (ran_at - sent_at.timestamp_millis());
    assert!(early_ms <= 20, "ran {early_ms} ms before its ETA");
    let eta = chrono::Utc::now() + chrono::Duration::milliseconds(800);
    let r = server.send(now_ms::signature().eta(eta)).await.unwrap();
    assert!(r.get(setup.timeout()).await.unwrap() >= eta.timestamp_millis() - 20);
    running.shutdown(setup.timeout()).await.unwrap();
}

async fn a_per_message_time_limit_cancels_the_run(server: &Server, setup: Setup) {
    let running = worker(server).await;
    let r = server
        .send(sleep_ms::signature(60_000).timeout(Duration::from_millis(200)))
        .await
        .unwrap();
    let state = r.wait(setup.timeout()).await.unwrap();
    assert_eq!(state.state, State::Failure);
    assert!(
        state.error.contains("exceeded its time limit of 200ms"),
        "{}",
        state.error
    );
    assert_eq!(
        sleep_ms::send(server, 1)
            .await
            .unwrap()
            .get(setup.timeout())
            .await
            .unwrap(),
        1
    );
    running.shutdown(setup.timeout()).await.unwrap();
}

async fn a_revoked_task_never_runs(server: &Server, setup: Setup) {
    let running = worker(server).await;
    let marker = marker("revoked");
    let r = server
        .send(count_call::signature(marker.clone()).countdown(Duration::from_millis(700)))
        .await
        .unwrap();
    server.revoke(r.uuid()).await.unwrap();
    let err = r.get(setup.timeout()).await.unwrap_err();
    assert!(err.to_string().contains("revoked"), "{err}");
    // After its ETA a worker receives it, and acknowledges it without running it. Proving that it did not
    // run needs time: wait well past the ETA, then for the queue to be empty.
    tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_millis(700 + 1500)).await;
    let queue = server.broker().route("");
    let settled = machinery_tests::eventually(setup.timeout(), || async {
        let stats = server
            .broker()
            .inspect()
            .unwrap()
            .queue_stats(&queue)
            .await
            .unwrap();
        stats.pending == 0 && stats.in_flight.unwrap_or(0) == 0
    })
    .await;
    assert!(settled, "the revoked message is still queued");
    assert_eq!(calls_of(&marker), 0);
    let state = r.state().await.unwrap().unwrap();
    assert!(state.is_revoked(), "{state:?}");
    running.shutdown(setup.timeout()).await.unwrap();
}

async fn hooks_see_every_task(server: &Server, setup: Setup) {
    let pre = Arc::new(AtomicUsize::new(0));
    let post = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let (pre2, post2, errors2) = (pre.clone(), post.clone(), errors.clone());
    let running = Worker::auto(server)
        .pre_task_handler(move |_| {
            pre2.fetch_add(1, Ordering::SeqCst);
        })
        .post_task_handler(move |sig, state| {
            post2
                .lock()
                .unwrap()
                .push((sig.name.clone(), state.state.clone()))
        })
        .error_handler(move |e| errors2.lock().unwrap().push(e.to_string()))
        .start()
        .await
        .unwrap();
    echo::send(server, "hi")
        .await
        .unwrap()
        .get(setup.timeout())
        .await
        .unwrap();
    let _ = fail_if_negative::send(server, -5)
        .await
        .unwrap()
        .get(setup.timeout())
        .await;
    running.shutdown(setup.timeout()).await.unwrap();
    assert_eq!(pre.load(Ordering::SeqCst), 2);
    let post = post.lock().unwrap().clone();
    assert!(
        post.contains(&("echo".to_string(), State::Success)),
        "{post:?}"
    );
    assert!(
        post.contains(&("fail_if_negative".to_string(), State::Failure)),
        "{post:?}"
    );
    assert_eq!(errors.lock().unwrap().as_slice(), ["-5 is negative"]);
}

async fn a_periodic_task_fires_on_its_schedule(server: &Server, setup: Setup) {
    let running = worker(server).await;
    let marker = marker("periodic");
    let periodic = server
        .register_periodic("@every 1s", &marker, count_call::signature(marker.clone()))
        .unwrap();
    let fired =
        machinery_tests::eventually(Duration::from_secs(5), || async { calls_of(&marker) >= 2 })
            .await;
    assert!(fired, "fired {} times in 5 s", calls_of(&marker));
    periodic.stop();
    running.shutdown(setup.timeout()).await.unwrap();
}

macro_rules! on_setup {
    ($module:ident, $setup:expr, [$($name:ident),* $(,)?]) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(server) = $setup.server(stringify!($name)).await {
                        super::$name(&server, $setup).await;
                    }
                }
            )*
        }
    };
}

macro_rules! on_every_setup {
    ($($name:ident),* $(,)?) => {
        on_setup!(memory, machinery_tests::setups::Setup::Memory, [$($name),*]);
        on_setup!(redis, machinery_tests::setups::Setup::Redis, [$($name),*]);
        on_setup!(memory_memcache, machinery_tests::setups::Setup::MemoryMemcache, [$($name),*]);
        on_setup!(redis_memcache, machinery_tests::setups::Setup::RedisMemcache, [$($name),*]);
        on_setup!(amqp, machinery_tests::setups::Setup::Amqp, [$($name),*]);
        on_setup!(amqp_redis, machinery_tests::setups::Setup::AmqpRedis, [$($name),*]);
        on_setup!(amqp_memcache, machinery_tests::setups::Setup::AmqpMemcache, [$($name),*]);
        on_setup!(redis_tls, machinery_tests::setups::Setup::RedisTls, [$($name),*]);
        on_setup!(amqp_tls, machinery_tests::setups::Setup::AmqpTls, [$($name),*]);
        on_setup!(redis_cluster, machinery_tests::setups::Setup::RedisCluster, [$($name),*]);
        on_setup!(redis_sentinel, machinery_tests::setups::Setup::RedisSentinel, [$($name),*]);
        on_setup!(amqp_cluster, machinery_tests::setups::Setup::AmqpCluster, [$($name),*]);
    };
}

on_every_setup!(
    group_results_come_back_in_group_order,
    a_failed_group_member_is_named_in_the_error,
    a_chord_collects_member_results_in_order,
    a_chord_with_a_failed_member_reports_it_and_runs_its_error_callback,
    a_chain_feeds_each_output_to_the_next_step,
    a_complete_signature_in_a_chain_takes_no_previous_result,
    a_failed_chain_step_stops_the_chain_and_is_named,
    a_go_style_chain_runs_on_our_worker,
    a_retry_requested_through_the_context_counts_against_retry_count,
    a_custom_back_off_sets_the_retry_delay,
    a_task_with_an_eta_does_not_run_early,
    a_per_message_time_limit_cancels_the_run,
    a_revoked_task_never_runs,
    hooks_see_every_task,
    a_periodic_task_fires_on_its_schedule,
);
