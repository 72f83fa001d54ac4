//! machinery's metrics in Prometheus' text format: install an exporter (here `metrics-exporter-prometheus`,
//! without its HTTP listener), run some tasks, and print what a scrape would return.
//!
//! ```text
//! cargo run --example metrics
//! ```
//!
//! In a service, serve `handle.render()` on your HTTP endpoint (or enable the exporter's
//! `http-listener` feature and call `PrometheusBuilder::with_http_listener`).

use std::time::Duration;

use machinery::{task, Config, Server, TaskError, Worker};
use metrics_exporter_prometheus::PrometheusBuilder;

/// Fails on odd numbers, to give the failure counter something to count.
#[task]
async fn even_only(n: i64) -> Result<i64, TaskError> {
    if n % 2 == 1 {
        return Err(TaskError::new(format!("{n} is odd")));
    }
    Ok(n)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let handle = PrometheusBuilder::new().install_recorder()?;
    let server = Server::new(Config::default()).await?;
    let running = Worker::auto(&server).concurrency(4).start().await?;
    for n in 0..10 {
        let _ = even_only::send(&server, n)
            .await?
            .get(Duration::from_secs(5))
            .await;
    }
    running.shutdown(Duration::from_secs(5)).await?;
    print!("{}", handle.render());
    Ok(())
}
