//! `machinery-bench count`: a whole send-and-drain on the in-process memory broker and backend, with
//! nothing else in the process, for `valgrind --tool=callgrind` to count instructions of. Two counts with
//! different task numbers give the instructions per task without the start-up (their difference divided
//! by the difference in tasks); docs/benchmarks.md has the commands.

use std::time::Duration;

use machinery::{Config, Server, Worker};

use crate::cli::CountArgs;
use crate::error::BenchError;

/// How long the drain may take, far beyond what it takes under valgrind.
const DRAIN_LIMIT: Duration = Duration::from_secs(600);

/// Sends `args.tasks` no-op tasks, then runs one worker at `args.concurrency` until the last result is
/// stored, and stops it.
pub(crate) async fn count(args: CountArgs) -> Result<(), BenchError> {
    let server = Server::new(Config::default()).await?;
    let mut last = None;
    for _ in 0..args.tasks {
        last = Some(crate::noop::send(&server).await?);
    }
    let worker = Worker::new(&server)
        .register(crate::noop::task())
        .concurrency(args.concurrency)
        .start()
        .await?;
    if let Some(last) = last {
        last.get(DRAIN_LIMIT).await?;
    }
    worker.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}
