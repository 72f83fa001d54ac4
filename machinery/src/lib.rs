//! # machinery
//!
//! A distributed task queue for Rust that speaks [Go machinery]'s wire format: an ordinary `async fn`
//! becomes a task with one attribute, workers and senders share a broker (in-memory, Redis or AMQP), and
//! results come back typed.
//!
//! ```
//! use std::time::Duration;
//! use machinery::{task, AsyncResult, Config, Server, TaskError, Worker};
//!
//! #[task]
//! async fn add(a: i64, b: i64) -> Result<i64, TaskError> {
//!     Ok(a + b)
//! }
//!
//! #[task]
//! async fn hello_world(arg: String) -> Result<String, TaskError> {
//!     Ok(format!("Hi, {arg}"))
//! }
//!
//! # async fn demo() -> Result<(), machinery::Error> {
//! let server = Server::new(Config::default()).await?; // in-memory broker and backend
//! let running = Worker::auto(&server).concurrency(4).start().await?; // every #[task] in the binary
//!
//! let r: AsyncResult<i64> = add::send(&server, 1, 2).await?;
//! assert_eq!(r.get(Duration::from_secs(5)).await?, 3);
//! let text = hello_world::send(&server, "task1").await?.get(Duration::from_secs(5)).await?;
//! assert_eq!(text, "Hi, task1");
//!
//! running.shutdown(Duration::from_secs(10)).await?;
//! # Ok(()) }
//! # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
//! ```
//!
//! [Go machinery]: https://github.com/RichardKnop/machinery

#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

// The face: what users name, and what generated code reaches.
pub mod config;
mod error;

// Go's wire format, below everything else.
pub mod wire;
pub use wire::{args, signature, state};
// Go's time format: named `wire::gotime`; the root path stays for older code.
#[doc(hidden)]
pub use wire::gotime;

// The traits, and the one place that picks a transport for a URL.
pub mod backend;
pub mod broker;
mod cancel;
pub mod connect;
pub mod lock;
#[cfg(any(feature = "redis", feature = "amqp", feature = "memcache"))]
pub mod tls;
// What two rooms share: writes made meanwhile go in one call (Redis final states, RabbitMQ acks).
#[cfg(any(feature = "redis", feature = "amqp"))]
mod group_commit;

// One room per transport.
#[cfg(feature = "amqp")]
pub mod amqp;
#[cfg(feature = "memcache")]
pub mod memcache;
pub mod memory;
#[cfg(feature = "redis")]
pub mod redis;
// Redis URLs as Go machinery reads them: named `redis::url`; the root path stays for older code.
#[cfg(feature = "redis")]
#[doc(hidden)]
pub use redis::url as redis_url;

// The engine.
pub mod periodic;
pub mod rate_limit;
mod result;
pub mod retry;
mod server;
mod task;
pub mod telemetry;
mod unique;
mod worker;
mod workflow;

#[doc(hidden)]
pub mod __private;

pub use cancel::CancelError;
pub use config::{AmqpConfig, Config, ConfigError, RedisConfig, TlsConfig, TlsSection};
pub use error::{Error, SendError};
/// Turns an `async fn` into a distributed task.
///
/// The function stays callable as written. Beside it, a module of the same name holds `NAME` (the wire
/// name), `Args` (a serde struct of the parameters), `TASK`/`task()` (for [`Worker::register`]),
/// `signature(..)` (a typed [`Signature`]), `send(&server, ..)` (sends it, giving an [`AsyncResult`]),
/// `partial(..)` (all parameters but the last, for [`Chain`] and [`Chord`]) and, for a last `Vec<T>`
/// parameter, `partial_with(.., head)`. Every task is registered for [`Worker::auto`].
///
/// Parameters and outputs are any serde types: Go's types (`bool`, `i8`..`i64`, `u8`..`u64`, `f32`,
/// `f64`, `String`, `Vec` of those, `Vec<u8>`) travel with Go's type tags; other types with the tag
/// `json`, which only Rust peers read. A tuple output is one result per element (Go's multiple return
/// values); `()` is no result. The error type may be any `E: Display` (`TaskError`, `String`,
/// `anyhow::Error`, ...); its text becomes the FAILURE's error.
///
/// # Options
///
/// ```
/// use std::time::Duration;
/// use machinery::retry::Exponential;
/// use machinery::{task, TaskContext, TaskError};
///
/// // `name`: the wire name (default: the function's name). Go senders use it.
/// #[task(name = "Add")]
/// async fn add(a: i64, b: i64) -> Result<i64, TaskError> { Ok(a + b) }
///
/// // `queue`: the routing key (Redis list, AMQP routing key) that `send` uses.
/// #[task(queue = "emails")]
/// async fn send_email(to: String) -> Result<(), TaskError> { Ok(()) }
///
/// // `retries` and `retry_timeout`: Go's RetryCount and RetryTimeout (seconds, or "5s") that `send`
/// // sets; retries wait 1 s, 2 s, 3 s, 5 s, ... (Go's Fibonacci back-off from RetryTimeout).
/// #[task(retries = 3, retry_timeout = "2s")]
/// async fn flaky_call(url: String) -> Result<String, TaskError> { Ok(url) }
///
/// // `backoff`: another delay between retries, any constant of a `BackoffStrategy` type.
/// const BACKOFF: Exponential = Exponential::new(Duration::from_secs(1), Duration::from_secs(60)).with_jitter();
/// #[task(retries = 5, backoff = BACKOFF)]
/// async fn fetch(url: String) -> Result<String, TaskError> { Ok(url) }
///
/// // `timeout`: the time limit of one run ("500ms", "30s", "2m", "1h", or whole seconds); a run that
/// // takes longer is cancelled and fails. `signature(..).timeout(d)` sets it per message.
/// #[task(timeout = "30s")]
/// async fn resize(image: Vec<u8>) -> Result<Vec<u8>, TaskError> { Ok(image) }
///
/// // `unique_for`: sending the same name and arguments while an earlier one is pending or running
/// // returns the earlier task's handle (same id) instead of queueing a second; the claim is released when
/// // the task finishes, or after the period. Needs a Redis or in-memory result backend.
/// #[task(unique_for = "1h")]
/// async fn daily_report(day: String) -> Result<String, TaskError> { Ok(day) }
///
/// // `rate_limit`: at most that many starts per second, minute or hour ("100/s", "10/m", "500/h"),
/// // spaced evenly, across every worker sharing a Redis result backend (per worker process otherwise).
/// // A limited task waits for its turn in the broker; other tasks keep flowing.
/// #[task(rate_limit = "10/s")]
/// async fn call_api(url: String) -> Result<String, TaskError> { Ok(url) }
///
/// // `variadic`: `send` spreads the last `Vec<T>` into one argument per element, as a Go worker's
/// // variadic function (`func(args ...int64)`) expects. Whatever the option, a worker accepts both forms.
/// #[task(variadic)]
/// async fn multiply(args: Vec<i64>) -> Result<i64, TaskError> { Ok(args.iter().product()) }
///
/// // An optional first parameter `&TaskContext`: the task's id, name, retries left, headers, server.
/// #[task]
/// async fn whoami(ctx: &TaskContext) -> Result<String, TaskError> {
///     if ctx.retry_count() > 0 && ctx.headers().is_empty() {
///         return Err(ctx.retry_after(Duration::from_secs(1)));
///     }
///     Ok(format!("{} {}", ctx.name(), ctx.uuid()))
/// }
///
/// // A tuple output is stored as one result per element, as Go stores multiple return values.
/// #[task]
/// async fn split_name(full: String) -> Result<(String, String), String> {
///     let (first, last) = full.split_once(' ').ok_or("no space")?;
///     Ok((first.to_owned(), last.to_owned()))
/// }
///
/// fn main() {
///     assert_eq!(add::NAME, "Add");
///     assert_eq!(send_email::signature("a@b.c").routing_key, "emails");
///     assert_eq!(flaky_call::signature("u").retry_count, 3);
///     assert_eq!(multiply::signature(vec![2, 3]).args.len(), 2);
/// }
/// ```
///
/// `crate = "my_facade::machinery"` names the machinery crate for code that re-exports it.
pub use machinery_macros::task;
pub use periodic::{PeriodicError, PeriodicTask, PERIODIC_TICK_HEADER};
pub use result::{AsyncResult, ResultError};
pub use server::Server;
pub use signature::{Arg, Headers, Signature};
pub use signature::{
    EXPIRES_HEADER, RATE_SLOT_HEADER, RETRY_ATTEMPT_HEADER, TIME_LIMIT_HEADER, UNIQUE_FOR_HEADER,
    UNIQUE_KEY_HEADER, UNKNOWN_TASK_REQUEUES_HEADER,
};
pub use state::{GroupMeta, State, TaskResult, TaskState};
pub use task::{
    registered_tasks, FailureKind, ProgressError, TaskContext, TaskDef, TaskError, TaskFailure,
    TaskOptions,
};
// What generated code calls: its home is `__private`. These root paths stay for code written before the
// move, and are left out of the documentation.
#[doc(hidden)]
pub use task::{Handler, HandlerFuture, Registration, TaskOutcome};
pub use worker::{RunningWorker, Worker, WorkerError, TASK_LOG_TARGET};
pub use workflow::{
    Chain, ChainResult, ChainStep, Chord, ChordResult, Group, GroupResult, Partial,
};
