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
            uuid: String::new(),
            name: String::new(),
            routing_key: "machinery_tasks".into(),
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
