//! The Redis lock for periodic tasks: `SET <key> <value> NX PX <ttl>`, as Go machinery's Redis lock takes
//! it, so Go and Rust processes that schedule the same periodic task under the same key fire it once. The
//! value is, as in Go, the Unix nanoseconds at which the lock may be taken again, minus one.

use std::fmt;

use async_trait::async_trait;

use super::conn::{self, Healing};
use super::url::RedisUrl;
use crate::config::{Config, TlsConfig};
use crate::lock::{Lock, LockError};

/// A lock held in Redis.
#[derive(Clone)]
pub struct RedisLock {
    url: RedisUrl,
    conn: Healing,
}

impl fmt::Debug for RedisLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLock")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

fn error(operation: &'static str) -> impl FnOnce(redis::RedisError) -> LockError {
    move |source| LockError::Operation {
        operation,
        source: Box::new(source),
    }
}

impl RedisLock {
    /// Connects to the Redis server named by `url` (any Redis URL form), with the TLS settings `tls`
    /// for a `rediss://` URL.
    pub async fn connect(
        url: &str,
        config: &Config,
        tls: &TlsConfig,
    ) -> Result<RedisLock, LockError> {
        let (url, _endpoint, conn) =
            conn::open(url, &config.redis, tls, "lock")
                .await
                .map_err(|e| LockError::Operation {
                    operation: "connect",
                    source: e.source,
                })?;
        Ok(RedisLock { url, conn })
    }
}

#[async_trait]
impl Lock for RedisLock {
    async fn try_acquire(&self, key: &str, ttl: std::time::Duration) -> Result<bool, LockError> {
        let millis = ttl.as_millis().clamp(1, u128::from(u64::MAX)) as u64;
        let until = chrono::Utc::now()
            .timestamp_nanos_opt()
            .unwrap_or(i64::MAX)
            .saturating_add(i64::try_from(ttl.as_nanos()).unwrap_or(i64::MAX))
            .saturating_sub(1);
        let mut conn = self.conn.clone();
        let reply: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(until)
            .arg("NX")
            .arg("PX")
            .arg(millis)
            .query_async(&mut conn)
            .await
            .map_err(error("acquire"))?;
        Ok(reply.is_some())
    }
}
