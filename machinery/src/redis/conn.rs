//! Connections shared by the Redis broker and result backend: a self-healing multiplexed connection for
//! ordinary commands, dedicated connections for blocking commands, and Lua scripts that survive a server
//! restart (`NOSCRIPT` reloads them).

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncConnectionConfig, Client, Cmd, ErrorKind, RedisResult, ServerErrorKind};

use super::url::RedisUrl;
use crate::config::RedisConfig;

/// Seconds from the configuration, with Go's meaning of 0 ("no limit").
fn secs(value: u64) -> Option<Duration> {
    (value > 0).then(|| Duration::from_secs(value))
}

/// Why [`open`] failed: the URL (password hidden) and the cause.
pub(crate) struct OpenError {
    pub(crate) url: String,
    pub(crate) source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

/// Parses `url` and connects a client and its self-healing connection, for a broker, a result backend or
/// a lock.
pub(crate) async fn open(
    url: &str,
    config: &RedisConfig,
) -> Result<(RedisUrl, Client, ConnectionManager), OpenError> {
    let parsed = RedisUrl::parse(url).map_err(|e| OpenError {
        url: super::url::redact(url),
        source: Box::new(e),
    })?;
    let failed = |source: redis::RedisError| OpenError {
        url: parsed.redacted(),
        source: Box::new(source),
    };
    let client = client(&parsed).map_err(failed)?;
    let conn = manager(&client, config).await.map_err(failed)?;
    Ok((parsed, client, conn))
}

/// A client for `url`.
pub(crate) fn client(url: &RedisUrl) -> RedisResult<Client> {
    Client::open(url.connection_info()?)
}

/// The connection for ordinary commands. It reconnects by itself with exponential back-off (100 ms,
/// doubling, up to 2 s between tries); a command that fails on a dead connection returns the error and
/// the next one waits for the new connection.
pub(crate) async fn manager(
    client: &Client,
    config: &RedisConfig,
) -> RedisResult<ConnectionManager> {
    // The manager retries its first connection for seconds; a wrong URL or password should fail at once,
    // so one plain connection is tried first.
    let probe = AsyncConnectionConfig::new().set_connection_timeout(secs(config.connect_timeout));
    drop(
        client
            .get_multiplexed_async_connection_with_config(&probe)
            .await?,
    );
    let settings = redis::aio::ConnectionManagerConfig::new()
        .set_min_delay(Duration::from_millis(100))
        .set_max_delay(Duration::from_secs(2))
        .set_response_timeout(secs(config.read_timeout))
        .set_connection_timeout(secs(config.connect_timeout));
    client.get_connection_manager_with_config(settings).await
}

/// A connection of its own for blocking commands (`BLMOVE`), which would stall every other command on a
/// shared multiplexed connection. It has no response timeout: the command's own timeout bounds it.
pub(crate) async fn blocking_connection(
    client: &Client,
    config: &RedisConfig,
) -> RedisResult<redis::aio::MultiplexedConnection> {
    let settings = AsyncConnectionConfig::new()
        .set_response_timeout(None)
        .set_connection_timeout(secs(config.connect_timeout));
    client
        .get_multiplexed_async_connection_with_config(&settings)
        .await
}

/// A Lua script run with `EVALSHA`, loaded on first use and again after `NOSCRIPT` (a restarted or
/// flushed server).
#[derive(Debug)]
pub(crate) struct Lua {
    script: redis::Script,
}

impl Lua {
    pub(crate) fn new(source: &str) -> Self {
        Lua {
            script: redis::Script::new(source),
        }
    }

    /// `EVALSHA` of this script as a plain command, for pipelines.
    pub(crate) fn cmd<K: redis::ToRedisArgs, A: redis::ToRedisArgs>(
        &self,
        keys: &[K],
        args: &[A],
    ) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(keys.len());
        for key in keys {
            cmd.arg(key);
        }
        for arg in args {
            cmd.arg(arg);
        }
        cmd
    }

    /// Runs the script.
    pub(crate) async fn run<T: redis::FromRedisValue, C: redis::aio::ConnectionLike>(
        &self,
        conn: &mut C,
        keys: &[&[u8]],
        args: &[&[u8]],
    ) -> RedisResult<T> {
        let mut invocation = self.script.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        for arg in args {
            invocation.arg(*arg);
        }
        invocation.invoke_async(conn).await
    }

    /// Loads the script (after a pipeline that used it failed with `NOSCRIPT`).
    pub(crate) async fn load<C: redis::aio::ConnectionLike>(
        &self,
        conn: &mut C,
    ) -> RedisResult<()> {
        self.script.load_async(conn).await.map(drop)
    }
}

/// Whether a pipeline failed because the server does not know a script.
pub(crate) fn is_noscript(error: &redis::RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}
