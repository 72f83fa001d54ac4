//! The worker process: the benchmark starts itself again with the hidden `worker` subcommand, so that the
//! worker's RSS and CPU time are its own and can be read from /proc.
//!
//! The conversation on the child's stdin and stdout, one line each:
//! - child: `ready` once the worker consumes;
//! - child: `done <seconds> <failures>` when `--expect` tasks have finished, `seconds` counted from the
//!   start of the first task to the end of the last;
//! - parent: `quit` (or closing stdin): the child shuts the worker down and exits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use machinery::{Server, State, Worker};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::Notify;

use crate::cli::{WorkerArgs, WorkerRuntime};
use crate::error::BenchError;
use crate::proc_stats;
use crate::servers;

/// How long the worker process may take to connect and start consuming.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the worker process may take to shut down and exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// What the worker process counts, shared with the worker's hooks.
#[derive(Debug)]
struct Progress {
    expect: u64,
    finished: AtomicU64,
    failures: AtomicU64,
    first_start: OnceLock<Instant>,
    last_end: OnceLock<Instant>,
    done: Notify,
}

/// The `worker` subcommand: runs one worker of the no-op task until told to quit.
pub(crate) async fn worker_main(args: WorkerArgs) -> Result<(), BenchError> {
    let config = servers::config(&args.broker, &args.backend, &args.queue, args.prefetch);
    let server = Server::new(config).await?;
    let progress = Arc::new(Progress {
        expect: args.expect,
        finished: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        first_start: OnceLock::new(),
        last_end: OnceLock::new(),
        done: Notify::new(),
    });
    let on_start = progress.clone();
    let on_end = progress.clone();
    let running = Worker::new(&server)
        .register(crate::noop::task())
        .concurrency(args.concurrency)
        .queue(args.queue.clone())
        .pre_task_handler(move |_| {
            on_start.first_start.get_or_init(Instant::now);
        })
        .post_task_handler(move |_, state| {
            if state.state == State::Failure {
                on_end.failures.fetch_add(1, Ordering::Relaxed);
            }
            let finished = on_end.finished.fetch_add(1, Ordering::AcqRel) + 1;
            if finished == on_end.expect {
                on_end.last_end.get_or_init(Instant::now);
                on_end.done.notify_one();
            }
        })
        .error_handler(|error| eprintln!("machinery-bench worker: {error}"))
        .start()
        .await?;
    println!("ready");

    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut quit = false;
    if args.expect > 0 {
        tokio::select! {
            _ = progress.done.notified() => {
                let seconds = match (progress.first_start.get(), progress.last_end.get()) {
                    (Some(start), Some(end)) => end.duration_since(*start).as_secs_f64(),
                    _ => 0.0,
                };
                let failures = progress.failures.load(Ordering::Relaxed);
                println!("done {seconds:.6} {failures}");
            }
            // The parent gave up waiting (a `quit` line, or stdin closed).
            _ = stdin.next_line() => quit = true,
        }
    }
    while !quit {
        match stdin.next_line().await {
            Ok(Some(line)) if line.trim() != "quit" => continue,
            _ => quit = true,
        }
    }
    running.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}

/// What starts a worker process.
#[derive(Debug, Clone)]
pub(crate) struct WorkerSpec {
    /// Broker URL.
    pub(crate) broker: String,
    /// Result backend URL or `null`.
    pub(crate) backend: String,
    /// The queue it consumes.
    pub(crate) queue: String,
    /// Tasks at once.
    pub(crate) concurrency: usize,
    /// Tasks to wait for before saying `done` (0: never).
    pub(crate) expect: u64,
    /// AMQP prefetch override.
    pub(crate) prefetch: Option<u16>,
    /// Its tokio runtime.
    pub(crate) runtime: WorkerRuntime,
}

/// What the worker process reported, and its RSS and CPU at that moment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Finished {
    /// Seconds from the start of the first task to the end of the last.
    pub(crate) seconds: f64,
    /// Tasks that ended in FAILURE.
    pub(crate) failures: u64,
    /// RSS in bytes when `done` arrived.
    pub(crate) rss: u64,
    /// CPU seconds used between `ready` and `done`.
    pub(crate) cpu_seconds: f64,
}

/// A running worker process, seen from the benchmark. Dropping it kills the process.
#[derive(Debug)]
pub(crate) struct ChildWorker {
    child: Child,
    pid: u32,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    ticks: f64,
    cpu_at_ready: f64,
}

impl ChildWorker {
    /// Starts a worker process and waits until it consumes.
    pub(crate) async fn spawn(spec: &WorkerSpec, ticks: f64) -> Result<ChildWorker, BenchError> {
        let exe = std::env::current_exe().map_err(BenchError::io(
            "finding this program to start the worker process",
        ))?;
        let mut command = tokio::process::Command::new(exe);
        command
            .arg("worker")
            .args(["--broker", &spec.broker])
            .args(["--backend", &spec.backend])
            .args(["--queue", &spec.queue])
            .args(["--concurrency", &spec.concurrency.to_string()])
            .args(["--expect", &spec.expect.to_string()])
            .args(["--runtime", spec.runtime.arg()]);
        if let Some(prefetch) = spec.prefetch {
            command.args(["--prefetch", &prefetch.to_string()]);
        }
        command
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(BenchError::io("starting the worker process"))?;
        let pid = child
            .id()
            .ok_or_else(|| BenchError::Child("exited at once".into()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| BenchError::Child("no stdout".into()))?;
        let mut worker = ChildWorker {
            stdin: child.stdin.take(),
            child,
            pid,
            stdout: BufReader::new(stdout).lines(),
            ticks,
            cpu_at_ready: 0.0,
        };
        let line = worker.next_line("`ready`", READY_TIMEOUT).await?;
        if line.trim() != "ready" {
            return Err(BenchError::Child(format!("expected `ready`, got {line:?}")));
        }
        worker.cpu_at_ready = proc_stats::cpu_seconds(pid, ticks)?;
        Ok(worker)
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// The resident set size now, in bytes.
    pub(crate) fn rss(&self) -> Result<u64, BenchError> {
        proc_stats::rss_bytes(self.pid)
    }

    /// Waits for `done`, then reads the RSS and the CPU time.
    pub(crate) async fn wait_done(&mut self, timeout: Duration) -> Result<Finished, BenchError> {
        let line = self.next_line("`done` (all tasks run)", timeout).await?;
        let rss = self.rss()?;
        let cpu = proc_stats::cpu_seconds(self.pid, self.ticks)?;
        let mut words = line.split_whitespace();
        let (Some("done"), Some(seconds), Some(failures)) =
            (words.next(), words.next(), words.next())
        else {
            return Err(BenchError::Child(format!(
                "expected `done <seconds> <failures>`, got {line:?}"
            )));
        };
        match (seconds.parse::<f64>(), failures.parse::<u64>()) {
            (Ok(seconds), Ok(failures)) => Ok(Finished {
                seconds,
                failures,
                rss,
                cpu_seconds: cpu - self.cpu_at_ready,
            }),
            _ => Err(BenchError::Child(format!(
                "expected `done <seconds> <failures>`, got {line:?}"
            ))),
        }
    }

    /// Tells the process to quit and waits for it to exit; kills it if it does not in time.
    pub(crate) async fn stop(mut self) -> Result<(), BenchError> {
        if let Some(mut stdin) = self.stdin.take() {
            // A process that already exited closed the pipe; its exit status tells the rest.
            let _ = stdin.write_all(b"quit\n").await;
            let _ = stdin.flush().await;
        }
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(BenchError::Child(format!("exited with {status}"))),
            Ok(Err(error)) => Err(BenchError::Io {
                what: "waiting for the worker process to exit".into(),
                source: error,
            }),
            Err(_) => {
                let _ = self.child.kill().await;
                Err(BenchError::Timeout {
                    what: "the worker process's shutdown".into(),
                    timeout: STOP_TIMEOUT,
                })
            }
        }
    }

    async fn next_line(&mut self, what: &str, timeout: Duration) -> Result<String, BenchError> {
        match tokio::time::timeout(timeout, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => {
                let status = self.child.wait().await.map_or_else(
                    |e| format!("unknown status ({e})"),
                    |status| status.to_string(),
                );
                Err(BenchError::Child(format!(
                    "exited ({status}) while the benchmark waited for {what}"
                )))
            }
            Ok(Err(error)) => Err(BenchError::Io {
                what: format!("reading the worker process's output while waiting for {what}"),
                source: error,
            }),
            Err(_) => Err(BenchError::Timeout {
                what: format!("the worker process's {what}"),
                timeout,
            }),
        }
    }
}
