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
//! - **Dead letters.** Messages the worker gives up on go to the list `<queue>.dead` as a JSON envelope
//!   `{"queue", "reason", "at", "body"}` (`body_base64` when the body is not UTF-8).
//!
//! Needs Redis 6.2 or newer (`LMOVE`, `LPOP` with a count). Redis Cluster is not supported: the scripts
//! touch keys of several queues.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::{AsyncCommands as _, Client, RedisError};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::backend::RedisBackend;
use super::conn::{self, is_noscript, Lua};
use super::url::RedisUrl;
use crate::broker::{
    Acknowledger, Broker, BrokerError, ConsumeOptions, Consumer, DeadLetter, DelayedMessage,
    Delivery, Inspect, Outgoing, QueueStats, WorkerInfo,
};
use crate::config::{Config, RedisConfig};
use crate::wire::state::TaskState;

/// The Redis broker.
#[derive(Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
    /// The result backend on this very database, when [`RedisBroker::with_backend`] was given one: state
    /// writes then ride in the same round trip as the broker's own commands.
    states: Option<RedisBackend>,
}

struct Inner {
    url: RedisUrl,
    client: Client,
    conn: ConnectionManager,
    config: RedisConfig,
    default_queue: String,
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
/// ARGV and what it does atomically.
struct Scripts {
    fetch: Lua,
    settle: Lua,
    recover: Lua,
    release: Lua,
    promote: Lua,
    stats: Lua,
    purge: Lua,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    fetch: Lua::new(include_str!("scripts/fetch.lua")),
    settle: Lua::new(include_str!("scripts/settle.lua")),
    recover: Lua::new(include_str!("scripts/recover.lua")),
    release: Lua::new(include_str!("scripts/release.lua")),
    promote: Lua::new(include_str!("scripts/promote.lua")),
    stats: Lua::new(include_str!("scripts/stats.lua")),
    purge: Lua::new(include_str!("scripts/purge.lua")),
});

/// The keys we keep beside Go's queue list.
#[derive(Debug, Clone)]
pub(crate) struct QueueKeys {
    queue: String,
    consumers: String,
    inflight_prefix: String,
    heartbeat_prefix: String,
    redelivered: String,
    dead: String,
}

impl QueueKeys {
    fn new(queue: &str) -> Self {
        QueueKeys {
            queue: queue.to_owned(),
            consumers: format!("machinery:consumers:{queue}"),
            inflight_prefix: format!("machinery:inflight:{queue}:"),
            heartbeat_prefix: format!("machinery:heartbeat:{queue}:"),
            redelivered: format!("machinery:redelivered:{queue}"),
            dead: dead_letter_key(queue),
        }
    }

    fn inflight(&self, tag: &str) -> String {
        format!("{}{tag}", self.inflight_prefix)
    }

    fn heartbeat(&self, tag: &str) -> String {
        format!("{}{tag}", self.heartbeat_prefix)
    }
}

/// The dead-letter list of a queue: `<queue>.dead`.
pub fn dead_letter_key(queue: &str) -> String {
    format!("{queue}.dead")
}

/// How long redelivery marks are kept (they only serve the `redelivered` flag).
const REDELIVERED_MARK_SECS: &str = "86400";

/// Most delayed entries one promotion moves (the next poll moves the rest).
const PROMOTE_LIMIT: &str = "1000";

/// Most messages one fetch takes, whatever the worker asks.
const MAX_FETCH: usize = 1000;

fn op(operation: &'static str) -> impl FnOnce(RedisError) -> BrokerError {
    move |error| BrokerError::operation(operation, error)
}

/// Whether an error means the command may not have run because the connection broke (worth retrying
/// once the connection manager has reconnected).
fn is_transient(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.is_unrecoverable_error()
}

/// Runs `attempt` up to four times while it fails for connection reasons (50 ms, 100 ms, 200 ms apart).
/// Only used for operations that are safe to repeat (at worst a duplicate, which at-least-once allows).
async fn retrying<T, F, Fut>(
    operation: &'static str,
    conn: &ConnectionManager,
    mut attempt: F,
) -> Result<T, BrokerError>
where
    F: FnMut(ConnectionManager) -> Fut,
    Fut: std::future::Future<Output = Result<T, RedisError>>,
{
    let mut delay = Duration::from_millis(50);
    for _ in 0..3 {
        match attempt(conn.clone()).await {
            Ok(value) => return Ok(value),
            Err(error) if is_transient(&error) => {
                tracing::debug!(%error, operation, retry_in = ?delay, "redis command failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(error) => return Err(op(operation)(error)),
        }
    }
    attempt(conn.clone()).await.map_err(op(operation))
}

impl Inner {
    /// Runs a pipeline of backend and broker commands in one round trip (retrying on connection errors),
    /// loading the backend's scripts and trying again if the server did not know them.
    async fn run_fused(
        &self,
        operation: &'static str,
        backend: &RedisBackend,
        pipe: &redis::Pipeline,
    ) -> Result<(), BrokerError> {
        let send = move |mut conn: ConnectionManager| async move {
            pipe.query_async::<()>(&mut conn).await
        };
        match retrying(operation, &self.conn, send).await {
            Err(BrokerError::Operation { source, .. })
                if source.downcast_ref::<RedisError>().is_some_and(is_noscript) =>
            {
                backend
                    .load_scripts(&mut self.conn.clone())
                    .await
                    .map_err(|error| BrokerError::operation(operation, error))?;
                retrying(operation, &self.conn, send).await
            }
            other => other,
        }
    }
}

impl RedisBroker {
    /// Connects to the Redis server named by `config.broker`.
    pub async fn connect(config: &Config) -> Result<RedisBroker, BrokerError> {
        let (url, client, conn) = conn::open(&config.broker, &config.redis)
            .await
            .map_err(|e| BrokerError::Connect {
                url: e.url,
                source: e.source,
            })?;
        tracing::debug!(url = %url, "connected to the redis broker");
        Ok(RedisBroker {
            inner: Arc::new(Inner {
                url,
                client,
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

    fn delayed_key(&self) -> &str {
        &self.inner.config.delayed_tasks_key
    }

    /// The command that publishes `message`: `RPUSH <queue>`, or `ZADD <delayed key> <eta ns>` for a
    /// future ETA.
    fn publish_cmd(&self, message: &Outgoing) -> redis::Cmd {
        match message.eta {
            Some(eta) if eta > Utc::now() => {
                let score = eta.timestamp_nanos_opt().unwrap_or(i64::MAX);
                let mut cmd = redis::cmd("ZADD");
                cmd.arg(self.delayed_key()).arg(score).arg(&message.body);
                cmd
            }
            _ => {
                let mut cmd = redis::cmd("RPUSH");
                cmd.arg(&message.routing_key).arg(&message.body);
                cmd
            }
        }
    }

    /// Moves due delayed tasks to their queues; returns how many.
    pub async fn promote_delayed(&self) -> Result<u64, BrokerError> {
        promote(&self.inner).await
    }

    /// Puts the in-flight messages of consumers of `queue` whose heartbeat has expired back on the queue;
    /// returns how many. Live consumers do this by themselves every fifth of the heartbeat timeout.
    pub async fn recover_dead_consumers(&self, queue: &str) -> Result<u64, BrokerError> {
        recover(&self.inner, &QueueKeys::new(queue), "").await
    }
}

async fn promote(inner: &Inner) -> Result<u64, BrokerError> {
    let now = Utc::now()
        .timestamp_nanos_opt()
        .unwrap_or(i64::MAX)
        .to_string();
    let mut conn = inner.conn.clone();
    SCRIPTS
        .promote
        .run(
            &mut conn,
            &[inner.config.delayed_tasks_key.as_bytes()],
            &[
                now.as_bytes(),
                PROMOTE_LIMIT.as_bytes(),
                inner.default_queue.as_bytes(),
            ],
        )
        .await
        .map_err(op("promote delayed tasks"))
}

async fn recover(inner: &Inner, keys: &QueueKeys, own_tag: &str) -> Result<u64, BrokerError> {
    let mut conn = inner.conn.clone();
    SCRIPTS
        .recover
        .run(
            &mut conn,
            &[
                keys.consumers.as_bytes(),
                keys.queue.as_bytes(),
                keys.redelivered.as_bytes(),
            ],
            &[
                keys.heartbeat_prefix.as_bytes(),
                keys.inflight_prefix.as_bytes(),
                own_tag.as_bytes(),
                REDELIVERED_MARK_SECS.as_bytes(),
            ],
        )
        .await
        .map_err(op("recover messages of dead workers"))
}

#[async_trait]
impl Broker for RedisBroker {
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

    async fn publish(&self, message: Outgoing) -> Result<(), BrokerError> {
        let cmd = &self.publish_cmd(&message);
        retrying("publish", &self.inner.conn, move |mut conn| async move {
            cmd.query_async::<()>(&mut conn).await
        })
        .await
    }

    async fn publish_many(&self, messages: Vec<Outgoing>) -> Result<(), BrokerError> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for message in &messages {
            pipe.add_command(self.publish_cmd(message)).ignore();
        }
        let pipe = &pipe;
        retrying("publish", &self.inner.conn, move |mut conn| async move {
            pipe.query_async::<()>(&mut conn).await
        })
        .await
    }

    async fn publish_with_state(
        &self,
        pending: &TaskState,
        message: Outgoing,
    ) -> Result<Option<Outgoing>, BrokerError> {
        // With the backend half on this very database, the PENDING state and the message travel in one
        // pipeline: one round trip, and the state is written first, as Go does.
        let Some(states) = &self.states else {
            return Ok(Some(message));
        };
        let state_cmd = states
            .state_cmd(pending)
            .map_err(|error| BrokerError::operation("publish", error))?;
        let mut pipe = redis::pipe();
        pipe.add_command(state_cmd)
            .ignore()
            .add_command(self.publish_cmd(&message))
            .ignore();
        self.inner.run_fused("publish", states, &pipe).await?;
        Ok(None)
    }

    async fn consume(&self, options: ConsumeOptions) -> Result<Box<dyn Consumer>, BrokerError> {
        let keys = QueueKeys::new(&options.queue);
        let tag = options.consumer_tag.clone();
        let heartbeat_timeout = Duration::from_millis(self.inner.config.heartbeat_timeout.max(500));
        let mut consumer = RedisConsumer {
            inner: self.inner.clone(),
            states: self.states.clone(),
            inflight: keys.inflight(&tag),
            heartbeat: keys.heartbeat(&tag),
            keys,
            tag,
            blocking: None,
            background: None,
            stop: CancellationToken::new(),
            outstanding: Outstanding::default(),
            busy: false,
            reconcile: false,
            heartbeat_timeout,
        };
        // A consumer that had this tag before and died left its messages in our in-flight list: they go
        // back to the queue before we take anything.
        let returned = consumer.release().await?;
        if returned > 0 {
            tracing::info!(queue = %options.queue, consumer = %consumer.tag, returned, "returned the in-flight messages of a previous consumer with this tag");
        }
        consumer.beat().await?;
        consumer.background = Some(AbortOnDropHandle::new(tokio::spawn(background(
            self.inner.clone(),
            consumer.keys.clone(),
            consumer.tag.clone(),
            heartbeat_timeout,
            consumer.stop.clone(),
        ))));
        Ok(Box::new(consumer))
    }

    fn inspect(&self) -> Result<&dyn Inspect, BrokerError> {
        Ok(self)
    }
}

#[async_trait]
impl Inspect for RedisBroker {
    async fn queue_stats(&self, queue: &str) -> Result<QueueStats, BrokerError> {
        let keys = QueueKeys::new(queue);
        let mut conn = self.inner.conn.clone();
        let (pending, delayed, in_flight, dead): (u64, u64, u64, u64) = SCRIPTS
            .stats
            .run(
                &mut conn,
                &[
                    queue.as_bytes(),
                    self.delayed_key().as_bytes(),
                    keys.consumers.as_bytes(),
                    keys.dead.as_bytes(),
                ],
                &[
                    queue.as_bytes(),
                    keys.inflight_prefix.as_bytes(),
                    self.inner.default_queue.as_bytes(),
                ],
            )
            .await
            .map_err(op("queue statistics"))?;
        Ok(QueueStats {
            queue: queue.to_owned(),
            pending,
            delayed: Some(delayed),
            in_flight: Some(in_flight),
            dead: Some(dead),
        })
    }

    async fn pending(&self, queue: &str, limit: usize) -> Result<Vec<Vec<u8>>, BrokerError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.inner.conn.clone();
        conn.lrange(queue, 0, (limit - 1) as isize)
            .await
            .map_err(op("list pending messages"))
    }

    async fn dead_letters(
        &self,
        queue: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.inner.conn.clone();
        let raw: Vec<Vec<u8>> = conn
            .lrange(dead_letter_key(queue), 0, (limit - 1) as isize)
            .await
            .map_err(op("list dead letters"))?;
        Ok(raw
            .iter()
            .map(|entry| Envelope::decode(queue, entry))
            .collect())
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let mut conn = self.inner.conn.clone();
        SCRIPTS
            .purge
            .run(&mut conn, &[queue.as_bytes()], &[])
            .await
            .map_err(op("purge"))
    }

    /// Found by scanning the keyspace (`SCAN`, which walks every key in steps without blocking Redis): the
    /// default queue; queues with a consumer registry `machinery:consumers:<queue>`, an in-flight list or a
    /// dead-letter list `<queue>.dead`; every other list whose first message is a task signature (Go
    /// queues nobody of ours consumes); and the routing keys of the delayed tasks. An empty queue is only
    /// found while a consumer is registered on it (Redis deletes empty lists).
    async fn queues(&self) -> Result<Vec<String>, BrokerError> {
        inspect::queues(&self.inner).await
    }

    /// `ZRANGE <delayed key> 0 <limit - 1> WITHSCORES`: the earliest first, the ETA from the score.
    async fn delayed(&self, limit: usize) -> Result<Vec<DelayedMessage>, BrokerError> {
        inspect::delayed(&self.inner, limit).await
    }

    /// Each dead letter moves back with one script call (`LREM` from `<queue>.dead` and `RPUSH` onto the
    /// queue, only if it was still there), so a message is never lost or duplicated, even beside another
    /// requeue. `--all` takes the entries present when it starts, not those dead-lettered meanwhile.
    async fn requeue_dead(&self, queue: &str, task_uuid: Option<&str>) -> Result<u64, BrokerError> {
        inspect::requeue_dead(&self.inner, queue, task_uuid).await
    }

    /// Every registered consumer of every queue, with its heartbeat's age (against the Redis server's
    /// clock) and its in-flight list's length. A consumer whose heartbeat expired is listed as dead until
    /// a live consumer of its queue recovers its messages.
    async fn workers(&self) -> Result<Vec<WorkerInfo>, BrokerError> {
        inspect::workers(&self.inner).await
    }
}

/// A dead letter as stored in `<queue>.dead`.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    queue: String,
    reason: String,
    at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body_base64: Option<String>,
}

impl Envelope {
    fn encode(queue: &str, reason: &str, at: DateTime<Utc>, body: &[u8]) -> Vec<u8> {
        use base64::Engine as _;
        let (body, body_base64) = match std::str::from_utf8(body) {
            Ok(text) => (Some(text.to_owned()), None),
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(body)),
            ),
        };
        let envelope = Envelope {
            queue: queue.to_owned(),
            reason: reason.to_owned(),
            at: crate::wire::gotime::format(&at),
            body,
            body_base64,
        };
        // Serializing a struct of strings cannot fail.
        serde_json::to_vec(&envelope).unwrap_or_default()
    }

    /// Reads an entry; one that is not our envelope (pushed by hand) is returned whole as the body.
    fn decode(queue: &str, entry: &[u8]) -> DeadLetter {
        use base64::Engine as _;
        match serde_json::from_slice::<Envelope>(entry) {
            Ok(envelope) => {
                let body = match (envelope.body, envelope.body_base64) {
                    (Some(text), _) => text.into_bytes(),
                    (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .unwrap_or_default(),
                    (None, None) => Vec::new(),
                };
                DeadLetter {
                    queue: envelope.queue,
                    reason: envelope.reason,
                    at: crate::wire::gotime::parse(&envelope.at).unwrap_or_else(|_| Utc::now()),
                    body,
                }
            }
            Err(_) => DeadLetter {
                queue: queue.to_owned(),
                reason: "unknown (not a machinery dead-letter envelope)".to_owned(),
                at: crate::wire::gotime::zero_time(),
                body: entry.to_vec(),
            },
        }
    }
}

/// Renews the heartbeat, promotes delayed tasks and recovers dead consumers' messages until stopped.
async fn background(
    inner: Arc<Inner>,
    keys: QueueKeys,
    tag: String,
    heartbeat_timeout: Duration,
    stop: CancellationToken,
) {
    let beat_every = heartbeat_timeout / 5;
    let promote_every = Duration::from_millis(inner.config.delayed_tasks_poll_period.max(10));
    // The first round recovers at once: a restarted worker picks up what its dead predecessors left.
    let mut next_beat = tokio::time::Instant::now();
    let mut failing = false;
    loop {
        let result = async {
            let now = tokio::time::Instant::now();
            if now >= next_beat {
                next_beat = now + beat_every;
                beat(&inner, &keys, &tag, heartbeat_timeout).await?;
                let recovered = recover(&inner, &keys, &tag).await?;
                if recovered > 0 {
                    tracing::warn!(queue = %keys.queue, recovered, "returned the in-flight messages of workers whose heartbeat expired to the queue; those tasks run again");
                }
            }
            let promoted = promote(&inner).await?;
            if promoted > 0 {
                tracing::debug!(promoted, "moved due delayed tasks to their queues");
            }
            Ok::<_, BrokerError>(())
        }
        .await;
        match result {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(queue = %keys.queue, "redis broker reachable again");
            }
            Ok(()) => {}
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(%error, queue = %keys.queue, "redis broker housekeeping failed (heartbeat, delayed tasks); retrying");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(promote_every.min(beat_every)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Renews the heartbeat (first) and the registration (second: a consumer is never registered without a
/// live heartbeat).
async fn beat(
    inner: &Inner,
    keys: &QueueKeys,
    tag: &str,
    timeout: Duration,
) -> Result<(), BrokerError> {
    let mut conn = inner.conn.clone();
    // The value is the beat's time in Unix milliseconds, so that `Broker::workers` can tell its age.
    let (added,): (u64,) = redis::pipe()
        .cmd("SET")
        .arg(keys.heartbeat(tag))
        .arg(Utc::now().timestamp_millis())
        .arg("PX")
        .arg(timeout.as_millis() as u64)
        .ignore()
        .cmd("SADD")
        .arg(&keys.consumers)
        .arg(tag)
        .query_async(&mut conn)
        .await
        .map_err(op("heartbeat"))?;
    if added == 1 {
        tracing::debug!(queue = %keys.queue, consumer = tag, "registered consumer");
    }
    Ok(())
}

/// A consumer of one Redis queue.
struct RedisConsumer {
    inner: Arc<Inner>,
    /// The backend half, handed to each acknowledger (see [`RedisBroker::with_backend`]).
    states: Option<RedisBackend>,
    keys: QueueKeys,
    tag: String,
    inflight: String,
    heartbeat: String,
    /// The connection `BLMOVE` blocks on, and its server-side id (to cut it off on close).
    blocking: Option<(MultiplexedConnection, i64)>,
    background: Option<AbortOnDropHandle<()>>,
    stop: CancellationToken,
    /// Hashes of the bodies handed to the worker and not yet settled, with counts.
    outstanding: Outstanding,
    /// A `next_batch` call is under way (still true at the next call if the previous one was dropped).
    busy: bool,
    /// A dropped call may have moved messages into our in-flight list without handing them out.
    reconcile: bool,
    heartbeat_timeout: Duration,
}

impl fmt::Debug for RedisConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConsumer")
            .field("queue", &self.keys.queue)
            .field("consumer", &self.tag)
            .finish_non_exhaustive()
    }
}

impl RedisConsumer {
    async fn beat(&self) -> Result<(), BrokerError> {
        beat(&self.inner, &self.keys, &self.tag, self.heartbeat_timeout).await
    }

    /// Returns everything in our in-flight list to the head of the queue and unregisters.
    async fn release(&self) -> Result<u64, BrokerError> {
        let keys = &[
            self.keys.consumers.as_bytes(),
            self.keys.queue.as_bytes(),
            self.keys.redelivered.as_bytes(),
            self.inflight.as_bytes(),
            self.heartbeat.as_bytes(),
        ];
        let args = &[self.tag.as_bytes(), REDELIVERED_MARK_SECS.as_bytes()];
        retrying(
            "return unacknowledged messages",
            &self.inner.conn,
            move |mut conn| async move { SCRIPTS.release.run::<u64, _>(&mut conn, keys, args).await },
        )
        .await
    }

    /// The fetch script's keys.
    fn fetch_keys(&self) -> [&[u8]; 3] {
        [
            self.keys.queue.as_bytes(),
            self.inflight.as_bytes(),
            self.keys.redelivered.as_bytes(),
        ]
    }

    /// Takes up to `max` messages without waiting.
    async fn fetch(&self, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        let mut conn = self.inner.conn.clone();
        let count = max.to_string();
        let pairs: Vec<(Vec<u8>, u8)> = SCRIPTS
            .fetch
            .run(&mut conn, &self.fetch_keys(), &[count.as_bytes()])
            .await
            .map_err(op("fetch"))?;
        Ok(pairs
            .into_iter()
            .map(|(body, redelivered)| self.delivery(body, redelivered == 1))
            .collect())
    }

    fn delivery(&self, body: Vec<u8>, redelivered: bool) -> Delivery {
        let hash = body_hash(&body);
        self.outstanding.add(hash);
        let acker = RedisAcker {
            inner: self.inner.clone(),
            states: self.states.clone(),
            queue: self.keys.queue.clone(),
            inflight: self.inflight.clone(),
            original: body.clone(),
            outstanding: self.outstanding.clone(),
            hash,
        };
        Delivery::new(body, redelivered, Box::new(acker))
    }

    /// Cuts the blocking connection, so that a `BLMOVE` left waiting by a dropped call can no longer move a
    /// message into our in-flight list.
    async fn cut_blocking_connection(&mut self) {
        if let Some((conn, id)) = self.blocking.take() {
            drop(conn);
            let mut admin = self.inner.conn.clone();
            let killed: Result<redis::Value, RedisError> = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query_async(&mut admin)
                .await;
            if let Err(error) = killed {
                tracing::debug!(%error, "could not kill the blocking fetch connection (already gone?)");
            }
        }
    }

    /// After a dropped call: the messages in our in-flight list that were never handed out (up to `max`).
    async fn orphans(&mut self, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        self.cut_blocking_connection().await;
        // Snapshot first: a delivery settled meanwhile leaves the list before it leaves the snapshot.
        let mut handed_out = self.outstanding.snapshot();
        let mut conn = self.inner.conn.clone();
        let listed: Vec<Vec<u8>> = conn
            .lrange(&self.inflight, 0, -1)
            .await
            .map_err(op("fetch"))?;
        let mut orphans = Vec::new();
        for body in listed {
            let hash = body_hash(&body);
            match handed_out.get_mut(&hash) {
                Some(count) if *count > 0 => *count -= 1,
                _ => orphans.push(body),
            }
        }
        self.reconcile = orphans.len() > max;
        if !orphans.is_empty() {
            tracing::debug!(queue = %self.keys.queue, orphans = orphans.len(), "handing out messages taken by an abandoned fetch");
        }
        Ok(orphans
            .into_iter()
            .take(max)
            .map(|body| self.delivery(body, false))
            .collect())
    }

    async fn next_batch_inner(&mut self, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        if self.reconcile {
            let orphans = self.orphans(max).await?;
            if !orphans.is_empty() {
                return Ok(orphans);
            }
        }
        let batch = self.fetch(max).await?;
        if !batch.is_empty() {
            return Ok(batch);
        }
        loop {
            let batch = self.wait(max).await?;
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }

    async fn blocking_connection(&mut self) -> Result<&mut MultiplexedConnection, BrokerError> {
        if self.blocking.is_none() {
            let mut conn = conn::blocking_connection(&self.inner.client, &self.inner.config)
                .await
                .map_err(op("connect for fetching"))?;
            let id: i64 = redis::cmd("CLIENT")
                .arg("ID")
                .query_async(&mut conn)
                .await
                .map_err(op("connect for fetching"))?;
            self.blocking = Some((conn, id));
        }
        match &mut self.blocking {
            Some((conn, _)) => Ok(conn),
            None => Err(BrokerError::Closed),
        }
    }

    /// Waits (up to the poll period) for a message with `BLMOVE`, and takes up to `max - 1` more in the
    /// same round trip: the fetch script follows in one pipeline and runs as soon as `BLMOVE` returns.
    async fn wait(&mut self, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        let period = self.inner.config.normal_tasks_poll_period.max(100);
        let timeout = format!("{:.3}", period as f64 / 1000.0);
        let mut pipe = redis::pipe();
        pipe.cmd("BLMOVE")
            .arg(&self.keys.queue)
            .arg(&self.inflight)
            .arg("LEFT")
            .arg("RIGHT")
            .arg(&timeout)
            .add_command(SCRIPTS.fetch.cmd(
                &self.fetch_keys(),
                &[(max - 1).to_string().as_bytes(), b"after-wait"],
            ));
        let conn = self.blocking_connection().await?;
        let replies: Result<(Option<Vec<u8>>, Vec<redis::Value>), RedisError> =
            pipe.query_async(conn).await;
        let (moved, fetched) = match replies {
            Ok(replies) => replies,
            Err(error) => {
                // A broken blocking connection is replaced on the next call. BLMOVE may have moved a
                // message before the script failed (NOSCRIPT after a server restart): the next call hands
                // out what sits in our in-flight list unclaimed.
                self.blocking = None;
                self.reconcile = true;
                if is_noscript(&error) {
                    let mut conn = self.inner.conn.clone();
                    SCRIPTS.fetch.load(&mut conn).await.map_err(op("fetch"))?;
                }
                return Err(op("fetch")(error));
            }
        };
        let mut fetched = fetched.into_iter();
        let first_redelivered = fetched.next();
        let mut batch = Vec::new();
        if let Some(body) = moved {
            let redelivered =
                first_redelivered.is_some_and(|v| redis::from_redis_value::<u8>(v) == Ok(1));
            batch.push(self.delivery(body, redelivered));
        }
        while let (Some(body), Some(flag)) = (fetched.next(), fetched.next()) {
            let body: Vec<u8> = redis::from_redis_value(body)
                .map_err(|error| BrokerError::operation("fetch", error))?;
            batch.push(self.delivery(body, redis::from_redis_value::<u8>(flag) == Ok(1)));
        }
        Ok(batch)
    }
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        // Cancel safety: a call dropped while its script or BLMOVE ran on the server may have moved
        // messages into our in-flight list without handing them out. The next call notices (`busy` is
        // still set), and hands out whatever is in the list but not outstanding.
        if self.busy {
            self.reconcile = true;
        }
        self.busy = true;
        let result = self.next_batch_inner(max.clamp(1, MAX_FETCH)).await;
        self.busy = false;
        result
    }

    async fn close(mut self: Box<Self>) -> Result<(), BrokerError> {
        self.stop.cancel();
        drop(self.background.take());
        // A BLMOVE whose future was dropped may still be waiting on the server, and would move a message
        // into our in-flight list after we emptied it. Killing that connection first makes the release
        // below the last word.
        self.cut_blocking_connection().await;
        let returned = self.release().await?;
        if returned > 0 {
            tracing::info!(queue = %self.keys.queue, returned, "returned unacknowledged messages to the queue");
        }
        Ok(())
    }
}

impl Drop for RedisConsumer {
    fn drop(&mut self) {
        // Without close(): the heartbeat stops, and live workers return our messages once it expires.
        self.stop.cancel();
    }
}

/// Counts of the deliveries a consumer handed out and that are not settled yet, by body hash.
#[derive(Debug, Clone, Default)]
struct Outstanding(Arc<std::sync::Mutex<HashMap<u64, usize>>>);

impl Outstanding {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, usize>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, hash: u64) {
        *self.lock().entry(hash).or_default() += 1;
    }

    fn remove(&self, hash: u64) {
        let mut map = self.lock();
        if let Some(count) = map.get_mut(&hash) {
            *count -= 1;
            if *count == 0 {
                map.remove(&hash);
            }
        }
    }

    fn snapshot(&self) -> HashMap<u64, usize> {
        self.lock().clone()
    }
}

fn body_hash(body: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut hasher);
    hasher.finish()
}

/// Settles one delivery.
struct RedisAcker {
    inner: Arc<Inner>,
    states: Option<RedisBackend>,
    queue: String,
    inflight: String,
    /// The bytes as taken, which identify the message in the in-flight list.
    original: Vec<u8>,
    outstanding: Outstanding,
    hash: u64,
}

impl Drop for RedisAcker {
    fn drop(&mut self) {
        // After the settling command (the methods own the acker until it is done), or when the delivery
        // is dropped unsettled: either way the consumer no longer hands this message out.
        self.outstanding.remove(self.hash);
    }
}

impl fmt::Debug for RedisAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisAcker")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl RedisAcker {
    async fn settle(&self, destination: &str, body: &[u8]) -> Result<(), BrokerError> {
        let keys = &[self.inflight.as_bytes(), destination.as_bytes()];
        let args = &[self.original.as_slice(), body];
        let moved: u64 = retrying("settle", &self.inner.conn, move |mut conn| async move {
            SCRIPTS.settle.run(&mut conn, keys, args).await
        })
        .await?;
        if moved == 0 {
            tracing::debug!(queue = %self.queue, "message was no longer in flight (returned to the queue meanwhile)");
        }
        Ok(())
    }
}

#[async_trait]
impl Acknowledger for RedisAcker {
    async fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        let (inflight, original) = (&self.inflight, &self.original);
        retrying("ack", &self.inner.conn, move |mut conn| async move {
            conn.lrem::<_, _, ()>(inflight, 1, original).await
        })
        .await
    }

    async fn requeue(self: Box<Self>, body: Vec<u8>) -> Result<(), BrokerError> {
        self.settle(&self.queue, &body).await
    }

    async fn try_ack_with_state(&self, state: &TaskState) -> Result<bool, BrokerError> {
        // The state first, then the acknowledgement, in one script on the server: if anything fails
        // before the end the message stays in flight and runs again (at-least-once), never the other way
        // round.
        let Some(states) = &self.states else {
            return Ok(false);
        };
        let cmd = states
            .state_and_ack_cmd(state, &self.inflight, &self.original)
            .map_err(|error| BrokerError::operation("store the state and acknowledge", error))?;
        let mut pipe = redis::pipe();
        pipe.add_command(cmd).ignore();
        self.inner
            .run_fused("store the state and acknowledge", states, &pipe)
            .await?;
        Ok(true)
    }

    async fn dead_letter(
        self: Box<Self>,
        body: Vec<u8>,
        reason: String,
    ) -> Result<(), BrokerError> {
        let envelope = Envelope::encode(&self.queue, &reason, Utc::now(), &body);
        self.settle(&dead_letter_key(&self.queue), &envelope).await
    }
}

/// The inspection commands behind `Broker::queues`, `delayed`, `requeue_dead` and `workers` (used by the
/// `machinery` command-line tool); none is on a worker's path.
mod inspect {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use chrono::DateTime;
    use redis::aio::ConnectionManager;

    use super::{
        dead_letter_key, op, BrokerError, DelayedMessage, Envelope, Inner, QueueKeys, WorkerInfo,
        SCRIPTS,
    };
    use crate::wire::signature::Signature;

    const CONSUMERS_PREFIX: &str = "machinery:consumers:";
    const INFLIGHT_PREFIX: &str = "machinery:inflight:";
    /// Keys asked for per `SCAN`/`ZSCAN`/`LRANGE` step.
    const STEP: usize = 1000;

    /// Every key matching `pattern` (and of `kind`, if given), walked with `SCAN`.
    async fn scan(
        conn: &mut ConnectionManager,
        pattern: &str,
        kind: Option<&str>,
    ) -> Result<Vec<String>, BrokerError> {
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(STEP);
            if let Some(kind) = kind {
                cmd.arg("TYPE").arg(kind);
            }
            let (next, batch): (u64, Vec<String>) =
                cmd.query_async(conn).await.map_err(op("scan keys"))?;
            keys.extend(batch);
            if next == 0 {
                return Ok(keys);
            }
            cursor = next;
        }
    }

    /// The routing key of a message, or `default` when it has none or is not a signature.
    fn routing_key(body: &[u8], default: &str) -> String {
        Signature::from_json(body)
            .ok()
            .map(|signature| signature.routing_key)
            .filter(|key| !key.is_empty())
            .unwrap_or_else(|| default.to_owned())
    }

    pub(super) async fn queues(inner: &Inner) -> Result<Vec<String>, BrokerError> {
        let mut conn = inner.conn.clone();
        let mut queues = BTreeSet::from([inner.default_queue.clone()]);
        for key in scan(&mut conn, &format!("{CONSUMERS_PREFIX}*"), Some("set")).await? {
            if let Some(queue) = key.strip_prefix(CONSUMERS_PREFIX) {
                queues.insert(queue.to_owned());
            }
        }
        let mut candidates = Vec::new();
        for key in scan(&mut conn, "*", Some("list")).await? {
            if let Some(rest) = key.strip_prefix(INFLIGHT_PREFIX) {
                // machinery:inflight:<queue>:<consumer tag>; tags have no colon, queue names may.
                if let Some((queue, _tag)) = rest.rsplit_once(':') {
                    queues.insert(queue.to_owned());
                }
            } else if key.starts_with("machinery:") {
                // Chord member lists and other keys of ours.
            } else if let Some(queue) = key.strip_suffix(".dead") {
                queues.insert(queue.to_owned());
            } else if !queues.contains(&key) {
                candidates.push(key);
            }
        }
        for chunk in candidates.chunks(STEP) {
            let mut pipe = redis::pipe();
            for key in chunk {
                pipe.cmd("LINDEX").arg(key).arg(0);
            }
            let heads: Vec<Option<Vec<u8>>> = pipe
                .query_async(&mut conn)
                .await
                .map_err(op("read the heads of lists"))?;
            for (key, head) in chunk.iter().zip(heads) {
                let is_task = head
                    .and_then(|body| Signature::from_json(&body).ok())
                    .is_some_and(|signature| !signature.name.is_empty());
                if is_task {
                    queues.insert(key.clone());
                }
            }
        }
        let mut cursor: u64 = 0;
        loop {
            let (next, flat): (u64, Vec<Vec<u8>>) = redis::cmd("ZSCAN")
                .arg(&inner.config.delayed_tasks_key)
                .arg(cursor)
                .arg("COUNT")
                .arg(STEP)
                .query_async(&mut conn)
                .await
                .map_err(op("scan delayed tasks"))?;
            // ZSCAN answers member, score, member, score, ...
            for body in flat.iter().step_by(2) {
                queues.insert(routing_key(body, &inner.default_queue));
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(queues.into_iter().collect())
    }

    pub(super) async fn delayed(
        inner: &Inner,
        limit: usize,
    ) -> Result<Vec<DelayedMessage>, BrokerError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = inner.conn.clone();
        let entries: Vec<(Vec<u8>, f64)> = redis::cmd("ZRANGE")
            .arg(&inner.config.delayed_tasks_key)
            .arg(0)
            .arg(limit - 1)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await
            .map_err(op("list delayed messages"))?;
        Ok(entries
            .into_iter()
            .map(|(body, score)| DelayedMessage {
                // The score is the ETA in Unix nanoseconds (a double: exact to well under a microsecond).
                eta: DateTime::from_timestamp_nanos(score as i64),
                body,
            })
            .collect())
    }

    pub(super) async fn requeue_dead(
        inner: &Inner,
        queue: &str,
        task_uuid: Option<&str>,
    ) -> Result<u64, BrokerError> {
        let dead = dead_letter_key(queue);
        let mut conn = inner.conn.clone();
        // Entries are identified by their exact bytes; `settle` removes one and pushes its body onto the
        // queue in one step, and does nothing if another client removed it first.
        let mut chosen: Vec<Vec<u8>> = Vec::new();
        let total: usize = redis::cmd("LLEN")
            .arg(&dead)
            .query_async(&mut conn)
            .await
            .map_err(op("requeue dead letters"))?;
        let mut start = 0;
        while start < total {
            let end = (start + STEP).min(total) - 1;
            let page: Vec<Vec<u8>> = redis::cmd("LRANGE")
                .arg(&dead)
                .arg(start)
                .arg(end)
                .query_async(&mut conn)
                .await
                .map_err(op("requeue dead letters"))?;
            if page.is_empty() {
                break;
            }
            start += page.len();
            chosen.extend(page.into_iter().filter(|entry| match task_uuid {
                None => true,
                Some(uuid) => {
                    crate::broker::has_task_uuid(&Envelope::decode(queue, entry).body, uuid)
                }
            }));
        }
        let mut moved = 0;
        for entry in chosen {
            let body = Envelope::decode(queue, &entry).body;
            let keys = &[dead.as_bytes(), queue.as_bytes()];
            let args = &[entry.as_slice(), body.as_slice()];
            let done: u64 = SCRIPTS
                .settle
                .run(&mut conn, keys, args)
                .await
                .map_err(op("requeue dead letters"))?;
            moved += done;
        }
        Ok(moved)
    }

    pub(super) async fn workers(inner: &Inner) -> Result<Vec<WorkerInfo>, BrokerError> {
        let mut conn = inner.conn.clone();
        let mut consumers: Vec<(QueueKeys, String)> = Vec::new();
        for registry in scan(&mut conn, &format!("{CONSUMERS_PREFIX}*"), Some("set")).await? {
            let Some(queue) = registry.strip_prefix(CONSUMERS_PREFIX) else {
                continue;
            };
            let tags: Vec<String> = redis::cmd("SMEMBERS")
                .arg(&registry)
                .query_async(&mut conn)
                .await
                .map_err(op("list workers"))?;
            let keys = QueueKeys::new(queue);
            consumers.extend(tags.into_iter().map(|tag| (keys.clone(), tag)));
        }
        let (now_secs, now_micros): (i64, i64) = redis::cmd("TIME")
            .query_async(&mut conn)
            .await
            .map_err(op("list workers"))?;
        let now_ms = now_secs * 1000 + now_micros / 1000;
        let mut workers = Vec::with_capacity(consumers.len());
        for chunk in consumers.chunks(STEP / 3) {
            let mut pipe = redis::pipe();
            for (keys, tag) in chunk {
                pipe.cmd("GET").arg(keys.heartbeat(tag));
                pipe.cmd("PTTL").arg(keys.heartbeat(tag));
                pipe.cmd("LLEN").arg(keys.inflight(tag));
            }
            let answers: Vec<(Option<String>, i64, u64)> = pipe
                .query_async::<Vec<redis::Value>>(&mut conn)
                .await
                .map_err(op("list workers"))?
                .chunks(3)
                .map(|three| {
                    let beat = three
                        .first()
                        .and_then(|v| redis::from_redis_value(v.clone()).ok());
                    let ttl = three
                        .get(1)
                        .and_then(|v| redis::from_redis_value(v.clone()).ok());
                    let len = three
                        .get(2)
                        .and_then(|v| redis::from_redis_value(v.clone()).ok());
                    (beat, ttl.unwrap_or(-2), len.unwrap_or(0))
                })
                .collect();
            for ((keys, tag), (beat, ttl, in_flight)) in chunk.iter().zip(answers) {
                // Builds before the timestamped heartbeat wrote `1`: no age for those.
                let heartbeat_age = beat
                    .and_then(|text| text.parse::<i64>().ok())
                    .filter(|&ms| ms > 1_000_000_000_000)
                    .map(|ms| Duration::from_millis(now_ms.saturating_sub(ms).max(0) as u64));
                workers.push(WorkerInfo {
                    queue: keys.queue.clone(),
                    consumer_tag: tag.clone(),
                    in_flight,
                    heartbeat_age,
                    alive: ttl > 0 || ttl == -1,
                });
            }
        }
        workers.sort_by(|a, b| (&a.queue, &a.consumer_tag).cmp(&(&b.queue, &b.consumer_tag)));
        Ok(workers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_text_and_binary_bodies() {
        let at = Utc::now();
        for body in [b"{\"UUID\":1}".to_vec(), vec![0xff, 0x00, 0x7b]] {
            let raw = Envelope::encode("q", "why", at, &body);
            let letter = Envelope::decode("q", &raw);
            assert_eq!(letter.body, body);
            assert_eq!(
                (letter.queue.as_str(), letter.reason.as_str()),
                ("q", "why")
            );
        }
        let foreign = Envelope::decode("q", b"not an envelope");
        assert_eq!(foreign.body, b"not an envelope");
    }

    #[test]
    fn keys_sit_beside_gos_queue() {
        let keys = QueueKeys::new("machinery_tasks");
        assert_eq!(keys.inflight("w1"), "machinery:inflight:machinery_tasks:w1");
        assert_eq!(
            keys.heartbeat("w1"),
            "machinery:heartbeat:machinery_tasks:w1"
        );
        assert_eq!(keys.dead, "machinery_tasks.dead");
    }
}
