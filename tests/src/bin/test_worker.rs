//! A worker process for tests that must kill a worker (`kill -9`) or cut its connections.
//!
//! Configured from the environment with Go machinery's names (`BROKER`, `RESULT_BACKEND`, `DEFAULT_QUEUE`,
//! `REDIS_HEARTBEAT_TIMEOUT`, ...) plus `WORKER_CONCURRENCY`. It runs until SIGINT/SIGTERM and knows these
//! tasks: `sleep_ms(ms: int64) -> int64` sleeps, then returns `ms`; `add(a..: int64) -> int64` sums;
//! `limited_sleep_ms` is `sleep_ms` limited to 50 starts a second; `sleep_until_cancelled(ms: int64)`
//! sleeps, but returns at once when cancelled. `WORKER_CANCEL_GRACE_MS` sets the cancel grace.

use std::time::Duration;

use machinery::rate_limit::RateLimit;
use machinery::{
    Arg, Config, FailureKind, HandlerFuture, Server, TaskContext, TaskDef, TaskFailure,
    TaskOptions, TaskResult, Worker,
};

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

fn sleep_ms(_: TaskContext, args: Vec<Arg>) -> HandlerFuture {
    Box::pin(async move {
        let ms = int_arg(&args, 0)?;
        tokio::time::sleep(Duration::from_millis(ms.max(0) as u64)).await;
        Ok(vec![TaskResult::new("int64", ms.into())])
    })
}

fn add(_: TaskContext, args: Vec<Arg>) -> HandlerFuture {
    Box::pin(async move {
        let sum: i64 = args.iter().filter_map(|a| a.value.as_i64()).sum();
        Ok(vec![TaskResult::new("int64", sum.into())])
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

static SLEEP_MS: TaskDef = TaskDef {
    name: "sleep_ms",
    rust_path: "test_worker::sleep_ms",
    handler: sleep_ms,
    options: OPTIONS,
};

static ADD: TaskDef = TaskDef {
    name: "add",
    rust_path: "test_worker::add",
    handler: add,
    options: OPTIONS,
};

fn sleep_until_cancelled(ctx: TaskContext, args: Vec<Arg>) -> HandlerFuture {
    Box::pin(async move {
        let ms = int_arg(&args, 0)?;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms.max(0) as u64)) => {}
            _ = ctx.cancelled() => {
                return Err(TaskFailure::new(FailureKind::Error, "stopped: the task saw its cancellation"));
            }
        }
        Ok(vec![TaskResult::new("int64", ms.into())])
    })
}

static SLEEP_UNTIL_CANCELLED: TaskDef = TaskDef {
    name: "sleep_until_cancelled",
    rust_path: "test_worker::sleep_until_cancelled",
    handler: sleep_until_cancelled,
    options: OPTIONS,
};

static LIMITED_SLEEP_MS: TaskDef = TaskDef {
    name: "limited_sleep_ms",
    rust_path: "test_worker::limited_sleep_ms",
    handler: sleep_ms,
    options: TaskOptions {
        rate_limit: Some(RateLimit::new(50, Duration::from_secs(1))),
        ..OPTIONS
    },
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = Config::from_env()?;
    let concurrency = std::env::var("WORKER_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let cancel_grace_ms = std::env::var("WORKER_CANCEL_GRACE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let server = Server::new(config).await?;
    Worker::new(&server)
        .register(&SLEEP_MS)
        .register(&ADD)
        .register(&LIMITED_SLEEP_MS)
        .register(&SLEEP_UNTIL_CANCELLED)
        .concurrency(concurrency)
        .cancel_grace(Duration::from_millis(cancel_grace_ms))
        .shutdown_timeout(Duration::from_secs(10))
        .launch()
        .await?;
    Ok(())
}
