//! Connections shared by the Redis broker and result backend: a self-healing multiplexed connection for
//! ordinary commands ([`Healing`]), dedicated connections for blocking commands, and Lua scripts that
//! survive a server restart (`NOSCRIPT` reloads them).
//!
//! A link can die without a word: after a failover or a NAT table drop, the TCP connection stays open on
//! our side and nothing ever arrives. Every connection here therefore has a response timeout, TCP
//! keepalive (and, on Linux, `TCP_USER_TIMEOUT`), and a shared connection that goes silent is replaced
//! rather than waited on for ever (`docs/redis.md`, "Network faults").

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::TcpSettings;
use redis::{
    AsyncConnectionConfig, Client, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult,
    ServerErrorKind, Value,
};
use tokio_util::sync::CancellationToken;

pub(crate) use super::client::client;
use super::cluster;
use super::url::RedisUrl;
use crate::config::{RedisConfig, TlsConfig};

/// Seconds from the configuration, with Go's meaning of 0 ("no limit").
fn secs(value: u64) -> Option<Duration> {
    (value > 0).then(|| Duration::from_secs(value))
}

/// How much longer than its own timeout a blocking fetch, or one round of a consumer's housekeeping,
/// may go without an answer before its link counts as silent.
const SILENCE_MARGIN: Duration = Duration::from_secs(1);

/// How long a consumer waits for an answer that should come within one poll period (its `BLMOVE`, a
/// round of housekeeping) before it declares the link silent and replaces its connections.
pub(crate) fn silence_limit(config: &RedisConfig) -> Duration {
    Duration::from_millis(config.normal_tasks_poll_period.max(100)) + SILENCE_MARGIN
}

/// Idle seconds before the first TCP keepalive probe, seconds between probes, and unanswered probes (or
/// seconds of unacknowledged data, `TCP_USER_TIMEOUT`) before the kernel gives the connection up: a
/// peer that vanished is noticed by the kernel within about half a minute even on an idle connection.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
#[cfg(any(target_os = "linux", target_os = "android"))]
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
#[cfg(any(target_os = "linux", target_os = "android"))]
const KEEPALIVE_PROBES: u32 = 3;
#[cfg(any(target_os = "linux", target_os = "android"))]
const USER_TIMEOUT: Duration = Duration::from_secs(30);

/// TCP settings of every connection: keepalive probes, and on Linux a bound on unacknowledged data.
pub(crate) fn tcp_settings() -> TcpSettings {
    let keepalive = redis::io::tcp::socket2::TcpKeepalive::new().with_time(KEEPALIVE_IDLE);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let keepalive = keepalive
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let settings = TcpSettings::default().set_keepalive(keepalive);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let settings = settings.set_user_timeout(USER_TIMEOUT);
    settings
}

/// Why [`open`] failed: the URL (password hidden) and the cause.
pub(crate) struct OpenError {
    pub(crate) url: String,
    pub(crate) source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

/// What connections are opened to: one server, or a Redis Cluster through its seed nodes.
// One per broker or backend, built once: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub(crate) enum Endpoint {
    /// One server.
    Single(Client),
    /// A cluster: its client, and a plain client per seed (for pub/sub, which any node relays).
    Cluster {
        client: ClusterClient,
        seeds: Vec<Client>,
    },
}

impl Endpoint {
    /// Clients of single servers for pub/sub: the server, or each seed of a cluster (a cluster relays
    /// every `PUBLISH` to all its nodes, so any seed that answers will do).
    pub(crate) fn pubsub_clients(&self) -> Vec<Client> {
        match self {
            Endpoint::Single(client) => vec![client.clone()],
            Endpoint::Cluster { seeds, .. } => seeds.clone(),
        }
    }
}

/// Parses `url` and connects a client and its self-healing connection, for a broker, a result backend or
/// a lock (`role`, named in the one warning of an unchecked TLS connection). A TLS handshake that fails
/// is told in plain words ([`crate::tls::explain`]), at once: no retry mends a wrong certificate. With
/// `config.cluster_enabled` the URL names the seed nodes of a Redis Cluster (see [`super::cluster`]); the
/// returned URL is the first seed's.
pub(crate) async fn open(
    url: &str,
    config: &RedisConfig,
    tls: &TlsConfig,
    role: &'static str,
) -> Result<(RedisUrl, Endpoint, Healing), OpenError> {
    let refused = |e: super::url::RedisUrlError| OpenError {
        url: super::url::redact(url),
        source: Box::new(e),
    };
    if config.cluster_enabled {
        let seeds = cluster::seed_urls(url).map_err(refused)?;
        // `seed_urls` gives at least one URL or an error.
        let first = seeds[0].clone();
        let failed = |source: Box<dyn std::error::Error + Send + Sync + 'static>| OpenError {
            url: first.redacted(),
            source,
        };
        let cluster = cluster::client(
            &seeds,
            tcp_settings(),
            secs(config.connect_timeout),
            secs(config.read_timeout),
        )
        .map_err(|e| failed(Box::new(e)))?;
        let conn = cluster
            .get_async_connection()
            .await
            .map_err(|e| failed(Box::new(e)))?;
        let plain = seeds
            .iter()
            .map(|seed| client(seed, tls, role).map(|(client, _)| client))
            .collect::<Result<Vec<_>, _>>()
            .map_err(failed)?;
        let healing = Healing {
            link: Link::Cluster(conn),
        };
        return Ok((
            first,
            Endpoint::Cluster {
                client: cluster,
                seeds: plain,
            },
            healing,
        ));
    }
    let parsed = RedisUrl::parse(url).map_err(refused)?;
    let failed = |source: Box<dyn std::error::Error + Send + Sync + 'static>| OpenError {
        url: parsed.redacted(),
        source,
    };
    let (client, sends_certificate) = client(&parsed, tls, role).map_err(failed)?;
    let conn = manager(&client, config).await.map_err(|error| {
        match crate::tls::explain(&error, sends_certificate) {
            Some(tls_error) => failed(Box::new(tls_error)),
            None => failed(Box::new(error)),
        }
    })?;
    Ok((parsed, Endpoint::Single(client), conn))
}

/// The connection for ordinary commands. It reconnects by itself with exponential back-off (100 ms,
/// doubling, up to 2 s between tries); a command that fails on a dead connection returns the error and
/// the next one waits for the new connection. A command unanswered for `read_timeout` fails, and the
/// connection is replaced (see [`Healing`]).
pub(crate) async fn manager(client: &Client, config: &RedisConfig) -> RedisResult<Healing> {
    // The manager retries its first connection for seconds; a wrong URL or password should fail at once,
    // so one plain connection is tried first.
    // A PING makes the probe complete a round trip: a TLS server that refuses our client certificate
    // says so only after the handshake, at the first read.
    let probe = AsyncConnectionConfig::new()
        .set_connection_timeout(secs(config.connect_timeout))
        .set_response_timeout(secs(config.read_timeout));
    let mut probe = client
        .get_multiplexed_async_connection_with_config(&probe)
        .await?;
    redis::cmd("PING").query_async::<()>(&mut probe).await?;
    drop(probe);
    let settings = ConnectionManagerConfig::new()
        .set_min_delay(Duration::from_millis(100))
        .set_max_delay(Duration::from_secs(2))
        .set_response_timeout(secs(config.read_timeout))
        .set_connection_timeout(secs(config.connect_timeout));
    let manager = client
        .get_connection_manager_with_config(settings.clone())
        .await?;
    Ok(Healing {
        link: Link::Single(Arc::new(HealingShared {
            client: client.clone(),
            settings,
            db: manager.get_db(),
            current: Mutex::new(Generation {
                number: 0,
                manager,
                abandoned: CancellationToken::new(),
            }),
        })),
    })
}

/// A self-healing connection for ordinary commands: `redis`'s [`ConnectionManager`], which reconnects
/// when the connection breaks, and which this replaces when the connection goes silent instead.
///
/// The manager treats a response timeout as a passing hiccup and keeps the connection, so on a
/// half-open link every command would wait out the timeout for ever. Here a timed-out command, or a
/// caller that saw the link go silent ([`Healing::replace`]), swaps in a new manager; the commands still
/// waiting on the old one fail at once as dropped by the connection (the broker retries its safe
/// operations on the new one). Clones share the connection.
///
/// On a Redis Cluster it is the `redis` crate's cluster connection instead, which follows `MOVED` and
/// `ASK`, reloads the slot map after a failover and reconnects to each node by itself; a pipeline whose
/// commands live in different slots runs as ordered single commands ([`cluster::in_order`]).
#[derive(Clone)]
pub(crate) struct Healing {
    link: Link,
}

#[derive(Clone)]
enum Link {
    Single(Arc<HealingShared>),
    Cluster(ClusterConnection),
}

struct HealingShared {
    client: Client,
    settings: ConnectionManagerConfig,
    db: i64,
    current: Mutex<Generation>,
}

/// One connection manager in the life of a [`Healing`] connection.
#[derive(Clone)]
struct Generation {
    number: u64,
    manager: ConnectionManager,
    /// Cancelled when this generation is replaced: its waiting commands give up.
    abandoned: CancellationToken,
}

impl std::fmt::Debug for Healing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Healing")
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

/// The error of a command abandoned with its silent connection: dropped by the connection, so safe
/// operations are retried on the new one.
fn abandoned() -> RedisError {
    RedisError::from(io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the redis connection went silent and was replaced",
    ))
}

impl Healing {
    /// The cluster connection, on a Redis Cluster.
    pub(crate) fn cluster(&self) -> Option<ClusterConnection> {
        match &self.link {
            Link::Single(_) => None,
            Link::Cluster(conn) => Some(conn.clone()),
        }
    }

    /// Which connection is in use; pass it to [`Healing::replace`] after watching it go silent. (Always 0
    /// on a cluster, whose connection replaces its node links by itself.)
    pub(crate) fn generation(&self) -> u64 {
        match &self.link {
            Link::Single(shared) => shared.current().number,
            Link::Cluster(_) => 0,
        }
    }

    /// Replaces the connection with a new one (connected on first use), if it is still `generation`
    /// (so many callers that saw the same silence replace it once); the commands waiting on the old one
    /// fail at once. Returns whether it replaced it (never on a cluster: see [`Healing`]).
    pub(crate) fn replace(&self, generation: u64, why: &str) -> bool {
        match &self.link {
            Link::Single(shared) => shared.replace(generation, why),
            Link::Cluster(_) => false,
        }
    }
}

impl HealingShared {
    fn current(&self) -> Generation {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn replace(&self, generation: u64, why: &str) -> bool {
        let old = {
            let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
            if current.number != generation {
                return false;
            }
            let fresh = match ConnectionManager::new_lazy_with_config(
                self.client.clone(),
                self.settings.clone(),
            ) {
                Ok(fresh) => fresh,
                Err(error) => {
                    tracing::warn!(%error, why, "cannot replace a silent redis connection");
                    return false;
                }
            };
            std::mem::replace(
                &mut *current,
                Generation {
                    number: generation + 1,
                    manager: fresh,
                    abandoned: CancellationToken::new(),
                },
            )
        };
        old.abandoned.cancel();
        tracing::warn!(why, "replaced a silent redis connection");
        true
    }

    /// Runs one request on the current connection; a timeout replaces the connection.
    async fn request<'a, T>(
        &self,
        send: impl FnOnce(ConnectionManager) -> RedisFuture<'a, T>,
    ) -> RedisResult<T> {
        let generation = self.current();
        let result = tokio::select! {
            result = send(generation.manager.clone()) => result,
            () = generation.abandoned.cancelled() => Err(abandoned()),
        };
        if let Err(error) = &result {
            if error.is_timeout() {
                self.replace(
                    generation.number,
                    "a command got no answer within REDIS_READ_TIMEOUT",
                );
            }
        }
        result
    }
}

impl ConnectionLike for Healing {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            match &mut self.link {
                Link::Single(shared) => {
                    shared
                        .request(|mut manager| {
                            Box::pin(async move { manager.send_packed_command(cmd).await })
                        })
                        .await
                }
                Link::Cluster(conn) => conn.req_packed_command(cmd).await,
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            match &mut self.link {
                Link::Single(shared) => {
                    shared
                        .request(|mut manager| {
                            Box::pin(async move {
                                manager.send_packed_commands(cmd, offset, count).await
                            })
                        })
                        .await
                }
                Link::Cluster(conn) => match conn.req_packed_commands(cmd, offset, count).await {
                    // Refused before anything was sent: the commands go one by one, in order.
                    Err(error) if cluster::is_cross_slot(&error) && !cmd.is_transaction() => {
                        cluster::in_order(conn, cmd, offset, count).await
                    }
                    other => other,
                },
            }
        })
    }

    fn get_db(&self) -> i64 {
        match &self.link {
            Link::Single(shared) => shared.db,
            Link::Cluster(_) => 0,
        }
    }
}

/// A connection of its own for blocking commands (`BLMOVE`), which would stall every other command on a
/// shared multiplexed connection. Its response timeout is the blocking command's own plus a margin
/// ([`silence_limit`]): a link that stays silent past it is dead, and the caller replaces it.
///
/// On a cluster it is a cluster connection of its own: its commands (all on one queue's slot) go to the
/// node that serves the queue, and it follows `MOVED`/`ASK` and failovers like the shared one.
pub(crate) async fn blocking_connection(
    endpoint: &Endpoint,
    config: &RedisConfig,
) -> RedisResult<Blocking> {
    match endpoint {
        Endpoint::Single(client) => {
            let settings = AsyncConnectionConfig::new()
                .set_response_timeout(Some(silence_limit(config)))
                .set_connection_timeout(secs(config.connect_timeout));
            client
                .get_multiplexed_async_connection_with_config(&settings)
                .await
                .map(Blocking::Single)
        }
        Endpoint::Cluster { client, .. } => {
            let settings = redis::cluster::ClusterConfig::new()
                .set_response_timeout(silence_limit(config))
                .set_connection_timeout(
                    secs(config.connect_timeout).unwrap_or(Duration::from_secs(10)),
                );
            client
                .get_async_connection_with_config(settings)
                .await
                .map(Blocking::Cluster)
        }
    }
}

/// The connection a consumer's blocking fetch uses ([`blocking_connection`]).
pub(crate) enum Blocking {
    Single(redis::aio::MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Blocking {
    /// Runs a command that names no key (`CLIENT INFO`) on the server that holds `key`: on a cluster, the
    /// node this connection's commands for `key` go to.
    pub(crate) async fn on_node_of<T: redis::FromRedisValue>(
        &mut self,
        key: &str,
        cmd: Cmd,
    ) -> RedisResult<T> {
        match self {
            Blocking::Single(conn) => cmd.query_async(conn).await,
            Blocking::Cluster(conn) => {
                redis::from_redis_value(cluster::on_node_of(conn, key, cmd).await?)
                    .map_err(RedisError::from)
            }
        }
    }
}

impl ConnectionLike for Blocking {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Blocking::Single(conn) => conn.req_packed_command(cmd),
            Blocking::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Blocking::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            Blocking::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Blocking::Single(conn) => conn.get_db(),
            Blocking::Cluster(_) => 0,
        }
    }
}

/// Runs a command that names no key (`CLIENT KILL`) on the server that holds `key`, over the shared
/// connection.
pub(crate) async fn on_node_of<T: redis::FromRedisValue>(
    conn: &Healing,
    key: &str,
    cmd: Cmd,
) -> RedisResult<T> {
    match conn.cluster() {
        None => cmd.query_async(&mut conn.clone()).await,
        Some(mut cluster) => {
            redis::from_redis_value(cluster::on_node_of(&mut cluster, key, cmd).await?)
                .map_err(RedisError::from)
        }
    }
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

/// Whether an error means the command may not have run because the connection broke, timed out or was
/// replaced (worth retrying once the connection is back).
pub(crate) fn is_transient(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.is_unrecoverable_error()
}

/// Whether a pipeline failed because the server does not know a script.
pub(crate) fn is_noscript(error: &redis::RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}
