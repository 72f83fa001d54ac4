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
    /// CPU seconds per 10,000 tasks of the sending process and of the servers, one per run.
    pub(crate) cpu: CpuPer10k,
}

/// CPU seconds per 10,000 tasks, one value per run: the process doing the work (the sender, or the
/// worker) and the servers it talks to (`INFO cpu` of the Redis it writes to; the local RabbitMQ
/// process, from `/proc`). What could not be read stays empty.
#[derive(Debug, Clone, Default)]
pub(crate) struct CpuPer10k {
    pub(crate) own: Vec<f64>,
    pub(crate) redis: Vec<f64>,
    pub(crate) rabbitmq: Vec<f64>,
}

impl CpuPer10k {
    /// Adds one run's readings (CPU seconds before and after `tasks` tasks).
    pub(crate) fn push(&mut self, tasks: u64, before: CpuReading, after: CpuReading) {
        let per_10k = |before: Option<f64>, after: Option<f64>| {
            Some((after? - before?).max(0.0) / tasks as f64 * 10_000.0)
        };
        let pairs = [
            (&mut self.own, before.own, after.own),
            (&mut self.redis, before.redis, after.redis),
            (&mut self.rabbitmq, before.rabbitmq, after.rabbitmq),
        ];
        for (values, before, after) in pairs {
            if let Some(value) = per_10k(before, after) {
                values.push(value);
            }
        }
    }
}

/// CPU seconds used so far by the process doing the work and by the servers.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuReading {
    pub(crate) own: Option<f64>,
    pub(crate) redis: Option<f64>,
    pub(crate) rabbitmq: Option<f64>,
}

impl SendRow {
    /// Adds a run's rate and CPU readings to its row, making the row if needed.
    pub(crate) fn add(
        rows: &mut Vec<SendRow>,
        (senders, backend): (usize, &'static str),
        tasks: u64,
        rate: f64,
        (before, after): (CpuReading, CpuReading),
    ) {
        let index = match rows
            .iter()
            .position(|r| r.senders == senders && r.backend == backend)
        {
            Some(index) => index,
            None => {
                rows.push(SendRow {
                    senders,
                    backend,
                    tasks,
                    rates: Vec::new(),
                    cpu: CpuPer10k::default(),
                });
                rows.len() - 1
            }
        };
        let row = &mut rows[index];
        row.rates.push(rate);
        row.cpu.push(tasks, before, after);
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
    /// CPU seconds per 10,000 tasks of the worker process (from `ready` to its last task) and of the
    /// servers (the Redis the worker fetches from or stores to: the broker's, else the backend's; the
    /// local RabbitMQ), from just before the worker process starts to just after it stops.
    pub(crate) cpu: CpuPer10k,
    /// The worker's RSS in bytes when the last task finished.
    pub(crate) rss_end: Vec<f64>,
    /// Redis commands per task (INFO commandstats, all clients, scripts included).
    pub(crate) commands_per_task: Vec<f64>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_per_10k_tasks_from_two_readings_leaves_out_what_was_not_read() {
        let before = CpuReading {
            own: Some(1.0),
            redis: Some(10.0),
            rabbitmq: None,
        };
        let after = CpuReading {
            own: Some(1.5),
            redis: Some(10.2),
            rabbitmq: Some(3.0),
        };
        let mut cpu = CpuPer10k::default();
        cpu.push(20_000, before, after);
        assert_eq!(cpu.own.len(), 1);
        assert!((cpu.own[0] - 0.25).abs() < 1e-9, "{:?}", cpu.own);
        assert!((cpu.redis[0] - 0.1).abs() < 1e-9, "{:?}", cpu.redis);
        assert!(cpu.rabbitmq.is_empty(), "no reading before: no value");
    }
}
