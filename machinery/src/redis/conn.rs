//! Connections shared by the Redis broker and result backend: a self-healing multiplexed connection for
//! ordinary commands ([`Healing`]) and dedicated connections for blocking commands.
//!
//! Where the server is comes from an [`Endpoint`]: one fixed address, or the master that Redis Sentinels
//! name. Behind Sentinel nothing is pinned to one address: every new connection asks the sentinels
//! first, and a connection that breaks or lands on a demoted master (`READONLY`) is replaced by one to
//! whichever master they name then. On a Redis Cluster the shared connection is the `redis` crate's
//! cluster connection, which follows `MOVED`/`ASK` and failovers by itself ([`super::cluster`]).
//!
//! A link can die without a word: after a failover or a NAT table drop, the TCP connection stays open on
//! our side and nothing ever arrives. Every connection here therefore has a response timeout, TCP
//! keepalive (and, on Linux, `TCP_USER_TIMEOUT`), and a shared connection that goes silent is replaced
//! rather than waited on for ever (`docs/redis.md`, "Network faults").

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::TcpSettings;
use redis::{
    Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, ServerErrorKind, Value,
};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

pub(crate) use super::blocking::{blocking_connection, on_node_of, Blocking};
use super::client::Target;
use super::cluster;
pub(crate) use super::endpoint::Endpoint;
use super::lua::{is_noscript, Lua};
pub(crate) use super::open::open;
use crate::config::RedisConfig;

/// Seconds from the configuration, with Go's meaning of 0 ("no limit").
pub(crate) fn secs(value: u64) -> Option<Duration> {
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

/// How long a durable write waits for its replicas (`WAIT`) before it fails: long enough for a
/// replica that is up (it acknowledges within milliseconds), short enough that a send to a master that
/// lost its replicas fails rather than stalls the shared connection behind it.
pub(crate) const WAIT_TIMEOUT: Duration = Duration::from_secs(2);

/// The error of a durable write that fewer than `wanted` replicas acknowledged.
fn not_replicated(acknowledged: u32, wanted: u32) -> RedisResult<()> {
    if acknowledged >= wanted {
        return Ok(());
    }
    Err(RedisError::from((
        ErrorKind::Client,
        "the write was not acknowledged by enough replicas (REDIS_WAIT_REPLICAS)",
        format!("{acknowledged} of {wanted} within {WAIT_TIMEOUT:?}"),
    )))
}

/// Whether `error` says the server we write to is no longer the master (a failover demoted it).
pub(crate) fn is_demoted(error: &RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
}

/// The connection for ordinary commands. It reconnects by itself with exponential back-off (100 ms,
/// doubling, up to 2 s between tries); a command that fails on a dead connection returns the error and
/// the next one waits for the new connection. A command unanswered for `read_timeout` fails, and the
/// connection is replaced (see [`Healing`]).
pub(crate) async fn manager(endpoint: &Endpoint, config: &RedisConfig) -> RedisResult<Healing> {
    // The manager retries its first connection for seconds; a wrong URL or password should fail at once,
    // so one plain connection is tried first.
    // A PING makes the probe complete a round trip: a TLS server that refuses our client certificate
    // says so only after the handshake, at the first read.
    let client = endpoint.client().await?;
    let mut probe = client
        .multiplexed(secs(config.connect_timeout), secs(config.read_timeout))
        .await?;
    redis::cmd("PING").query_async::<()>(&mut probe).await?;
    drop(probe);
    let settings = ConnectionManagerConfig::new()
        .set_min_delay(Duration::from_millis(100))
        .set_max_delay(Duration::from_secs(2))
        .set_response_timeout(secs(config.read_timeout))
        .set_connection_timeout(secs(config.connect_timeout));
    let shared = HealingShared {
        endpoint: endpoint.clone(),
        wait_replicas: config.wait_replicas,
        settings,
        connect_timeout: secs(config.connect_timeout),
        read_timeout: secs(config.read_timeout),
        db: client.client().get_connection_info().redis_settings().db(),
        current: Mutex::new(Generation {
            number: 0,
            switches: endpoint.switches(),
            manager: Arc::new(OnceCell::new()),
            abandoned: CancellationToken::new(),
        }),
    };
    let first = shared.link(client).await?;
    let current = shared
        .current
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .manager
        .clone();
    let _ = current.set(first);
    Ok(Healing {
        link: Link::Single(Arc::new(shared)),
    })
}

/// The connection of one [`Generation`]: `redis`'s [`ConnectionManager`] for a fixed address, which
/// reconnects by itself; behind Sentinel a plain connection, which does not, because it would reconnect
/// to the same address, a demoted master by then (its reads stale, its writes refused): the broken
/// connection is replaced instead, by one to the master the sentinels name. A server whose certificate
/// is checked for `TLS_SERVER_NAME` has plain connections too, made over our own TLS stream (the
/// manager would make its own and check the URL's host).
#[derive(Clone)]
enum Conn {
    Managed(ConnectionManager),
    Plain(MultiplexedConnection),
}

impl Conn {
    async fn send_packed_command(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Conn::Managed(conn) => conn.send_packed_command(cmd).await,
            Conn::Plain(conn) => conn.send_packed_command(cmd).await,
        }
    }

    async fn send_packed_commands(
        &mut self,
        cmd: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        match self {
            Conn::Managed(conn) => conn.send_packed_commands(cmd, offset, count).await,
            Conn::Plain(conn) => conn.send_packed_commands(cmd, offset, count).await,
        }
    }
}

impl HealingShared {
    /// A new link to `client`'s server, of the kind the endpoint wants.
    async fn link(&self, client: Target) -> RedisResult<Conn> {
        if self.endpoint.replaces_broken_links() {
            let conn = client
                .multiplexed(self.connect_timeout, self.read_timeout)
                .await?;
            return Ok(Conn::Plain(conn));
        }
        ConnectionManager::new_lazy_with_config(client.client().clone(), self.settings.clone())
            .map(Conn::Managed)
    }
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
/// Behind Sentinel the link is a plain connection instead ([`Conn`]), replaced when it breaks, when a
/// write is refused as `READONLY`, or when the sentinels announce a new master. So it is, replaced when
/// it breaks, on a server whose certificate is checked for `TLS_SERVER_NAME`.
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
    endpoint: Endpoint,
    /// `REDIS_WAIT_REPLICAS`: replicas a durable write waits for ([`Healing::write`]).
    wait_replicas: u32,
    settings: ConnectionManagerConfig,
    /// `REDIS_CONNECT_TIMEOUT` and `REDIS_READ_TIMEOUT` of a plain link ([`Conn::Plain`]).
    connect_timeout: Option<Duration>,
    read_timeout: Option<Duration>,
    db: i64,
    current: Mutex<Generation>,
}

/// One connection manager in the life of a [`Healing`] connection.
#[derive(Clone)]
struct Generation {
    number: u64,
    /// The endpoint's count of announced master switches when this generation began.
    switches: u64,
    /// Made on first use (behind Sentinel, that is when the master is looked up).
    manager: Arc<OnceCell<Conn>>,
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
    /// The shared connection of a Redis Cluster: the cluster connection itself.
    pub(crate) fn over_cluster(conn: ClusterConnection) -> Healing {
        Healing {
            link: Link::Cluster(conn),
        }
    }

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
            Link::Single(shared) => shared.generation(),
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

    /// Retries after a connection failure that the broker's safe operations get: a failover behind
    /// Sentinel takes a second or two, which these span (50 ms doubling: 0.35 s, or 3.1 s behind Sentinel).
    pub(crate) fn retries(&self) -> u32 {
        match &self.link {
            Link::Single(shared) => shared.retries(),
            Link::Cluster(_) => 3,
        }
    }

    /// `REDIS_WAIT_REPLICAS` (not applied on a cluster, whose connection picks the node per key).
    fn wait_replicas(&self) -> u32 {
        match &self.link {
            Link::Single(shared) => shared.wait_replicas,
            Link::Cluster(_) => 0,
        }
    }

    /// Runs `pipe`, every command of which ignores its reply, as a durable write: with
    /// `REDIS_WAIT_REPLICAS=n` it ends with `WAIT n`, in the same pipeline so on the same connection
    /// right after the writes, and fails unless `n` replicas acknowledged them within [`WAIT_TIMEOUT`]
    /// (an acknowledged write then survives a failover to one of them).
    pub(crate) async fn write(&self, pipe: &Pipeline) -> RedisResult<()> {
        let mut conn = self.clone();
        let wanted = self.wait_replicas();
        if wanted == 0 {
            return pipe.query_async(&mut conn).await;
        }
        let mut pipe = pipe.clone();
        pipe.cmd("WAIT")
            .arg(wanted)
            .arg(WAIT_TIMEOUT.as_millis() as u64);
        let (acknowledged,): (u32,) = pipe.query_async(&mut conn).await?;
        not_replicated(acknowledged, wanted)
    }

    /// [`Healing::write`] of a pipeline in which exactly one command keeps its reply, which it returns.
    pub(crate) async fn write_returning<T: redis::FromRedisValue>(
        &self,
        pipe: &Pipeline,
    ) -> RedisResult<T> {
        let mut conn = self.clone();
        let wanted = self.wait_replicas();
        if wanted == 0 {
            return pipe
                .query_async(&mut conn)
                .await
                .map(|(reply,): (T,)| reply);
        }
        let mut pipe = pipe.clone();
        pipe.cmd("WAIT")
            .arg(wanted)
            .arg(WAIT_TIMEOUT.as_millis() as u64);
        let (reply, acknowledged): (T, u32) = pipe.query_async(&mut conn).await?;
        not_replicated(acknowledged, wanted).map(|()| reply)
    }

    /// Runs `lua` as a durable write (see [`Healing::write`]) and returns its reply.
    pub(crate) async fn run_durably<T: redis::FromRedisValue>(
        &self,
        lua: &Lua,
        keys: &[&[u8]],
        args: &[&[u8]],
    ) -> RedisResult<T> {
        let mut conn = self.clone();
        let wanted = self.wait_replicas();
        if wanted == 0 {
            return lua.run(&mut conn, keys, args).await;
        }
        let mut pipe = redis::pipe();
        pipe.add_command(lua.cmd(keys, args))
            .cmd("WAIT")
            .arg(wanted)
            .arg(WAIT_TIMEOUT.as_millis() as u64);
        let (reply, acknowledged): (T, u32) = match pipe.query_async(&mut conn).await {
            Err(error) if is_noscript(&error) => {
                lua.load(&mut conn).await?;
                pipe.query_async(&mut conn).await?
            }
            other => other?,
        };
        not_replicated(acknowledged, wanted)?;
        Ok(reply)
    }
}

impl HealingShared {
    fn current(&self) -> Generation {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Which connection is in use; pass it to [`Healing::replace`] after watching it go silent.
    fn generation(&self) -> u64 {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .number
    }

    /// Replaces the connection with a new one (connected on first use), if it is still `generation`
    /// (so many callers that saw the same silence replace it once); the commands waiting on the old one
    /// fail at once. Returns whether it replaced it.
    fn replace(&self, generation: u64, why: &str) -> bool {
        let old = {
            let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
            if current.number != generation {
                return false;
            }
            std::mem::replace(
                &mut *current,
                Generation {
                    number: generation + 1,
                    switches: self.endpoint.switches(),
                    manager: Arc::new(OnceCell::new()),
                    abandoned: CancellationToken::new(),
                },
            )
        };
        old.abandoned.cancel();
        tracing::warn!(why, "replaced a redis connection");
        true
    }

    /// The connection manager of `generation`, made now if it is new (asking the sentinels first, if
    /// the endpoint is theirs).
    async fn manager_of(&self, generation: &Generation) -> RedisResult<Conn> {
        let manager = generation
            .manager
            .get_or_try_init(|| async {
                let client = self.endpoint.client().await?;
                self.link(client).await
            })
            .await?;
        Ok(manager.clone())
    }

    /// Retries after a connection failure that the broker's safe operations get: a failover behind
    /// Sentinel takes a second or two, which these span (50 ms doubling: 0.35 s, or 3.1 s behind Sentinel).
    fn retries(&self) -> u32 {
        if self.endpoint.follows_failover() {
            6
        } else {
            3
        }
    }

    /// Runs one request on the current connection; a timeout replaces the connection, and so does,
    /// on a plain link (behind Sentinel, or with `TLS_SERVER_NAME`), a broken connection or a write
    /// refused by a demoted master.
    async fn request<'a, T>(
        &'a self,
        send: impl FnOnce(Conn) -> RedisFuture<'a, T>,
    ) -> RedisResult<T> {
        let mut generation = self.current();
        if generation.switches != self.endpoint.switches() {
            self.replace(generation.number, "the sentinels announced a new master");
            generation = self.current();
        }
        let result = tokio::select! {
            result = async {
                let manager = self.manager_of(&generation).await?;
                send(manager).await
            } => result,
            () = generation.abandoned.cancelled() => Err(abandoned()),
        };
        if let Err(error) = &result {
            if error.is_timeout() {
                self.replace(
                    generation.number,
                    "a command got no answer within REDIS_READ_TIMEOUT",
                );
            } else if self.endpoint.replaces_broken_links()
                && (is_demoted(error)
                    || error.is_connection_dropped()
                    || error.is_connection_refusal()
                    || error.is_io_error())
            {
                let why = if self.endpoint.follows_failover() {
                    "the master went away or was demoted; asking the sentinels again"
                } else {
                    "the connection broke; reconnecting"
                };
                self.replace(generation.number, why);
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

/// Whether an error means the command may not have run because the connection broke, timed out or was
/// replaced (worth retrying once the connection is back).
pub(crate) fn is_transient(error: &RedisError) -> bool {
    // A demoted master refused the write: it did not happen, and the sentinels name the new master.
    is_demoted(error)
        || error.kind() == ErrorKind::MasterNameNotFoundBySentinel
        || error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.is_unrecoverable_error()
}
