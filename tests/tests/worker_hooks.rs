//! Worker hooks that panic (issue 13): a panicking pre-task, post-task or error handler is logged and
//! ignored, so the other tasks of its batch still finish, its own task reaches a final state, and (on
//! Redis) no message is left in the consumer's in-flight list.

mod redis_common;

use std::sync::Arc;
use std::time::Duration;

use machinery::backend::memory::MemoryBackend;
use machinery::broker::memory::MemoryBroker;
use machinery::{task, AsyncResult, Config, ResultError, Server, TaskError, Worker};
use machinery_tests::{eventually, require, Service};
use redis_common::Names;

const WAIT: Duration = Duration::from_secs(10);

#[task]
async fn hooked_add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

/// The task whose hooks panic: it fails, so the error handler is called for it too.
#[task]
async fn hook_victim(n: i64) -> Result<i64, TaskError> {
    Err(TaskError::new(format!("victim {n} refused")))
}

/// A worker whose every hook panics for `hook_victim`, and only for it.
async fn panicky_worker(server: &Server) -> machinery::RunningWorker {
    Worker::new(server)
        .register(hooked_add::task())
        .register(hook_victim::task())
        .concurrency(16)
        .pre_task_handler(|signature| {
            if signature.name == "hook_victim" {
                panic!("pre-task hook panics for {}", signature.uuid);
            }
        })
        .post_task_handler(|signature, _state| {
            if signature.name == "hook_victim" {
                panic!("post-task hook panics for {}", signature.uuid);
            }
        })
        .error_handler(|error| {
            if error.to_string().contains("victim") {
                panic!("error hook panics on {error}");
            }
        })
        .start()
        .await
        .expect("worker starts")
}

/// Sends 30 additions with two victims among them before the worker starts, so that they are fetched
/// together in the same batches; returns the additions and the victims.
async fn send_mixed(server: &Server) -> (Vec<AsyncResult<i64>>, Vec<AsyncResult<i64>>) {
    let mut sums = Vec::new();
    let mut victims = Vec::new();
    for n in 0..30 {
        sums.push(hooked_add::send(server, n, 1).await.expect("send"));
        if n == 3 || n == 17 {
            victims.push(hook_victim::send(server, n).await.expect("send"));
        }
    }
    (sums, victims)
}

async fn assert_all_finished(sums: Vec<AsyncResult<i64>>, victims: Vec<AsyncResult<i64>>) {
    for (n, sum) in sums.into_iter().enumerate() {
        assert_eq!(
            sum.get(WAIT).await.expect("an addition of the same batch"),
            n as i64 + 1
        );
    }
    for victim in victims {
        match victim.get(WAIT).await {
            Err(ResultError::Failed { error, .. }) => assert!(error.contains("refused"), "{error}"),
            other => panic!("the victim must end in FAILURE with its own error, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn panicking_hooks_do_not_take_down_their_batch_on_memory() {
    let server = Server::from_parts(
        Config::default(),
        Arc::new(MemoryBroker::new("memory://", "machinery_tasks")),
        Arc::new(MemoryBackend::new("memory://", Duration::from_secs(600))),
    );
    let (sums, victims) = send_mixed(&server).await;
    let running = panicky_worker(&server).await;
    assert_all_finished(sums, victims).await;
    let stats = server
        .broker()
        .inspect()
        .unwrap()
        .queue_stats("machinery_tasks")
        .await
        .unwrap();
    assert_eq!(stats.pending, 0);
    running.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn panicking_hooks_leave_nothing_in_flight_on_redis() {
    if !require(
        Service::Redis,
        "panicking_hooks_leave_nothing_in_flight_on_redis",
    ) {
        return;
    }
    let names = Names::new("hooks_panic");
    let server = Server::new(names.config()).await.unwrap();
    let (sums, victims) = send_mixed(&server).await;
    let running = panicky_worker(&server).await;
    assert_all_finished(sums, victims).await;
    // While the worker still runs (closing it would return everything anyway).
    let inspect = server.broker();
    let settled = eventually(Duration::from_secs(5), || async {
        let stats = inspect
            .inspect()
            .unwrap()
            .queue_stats(&names.queue)
            .await
            .unwrap();
        stats.pending == 0 && stats.in_flight == Some(0)
    })
    .await;
    assert!(settled, "every message settled, none left in flight");
    running.shutdown(Duration::from_secs(5)).await.unwrap();
    names.cleanup().await;
}
