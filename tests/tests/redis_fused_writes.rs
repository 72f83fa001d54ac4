//! A Redis broker paired with a Redis backend on one database writes a send's PENDING with its publish,
//! and a finished task's SUCCESS with its acknowledgement (one round trip each); paired with any other
//! backend it says so, and the sender and the worker store states through the backend and settle apart.
//! Tasks of one worker that finish together share one such call (group commit), each with its own
//! answer: a write the server refuses fails that task alone.

mod redis_common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use machinery::{AsyncResult, Config, RunningWorker, Server, Signature, State, Worker};
use machinery_tests::{require, Service};
use redis::AsyncCommands as _;
use redis_common::{int, raw, Names, ADD, SLEEP_MS};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

/// Every line of Redis's `MONITOR` stream that names `needle`, until the returned task is aborted.
async fn monitor(needle: String) -> (Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    let mut stream = tokio::net::TcpStream::connect(Service::Redis.addr())
        .await
        .expect("connect for MONITOR");
    stream.write_all(b"MONITOR\r\n").await.unwrap();
    let mut lines = tokio::io::BufReader::new(stream).lines();
    let ok = lines.next_line().await.unwrap();
    assert_eq!(ok.as_deref(), Some("+OK"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(&needle) {
                kept.lock().unwrap().push(line);
            }
        }
    });
    (seen, reader)
}

/// The `LREM`s (acknowledgements) among the lines `monitor` kept, once it has seen the last of them.
async fn acknowledgements(
    lines: Arc<Mutex<Vec<String>>>,
    reader: tokio::task::JoinHandle<()>,
) -> Vec<String> {
    // MONITOR's copy of the last command can come after its effect is visible.
    tokio::time::sleep(Duration::from_millis(200)).await;
    reader.abort();
    let lines = lines.lock().unwrap();
    lines
        .iter()
        .filter(|l| l.contains("\"LREM\""))
        .cloned()
        .collect()
}

/// Sends one `add(2, 3)` through `config` and runs a worker until its result is stored.
async fn send_and_run(config: Config) -> Server {
    let server = Server::new(config).await.unwrap();
    let worker = Worker::new(&server).register(&ADD).start().await.unwrap();
    let sent = server
        .send(Signature::with_args("add", vec![int(2), int(3)]))
        .await
        .unwrap();
    let state = sent.wait(Duration::from_secs(10)).await.unwrap();
    assert_eq!(state.state, State::Success);
    worker.shutdown(Duration::from_secs(10)).await.unwrap();
    server
}

#[tokio::test]
async fn a_paired_broker_writes_states_with_its_publishes_and_acknowledgements() {
    if !require(
        Service::Redis,
        "a_paired_broker_writes_states_with_its_publishes_and_acknowledgements",
    ) {
        return;
    }
    let names = Names::new("rfw_paired");
    let (lines, reader) = monitor(names.queue.clone()).await;
    let server = send_and_run(names.config()).await;
    assert!(server.broker().holds_states());
    let acks = acknowledgements(lines, reader).await;
    assert!(!acks.is_empty(), "no acknowledgement seen");
    assert!(
        acks.iter().all(|l| l.contains(" lua] ")),
        "the acknowledgement is made by the script that stores the SUCCESS: {acks:#?}"
    );
    names.cleanup().await;
}

#[tokio::test]
async fn a_broker_without_the_backends_half_settles_apart_from_the_state() {
    if !require(
        Service::Redis,
        "a_broker_without_the_backends_half_settles_apart_from_the_state",
    ) {
        return;
    }
    let names = Names::new("rfw_apart");
    let mut config = names.config();
    config.result_backend = "memory://".to_owned();
    let (lines, reader) = monitor(names.queue.clone()).await;
    let server = send_and_run(config).await;
    assert!(!server.broker().holds_states());
    let acks = acknowledgements(lines, reader).await;
    assert!(
        acks.iter().any(|l| !l.contains(" lua] ")),
        "a plain LREM acknowledges, after the backend stored the state: {acks:#?}"
    );
    names.cleanup().await;
}

/// The top-level calls that stored final states (those announcing them on `machinery:done:…`) among the
/// lines `monitor` kept, each with the number of tasks it carried, once it has seen the last of them.
async fn finish_calls(
    lines: Arc<Mutex<Vec<String>>>,
    reader: tokio::task::JoinHandle<()>,
) -> Vec<(String, usize)> {
    tokio::time::sleep(Duration::from_millis(200)).await;
    reader.abort();
    let lines = lines.lock().unwrap();
    lines
        .iter()
        .filter(|l| l.contains("\"EVALSHA\"") && !l.contains(" lua] "))
        .map(|l| (l.clone(), l.matches("\"machinery:done:").count()))
        .filter(|(_, tasks)| *tasks > 0)
        .collect()
}

/// Sends `sleep_ms(ms)` for each `(id, ms)` of `tasks` on `names`' queue, then starts a worker running
/// ten at once (so that those sent together start together and end together).
async fn sleepers(
    names: &Names,
    tasks: Vec<(String, i64)>,
) -> (Server, Vec<AsyncResult<serde_json::Value>>, RunningWorker) {
    let server = Server::new(names.config()).await.unwrap();
    let mut sent = Vec::new();
    for (uuid, ms) in tasks {
        let signature = Signature::with_args("sleep_ms", vec![int(ms)]).with_uuid(uuid);
        sent.push(server.send(signature).await.unwrap());
    }
    let worker = Worker::new(&server)
        .register(&SLEEP_MS)
        .concurrency(10)
        .start()
        .await
        .unwrap();
    (server, sent, worker)
}

#[tokio::test]
async fn tasks_finishing_together_store_their_states_in_shared_calls() {
    if !require(
        Service::Redis,
        "tasks_finishing_together_store_their_states_in_shared_calls",
    ) {
        return;
    }
    let names = Names::new("rfw_group");
    let (lines, reader) = monitor(names.queue.clone()).await;
    let tasks = (0..30).map(|n| (names.task(n), 50)).collect();
    let (server, sent, worker) = sleepers(&names, tasks).await;
    for result in &sent {
        let state = result.wait(Duration::from_secs(20)).await.unwrap();
        assert_eq!(state.state, State::Success);
    }
    worker.shutdown(Duration::from_secs(10)).await.unwrap();
    let calls = finish_calls(lines, reader).await;
    let carried: usize = calls.iter().map(|(_, tasks)| tasks).sum();
    assert_eq!(carried, 30, "each task's state is stored once: {calls:#?}");
    let most = calls.iter().map(|(_, tasks)| *tasks).max().unwrap_or(0);
    assert!(
        calls.len() < 30 && most >= 3,
        "tasks that finished together went in shared calls, not one call each ({} calls, at most {most} tasks in one)",
        calls.len()
    );
    assert_eq!(
        redis_common::queue_counts(&server, &names.queue).await,
        (0, Some(0))
    );
    names.cleanup().await;
}

#[tokio::test]
async fn a_refused_write_in_a_shared_call_fails_that_task_alone() {
    if !require(
        Service::Redis,
        "a_refused_write_in_a_shared_call_fails_that_task_alone",
    ) {
        return;
    }
    let names = Names::new("rfw_refused");
    let (lines, reader) = monitor(names.queue.clone()).await;
    let spoilt = names.task("spoilt");
    // Nine end at 300 ms, the spoilt one at 450 ms.
    let mut tasks: Vec<_> = (0..9).map(|n| (names.task(n), 300)).collect();
    tasks.push((spoilt.clone(), 450));
    let (server, mut sent, worker) = sleepers(&names, tasks).await;
    sent.pop();
    let mut conn = raw().await;
    redis_common::wait_until("the spoilt task started", Duration::from_secs(10), || {
        let mut conn = conn.clone();
        let key = spoilt.clone();
        async move {
            let record: Option<String> = conn.get(&key).await.unwrap();
            record.is_some_and(|r| r.contains("STARTED"))
        }
    })
    .await;
    // Its record becomes a list: the server refuses to store its SUCCESS over it.
    let _: () = conn.del(&spoilt).await.unwrap();
    let _: () = conn.rpush(&spoilt, "not a state").await.unwrap();
    // Writes held from before the nine end until after the spoilt one did: the first calls wait on the
    // server, and every task that ends meanwhile, the spoilt one among them, goes in the next call.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(450)
        .arg("WRITE")
        .query_async(&mut conn)
        .await
        .unwrap();
    for result in &sent {
        let state = result.wait(Duration::from_secs(20)).await.unwrap();
        assert_eq!(state.state, State::Success, "the others' states are stored");
    }
    worker.shutdown(Duration::from_secs(10)).await.unwrap();
    let calls = finish_calls(lines, reader).await;
    assert!(
        calls
            .iter()
            .any(|(line, tasks)| *tasks >= 2 && line.contains(&spoilt)),
        "the spoilt task's write shared a call with others: {:#?}",
        calls.iter().map(|(_, tasks)| tasks).collect::<Vec<_>>()
    );
    let kind: String = redis::cmd("TYPE")
        .arg(&spoilt)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(kind, "list", "the refused write replaced nothing");
    // Its message went to the dead letters (its outcome can never be stored); nothing is left in flight.
    assert_eq!(
        redis_common::queue_counts(&server, &names.queue).await,
        (0, Some(0))
    );
    let dead: Vec<String> = conn
        .lrange(format!("{}.dead", names.queue), 0, -1)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert!(dead[0].contains(&spoilt), "{dead:#?}");
    names.cleanup().await;
}
