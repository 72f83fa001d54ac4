//! Helpers shared by the Redis test files: raw connections, per-test names and clean-up, and tasks
//! defined by hand (the tests drive the worker without the `#[task]` macro).

#![allow(dead_code)]

use std::time::Duration;

use machinery::{
    Arg, Config, FailureKind, HandlerFuture, TaskContext, TaskDef, TaskFailure, TaskOptions,
    TaskResult,
};
use machinery_tests::{unique, Service};
use redis::AsyncCommands as _;

/// One test's names: the queue, the delayed-task key and the prefix of every id, all containing `id`, so
/// that [`Names::cleanup`] finds every key the test made.
#[derive(Debug, Clone)]
pub struct Names {
    pub id: String,
    pub queue: String,
    pub delayed: String,
}

impl Names {
    pub fn new(prefix: &str) -> Names {
        let id = unique(prefix);
        Names {
            queue: format!("{id}_q"),
            delayed: format!("{id}_delayed"),
            id,
        }
    }

    /// A task id belonging to this test.
    pub fn task(&self, n: impl std::fmt::Display) -> String {
        format!("task_{}_{n}", self.id)
    }

    /// A configuration on the test Redis for both broker and backend, with this test's queue and delayed
    /// key, prompt delayed-task polling and short-lived results.
    pub fn config(&self) -> Config {
        let mut config =
            Config::new(Service::Redis.url(), Service::Redis.url()).with_default_queue(&self.queue);
        config.redis.delayed_tasks_key = self.delayed.clone();
        config.redis.delayed_tasks_poll_period = 50;
        // Long enough that a busy test machine never makes a live worker look dead (tests of recovery
        // shorten it).
        config.redis.heartbeat_timeout = 5000;
        config.results_expire_in = 300;
        config
    }

    /// Deletes every key whose name contains this test's id.
    pub async fn cleanup(&self) {
        let mut conn = raw().await;
        let keys: Vec<String> = {
            let mut iter: redis::AsyncIter<String> = conn
                .scan_match(format!("*{}*", self.id))
                .await
                .expect("SCAN");
            let mut keys = Vec::new();
            while let Some(key) = futures_next(&mut iter).await {
                keys.push(key);
            }
            keys
        };
        if !keys.is_empty() {
            let _: () = conn.del(keys).await.expect("DEL");
        }
    }
}

async fn futures_next(iter: &mut redis::AsyncIter<'_, String>) -> Option<String> {
    iter.next_item().await.and_then(Result::ok)
}

/// A plain connection to the test Redis, for reading and writing raw keys.
pub async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(Service::Redis.url())
        .expect("redis client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test redis")
}

/// Waits until `condition` holds, up to `timeout`; panics with `what` otherwise.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(
        machinery_tests::eventually(timeout, condition).await,
        "timed out after {timeout:?} waiting for {what}"
    );
}

fn int_arg(args: &[Arg], index: usize) -> Result<i64, TaskFailure> {
    args.get(index)
        .and_then(|arg| arg.value.as_i64())
        .ok_or_else(|| {
            TaskFailure::new(
                FailureKind::BadArguments,
                format!("argument {index}: expected int64"),
            )
        })
}

const OPTIONS: TaskOptions = TaskOptions {
    queue: None,
    retries: 0,
    retry_timeout: 0,
    timeout: None,
    backoff: None,
    unique_for: None,
    rate_limit: None,
};

fn add(_: TaskContext, args: Vec<Arg>) -> HandlerFuture {
    Box::pin(async move {
        let sum: i64 = args.iter().filter_map(|a| a.value.as_i64()).sum();
        Ok(vec![TaskResult::new("int64", sum.into())])
    })
}

fn sleep_ms(_: TaskContext, args: Vec<Arg>) -> HandlerFuture {
    Box::pin(async move {
        let ms = int_arg(&args, 0)?;
        tokio::time::sleep(Duration::from_millis(ms.max(0) as u64)).await;
        Ok(vec![TaskResult::new("int64", ms.into())])
    })
}

/// `add(a, b, ...) -> int64`: the sum of its int64 arguments (also the chord callback).
pub static ADD: TaskDef = TaskDef {
    name: "add",
    rust_path: "redis_common::add",
    handler: add,
    options: OPTIONS,
};

/// `sleep_ms(ms) -> int64`: sleeps, then returns `ms`.
pub static SLEEP_MS: TaskDef = TaskDef {
    name: "sleep_ms",
    rust_path: "redis_common::sleep_ms",
    handler: sleep_ms,
    options: OPTIONS,
};

/// An int64 argument.
pub fn int(value: i64) -> Arg {
    Arg::new("", "int64", value.into())
}

/// The queue's waiting and in-flight counts, as `server`'s broker inspects them.
#[allow(dead_code)] // not every test file that shares this module counts a queue
pub async fn queue_counts(server: &machinery::Server, queue: &str) -> (u64, Option<u64>) {
    let stats = server
        .broker()
        .inspect()
        .expect("the Redis broker inspects")
        .queue_stats(queue)
        .await
        .expect("queue stats");
    (stats.pending, stats.in_flight)
}
