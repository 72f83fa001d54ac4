//! `machinery`: the command-line inspector of a machinery task queue (Redis or AMQP broker; the in-process
//! memory broker is refused, since no other process can reach it).
//!
//! ```text
//! machinery queues                      # pending, delayed, in-flight, dead-letter counts per queue
//! machinery task <uuid>                 # a task's state and results
//! machinery pending <queue> --limit 5   # waiting messages
//! machinery delayed                     # messages waiting for their ETA
//! machinery dead <queue>                # dead letters with reasons
//! machinery requeue <queue> --all       # dead letters back onto the queue
//! machinery purge <queue> --yes         # empty a queue
//! machinery send add --args '[{"Type":"int64","Value":1}]' --wait 10
//! machinery workers                     # consumers, their heartbeats and in-flight counts
//! machinery web                         # a dashboard on http://127.0.0.1:5555 (docs/web.md)
//! ```
//!
//! Every command takes `--json`, `-c config.yaml`, `--broker URL` and `--backend URL`; see `docs/cli.md`.

#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

mod cli;
mod commands;
mod error;
mod message;
mod output;
mod report;
mod web;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("machinery: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // `machinery pending q | head`: the reader left, which is not an error.
        Err(error::CliError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("machinery: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
