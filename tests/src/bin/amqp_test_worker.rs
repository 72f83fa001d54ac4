//! A worker process for the AMQP tests that kill a worker (`kill -9`): the broker and backend come from
//! Go's environment variables (`BROKER`, `RESULT_BACKEND`, `DEFAULT_QUEUE`, `AMQP_EXCHANGE`, ...), the
//! concurrency from `WORKER_CONCURRENCY` (default 1). It runs the tasks of `machinery_tests::tasks`,
//! prints `ready` once it consumes, and stops gracefully on SIGTERM or SIGINT.

use std::time::Duration;

use machinery::{Config, Server, Worker};
use machinery_tests::tasks::{collect, probe, sleep_add};
use tokio::signal::unix::{signal, SignalKind};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Logs go to stderr (shown when a test fails); stdout carries only `ready`.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let concurrency = std::env::var("WORKER_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let server = Server::new(Config::from_env()?).await?;
    let running = Worker::new(&server)
        .register(probe::task())
        .register(sleep_add::task())
        .register(collect::task())
        .concurrency(concurrency)
        .start()
        .await?;
    println!("ready");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    running.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}
