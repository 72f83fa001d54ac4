//! `machinery-bench`: how fast machinery sends, drains and answers on a real broker, next to what the
//! broker itself does on the same machine in the same run.
//!
//! ```text
//! cargo run --release -p machinery-bench                        # Redis broker and backend, ~3 min
//! cargo run --release -p machinery-bench -- --quick --no-record # a 30-second check
//! cargo run --release -p machinery-bench -- --broker amqp://guest:guest@127.0.0.1:5672/
//! ```
//!
//! The tables go to stdout and are appended to `docs/benchmarks.md` (which explains every row); progress
//! goes to stderr. The worker runs in a child process, this program started again with the hidden
//! `worker` subcommand, so that its RSS and CPU time are its own.

#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

/// The allocator the bench's worker runs with (see Cargo.toml's features).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod ceiling;
mod child;
mod cli;
mod cluster;
mod commands;
mod count;
mod error;
mod measure;
mod proc_stats;
mod report;
mod rows;
mod run;
mod servers;

use std::process::ExitCode;

use clap::Parser as _;

/// The task every measurement sends: it does nothing, so what is measured is machinery and the broker.
#[machinery::task]
async fn noop() -> Result<(), machinery::TaskError> {
    Ok(())
}

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let flavor = match &cli.command {
        Some(cli::Command::Worker(args)) => args.runtime,
        // One thread, so that the count does not depend on how work spreads over threads.
        Some(cli::Command::Count(_)) => cli::WorkerRuntime::Current,
        Some(cli::Command::Cluster(_)) | None => cli::WorkerRuntime::Multi,
    };
    let runtime = match flavor.build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("machinery-bench: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let (who, result) = match cli.command {
        Some(cli::Command::Worker(args)) => (
            "machinery-bench worker",
            runtime.block_on(child::worker_main(args)),
        ),
        Some(cli::Command::Count(args)) => (
            "machinery-bench count",
            runtime.block_on(count::count(args)),
        ),
        Some(cli::Command::Cluster(args)) => (
            "machinery-bench cluster",
            runtime.block_on(cluster::run(args)),
        ),
        None => (
            "machinery-bench",
            match cli.options.resolve() {
                Ok(settings) => runtime.block_on(run::run(settings)),
                Err(error) => Err(error),
            },
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error @ error::BenchError::Usage(_)) => {
            eprintln!("{who}: {error}");
            ExitCode::from(2)
        }
        Err(error) => {
            eprintln!("{who}: {error}");
            ExitCode::FAILURE
        }
    }
}
