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

mod wire;

#[cfg(feature = "amqp")]
mod amqp;

pub mod args;
pub mod backend;
pub mod broker;
pub mod config;
mod error;
pub mod gotime;
pub mod lock;
pub mod periodic;
#[cfg(feature = "redis")]
mod redis_conn;
#[cfg(feature = "redis")]
pub mod redis_url;
mod result;
pub mod retry;
mod server;
pub mod signature;
pub mod state;
mod task;
mod worker;
mod workflow;

#[doc(hidden)]
pub mod __private;

pub use config::{AmqpConfig, Config, ConfigError, RedisConfig};
pub use error::{Error, SendError};
pub use machinery_macros::task;
pub use periodic::{PeriodicError, PeriodicTask};
pub use result::{AsyncResult, ResultError};
pub use server::Server;
pub use signature::{Arg, Headers, Signature};
pub use signature::{RETRY_ATTEMPT_HEADER, TIME_LIMIT_HEADER, UNKNOWN_TASK_REQUEUES_HEADER};
pub use state::{GroupMeta, State, TaskResult, TaskState};
pub use task::{
    registered_tasks, FailureKind, Handler, HandlerFuture, Registration, TaskContext, TaskDef,
    TaskError, TaskFailure, TaskOptions, TaskOutcome,
};
pub use worker::{RunningWorker, Worker, WorkerError};
pub use workflow::{
    Chain, ChainResult, ChainStep, Chord, ChordResult, Group, GroupResult, Partial,
};
