//! Locks that make each tick of a periodic task fire once across many processes.
//!
//! The lock is named by `Config::lock`; when that is empty, a Redis broker lends its Redis, and any other
//! broker gets the in-process lock (every process then fires its own copy, as Go's default eager lock
//! does — a warning says so).

pub mod memory;
#[cfg(feature = "redis")]
pub mod redis;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::config::{Config, ConfigError};

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

/// The lock for `config`: `config.lock` if set, else the broker's Redis, else in-process.
pub async fn connect(config: &Config) -> Result<Arc<dyn Lock>, crate::Error> {
    let scheme_of = |url: &str| url.split_once("://").map(|(s, _)| s.to_owned());
    let url = if !config.lock.trim().is_empty() {
        config.lock.trim().to_owned()
    } else if cfg!(feature = "redis")
        && matches!(
            scheme_of(config.broker.trim()).as_deref(),
            Some("redis" | "rediss" | "redis+socket")
        )
    {
        config.broker.trim().to_owned()
    } else {
        "memory://".to_owned()
    };
    let scheme = scheme_of(&url).unwrap_or_else(|| url.clone());
    match scheme.as_str() {
        "memory" | "eager" | "" => Ok(Arc::new(memory::MemoryLock::default())),
        #[cfg(feature = "redis")]
        "redis" | "rediss" | "redis+socket" => Ok(Arc::new(
            redis::RedisLock::connect(&url, config)
                .await
                .map_err(|source| ConfigError::InvalidUrl {
                    role: "lock",
                    url: crate::redis_url::redact(&url),
                    reason: source.to_string(),
                })?,
        )),
        _ => Err(ConfigError::UnknownScheme {
            role: "lock",
            url: crate::config::redact_url(&url),
            supported: supported_schemes().join(", "),
        }
        .into()),
    }
}

/// The URL schemes of the locks in this build.
pub fn supported_schemes() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut schemes = vec!["memory://"];
    #[cfg(feature = "redis")]
    schemes.extend(["redis://", "rediss://", "redis+socket://"]);
    schemes
}
