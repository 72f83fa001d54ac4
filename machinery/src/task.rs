//! What a task is to the runtime: its registration ([`TaskDef`]), its context ([`TaskContext`]) and its
//! error type ([`TaskError`]).

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::wire::signature::{Arg, Headers, Signature, RETRY_ATTEMPT_HEADER};
use crate::wire::state::TaskResult;
use crate::Server;

/// The error type tasks usually return.
///
/// Any error converts into it with `?`, and [`TaskError::retry_after`] asks the worker to run the task
/// again later. Like `anyhow::Error`, it does not itself implement `std::error::Error`, which is what
/// lets every error convert into it.
///
/// ```
/// use machinery::TaskError;
///
/// fn parse(text: &str) -> Result<i64, TaskError> {
///     if text.is_empty() {
///         return Err(TaskError::new("empty input"));
///     }
///     Ok(text.parse::<i64>()?)
/// }
/// assert_eq!(parse("").unwrap_err().to_string(), "empty input");
/// assert_eq!(parse("x").unwrap_err().to_string(), "invalid digit found in string");
/// ```
pub struct TaskError {
    message: String,
    retry_after: Option<Duration>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl TaskError {
    /// An error with this message.
    pub fn new(message: impl fmt::Display) -> Self {
        TaskError {
            message: message.to_string(),
            retry_after: None,
            source: None,
        }
    }

    /// An error that asks for the task to run again after `delay`. The retry counts against the task's
    /// `RetryCount`; once that is used up the task fails with `message`.
    pub fn retry_after(delay: Duration, message: impl fmt::Display) -> Self {
        TaskError {
            message: message.to_string(),
            retry_after: Some(delay),
            source: None,
        }
    }

    /// The delay this error asks to retry after, if it asks for a retry.
    pub fn retry_delay(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The underlying error, if this one was converted from another.
    pub fn source(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("TaskError");
        d.field("message", &self.message);
        if let Some(delay) = self.retry_after {
            d.field("retry_after", &delay);
        }
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for TaskError {
    fn from(error: E) -> Self {
        TaskError {
            message: error.to_string(),
            retry_after: None,
            source: Some(Box::new(error)),
        }
    }
}

/// What a running task knows about itself. Take it as an optional first parameter `ctx: &TaskContext`.
#[derive(Debug)]
pub struct TaskContext {
    signature: Arc<Signature>,
    server: Server,
    retry_request: Mutex<Option<Duration>>,
    run: RunInfo,
}

/// What the worker knows about one run of a task, beyond its message.
#[derive(Debug, Default)]
pub(crate) struct RunInfo {
    /// The broker delivered the message before.
    pub(crate) redelivered: bool,
    /// When the run's time limit ends.
    pub(crate) deadline: Option<std::time::Instant>,
    /// Cancelled when the task is [cancelled](crate::Server::cancel).
    pub(crate) cancel: CancellationToken,
}

impl TaskContext {
    pub(crate) fn new(signature: Arc<Signature>, server: Server, run: RunInfo) -> Self {
        TaskContext {
            signature,
            server,
            retry_request: Mutex::new(None),
            run,
        }
    }

    /// Whether the broker delivered this message before: an earlier run may have been cut off (a worker
    /// that died, a lost connection), so side effects of that run may already have happened.
    pub fn redelivered(&self) -> bool {
        self.run.redelivered
    }

    /// Which run of the task this is: 1 for the first, 2 for the first retry, and so on. Counted in a
    /// header that Go workers keep; a message from Go starts at 1.
    pub fn attempt(&self) -> u32 {
        let retries = self
            .signature
            .header_value(RETRY_ATTEMPT_HEADER)
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        u32::try_from(retries).unwrap_or(u32::MAX).saturating_add(1)
    }

    /// Resolves when the task is [cancelled](crate::Server::cancel) while it runs: stop soon and return
    /// (whatever it returns, its final state is FAILURE `cancelled: ...`). A task that does not return
    /// within the worker's [grace](crate::Worker::cancel_grace) is dropped at its next `.await`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use machinery::{task, TaskContext, TaskError};
    ///
    /// #[task]
    /// async fn crawl(ctx: &TaskContext, pages: u32) -> Result<u32, TaskError> {
    ///     for page in 0..pages {
    ///         tokio::select! {
    ///             _ = ctx.cancelled() => return Err(TaskError::new(format!("stopped at page {page}"))),
    ///             _ = tokio::time::sleep(Duration::from_millis(10)) => {}
    ///         }
    ///     }
    ///     Ok(pages)
    /// }
    /// ```
    pub fn cancelled(&self) -> impl std::future::Future<Output = ()> + Send + '_ {
        self.run.cancel.cancelled()
    }

    /// Whether the task has been [cancelled](crate::Server::cancel) while it runs.
    pub fn is_cancelled(&self) -> bool {
        self.run.cancel.is_cancelled()
    }

    /// When this run's time limit (`#[task(timeout = ..)]` or [`Signature::timeout`]) ends, if it has
    /// one: the run is cancelled then.
    pub fn deadline(&self) -> Option<std::time::Instant> {
        self.run.deadline
    }

    /// The task id.
    pub fn uuid(&self) -> &str {
        &self.signature.uuid
    }

    /// The task's wire name.
    pub fn name(&self) -> &str {
        &self.signature.name
    }

    /// How many retries are left (Go's `RetryCount`).
    pub fn retry_count(&self) -> u32 {
        self.signature.retry_count
    }

    /// The message headers (empty if the message has none).
    pub fn headers(&self) -> &Headers {
        static EMPTY: std::sync::OnceLock<Headers> = std::sync::OnceLock::new();
        self.signature
            .headers
            .as_ref()
            .unwrap_or_else(|| EMPTY.get_or_init(Headers::new))
    }

    /// The whole message this task was started from.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// The server the worker runs on, for sending further tasks.
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// Asks for this task to run again after `delay`; return the error it gives: `return
    /// Err(ctx.retry_after(d).into())`. The retry counts against `RetryCount` (unlike Go, which can retry
    /// forever); once that is used up the task fails.
    pub fn retry_after(&self, delay: Duration) -> TaskError {
        if let Ok(mut request) = self.retry_request.lock() {
            *request = Some(delay);
        }
        TaskError::retry_after(
            delay,
            format!("task {} asked to be retried in {delay:?}", self.name()),
        )
    }

    /// Reports how far the task has got: `progress` (any `Serialize` value, such as a struct `{done,
    /// total}`) is stored with the task's STARTED state, where a sender reads it with
    /// [`AsyncResult::progress`](crate::AsyncResult::progress) while the task runs. It travels as an extra
    /// `Progress` key of the state record, which Go machinery ignores. Each call is one backend write:
    /// report every so often, not on every item of a tight loop.
    pub async fn set_progress<P: serde::Serialize + ?Sized>(
        &self,
        progress: &P,
    ) -> Result<(), ProgressError> {
        let value = serde_json::to_value(progress).map_err(|source| ProgressError::Encode {
            task: self.name().to_owned(),
            uuid: self.uuid().to_owned(),
            source,
        })?;
        let state = crate::wire::state::TaskState::progress(self.uuid(), self.name(), value);
        self.server
            .backend()
            .set_state(&state)
            .await
            .map_err(|source| ProgressError::Backend {
                task: self.name().to_owned(),
                uuid: self.uuid().to_owned(),
                source,
            })
    }

    pub(crate) fn requested_retry(&self) -> Option<Duration> {
        self.retry_request.lock().ok().and_then(|r| *r)
    }
}

/// Why [`TaskContext::set_progress`] failed. It converts into [`TaskError`] with `?`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProgressError {
    /// The progress value could not be encoded as JSON.
    #[error("task {task} ({uuid}): the progress cannot be encoded as JSON: {source}")]
    Encode {
        /// The task name.
        task: String,
        /// The task id.
        uuid: String,
        /// serde's description.
        #[source]
        source: serde_json::Error,
    },
    /// The result backend could not store it.
    #[error("task {task} ({uuid}): the progress cannot be stored: {source}")]
    Backend {
        /// The task name.
        task: String,
        /// The task id.
        uuid: String,
        /// The backend's error.
        #[source]
        source: crate::backend::BackendError,
    },
}

/// Why a task run did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureKind {
    /// The task returned an error.
    Error,
    /// The message's arguments do not fit the task's parameters; never retried.
    BadArguments,
    /// The task panicked.
    Panic,
    /// The task ran past its time limit and was cancelled.
    TimeLimit,
    /// The task's output could not be encoded; never retried.
    Encode,
    /// The task was [cancelled](crate::Server::cancel) while it ran; never retried.
    Cancelled,
    /// The task was not started before it expired ([`Signature::expires_at`]); it did not run.
    Expired,
}

/// A failed task run: what went wrong, and whether the task asked to be retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFailure {
    /// The kind of failure.
    pub kind: FailureKind,
    /// The error text stored in the FAILURE state.
    pub message: String,
    /// A retry delay the task asked for.
    pub retry_after: Option<Duration>,
}

impl TaskFailure {
    /// A failure of this kind with this message.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        TaskFailure {
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The failure for an error a task returned; a [`TaskError`] may carry a retry request.
    pub fn from_error<E: fmt::Display + 'static>(error: &E) -> Self {
        let mut failure = TaskFailure::new(FailureKind::Error, error.to_string());
        if let Some(task_error) = (error as &dyn Any).downcast_ref::<TaskError>() {
            failure.retry_after = task_error.retry_after;
        }
        failure
    }

    /// Whether a retry may help (bad arguments and encoding errors never get better).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            FailureKind::Error | FailureKind::Panic | FailureKind::TimeLimit
        )
    }
}

impl fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The outcome of one run of a task's handler.
pub type TaskOutcome = Result<Vec<TaskResult>, TaskFailure>;

/// The future a handler returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = TaskOutcome> + Send + 'static>>;

/// The function `#[task]` generates to decode arguments, run the task and encode its results.
pub type Handler = fn(TaskContext, Vec<Arg>) -> HandlerFuture;

/// Defaults a task declares with `#[task(...)]` options.
#[derive(Debug, Clone, Copy, Default)]
pub struct TaskOptions {
    /// `queue = ".."`: the routing key `send` uses.
    pub queue: Option<&'static str>,
    /// `retries = N`: the `RetryCount` `send` sets.
    pub retries: u32,
    /// `retry_timeout = N`: the `RetryTimeout` (seconds) `send` sets.
    pub retry_timeout: u32,
    /// `timeout = "30s"`: the time limit of one run.
    pub timeout: Option<Duration>,
    /// `backoff = EXPR`: the delay between retries (default: Go's Fibonacci sequence).
    pub backoff: Option<&'static dyn crate::retry::BackoffStrategy>,
    /// `unique_for = "1h"`: the unique period `send` sets ([`Signature::unique_for`]).
    pub unique_for: Option<Duration>,
    /// `rate_limit = "100/s"`: at most that many starts per period (see [`crate::rate_limit`]).
    pub rate_limit: Option<crate::rate_limit::RateLimit>,
}

/// A task as the worker knows it. `#[task]` creates one per function (`my_task::task()`), and registers it
/// with `inventory` for [`Worker::auto`](crate::Worker::auto).
#[derive(Debug)]
pub struct TaskDef {
    /// The wire name.
    pub name: &'static str,
    /// The Rust path of the function, for error messages (`my_crate::tasks::add`).
    pub rust_path: &'static str,
    /// Decodes, runs and encodes.
    pub handler: Handler,
    /// Declared defaults.
    pub options: TaskOptions,
}

/// The `inventory` item that `#[task]` submits for each task.
#[derive(Debug)]
pub struct Registration(pub &'static TaskDef);

inventory::collect!(Registration);

/// Every task linked into this binary.
pub fn registered_tasks() -> impl Iterator<Item = &'static TaskDef> {
    inventory::iter::<Registration>.into_iter().map(|r| r.0)
}
