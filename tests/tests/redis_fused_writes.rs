//! A Redis broker paired with a Redis backend on one database writes a send's PENDING with its publish,
//! and a finished task's SUCCESS with its acknowledgement (one round trip each); paired with any other
//! backend it says so, and the sender and the worker store states through the backend and settle apart.

mod redis_common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use machinery::{Config, Server, Signature, State, Worker};
use machinery_tests::{require, Service};
use redis_common::{int, Names, ADD};
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
