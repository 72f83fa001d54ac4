//! The Redis broker (`redis://`, `rediss://`, `redis+socket://`), wire-compatible with Go machinery and
//! safe against crashes.
//!
//! What Go machinery sees is unchanged: a task is `RPUSH`ed onto the list named by its routing key, a
//! task with a future ETA is `ZADD`ed to the `delayed_tasks` sorted set with its ETA in Unix nanoseconds
//! as the score. Go senders and Go workers can share the queues with us.
//!
//! What we add (all keys beside Go's, see `docs/redis.md`):
//! - **At-least-once delivery.** A Lua script moves up to `max` messages at once from the queue into this
//!   consumer's in-flight list `machinery:inflight:<queue>:<consumer>` (`BLMOVE` waits when the queue is
//!   empty). A message leaves that list only when the worker acknowledges it, after the task's final
//!   state is stored. Each consumer renews a heartbeat key `machinery:heartbeat:<queue>:<consumer>`
//!   with a TTL; live consumers check the registry `machinery:consumers:<queue>` and put the in-flight
//!   messages of a consumer without heartbeat back at the head of the queue. A task cut off by a crash
//!   therefore runs again.
//! - **Atomic delayed tasks.** One Lua script moves every due entry from the sorted set to its queue, so
//!   many workers polling neither duplicate nor lose an entry.
//! - **Worker cards.** Beside its heartbeat each consumer renews `machinery:worker:<queue>:<consumer>`,
//!   JSON of its host, pid, concurrency and task counters, kept a while after the heartbeat lapses
//!   ([`card`]), for dashboards.
//! - **Dead letters.** Messages the worker gives up on go to the list `<queue>.dead` as a JSON envelope
//!   `{"queue", "reason", "at", "body"}` (`body_base64` when the body is not UTF-8).
//!
//! Needs Redis 6.2 or newer (`LMOVE`, `LPOP` with a count). On a Redis Cluster (`REDIS_CLUSTER_MODE`)
//! the keys of each queue share its slot (`keys.rs`), and a task with a future ETA goes to its queue's
//! own delayed set `{<queue>}:delayed` instead of Go's global one (see `docs/redis.md`, "Redis
//! Cluster").

mod acker;
pub(super) mod card;
mod consumer;
mod control;
mod envelope;
mod finisher;
mod go_delayed;
mod keys;

use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use redis::RedisError;

use self::consumer::RedisConsumer;
pub use self::control::CANCEL_CHANNEL;
pub(super) use self::envelope::Envelope;
pub(super) use self::keys::QueueKeys;
pub use self::keys::{cluster_dead_letter_key, dead_letter_key};
use super::backend::RedisBackend;
use super::conn::{self, is_transient, Endpoint, Healing};
use super::lua::{is_noscript, Lua};
use super::url::RedisUrl;
use crate::broker::{Broker, BrokerError, ConsumeOptions, Consumer, Inspect, Outgoing};
use crate::config::{Config, RedisConfig};
use crate::wire::state::TaskState;

/// The Redis broker.
#[derive(Clone)]
pub struct RedisBroker {
    pub(super) inner: Arc<Inner>,
    /// The result backend on this very database, when [`RedisBroker::with_backend`] was given one: state
    /// writes then ride in the same round trip as the broker's own commands.
    states: Option<RedisBackend>,
}

/// What every clone of a broker, and each of its consumers and acknowledgers, shares.
pub(super) struct Inner {
    url: RedisUrl,
    endpoint: Endpoint,
    // The inspection commands (`redis/inspect.rs`) read these three as well.
    pub(super) conn: Healing,
    pub(super) config: RedisConfig,
    pub(super) default_queue: String,
}

impl fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBroker")
            .field("url", &self.inner.url)
            .field("default_queue", &self.inner.default_queue)
            .finish_non_exhaustive()
    }
}

/// The broker's Lua scripts, kept in `scripts/<name>.lua` where each file's header names its KEYS and
/// ARGV and what it does atomically. (Those only inspection runs are in `inspect.rs`.)
pub(super) struct Scripts {
    fetch: Lua,
    /// Also requeues dead letters, for inspection.
    pub(super) settle: Lua,
    give_back: Lua,
    recover: Lua,
    release: Lua,
    promote: Lua,
    promote_queue: Lua,
}

pub(super) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    fetch: Lua::new(include_str!("../scripts/fetch.lua")),
    settle: Lua::new(include_str!("../scripts/settle.lua")),
    give_back: Lua::new(include_str!("../scripts/give_back.lua")),
    recover: Lua::new(include_str!("../scripts/recover.lua")),
    release: Lua::new(include_str!("../scripts/release.lua")),
    promote: Lua::new(include_str!("../scripts/promote.lua")),
    promote_queue: Lua::new(include_str!("../scripts/promote_queue.lua")),
});

/// How long redelivery marks are kept (they only serve the `redelivered` flag).
const REDELIVERED_MARK_SECS: &str = "86400";

/// Most delayed entries one promotion moves (the next poll moves the rest).
const PROMOTE_LIMIT: &str = "1000";
/// The largest delayed entry the promotion script may decode to find a routing key spelt otherwise than
/// Go spells it; anything larger is only scanned, so that one huge message cannot hold Redis for long.
const PROMOTE_DECODE_LIMIT: &str = "65536";

/// A failed Redis command as a broker error naming what we were doing.
pub(super) fn op(operation: &'static str) -> impl FnOnce(RedisError) -> BrokerError {
    move |error| BrokerError::operation(operation, error)
}

/// Runs `attempt` up to four times while it fails for connection reasons (50 ms, 100 ms, 200 ms apart).
/// Only used for operations that are safe to repeat (at worst a duplicate, which at-least-once allows).
async fn retrying<T, F, Fut>(
    operation: &'static str,
    conn: &Healing,
    attempt: F,
) -> Result<T, BrokerError>
where
    F: FnMut(Healing) -> Fut,
    Fut: std::future::Future<Output = Result<T, RedisError>>,
{
    retrying_redis(operation, conn, attempt)
        .await
        .map_err(op(operation))
}

/// [`retrying`], handing back the last Redis error itself, for callers that act on its kind.
async fn retrying_redis<T, F, Fut>(
    operation: &'static str,
    conn: &Healing,
    mut attempt: F,
) -> Result<T, RedisError>
where
    F: FnMut(Healing) -> Fut,
    Fut: std::future::Future<Output = Result<T, RedisError>>,
{
    let mut delay = Duration::from_millis(50);
    for _ in 0..conn.retries() {
        match attempt(conn.clone()).await {
            Ok(value) => return Ok(value),
            Err(error) if is_transient(&error) => {
                tracing::debug!(%error, operation, retry_in = ?delay, "redis command failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(error) => return Err(error),
        }
    }
    attempt(conn.clone()).await
}

impl Inner {
    /// The keys of `queue` (in the cluster layout on a cluster).
    pub(super) fn keys(&self, queue: &str) -> QueueKeys {
        QueueKeys::new(queue, self.config.cluster_enabled)
    }

    /// Runs a pipeline of backend and broker commands in one round trip (retrying on connection errors),
    /// loading the backend's scripts and trying again if the server did not know them.
    async fn run_fused(
        &self,
        operation: &'static str,
        backend: &RedisBackend,
        pipe: &redis::Pipeline,
    ) -> Result<(), BrokerError> {
        self.fused(operation, backend, move |conn: Healing| async move {
            conn.write(pipe).await
        })
        .await
    }

    /// Runs `send` (retrying on connection errors), loading the backend's scripts and trying again if
    /// the server did not know them: the road of every write that carries backend scripts.
    pub(super) async fn fused<T, F, Fut>(
        &self,
        operation: &'static str,
        backend: &RedisBackend,
        send: F,
    ) -> Result<T, BrokerError>
    where
        F: Fn(Healing) -> Fut + Copy,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        match retrying_redis(operation, &self.conn, send).await {
            Err(error) if is_noscript(&error) => {
                backend
                    .load_scripts(&mut self.conn.clone())
                    .await
                    .map_err(|error| BrokerError::operation(operation, error))?;
                retrying(operation, &self.conn, send).await
            }
            other => other.map_err(op(operation)),
        }
    }
}

impl RedisBroker {
    /// Connects to the Redis server named by `config.broker`.
    pub async fn connect(config: &Config) -> Result<RedisBroker, BrokerError> {
        let (url, endpoint, conn) = conn::open(
            &config.broker,
            &config.redis,
            &config.tls.for_broker(),
            "broker",
        )
        .await
        .map_err(|e| BrokerError::Connect {
            url: e.url,
            source: e.source,
        })?;
        tracing::debug!(url = %url, "connected to the redis broker");
        Ok(RedisBroker {
            inner: Arc::new(Inner {
                url,
                endpoint,
                conn,
                config: config.redis.clone(),
                default_queue: config.default_queue.clone(),
            }),
            states: None,
        })
    }

    /// This broker holding `backend` as its backend half, when `backend` is on the very same database:
    /// a send's PENDING state then travels in the publish's pipeline, and a final state in the
    /// acknowledgement's script (one round trip each, the state written first). On another database
    /// the broker is returned unchanged, and the two are written separately.
    pub fn with_backend(mut self, backend: RedisBackend) -> RedisBroker {
        if backend.url().same_database(&self.inner.url) {
            self.states = Some(backend);
        } else {
            tracing::debug!(broker = %self.inner.url, backend = %backend.url(), "broker and result backend are different databases; their writes stay separate");
        }
        self
    }

    /// The server this broker talks to (password redacted when displayed).
    pub fn url(&self) -> &RedisUrl {
        &self.inner.url
    }

    pub(super) fn delayed_key(&self) -> &str {
        &self.inner.config.delayed_tasks_key
    }

    /// The command that publishes `message`: `RPUSH <queue>`, or `ZADD <delayed key> <eta ns>` for a
    /// future ETA (on a cluster, the queue's own `{<queue>}:delayed`).
    fn publish_cmd(&self, message: &Outgoing<'_>) -> redis::Cmd {
        match message.eta {
            Some(eta) if eta > Utc::now() => {
                let score = eta.timestamp_nanos_opt().unwrap_or(i64::MAX);
                let mut cmd = redis::cmd("ZADD");
                match self.inner.keys(message.routing_key).delayed {
                    Some(own) => cmd.arg(own),
                    None => cmd.arg(self.delayed_key()),
                };
                cmd.arg(score).arg(&message.body);
                cmd
            }
            _ => {
                let mut cmd = redis::cmd("RPUSH");
                cmd.arg(message.routing_key).arg(&message.body);
                cmd
            }
        }
    }

    /// Moves due delayed tasks to their queues; returns how many. (On a cluster each queue has a
    /// delayed set of its own, which its consumers promote: this promotes the default queue's.)
    pub async fn promote_delayed(&self) -> Result<u64, BrokerError> {
        promote(&self.inner, &self.inner.keys(&self.inner.default_queue)).await
    }

    /// Puts the in-flight messages of consumers of `queue` whose heartbeat has expired back on the queue;
    /// returns how many. Live consumers do this by themselves, one per queue every fifth of the heartbeat
    /// timeout (the recovery lock); this call scans at once, without the lock.
    pub async fn recover_dead_consumers(&self, queue: &str) -> Result<u64, BrokerError> {
        let moved = recover(&self.inner, &self.inner.keys(queue), "", Duration::ZERO).await?;
        Ok(moved.unwrap_or(0))
    }
}

/// Moves due delayed tasks: from Go's global set to the queues their entries name, or on a cluster from
/// the queue's own set (`keys.delayed`) to the queue, and then Go's global set by claims
/// ([`go_delayed::claim`]).
async fn promote(inner: &Inner, keys: &QueueKeys) -> Result<u64, BrokerError> {
    let now = Utc::now()
        .timestamp_nanos_opt()
        .unwrap_or(i64::MAX)
        .to_string();
    let at = crate::wire::gotime::format(&Utc::now());
    let mut conn = inner.conn.clone();
    if let Some(delayed) = &keys.delayed {
        let own: u64 = SCRIPTS
            .promote_queue
            .run(
                &mut conn,
                &[
                    delayed.as_bytes(),
                    keys.queue.as_bytes(),
                    keys.dead.as_bytes(),
                ],
                &[now.as_bytes(), PROMOTE_LIMIT.as_bytes(), at.as_bytes()],
            )
            .await
            .map_err(op("promote delayed tasks"))?;
        return Ok(own + go_delayed::claim(inner).await?);
    }
    let dead = keys::dead_letter_key(&inner.default_queue);
    SCRIPTS
        .promote
        .run(
            &mut conn,
            &[inner.config.delayed_tasks_key.as_bytes(), dead.as_bytes()],
            &[
                now.as_bytes(),
                PROMOTE_LIMIT.as_bytes(),
                inner.default_queue.as_bytes(),
                at.as_bytes(),
                PROMOTE_DECODE_LIMIT.as_bytes(),
            ],
        )
        .await
        .map_err(op("promote delayed tasks"))
}

/// Runs the recover script: `Some(moved)`, or `None` when another consumer of the queue holds the
/// recovery lock (taken for `lock` when it is not zero; zero scans regardless).
async fn recover(
    inner: &Inner,
    keys: &QueueKeys,
    own_tag: &str,
    lock: Duration,
) -> Result<Option<u64>, BrokerError> {
    let mut conn = inner.conn.clone();
    let lock_ms = lock.as_millis().to_string();
    let moved: i64 = SCRIPTS
        .recover
        .run(
            &mut conn,
            &[
                keys.consumers.as_bytes(),
                keys.queue.as_bytes(),
                keys.redelivered.as_bytes(),
                keys.recovering.as_bytes(),
            ],
            &[
                keys.heartbeat_prefix.as_bytes(),
                keys.inflight_prefix.as_bytes(),
                own_tag.as_bytes(),
                REDELIVERED_MARK_SECS.as_bytes(),
                lock_ms.as_bytes(),
            ],
        )
        .await
        .map_err(op("recover messages of dead workers"))?;
    Ok(u64::try_from(moved).ok())
}

#[async_trait]
impl Broker for RedisBroker {
    async fn publish_cancel(&self, task_uuid: &str) -> Result<(), BrokerError> {
        self.publish_cancel_request(task_uuid).await
    }

    async fn cancellations(&self) -> Result<crate::broker::CancelReceiver, BrokerError> {
        Ok(self.listen_for_cancellations().await)
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    fn route(&self, routing_key: &str) -> String {
        if routing_key.is_empty() {
            self.inner.default_queue.clone()
        } else {
            routing_key.to_owned()
        }
    }

    async fn publish(&self, message: Outgoing<'_>) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        pipe.add_command(self.publish_cmd(&message)).ignore();
        let pipe = &pipe;
        retrying("publish", &self.inner.conn, move |conn| async move {
            conn.write(pipe).await
        })
        .await
    }

    async fn publish_many(&self, messages: Vec<Outgoing<'_>>) -> Result<(), BrokerError> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for message in &messages {
            pipe.add_command(self.publish_cmd(message)).ignore();
        }
        let pipe = &pipe;
        retrying("publish", &self.inner.conn, move |conn| async move {
            conn.write(pipe).await
        })
        .await
    }

    fn holds_states(&self) -> bool {
        self.states.is_some()
    }

    async fn publish_with_state<'a>(
        &self,
        pending: &TaskState,
        message: Outgoing<'a>,
    ) -> Result<Option<Outgoing<'a>>, BrokerError> {
        // With the backend half on this very database, the PENDING state and the message travel in one
        // pipeline: one round trip, and the state is written first, as Go does.
        let Some(states) = &self.states else {
            return Ok(Some(message));
        };
        // A state the backend will not write (an id that names one of our keys, say) is declined here: the
        // sender then stores it through the backend, which reports why, and publishes nothing.
        let Ok(state_cmd) = states.state_cmd(pending) else {
            return Ok(Some(message));
        };
        let mut pipe = redis::pipe();
        pipe.add_command(state_cmd)
            .ignore()
            .add_command(self.publish_cmd(&message))
            .ignore();
        self.inner.run_fused("publish", states, &pipe).await?;
        Ok(None)
    }

    async fn consume(&self, options: ConsumeOptions) -> Result<Box<dyn Consumer>, BrokerError> {
        let consumer =
            RedisConsumer::start(self.inner.clone(), self.states.clone(), &options).await?;
        Ok(Box::new(consumer))
    }

    fn inspect(&self) -> Result<&dyn Inspect, BrokerError> {
        Ok(self)
    }
}
