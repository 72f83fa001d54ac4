//! What one run measured: the rows that `run` fills in and `report` renders, and the machine they were
//! measured on. Both sides import this module; neither imports the other's internals.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;

use crate::ceiling::Ceiling;
use crate::cli::{BrokerKind, Settings};
use crate::commands::{Delta, Tally};
use crate::proc_stats;

/// Concurrency of the drain whose Redis commands are counted.
pub(crate) const COUNTED_CONCURRENCY: usize = 10;

/// Send rates with one backend and one number of senders, one per run.
#[derive(Debug, Clone)]
pub(crate) struct SendRow {
    /// Concurrent senders (1: one sender awaiting each send).
    pub(crate) senders: usize,
    /// `redis`, `null`, ...
    pub(crate) backend: &'static str,
    /// Tasks sent per run.
    pub(crate) tasks: u64,
    /// Tasks per second, one per run.
    pub(crate) rates: Vec<f64>,
}

impl SendRow {
    /// Adds a run's rate to its row, making the row if needed.
    pub(crate) fn add(
        rows: &mut Vec<SendRow>,
        senders: usize,
        backend: &'static str,
        tasks: u64,
        rate: f64,
    ) {
        match rows
            .iter_mut()
            .find(|r| r.senders == senders && r.backend == backend)
        {
            Some(row) => row.rates.push(rate),
            None => rows.push(SendRow {
                senders,
                backend,
                tasks,
                rates: vec![rate],
            }),
        }
    }
}

/// Drains with one backend at one concurrency, one value per run.
#[derive(Debug, Clone, Default)]
pub(crate) struct DrainRow {
    /// `redis`, `null`, ...
    pub(crate) backend: &'static str,
    /// The worker's concurrency.
    pub(crate) concurrency: usize,
    /// Tasks per drain.
    pub(crate) tasks: u64,
    /// Tasks per second.
    pub(crate) rates: Vec<f64>,
    /// The worker's CPU seconds per 10,000 tasks.
    pub(crate) cpu_per_10k: Vec<f64>,
    /// The worker's RSS in bytes when the last task finished.
    pub(crate) rss_end: Vec<f64>,
    /// Redis commands per task (INFO commandstats, all clients, scripts included).
    pub(crate) commands_per_task: Vec<f64>,
    /// CPU seconds per 10,000 tasks of the Redis server the worker fetches from or stores to (the
    /// broker's, else the backend's; `INFO cpu`, whatever its clients asked of it), from just before the
    /// worker process starts to just after it reports `done` and stops.
    pub(crate) redis_cpu_per_10k: Vec<f64>,
    /// The same for the local RabbitMQ server process (`/proc/<pid>/stat`), AMQP broker only.
    pub(crate) rabbitmq_cpu_per_10k: Vec<f64>,
    /// Tasks that ended in FAILURE, over all runs.
    pub(crate) failures: u64,
}

impl DrainRow {
    /// The row for this backend and concurrency, made if needed.
    pub(crate) fn find<'a>(
        rows: &'a mut Vec<DrainRow>,
        backend: &'static str,
        concurrency: usize,
        tasks: u64,
    ) -> &'a mut DrainRow {
        let at = rows
            .iter()
            .position(|r| r.backend == backend && r.concurrency == concurrency);
        let at = at.unwrap_or_else(|| {
            rows.push(DrainRow {
                backend,
                concurrency,
                tasks,
                ..DrainRow::default()
            });
            rows.len() - 1
        });
        &mut rows[at]
    }
}

/// Send→get round trips.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RoundTrip {
    /// Pairs measured.
    pub(crate) count: usize,
    /// Median.
    pub(crate) p50: Duration,
    /// 99th percentile.
    pub(crate) p99: Duration,
    /// Slowest.
    pub(crate) max: Duration,
}

/// The Redis commands of the worker path.
#[derive(Debug, Clone, Default)]
pub(crate) struct CommandCount {
    /// Tasks per counted drain.
    pub(crate) tasks: u64,
    /// INFO commandstats deltas of the counted drains, one per run.
    pub(crate) runs: Vec<Delta>,
    /// The most commands per second other clients ran just before a counted drain.
    pub(crate) background_per_second: f64,
    /// Tasks of the MONITOR drain.
    pub(crate) monitored_tasks: u64,
    /// What MONITOR saw of the worker process.
    pub(crate) tally: Option<Tally>,
}

/// Everything a run measured.
#[derive(Debug, Default)]
pub(crate) struct Results {
    /// Raw broker rates, one per run.
    pub(crate) ceilings: BTreeMap<Ceiling, Vec<f64>>,
    /// Send rates.
    pub(crate) sends: Vec<SendRow>,
    /// Drain rates and the worker's resources.
    pub(crate) drains: Vec<DrainRow>,
    /// Round trips, if measured.
    pub(crate) round_trip: Option<RoundTrip>,
    /// Why the round trips were not measured.
    pub(crate) round_trip_skipped: Option<String>,
    /// The worker's RSS on an empty queue, in bytes.
    pub(crate) idle_rss: Option<u64>,
    /// Redis commands per task (Redis broker).
    pub(crate) commands: Option<CommandCount>,
    /// Remarks for the reader.
    pub(crate) notes: Vec<String>,
    /// Bytes of one no-op task message.
    pub(crate) payload_len: usize,
    /// How long the run took.
    pub(crate) elapsed: Duration,
}

/// The machine and the servers, for the record.
#[derive(Debug, Clone)]
pub(crate) struct Machine {
    pub(crate) date: String,
    pub(crate) commit: Option<String>,
    pub(crate) nproc: usize,
    pub(crate) cpu: String,
    pub(crate) memory: Option<u64>,
    pub(crate) redis: Option<String>,
    pub(crate) rabbitmq: Option<String>,
}

impl Machine {
    /// Finds out what it can: a missing piece is left out of the record, never an error.
    pub(crate) async fn detect(
        settings: &Settings,
        redis: Option<&mut MultiplexedConnection>,
    ) -> Machine {
        let redis_version = match redis {
            Some(conn) => redis::cmd("INFO")
                .arg("server")
                .query_async::<String>(conn)
                .await
                .ok()
                .and_then(|info| {
                    info.lines()
                        .find_map(|l| l.trim().strip_prefix("redis_version:").map(str::to_owned))
                }),
            None => None,
        };
        let local = ["@127.0.0.1", "@localhost", "//127.0.0.1", "//localhost"];
        let rabbitmq = if settings.kind == BrokerKind::Amqp
            && local.iter().any(|host| settings.broker.contains(host))
        {
            command_output("rabbitmqctl", &["version"]).await
        } else {
            None
        };
        let dir = env!("CARGO_MANIFEST_DIR");
        let commit = match command_output("git", &["-C", dir, "rev-parse", "--short", "HEAD"]).await
        {
            Some(commit) => {
                let dirty = command_output(
                    "git",
                    &["-C", dir, "status", "--porcelain", "--untracked-files=no"],
                )
                .await
                .is_some_and(|status| !status.is_empty());
                Some(if dirty {
                    format!("{commit}+dirty")
                } else {
                    commit
                })
            }
            None => None,
        };
        Machine {
            date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            commit,
            nproc: proc_stats::nproc(),
            cpu: proc_stats::cpu_model(),
            memory: proc_stats::mem_total(),
            redis: redis_version,
            rabbitmq,
        }
    }
}

/// The trimmed stdout of a command that succeeds within 10 s.
async fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let output = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(10), output).await {
        Ok(Ok(out)) if out.status.success() => {
            Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        }
        _ => None,
    }
}
