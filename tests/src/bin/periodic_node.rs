//! A process that registers one periodic task and exits after a while, for the test that several
//! processes fire each tick once.
//!
//! Configured from Go's environment variables (`BROKER`, `RESULT_BACKEND`, `DEFAULT_QUEUE`) plus
//! `PERIODIC_SPEC`, `PERIODIC_NAME` and `RUN_FOR_MS`. The periodic task is `tick`, with no arguments; no
//! worker runs here, so its messages stay in the queue for the test to read.

use std::time::Duration;

use machinery::{Config, Server, Signature};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let env = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
    let server = Server::new(Config::from_env()?).await?;
    let run_for: u64 = env("RUN_FOR_MS")?.parse()?;
    let periodic = server.register_periodic(
        &env("PERIODIC_SPEC")?,
        &env("PERIODIC_NAME")?,
        Signature::new("tick"),
    )?;
    tokio::time::sleep(Duration::from_millis(run_for)).await;
    periodic.stop();
    Ok(())
}
