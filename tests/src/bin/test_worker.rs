//! A worker process for tests that must kill a worker (`kill -9`) or cut its connections.
//!
//! Configured from the environment with Go machinery's names (`BROKER`, `RESULT_BACKEND`, `DEFAULT_QUEUE`,
//! `REDIS_HEARTBEAT_TIMEOUT`, ...) plus `WORKER_CONCURRENCY`. It runs until SIGINT/SIGTERM and knows these
//! tasks: `sleep_ms(ms: int64) -> int64` sleeps, then returns `ms`; `add(a..: int64) -> int64` and `sum`
//! (the same, under the name a chord callback is sent by) sum their arguments; `limited_sleep_ms` is
//! `sleep_ms` limited to 50 starts a second; `sleep_until_cancelled(ms: int64)` sleeps, but returns at once
//! when cancelled. `WORKER_CANCEL_GRACE_MS` sets the cancel grace.
//!
//! With `LEDGER_KEY` set, `add` and `sum` keep an execution ledger: each run takes 10 ms, then appends
//! `"<task uuid> <pid>"` to the Redis list `LEDGER_KEY` at `LEDGER_URL` (default the local Redis), on a
//! connection of its own (tests put faults between the worker and its servers, never the ledger).

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

fn add(ctx: TaskContext, args: Vec<Arg>) -> HandlerFuture {
    Box::pin(async move {
        let sum: i64 = args.iter().filter_map(|a| a.value.as_i64()).sum();
        record_run(ctx.uuid()).await?;
        Ok(vec![TaskResult::new("int64", sum.into())])
    })
}

/// The ledger's connection and list, if `LEDGER_KEY` is set.
async fn ledger() -> &'static Option<(redis::aio::MultiplexedConnection, String)> {
    static LEDGER: tokio::sync::OnceCell<Option<(redis::aio::MultiplexedConnection, String)>> =
        tokio::sync::OnceCell::const_new();
    LEDGER
        .get_or_init(|| async {
            let key = std::env::var("LEDGER_KEY").ok()?;
            let url =
                std::env::var("LEDGER_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
            let client = redis::Client::open(url).ok()?;
            let conn = client.get_multiplexed_async_connection().await.ok()?;
            Some((conn, key))
        })
        .await
}

/// Appends this run to the ledger (see the module docs); a run that cannot be recorded fails.
async fn record_run(uuid: &str) -> Result<(), TaskFailure> {
    let Some((conn, key)) = ledger().await else {
        return Ok(());
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    let entry = format!("{uuid} {}", std::process::id());
    redis::cmd("RPUSH")
        .arg(key)
        .arg(entry)
        .query_async::<i64>(&mut conn.clone())
        .await
        .map(drop)
        .map_err(|e| TaskFailure::new(FailureKind::Error, format!("ledger: {e}")))
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

static SUM: TaskDef = TaskDef {
    name: "sum",
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
        .register(&SUM)
        .register(&LIMITED_SLEEP_MS)
        .register(&SLEEP_UNTIL_CANCELLED)
        .concurrency(concurrency)
        .cancel_grace(Duration::from_millis(cancel_grace_ms))
        .shutdown_timeout(Duration::from_secs(10))
        .launch()
        .await?;
    Ok(())
}
