//! The [`Worker`]: consumes a queue and runs the tasks it knows.
//!
//! ```
//! # async fn demo() -> Result<(), machinery::Error> {
//! use std::time::Duration;
//! use machinery::{task, Config, Server, TaskError, Worker};
//!
//! #[task]
//! async fn add(a: i64, b: i64) -> Result<i64, TaskError> {
//!     Ok(a + b)
//! }
//!
//! let server = Server::new(Config::default()).await?;
//! let running = Worker::new(&server).register(add::task()).concurrency(4).start().await?;
//! let sum = add::send(&server, 1, 2).await?.get(Duration::from_secs(5)).await?;
//! assert_eq!(sum, 3);
//! running.shutdown(Duration::from_secs(5)).await?;
//! # Ok(()) }
//! # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
//! ```

mod call;
mod control;
mod follow_up;
mod health;
mod log;
pub use log::TASK_LOG_TARGET;
mod process;
mod rate;
mod registry;
mod run;
mod signals;
mod slot;
mod start;
mod unknown;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::broker::{BrokerError, ConsumeOptions};
use crate::task::{registered_tasks, TaskDef};
use crate::wire::signature::Signature;
use crate::wire::state::TaskState;
use crate::Server;
use registry::Registry;

/// Why a worker could not start, or how it stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// Two different tasks share one wire name.
    #[error("two tasks are registered under the name {name:?}: {first} and {second}; give one of them another name with #[task(name = \"...\")]")]
    DuplicateTask {
        /// The wire name.
        name: String,
        /// One task's Rust path.
        first: String,
        /// The other's.
        second: String,
    },
    /// The worker has no task to run.
    #[error("the worker has no tasks: register some with Worker::register, or use Worker::auto in a binary that defines #[task] functions")]
    NoTasks,
    /// The broker could not start consuming.
    #[error("the worker cannot consume queue {queue}: {source}")]
    Consume {
        /// The queue.
        queue: String,
        /// The broker's error.
        #[source]
        source: BrokerError,
    },
    /// The shutdown deadline passed with tasks still running; they were cancelled and their messages
    /// returned to the queue.
    #[error("shutdown deadline of {deadline:?} passed; {aborted} running task(s) were cancelled and their messages returned to the queue")]
    ShutdownDeadline {
        /// The deadline.
        deadline: Duration,
        /// How many tasks were cancelled.
        aborted: usize,
    },
    /// A second signal stopped the worker without waiting for its tasks.
    #[error("stopped by a second signal; {aborted} running task(s) were cancelled and their messages returned to the queue")]
    QuitAbruptly {
        /// How many tasks were cancelled.
        aborted: usize,
    },
    /// Signal handlers could not be installed.
    #[error("cannot listen for signals: {0}")]
    Signals(#[source] std::io::Error),
    /// The worker's own loop panicked (a bug).
    #[error("the worker loop stopped unexpectedly: {0}")]
    Crashed(String),
}

type ErrorHandler = Arc<dyn Fn(&(dyn std::error::Error + 'static)) + Send + Sync>;
type PreTaskHandler = Arc<dyn Fn(&Signature) + Send + Sync>;
type PostTaskHandler = Arc<dyn Fn(&Signature, &TaskState) + Send + Sync>;

/// Handlers called around tasks, like Go's `SetErrorHandler`, `SetPreTaskHandler`, `SetPostTaskHandler`.
#[derive(Clone, Default)]
pub(crate) struct Hooks {
    pub(crate) error: Option<ErrorHandler>,
    pub(crate) pre_task: Option<PreTaskHandler>,
    pub(crate) post_task: Option<PostTaskHandler>,
}

impl Hooks {
    /// Calls the error handler (or logs the error when there is none). A handler that panics is logged
    /// and otherwise ignored.
    pub(crate) fn error(&self, error: &(dyn std::error::Error + 'static)) {
        match &self.error {
            Some(handler) => guarded("error", || handler(error)),
            None => tracing::error!(%error, "worker error"),
        }
    }

    /// Calls the pre-task handler, if any; a panic in it is logged and the task runs as if it had returned.
    pub(crate) fn pre_task(&self, signature: &Signature) {
        if let Some(handler) = &self.pre_task {
            guarded("pre-task", || handler(signature));
        }
    }

    /// Calls the post-task handler, if any; a panic in it is logged and the message is settled as if it
    /// had returned.
    pub(crate) fn post_task(&self, signature: &Signature, state: &TaskState) {
        if let Some(handler) = &self.post_task {
            guarded("post-task", || handler(signature, state));
        }
    }
}

/// Runs a user hook, catching a panic (logged at ERROR) so that it cannot take down the batch of tasks it
/// runs in, nor leave their messages unsettled.
fn guarded(which: &str, hook: impl FnOnce()) {
    if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(hook)) {
        let message = panic_message(payload.as_ref());
        tracing::error!(hook = which, panic = %message, "a worker {which} handler panicked; carrying on as if it had returned");
    }
}

/// The text of a panic payload (`&str` or `String`), or a placeholder.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

/// Messages a worker fetches ahead per run slot unless told otherwise ([`Worker::fetch_ahead`]):
/// measured in `machinery-bench` (docs/benchmarks.md), half a message per slot drained 24k tasks/s at
/// concurrency 10 on Redis with results, one 30k/s and two 34k/s.
const DEFAULT_FETCH_AHEAD_PER_SLOT: usize = 2;

/// A worker being configured. [`start`](Worker::start) it, or [`launch`](Worker::launch) it to run until
/// SIGINT/SIGTERM.
pub struct Worker {
    server: Server,
    tasks: Vec<&'static TaskDef>,
    concurrency: usize,
    /// Messages fetched ahead of free slots; `None`: twice the concurrency ([`DEFAULT_FETCH_AHEAD_PER_SLOT`]).
    fetch_ahead: Option<usize>,
    queue: Option<String>,
    consumer_tag: String,
    shutdown_timeout: Duration,
    cancel_grace: Duration,
    hooks: Hooks,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field(
                "tasks",
                &self.tasks.iter().map(|t| t.name).collect::<Vec<_>>(),
            )
            .field("concurrency", &self.concurrency)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// A worker with no tasks yet; add them with [`register`](Worker::register).
    pub fn new(server: &Server) -> Worker {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        Worker {
            server: server.clone(),
            tasks: Vec::new(),
            concurrency: 2 * cpus,
            fetch_ahead: None,
            queue: None,
            consumer_tag: format!(
                "machinery-{}-{}",
                std::process::id(),
                uuid::Uuid::new_v4().simple()
            ),
            shutdown_timeout: Duration::from_secs(30),
            cancel_grace: Duration::from_secs(10),
            hooks: Hooks::default(),
        }
    }

    /// A worker with every `#[task]` linked into this binary. Two tasks with one wire name make
    /// [`start`](Worker::start) fail with an error naming both.
    pub fn auto(server: &Server) -> Worker {
        let mut worker = Worker::new(server);
        worker.tasks.extend(registered_tasks());
        worker
    }

    /// Adds a task: `Worker::new(&server).register(add::task())`.
    pub fn register(mut self, task: &'static TaskDef) -> Self {
        self.tasks.push(task);
        self
    }

    /// How many tasks run at once (default: twice the CPUs, as Go's `0`).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// How many messages the worker may hold fetched while every slot is busy (default: twice the
    /// concurrency), so that a slot that frees starts its next task without waiting for the broker, and
    /// one fetch serves many slots. Running and waiting messages then come to at most three times the
    /// concurrency (Celery prefetches four times), besides those whose outcome is still being stored.
    /// They stay in this worker's in-flight list (Redis) or unacknowledged (RabbitMQ): a worker that dies
    /// hands them back like the running ones, and a stopping worker returns them at once. `0` fetches only
    /// for free slots, as a worker of long tasks sharing a queue may want (the messages it would hold
    /// could run on another worker meanwhile); on RabbitMQ the default prefetch grows by the same number.
    pub fn fetch_ahead(mut self, messages: usize) -> Self {
        self.fetch_ahead = Some(messages);
        self
    }

    /// Consumes this queue instead of the configured default queue (Go's `NewCustomQueueWorker`).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// Names this worker's consumer (AMQP consumer tag, Redis in-flight list). The default,
    /// `machinery-<pid>-<uuid>`, is unique per process; a tag of your own must be too: on Redis a consumer
    /// starting under a tag returns what that tag holds in flight to the queue, so two live processes under
    /// one tag hand each other's running messages out again.
    pub fn consumer_tag(mut self, tag: impl Into<String>) -> Self {
        self.consumer_tag = tag.into();
        self
    }

    /// How long [`launch`](Worker::launch) waits for running tasks after the first signal (default 30 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// How long a task [cancelled](crate::Server::cancel) while it runs may take to return after its
    /// [`TaskContext::cancelled`](crate::TaskContext::cancelled) resolves, before its future is dropped
    /// (default 10 s).
    pub fn cancel_grace(mut self, grace: Duration) -> Self {
        self.cancel_grace = grace;
        self
    }

    /// Called with every task failure and broker error (default: logged).
    pub fn error_handler(
        mut self,
        handler: impl Fn(&(dyn std::error::Error + 'static)) + Send + Sync + 'static,
    ) -> Self {
        self.hooks.error = Some(Arc::new(handler));
        self
    }

    /// Called before each task runs.
    pub fn pre_task_handler(
        mut self,
        handler: impl Fn(&Signature) + Send + Sync + 'static,
    ) -> Self {
        self.hooks.pre_task = Some(Arc::new(handler));
        self
    }

    /// Called after each task run, with its final state (SUCCESS, FAILURE or RETRY).
    pub fn post_task_handler(
        mut self,
        handler: impl Fn(&Signature, &TaskState) + Send + Sync + 'static,
    ) -> Self {
        self.hooks.post_task = Some(Arc::new(handler));
        self
    }

    /// Starts consuming in the background and returns a handle to stop it.
    pub async fn start(self) -> Result<RunningWorker, WorkerError> {
        let registry = Registry::build(&self.tasks)?;
        if registry.len() == 0 {
            return Err(WorkerError::NoTasks);
        }
        // The default queue, not the default routing key: on an AMQP direct exchange they differ (Go's
        // worker consumes `default_queue`, bound with the binding key senders route to).
        let queue = match &self.queue {
            Some(queue) => queue.clone(),
            None => self.server.config().default_queue.clone(),
        };
        let fetch_ahead = self.fetch_ahead.unwrap_or(
            self.concurrency
                .saturating_mul(DEFAULT_FETCH_AHEAD_PER_SLOT),
        );
        let prefetch = match self.server.config().amqp.prefetch_count {
            0 => self.concurrency + fetch_ahead,
            n => usize::from(n),
        };
        let options = ConsumeOptions {
            queue: queue.clone(),
            consumer_tag: self.consumer_tag.clone(),
            concurrency: self.concurrency,
            prefetch,
        };
        let consumer = self
            .server
            .broker()
            .consume(options)
            .await
            .map_err(|source| WorkerError::Consume {
                queue: queue.clone(),
                source,
            })?;
        self.server.config().warn_if_in_process_by_default("worker");
        tracing::info!(
            queue = %queue,
            concurrency = self.concurrency,
            broker = self.server.broker().kind(),
            backend = self.server.backend().kind(),
            tasks = ?registry.names(),
            "worker started"
        );
        let stop = CancellationToken::new();
        let abort = CancellationToken::new();
        let control =
            control::Control::start(self.server.broker().as_ref(), self.cancel_grace).await;
        let context = Arc::new(process::WorkerContext {
            server: self.server.clone(),
            registry,
            queue: queue.clone(),
            hooks: self.hooks,
            backend_health: health::BackendHealth::default(),
            counters: consumer.counters().unwrap_or_default(),
            control,
        });
        let handle = tokio::spawn(run::run(
            context,
            consumer,
            run::Sizes {
                concurrency: self.concurrency,
                fetch_ahead,
            },
            stop.clone(),
            abort.clone(),
        ));
        Ok(RunningWorker {
            stop,
            abort,
            handle: Some(handle),
            queue,
            shutdown_timeout: self.shutdown_timeout,
        })
    }

    /// Starts, then runs until SIGINT or SIGTERM: the first signal stops fetching and waits up to the
    /// [shutdown timeout](Worker::shutdown_timeout) for running tasks; a second one stops at once. Running
    /// tasks that are cut off go back to the queue. With `no_unix_signals` set it runs until the process
    /// ends.
    pub async fn launch(self) -> Result<(), WorkerError> {
        let no_signals = self.server.config().no_unix_signals;
        let running = self.start().await?;
        if no_signals {
            std::future::pending::<()>().await;
        }
        let mut signals = signals::Signals::new().map_err(WorkerError::Signals)?;
        signals.next().await;
        tracing::info!(
            "signal received; waiting for running tasks to finish (send another to quit at once)"
        );
        running.shutdown_or_interrupt(signals).await
    }
}

/// How a worker loop ended.
#[derive(Debug)]
pub(crate) struct Stopped {
    pub(crate) aborted: usize,
}

/// A started worker. Stop it with [`shutdown`](RunningWorker::shutdown); dropping it stops it without
/// waiting.
#[derive(Debug)]
pub struct RunningWorker {
    stop: CancellationToken,
    abort: CancellationToken,
    handle: Option<JoinHandle<Stopped>>,
    queue: String,
    shutdown_timeout: Duration,
}

impl RunningWorker {
    /// The queue this worker consumes.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Stops fetching, waits up to `deadline` for running tasks to finish (their results stored and their
    /// messages acknowledged), then cancels what is left and returns its messages to the queue.
    pub async fn shutdown(mut self, deadline: Duration) -> Result<(), WorkerError> {
        self.stop.cancel();
        let Some(mut handle) = self.handle.take() else {
            return Ok(());
        };
        let stopped = tokio::select! {
            result = &mut handle => result,
            _ = tokio::time::sleep(deadline) => {
                self.abort.cancel();
                handle.await
            }
        };
        match stopped {
            Ok(Stopped { aborted: 0 }) => Ok(()),
            Ok(Stopped { aborted }) => Err(WorkerError::ShutdownDeadline { deadline, aborted }),
            Err(e) => Err(WorkerError::Crashed(e.to_string())),
        }
    }

    async fn shutdown_or_interrupt(
        mut self,
        mut signals: signals::Signals,
    ) -> Result<(), WorkerError> {
        self.stop.cancel();
        let deadline = self.shutdown_timeout;
        let Some(mut handle) = self.handle.take() else {
            return Ok(());
        };
        let (stopped, interrupted) = tokio::select! {
            result = &mut handle => (result, false),
            _ = tokio::time::sleep(deadline) => {
                self.abort.cancel();
                (handle.await, false)
            }
            _ = signals.next() => {
                self.abort.cancel();
                (handle.await, true)
            }
        };
        match stopped {
            Ok(Stopped { aborted }) if interrupted => Err(WorkerError::QuitAbruptly { aborted }),
            Ok(Stopped { aborted: 0 }) => Ok(()),
            Ok(Stopped { aborted }) => Err(WorkerError::ShutdownDeadline { deadline, aborted }),
            Err(e) => Err(WorkerError::Crashed(e.to_string())),
        }
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        if self.handle.is_some() {
            // Not shut down: stop at once; the loop still closes its consumer, returning unfinished
            // messages to the queue.
            self.stop.cancel();
            self.abort.cancel();
        }
    }
}
