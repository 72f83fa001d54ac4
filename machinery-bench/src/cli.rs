//! The command line, and the settings of a run resolved from it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::error::BenchError;

/// Tasks per measurement of a full run: keeps it under 3 minutes on 2 cores.
const DEFAULT_TASKS: u64 = 20_000;
/// Tasks per measurement with `--quick`: keeps the run under 30 seconds.
const QUICK_TASKS: u64 = 2_000;
/// Runs per measurement of a full run; each rate is their median.
const DEFAULT_REPEAT: usize = 3;

/// Benchmarks machinery on a real broker: send, drain and round-trip rates, next to what the broker
/// itself does with the same client crate in the same run, Redis commands per task, and the worker's
/// RSS and CPU.
///
/// Prints the results as markdown tables and appends them, with the command and the machine, to
/// docs/benchmarks.md (unless --no-record). The worker runs in a child process (this program started
/// again) so that its memory and CPU are its own.
#[derive(Debug, Parser)]
#[command(
    name = "machinery-bench",
    version,
    args_conflicts_with_subcommands = true
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
    #[command(flatten)]
    pub(crate) options: Options,
}

/// The hidden subcommand the benchmark starts its worker process with.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// The worker process of the benchmark (started by the benchmark itself)
    #[command(hide = true)]
    Worker(WorkerArgs),
    /// Sends N no-op tasks on the in-process memory broker and backend, then drains them with one worker,
    /// all on one thread: the run to count instructions of under `valgrind --tool=callgrind`
    /// (docs/benchmarks.md, "Instructions per task")
    Count(CountArgs),
    /// Drain rate on one Redis node against a Redis Cluster, with one queue and with three
    Cluster(ClusterArgs),
}

/// What `count` runs.
#[derive(Debug, Args)]
pub(crate) struct CountArgs {
    /// Tasks sent, then drained
    #[arg(long, default_value_t = 10_000)]
    pub(crate) tasks: u64,
    /// Worker concurrency
    #[arg(long, default_value_t = 10)]
    pub(crate) concurrency: usize,
}

/// The options of `machinery-bench cluster`.
#[derive(Debug, Args)]
pub(crate) struct ClusterArgs {
    /// The single node.
    #[arg(long, value_name = "URL", default_value = "redis://127.0.0.1:6379")]
    pub(crate) single: String,
    /// The cluster's seed nodes.
    #[arg(
        long,
        value_name = "URL",
        default_value = "redis://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002"
    )]
    pub(crate) cluster: String,
    /// Tasks per queue.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) tasks: u64,
    /// Concurrency of each queue's worker.
    #[arg(long, default_value_t = 50)]
    pub(crate) concurrency: usize,
    /// Runs per row (the median is shown).
    #[arg(long, default_value_t = 3)]
    pub(crate) repeat: usize,
}

/// What the worker process runs: one worker of the no-op task on one queue.
#[derive(Debug, Args)]
pub(crate) struct WorkerArgs {
    /// Broker URL
    #[arg(long)]
    pub(crate) broker: String,
    /// Result backend URL, or `null`
    #[arg(long)]
    pub(crate) backend: String,
    /// The queue to consume
    #[arg(long)]
    pub(crate) queue: String,
    /// Tasks run at once
    #[arg(long)]
    pub(crate) concurrency: usize,
    /// Print `done` when this many tasks have finished (0: never)
    #[arg(long)]
    pub(crate) expect: u64,
    /// AMQP prefetch (0: the concurrency); the library's default when absent
    #[arg(long)]
    pub(crate) prefetch: Option<u16>,
    /// The worker process's tokio runtime.
    #[arg(long, value_enum, default_value_t = WorkerRuntime::Multi)]
    pub(crate) runtime: WorkerRuntime,
}

/// The tokio runtime the worker process runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum WorkerRuntime {
    /// `#[tokio::main]`'s default: a worker thread per CPU.
    Multi,
    /// `#[tokio::main(flavor = "current_thread")]`: everything on one thread.
    Current,
}

impl WorkerRuntime {
    /// How the report names it.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            WorkerRuntime::Multi => "multi-thread tokio runtime (the `#[tokio::main]` default)",
            WorkerRuntime::Current => "current-thread tokio runtime",
        }
    }

    /// The command-line value.
    pub(crate) fn arg(self) -> &'static str {
        match self {
            WorkerRuntime::Multi => "multi",
            WorkerRuntime::Current => "current",
        }
    }

    /// Builds the runtime.
    pub(crate) fn build(self) -> std::io::Result<tokio::runtime::Runtime> {
        match self {
            WorkerRuntime::Multi => tokio::runtime::Builder::new_multi_thread(),
            WorkerRuntime::Current => tokio::runtime::Builder::new_current_thread(),
        }
        .enable_all()
        .build()
    }
}

/// The options of a benchmark run.
#[derive(Debug, Args)]
pub(crate) struct Options {
    /// Broker URL: redis://… or amqp://…
    #[arg(long, value_name = "URL", default_value = "redis://127.0.0.1:6379")]
    broker: String,
    /// Result backend URL, or `null` for none [default: the broker's URL for a Redis broker,
    /// redis://127.0.0.1:6379 for an AMQP broker]
    #[arg(long, value_name = "URL|null")]
    backend: Option<String>,
    /// Tasks per measurement; one sender and the drain at concurrency 1 use a fifth of them [default:
    /// 20000, 2000 with --quick]
    #[arg(long, value_name = "N")]
    tasks: Option<u64>,
    /// Worker concurrencies of the drain, comma-separated
    #[arg(
        long,
        value_name = "C[,C…]",
        value_delimiter = ',',
        default_value = "1,10,100"
    )]
    concurrency: Vec<usize>,
    /// Concurrent senders (tasks sharing one Server), and connections of the raw broker ceilings
    #[arg(long, value_name = "S", default_value_t = 10)]
    senders: usize,
    /// Runs of each measurement; every rate shown is their median [default: 3, 1 with --quick]
    #[arg(long, value_name = "R")]
    repeat: Option<usize>,
    /// Sequential send→get pairs of the round-trip measurement
    #[arg(long, value_name = "N", default_value_t = 1000)]
    round_trips: usize,
    /// AMQP basic.qos prefetch of the worker; 0 means the worker's concurrency [default: the
    /// library's, 0]
    #[arg(long, value_name = "N")]
    prefetch: Option<u16>,
    /// The worker process's tokio runtime: `multi` (the `#[tokio::main]` default) or `current`
    /// (`flavor = "current_thread"`)
    #[arg(long, value_enum, value_name = "RUNTIME", default_value_t = WorkerRuntime::Multi)]
    worker_runtime: WorkerRuntime,
    /// Small sizes and a single run, to check a setup in under 30 seconds
    #[arg(long)]
    quick: bool,
    /// Print the tables only; do not append them to the record
    #[arg(long)]
    no_record: bool,
    /// The markdown file the results are appended to [default: docs/benchmarks.md of this
    /// workspace]
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,
}

/// Which broker a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BrokerKind {
    /// `redis://`, `rediss://`, `redis+socket://`.
    Redis,
    /// `amqp://`, `amqps://`.
    Amqp,
}

impl BrokerKind {
    /// The kind of a broker URL, or a usage error for brokers a separate worker process cannot share.
    pub(crate) fn of(url: &str) -> Result<BrokerKind, BenchError> {
        let url = url.trim();
        if is_redis(url) {
            Ok(BrokerKind::Redis)
        } else if url.starts_with("amqp://") || url.starts_with("amqps://") {
            Ok(BrokerKind::Amqp)
        } else {
            Err(BenchError::Usage(format!(
                "--broker {}: expected a redis://, rediss://, redis+socket:// or amqp(s):// URL (the \
                 worker runs in another process, so memory:// cannot be measured)",
                machinery::config::redact_url(url)
            )))
        }
    }

    /// `redis` or `amqp`, for labels.
    pub(crate) fn name(self) -> &'static str {
        match self {
            BrokerKind::Redis => "redis",
            BrokerKind::Amqp => "amqp",
        }
    }
}

/// Whether `url` names a Redis server.
pub(crate) fn is_redis(url: &str) -> bool {
    ["redis://", "rediss://", "redis+socket://"]
        .iter()
        .any(|scheme| url.trim().starts_with(scheme))
}

/// The kind of a result backend URL, for labels: `redis`, `amqp`, `memcache` or `null`.
pub(crate) fn backend_label(url: &str) -> &'static str {
    let url = url.trim();
    if url == "null" {
        "null"
    } else if is_redis(url) {
        "redis"
    } else if url.starts_with("amqp") {
        "amqp"
    } else if url.starts_with("memcache") {
        "memcache"
    } else {
        "other"
    }
}

/// A run's settings, defaults applied and checked.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Broker URL.
    pub(crate) broker: String,
    /// Which broker that is.
    pub(crate) kind: BrokerKind,
    /// The configured result backend URL (`null` allowed).
    pub(crate) backend: String,
    /// Tasks per measurement.
    pub(crate) tasks: u64,
    /// Worker concurrencies of the drain.
    pub(crate) concurrency: Vec<usize>,
    /// Concurrent senders.
    pub(crate) senders: usize,
    /// Runs per measurement.
    pub(crate) repeat: usize,
    /// Send→get pairs of the round trip.
    pub(crate) round_trips: usize,
    /// AMQP prefetch override.
    pub(crate) prefetch: Option<u16>,
    /// The worker process's tokio runtime.
    pub(crate) worker_runtime: WorkerRuntime,
    /// `--quick` was given.
    pub(crate) quick: bool,
    /// Where to append the results, if anywhere.
    pub(crate) record: Option<PathBuf>,
    /// The arguments as given, for the record.
    pub(crate) args: Vec<String>,
}

impl Settings {
    /// Tasks of a measurement done one at a time (one sender, a worker at concurrency 1): a fifth, to
    /// keep the run short.
    pub(crate) fn tasks_at(&self, concurrency: usize) -> u64 {
        if concurrency == 1 {
            (self.tasks / 5).max(1)
        } else {
            self.tasks
        }
    }
}

impl Options {
    /// Applies the defaults and checks the values.
    pub(crate) fn resolve(self) -> Result<Settings, BenchError> {
        let kind = BrokerKind::of(&self.broker)?;
        let backend = match self.backend {
            Some(backend) => backend.trim().to_owned(),
            None => match kind {
                BrokerKind::Redis => self.broker.trim().to_owned(),
                BrokerKind::Amqp => "redis://127.0.0.1:6379".to_owned(),
            },
        };
        if backend.starts_with("memory://") {
            return Err(BenchError::Usage(
                "--backend memory://: the worker runs in another process; use a server's URL or null"
                    .into(),
            ));
        }
        let tasks = self.tasks.unwrap_or(if self.quick {
            QUICK_TASKS
        } else {
            DEFAULT_TASKS
        });
        let repeat = self
            .repeat
            .unwrap_or(if self.quick { 1 } else { DEFAULT_REPEAT });
        if tasks == 0 || self.senders == 0 || repeat == 0 {
            return Err(BenchError::Usage(
                "--tasks, --senders and --repeat must be at least 1".into(),
            ));
        }
        if self.concurrency.is_empty() || self.concurrency.contains(&0) {
            return Err(BenchError::Usage(
                "--concurrency takes one or more numbers of at least 1, e.g. 1,10,100".into(),
            ));
        }
        let record = if self.no_record {
            None
        } else {
            Some(self.record.unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks.md")
            }))
        };
        Ok(Settings {
            broker: self.broker.trim().to_owned(),
            kind,
            backend,
            tasks,
            concurrency: self.concurrency,
            senders: self.senders,
            repeat,
            round_trips: self.round_trips,
            prefetch: self.prefetch,
            worker_runtime: self.worker_runtime,
            quick: self.quick,
            record,
            args: std::env::args().skip(1).collect(),
        })
    }
}
