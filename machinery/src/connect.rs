//! URL → broker, result backend, lock: the one place that picks transports.
//!
//! Each role's URL scheme names a transport room ([`crate::memory`], [`crate::redis`], [`crate::amqp`],
//! [`crate::memcache`]); the engine gets trait objects back and never names a transport type. This is
//! also where a pair is made: when the broker and the result backend are the same Redis database, the
//! Redis room is asked for a broker that holds its backend half
//! ([`RedisBroker::with_backend`](crate::redis::RedisBroker::with_backend)), so that a state write rides
//! with the broker's own command.
//!
//! ```
//! # async fn demo() -> Result<(), machinery::Error> {
//! use machinery::Config;
//!
//! let (broker, backend, lock) = machinery::connect::all(&Config::default()).await?;
//! assert_eq!((broker.kind(), backend.kind()), ("memory", "memory"));
//! # let _ = lock;
//! # Ok(()) }
//! # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
//! ```

use std::sync::Arc;

use crate::backend::null::NullBackend;
use crate::backend::Backend;
use crate::broker::Broker;
use crate::config::{Config, ConfigError};
use crate::lock::Lock;
use crate::memory::{MemoryBackend, MemoryBroker, MemoryLock};

/// The transport a URL's scheme names (empty for a URL with no `://`).
fn scheme(url: &str) -> &str {
    url.split_once("://").map(|(s, _)| s).unwrap_or(url)
}

/// Whether `scheme` is one of Redis's.
fn is_redis(scheme: &str) -> bool {
    matches!(scheme, "redis" | "rediss" | "redis+socket")
}

/// The broker, the result backend and the lock that `config` names, with a Redis broker and backend on one
/// database paired (see the module's documentation).
pub async fn all(
    config: &Config,
) -> Result<(Arc<dyn Broker>, Arc<dyn Backend>, Arc<dyn Lock>), crate::Error> {
    let (broker, backend) = broker_and_backend(config).await?;
    let lock = lock(config).await?;
    Ok((broker, backend, lock))
}

#[cfg(feature = "redis")]
async fn broker_and_backend(
    config: &Config,
) -> Result<(Arc<dyn Broker>, Arc<dyn Backend>), crate::Error> {
    if is_redis(scheme(config.broker.trim())) && is_redis(scheme(config.result_backend.trim())) {
        let backend = crate::redis::RedisBackend::connect(config).await?;
        let broker = crate::redis::RedisBroker::connect(config)
            .await?
            .with_backend(backend.clone());
        return Ok((Arc::new(broker), Arc::new(backend)));
    }
    Ok((broker(config).await?, backend(config).await?))
}

#[cfg(not(feature = "redis"))]
async fn broker_and_backend(
    config: &Config,
) -> Result<(Arc<dyn Broker>, Arc<dyn Backend>), crate::Error> {
    Ok((broker(config).await?, backend(config).await?))
}

/// The URL schemes of the brokers in this build.
pub fn broker_schemes() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut schemes = vec!["memory://"];
    #[cfg(feature = "amqp")]
    schemes.extend(["amqp://", "amqps://"]);
    #[cfg(feature = "redis")]
    schemes.extend(["redis://", "rediss://", "redis+socket://"]);
    schemes
}

/// Connects to the broker named by `config.broker` alone (no backend half: see [`all`]).
pub async fn broker(config: &Config) -> Result<Arc<dyn Broker>, crate::Error> {
    let url = config.broker.trim();
    match scheme(url) {
        "memory" | "" | "eager" => Ok(MemoryBroker::connect(url, config)),
        #[cfg(feature = "amqp")]
        "amqp" | "amqps" => match crate::amqp::AmqpBroker::new(config).await {
            Ok(broker) => Ok(Arc::new(broker)),
            Err(crate::amqp::ConnectError::Url(error)) => Err(error.into()),
            Err(crate::amqp::ConnectError::Server(error)) => Err(error.into()),
        },
        #[cfg(feature = "redis")]
        "redis" | "rediss" | "redis+socket" => {
            Ok(Arc::new(crate::redis::RedisBroker::connect(config).await?))
        }
        _ => Err(ConfigError::UnknownScheme {
            role: "broker",
            url: crate::config::redact_url(url),
            supported: broker_schemes().join(", "),
        }
        .into()),
    }
}

/// The URL schemes of the result backends in this build.
pub fn backend_schemes() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut schemes = vec!["memory://", "null"];
    #[cfg(feature = "amqp")]
    schemes.extend(["amqp://", "amqps://"]);
    #[cfg(feature = "redis")]
    schemes.extend(["redis://", "rediss://", "redis+socket://"]);
    #[cfg(feature = "memcache")]
    schemes.extend(["memcache://", "memcaches://"]);
    schemes
}

/// Connects to the result backend named by `config.result_backend`; the memory backend may share the
/// memory broker's instance name.
pub async fn backend(config: &Config) -> Result<Arc<dyn Backend>, crate::Error> {
    let url = config.result_backend.trim();
    match scheme(url) {
        "memory" | "" | "eager" => Ok(MemoryBackend::connect(url, config)),
        "null" => Ok(Arc::new(NullBackend)),
        #[cfg(feature = "amqp")]
        "amqp" | "amqps" => match crate::amqp::AmqpBackend::new(config).await {
            Ok(backend) => Ok(Arc::new(backend)),
            Err(crate::amqp::ConnectError::Url(error)) => Err(error.into()),
            Err(crate::amqp::ConnectError::Server(error)) => Err(error.into()),
        },
        #[cfg(feature = "redis")]
        "redis" | "rediss" | "redis+socket" => {
            Ok(Arc::new(crate::redis::RedisBackend::connect(config).await?))
        }
        #[cfg(feature = "memcache")]
        "memcache" | "memcaches" => {
            match crate::memcache::MemcacheBackend::connect(url, config).await {
                Ok(backend) => Ok(Arc::new(backend)),
                Err(crate::memcache::ConnectError::Url(error)) => Err(error.into()),
                Err(crate::memcache::ConnectError::Unreachable(error)) => Err(error.into()),
            }
        }
        _ => Err(ConfigError::UnknownScheme {
            role: "result backend",
            url: crate::config::redact_url(url),
            supported: backend_schemes().join(", "),
        }
        .into()),
    }
}

/// The URL schemes of the locks in this build.
pub fn lock_schemes() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut schemes = vec!["memory://"];
    #[cfg(feature = "redis")]
    schemes.extend(["redis://", "rediss://", "redis+socket://"]);
    schemes
}

/// The in-process lock: each tick fires once per process (what a server built from parts gets).
pub fn process_lock() -> Arc<dyn Lock> {
    Arc::new(MemoryLock::default())
}

/// The lock for `config`: `config.lock` if set, else the broker's Redis, else in-process.
pub async fn lock(config: &Config) -> Result<Arc<dyn Lock>, crate::Error> {
    let on_broker = config.lock.trim().is_empty();
    let url = if !on_broker {
        config.lock.trim()
    } else if cfg!(feature = "redis") && is_redis(scheme(config.broker.trim())) {
        config.broker.trim()
    } else {
        "memory://"
    };
    match scheme(url) {
        "memory" | "eager" | "" => Ok(process_lock()),
        #[cfg(feature = "redis")]
        "redis" | "rediss" | "redis+socket" => Ok(Arc::new(
            crate::redis::RedisLock::connect(url, config, &config.tls.for_lock(on_broker))
                .await
                .map_err(|source| ConfigError::InvalidUrl {
                    role: "lock",
                    url: crate::redis::url::redact(url),
                    reason: source.to_string(),
                })?,
        )),
        _ => Err(ConfigError::UnknownScheme {
            role: "lock",
            url: crate::config::redact_url(url),
            supported: lock_schemes().join(", "),
        }
        .into()),
    }
}
