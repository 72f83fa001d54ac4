//! Locks that make each tick of a periodic task fire once across many processes.
//!
//! The lock is named by `Config::lock`; when that is empty, a Redis broker lends its Redis, and any other
//! broker gets the in-process lock (every process then fires its own copy, as Go's default eager lock
//! does — a warning says so).

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

/// Why a lock operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// The lock server could not be reached or refused the command.
    #[error("lock {operation} failed: {source}")]
    Operation {
        /// What we were doing.
        operation: &'static str,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

/// A distributed lock with expiry.
#[async_trait]
pub trait Lock: Send + Sync + fmt::Debug + 'static {
    /// Takes `key` for `ttl` if nobody holds it; `true` if we got it. Never released early: a periodic
    /// tick's key simply expires.
    async fn try_acquire(&self, key: &str, ttl: Duration) -> Result<bool, LockError>;
}

// Where the locks and `connect` lived before each transport had a room of its own; these paths stay so
// that code naming them keeps compiling.

pub use crate::connect::{lock as connect, lock_schemes as supported_schemes};

/// The in-process lock (now [`crate::memory`]).
pub mod memory {
    pub use crate::memory::MemoryLock;
}

/// The Redis lock (now [`crate::redis`]).
#[cfg(feature = "redis")]
pub mod redis {
    pub use crate::redis::RedisLock;
}
