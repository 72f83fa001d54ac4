//! `#[task]` functions served by a worker over the Redis broker and backend: typed sends and results,
//! several workers sharing one queue without running a task twice, and a Go-written message next to ours.

mod redis_common;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use machinery::{task, Server, TaskContext, TaskError, Worker};
use machinery_tests::{eventually, require, Service};
use redis::AsyncCommands as _;
use redis_common::{queue_counts, raw, Names};

#[task]
async fn add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

#[task]
async fn shout(text: String) -> Result<String, TaskError> {
    Ok(text.to_uppercase())
}

#[task]
async fn reverse_bytes(bytes: Vec<u8>) -> Result<Vec<u8>, TaskError> {
    Ok(bytes.into_iter().rev().collect())
}

#[task]
async fn nap(ms: u64) -> Result<u64, TaskError> {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(ms)
}

/// How often each task id ran, per test (tests run in parallel in one process).
static RUNS: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);

#[task]
async fn count_run(ctx: &TaskContext, n: i64) -> Result<i64, TaskError> {
    let mut runs = RUNS.lock().unwrap_or_else(|p| p.into_inner());
    *runs
        .get_or_insert_with(HashMap::new)
        .entry(ctx.uuid().to_owned())
        .or_default() += 1;
    Ok(n)
}

#[tokio::test]
async fn typed_tasks_round_trip_over_redis() {
    if !require(Service::Redis, "typed_tasks_round_trip_over_redis") {
        return;
    }
    let names = Names::new("rw_typed");
    let server = Server::new(names.config()).await.unwrap();
    let running = Worker::new(&server)
        .register(add::task())
        .register(shout::task())
        .register(reverse_bytes::task())
        .concurrency(4)
        .start()
        .await
        .unwrap();
    let timeout = Duration::from_secs(10);
    let sum = add::send(&server, 40, 2).await.unwrap();
    let mut ids = vec![sum.uuid().to_owned()];
    assert_eq!(sum.get(timeout).await.unwrap(), 42);
    let text = shout::send(&server, "hi").await.unwrap();
    ids.push(text.uuid().to_owned());
    assert_eq!(text.get(timeout).await.unwrap(), "HI");
    let bytes = reverse_bytes::send(&server, vec![1u8, 2, 3]).await.unwrap();
    let uuid = bytes.uuid().to_owned();
    assert_eq!(bytes.get(timeout).await.unwrap(), vec![3u8, 2, 1]);
    // Stored as Go stores a []byte result: type tag []uint8, base64 value.
    let mut conn = raw().await;
    let stored: String = conn.get(&uuid).await.unwrap();
    assert!(
        stored.contains(r#""Results":[{"Type":"[]uint8","Value":"AwIB"}]"#),
        "{stored}"
    );
    running.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(queue_counts(&server, &names.queue).await, (0, Some(0)));
    ids.push(uuid);
    let _: () = conn.del(ids).await.unwrap();
    names.cleanup().await;
}

#[tokio::test]
async fn three_workers_share_a_queue_and_run_each_task_once() {
    if !require(
        Service::Redis,
        "three_workers_share_a_queue_and_run_each_task_once",
    ) {
        return;
    }
    let names = Names::new("rw_share");
    let mut workers = Vec::new();
    for _ in 0..3 {
        let server = Server::new(names.config()).await.unwrap();
        workers.push(
            Worker::new(&server)
                .register(count_run::task())
                .concurrency(5)
                .start()
                .await
                .unwrap(),
        );
    }
    let sender = Server::new(names.config()).await.unwrap();
    let mut results = Vec::new();
    for n in 0..300 {
        results.push(count_run::send(&sender, n).await.unwrap());
    }
    let mut ids = Vec::new();
    for (n, result) in results.into_iter().enumerate() {
        ids.push(result.uuid().to_owned());
        assert_eq!(result.get(Duration::from_secs(20)).await.unwrap(), n as i64);
    }
    for worker in workers {
        worker.shutdown(Duration::from_secs(5)).await.unwrap();
    }
    let runs = RUNS.lock().unwrap().clone().unwrap_or_default();
    for id in &ids {
        assert_eq!(runs.get(id), Some(&1), "task {id} ran once");
    }
    let mut conn = raw().await;
    for id in &ids {
        let _: () = conn.del(id).await.unwrap();
    }
    names.cleanup().await;
}

#[tokio::test]
async fn a_message_written_by_a_go_sender_runs_on_our_worker() {
    if !require(
        Service::Redis,
        "a_message_written_by_a_go_sender_runs_on_our_worker",
    ) {
        return;
    }
    let names = Names::new("rw_gosend");
    let server = Server::new(names.config()).await.unwrap();
    let running = Worker::new(&server)
        .register(add::task())
        .start()
        .await
        .unwrap();
    // Go's SendTask: SET <uuid> PENDING, then RPUSH the Signature (bytes of tests/fixtures/go, add(40, 2)).
    let path =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/go/signature_add.json");
    let body = std::fs::read_to_string(path).unwrap();
    let value: serde_json::Value = serde_json::from_str(&body).unwrap();
    let go_uuid = value["UUID"].as_str().unwrap();
    let uuid = names.task("go");
    let body = body.trim_end().replace(go_uuid, &uuid).replace(
        "\"RoutingKey\":\"wire_q\"",
        &format!("\"RoutingKey\":\"{}\"", names.queue),
    );
    let mut conn = raw().await;
    let _: () = conn.rpush(&names.queue, &body).await.unwrap();
    let result = server.result::<i64>(&uuid);
    assert_eq!(result.get(Duration::from_secs(10)).await.unwrap(), 42);
    running.shutdown(Duration::from_secs(5)).await.unwrap();
    names.cleanup().await;
}

/// When the server forgets its scripts (`SCRIPT FLUSH`, as after a restart) while a worker drains at
/// concurrency 50, every fetch, state write and acknowledgement refused with `NOSCRIPT` goes again once
/// the scripts are loaded: every task's result is stored, nothing stays in flight, and no task runs twice.
#[tokio::test]
async fn a_script_flush_during_a_drain_loses_no_acknowledgement() {
    if !require(
        Service::Redis,
        "a_script_flush_during_a_drain_loses_no_acknowledgement",
    ) {
        return;
    }
    let names = Names::new("rw_flush");
    let server = Server::new(names.config()).await.unwrap();
    let mut results = Vec::new();
    for n in 0..600 {
        results.push(count_run::send(&server, n).await.unwrap());
    }
    let running = Worker::new(&server)
        .register(count_run::task())
        .concurrency(50)
        .start()
        .await
        .unwrap();
    let mut conn = raw().await;
    for _ in 0..10 {
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut ids = Vec::new();
    for (n, result) in results.into_iter().enumerate() {
        ids.push(result.uuid().to_owned());
        assert_eq!(result.get(Duration::from_secs(20)).await.unwrap(), n as i64);
    }
    running.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(queue_counts(&server, &names.queue).await, (0, Some(0)));
    let runs = RUNS.lock().unwrap().clone().unwrap_or_default();
    for id in &ids {
        assert_eq!(runs.get(id), Some(&1), "task {id} ran once");
    }
    let _: () = conn.del(&ids).await.unwrap();
    names.cleanup().await;
}

/// A worker holds a few messages fetched ahead of its free slots (in its in-flight list, so a crash
/// hands them back like the running ones); when it stops, those go back to the queue unrun at once,
/// and only the tasks that were running finish.
/// The ids of `nap_noted` tasks whose handler has returned (tests run in parallel in one process; ids
/// are unique).
static RETURNED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

#[task]
async fn nap_noted(ctx: &TaskContext, ms: u64) -> Result<u64, TaskError> {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    RETURNED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashSet::new)
        .insert(ctx.uuid().to_owned());
    Ok(ms)
}

/// With `fetch_ahead(0)` a worker holds no message it has no free slot for (a worker of long tasks
/// sharing a queue leaves the rest to the others). A message whose handler has returned gives its slot
/// to the next one while its state is stored and it is acknowledged, so the in-flight list may briefly
/// hold it beside two new ones: what is counted is the messages there whose handler has not returned
/// (waiting or running). The list is read before the set of returned ones, so a handler that returns in
/// between is not counted against the worker.
#[tokio::test]
async fn without_fetch_ahead_a_worker_takes_no_more_messages_than_it_has_free_slots() {
    if !require(
        Service::Redis,
        "without_fetch_ahead_a_worker_takes_no_more_messages_than_it_has_free_slots",
    ) {
        return;
    }
    let names = Names::new("rw_no_ahead");
    let server = Server::new(names.config()).await.unwrap();
    for _ in 0..8 {
        nap_noted::send(&server, 60).await.unwrap();
    }
    let running = Worker::new(&server)
        .register(nap_noted::task())
        .concurrency(2)
        .fetch_ahead(0)
        .start()
        .await
        .unwrap();
    // Go's Redis worker pops up to 2 x concurrency + 1 messages ahead; ours, told so, one per free slot.
    let mut conn = raw().await;
    let inflight_keys = format!("machinery:inflight:{}:*", names.queue);
    let (mut most, mut samples) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut held = Vec::new();
        let keys: Vec<String> = conn.keys(&inflight_keys).await.unwrap();
        for key in keys {
            let bodies: Vec<Vec<u8>> = conn.lrange(&key, 0, -1).await.unwrap();
            for body in bodies {
                let message: serde_json::Value = serde_json::from_slice(&body).unwrap();
                held.push(message["UUID"].as_str().unwrap().to_owned());
            }
        }
        let unreturned = {
            let returned = RETURNED.lock().unwrap_or_else(|p| p.into_inner());
            let returned = returned.as_ref();
            held.iter()
                .filter(|id| !returned.is_some_and(|set| set.contains(*id)))
                .count()
        };
        assert!(
            unreturned <= 2,
            "{unreturned} messages waiting or running with concurrency 2 (in flight: {held:?})"
        );
        most = most.max(unreturned);
        samples += 1;
        let (queued, in_flight) = queue_counts(&server, &names.queue).await;
        if queued == 0 && in_flight == Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "tasks did not finish");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        samples > 10,
        "the in-flight list was sampled while the tasks ran ({samples} samples)"
    );
    assert_eq!(most, 2, "both slots were used");
    running.shutdown(Duration::from_secs(5)).await.unwrap();
    names.cleanup().await;
}

#[tokio::test]
async fn a_stopping_worker_returns_the_messages_it_fetched_ahead() {
    if !require(
        Service::Redis,
        "a_stopping_worker_returns_the_messages_it_fetched_ahead",
    ) {
        return;
    }
    holds_ahead_and_returns_them("rw_ahead", 6, Some(2), 2).await;
}

/// Unless told otherwise, a worker fetches twice its concurrency ahead (three times its concurrency
/// held in all): at concurrency 2, four messages wait beside the two running.
#[tokio::test]
async fn a_worker_fetches_twice_its_concurrency_ahead_by_default() {
    if !require(
        Service::Redis,
        "a_worker_fetches_twice_its_concurrency_ahead_by_default",
    ) {
        return;
    }
    holds_ahead_and_returns_them("rw_ahead_default", 10, None, 4).await;
}

/// The worker tops its buffer up while its tasks run, instead of waiting for it to empty and a slot to
/// free: at concurrency 1 with 2 fetched ahead, it holds 3 messages all along (one running, two waiting).
#[tokio::test]
async fn a_worker_refills_what_it_fetched_ahead_while_its_tasks_run() {
    if !require(
        Service::Redis,
        "a_worker_refills_what_it_fetched_ahead_while_its_tasks_run",
    ) {
        return;
    }
    let names = Names::new("rw_refill");
    let server = Server::new(names.config()).await.unwrap();
    let mut results = Vec::new();
    for _ in 0..8 {
        results.push(nap::send(&server, 400).await.unwrap());
    }
    let running = Worker::new(&server)
        .register(nap::task())
        .concurrency(1)
        .fetch_ahead(2)
        .start()
        .await
        .unwrap();
    // Two tasks done (about 0.8 s in), the third running.
    assert!(
        eventually(Duration::from_secs(5), || async {
            succeeded(&server, &results).await >= 2
        })
        .await,
        "two tasks finish"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Without refilling, the buffer would be empty now (one message in flight, five queued) until the
    // third task ends.
    assert_eq!(
        (
            succeeded(&server, &results).await,
            queue_counts(&server, &names.queue).await
        ),
        (2, (3, Some(3))),
        "(tasks done, (queued, in flight)): one running and two waiting, fetched while the tasks ran"
    );
    running.shutdown(Duration::from_secs(5)).await.unwrap();
    names.cleanup().await;
}

/// Queues `tasks` slow tasks, starts a worker at concurrency 2 (with `fetch_ahead` if given), checks that
/// it holds the two running and `ahead` more, stops it, and checks that everything but the two running
/// went back to the queue and that only those two ran.
async fn holds_ahead_and_returns_them(
    prefix: &str,
    tasks: u64,
    fetch_ahead: Option<usize>,
    ahead: u64,
) {
    let names = Names::new(prefix);
    let server = Server::new(names.config()).await.unwrap();
    let mut results = Vec::new();
    for _ in 0..tasks {
        results.push(nap::send(&server, 600).await.unwrap());
    }
    let mut worker = Worker::new(&server).register(nap::task()).concurrency(2);
    if let Some(messages) = fetch_ahead {
        worker = worker.fetch_ahead(messages);
    }
    let running = worker.start().await.unwrap();
    let held = 2 + ahead;
    let expected = (tasks - held, Some(held));
    let holding = eventually(Duration::from_secs(5), || async {
        queue_counts(&server, &names.queue).await == expected
    })
    .await;
    assert!(
        holding,
        "two running and {ahead} fetched ahead of {tasks}: (queued, in flight) = {:?}",
        queue_counts(&server, &names.queue).await
    );
    running.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        queue_counts(&server, &names.queue).await,
        (tasks - 2, Some(0))
    );
    assert_eq!(
        succeeded(&server, &results).await,
        2,
        "only the two running tasks ran"
    );
    names.cleanup().await;
}

/// How many of `results` have SUCCESS stored.
async fn succeeded<T>(server: &Server, results: &[machinery::AsyncResult<T>]) -> usize {
    let mut done = 0;
    for result in results {
        let state = server.backend().get_state(result.uuid()).await.unwrap();
        if state.is_some_and(|s| s.state == machinery::State::Success) {
            done += 1;
        }
    }
    done
}
