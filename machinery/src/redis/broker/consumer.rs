//! A consumer of one Redis queue: takes messages into its in-flight list (the fetch script, or `BLMOVE`
//! when the queue is empty), keeps its heartbeat alive, promotes delayed tasks and recovers the messages
//! of dead consumers in the background, and returns what it holds when it closes.

use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use redis::{AsyncCommands as _, RedisError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::acker::{body_hash, Outstanding, RedisAcker};
use super::card::{CardWriter, GONE_KEPT};
use super::finisher::Finisher;
use super::{op, promote, recover, retrying, Inner, QueueKeys, REDELIVERED_MARK_SECS, SCRIPTS};
use crate::broker::{BrokerError, ConsumeOptions, Consumer, Delivery};
use crate::redis::backend::RedisBackend;
use crate::redis::blocking::ClientId;
use crate::redis::conn::{self, Blocking};
use crate::redis::lua::is_noscript;

/// Most messages one fetch takes, whatever the worker asks.
const MAX_FETCH: usize = 1000;

/// The generations of the shared connections a silent link takes down with it: the broker's, and that of
/// the backend half it holds (the worker's result backend, when on the same database).
#[derive(Debug, Clone, Copy)]
struct Links {
    broker: u64,
    backend: Option<u64>,
}

impl Links {
    fn now(inner: &Inner, states: Option<&RedisBackend>) -> Links {
        Links {
            broker: inner.conn.generation(),
            backend: states.map(|states| states.link().generation()),
        }
    }

    /// Replaces those connections (each only if nobody replaced it since `self` was taken).
    fn replace(self, inner: &Inner, states: Option<&RedisBackend>, why: &str) {
        inner.conn.replace(self.broker, why);
        if let (Some(states), Some(generation)) = (states, self.backend) {
            states.link().replace(generation, why);
        }
    }
}

/// Renews the heartbeat, promotes delayed tasks and recovers dead consumers' messages until stopped
/// (recovery only when no other consumer of the queue ran it within the last nine tenths of a period).
///
/// Each round is also the probe of the shared connections: a round that gets no answer within the
/// poll period plus a second ([`conn::silence_limit`]) means a silent link, and they are replaced.
async fn background(
    inner: Arc<Inner>,
    states: Option<RedisBackend>,
    keys: QueueKeys,
    tag: String,
    card: CardWriter,
    heartbeat_timeout: Duration,
    stop: CancellationToken,
) {
    let beat_every = heartbeat_timeout / 5;
    let promote_every = Duration::from_millis(inner.config.delayed_tasks_poll_period.max(10));
    let silence = conn::silence_limit(&inner.config);
    // The first round recovers at once (unless another consumer of the queue did within the period): a
    // restarted worker picks up what its dead predecessors left.
    let mut next_beat = tokio::time::Instant::now();
    let mut failing = false;
    loop {
        let links = Links::now(&inner, states.as_ref());
        let round = async {
            let now = tokio::time::Instant::now();
            if now >= next_beat {
                next_beat = now + beat_every;
                beat(&inner, &keys, &tag, &card, heartbeat_timeout).await?;
                // One consumer per queue scans per period: the lock lasts nine tenths of it, so that the
                // holder's own next round (due one period after this one began) finds it free.
                let recovered = recover(&inner, &keys, &tag, beat_every * 9 / 10).await?;
                if let Some(recovered @ 1..) = recovered {
                    tracing::warn!(queue = %keys.queue, recovered, "returned the in-flight messages of workers whose heartbeat expired to the queue; those tasks run again");
                }
            }
            let promoted = promote(&inner, &keys).await?;
            if promoted > 0 {
                tracing::debug!(promoted, "moved due delayed tasks to their queues");
            }
            Ok::<_, BrokerError>(())
        };
        let result = match tokio::time::timeout(silence, round).await {
            Ok(result) => result,
            Err(_) => {
                links.replace(
                    &inner,
                    states.as_ref(),
                    "broker housekeeping got no answer within the poll period plus a second",
                );
                // The heartbeat may not have been renewed: the next round renews it at once.
                next_beat = tokio::time::Instant::now();
                Err(BrokerError::operation(
                    "housekeeping",
                    format!("no answer from redis within {silence:?}"),
                ))
            }
        };
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

/// Renews the heartbeat (first), the worker card, and the registration (last: a consumer is never
/// registered without a live heartbeat).
async fn beat(
    inner: &Inner,
    keys: &QueueKeys,
    tag: &str,
    card: &CardWriter,
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
        .cmd("SET")
        .arg(keys.card(tag))
        .arg(card.json())
        .arg("PX")
        .arg((timeout + GONE_KEPT).as_millis() as u64)
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
pub(super) struct RedisConsumer {
    inner: Arc<Inner>,
    /// The backend half, handed to each acknowledger (see [`RedisBroker::with_backend`](super::RedisBroker::with_backend)).
    states: Option<RedisBackend>,
    /// Final states stored with their acknowledgements in batches (none on a cluster: no shared slot).
    finisher: Option<Finisher>,
    keys: QueueKeys,
    tag: String,
    inflight: String,
    heartbeat: String,
    card_key: String,
    /// Who runs this consumer and its task counters, written with each heartbeat.
    card: CardWriter,
    /// The connection `BLMOVE` blocks on, and who it is on the server (to cut it off).
    blocking: Option<(Blocking, ClientId)>,
    /// The endpoint's count of announced master switches when `blocking` was connected: behind
    /// Sentinel, a fetch must not go on blocking on a master that is no longer the one.
    blocking_switches: u64,
    /// A blocking connection given up but not yet known to be gone on the server: until it is killed
    /// there, a `BLMOVE` it carried may still move a message into our in-flight list.
    killing: Option<ClientId>,
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
    /// Registers a consumer on `options.queue`, after returning what a previous consumer with the same
    /// tag left in flight, and starts its background task.
    pub(super) async fn start(
        inner: Arc<Inner>,
        states: Option<RedisBackend>,
        options: &ConsumeOptions,
    ) -> Result<RedisConsumer, BrokerError> {
        let keys = inner.keys(&options.queue);
        let tag = options.consumer_tag.clone();
        let heartbeat_timeout = Duration::from_millis(inner.config.heartbeat_timeout.max(500));
        let inflight = keys.inflight(&tag);
        let finisher = (states.as_ref())
            .filter(|_| !inner.config.cluster_enabled)
            .map(|states| {
                Finisher::new(
                    inner.clone(),
                    states.clone(),
                    &inflight,
                    options.concurrency,
                )
            });
        let mut consumer = RedisConsumer {
            inner,
            states,
            finisher,
            inflight,
            heartbeat: keys.heartbeat(&tag),
            card_key: keys.card(&tag),
            card: CardWriter::new(options.concurrency),
            keys,
            tag,
            blocking: None,
            blocking_switches: 0,
            killing: None,
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
            consumer.inner.clone(),
            consumer.states.clone(),
            consumer.keys.clone(),
            consumer.tag.clone(),
            consumer.card.clone(),
            heartbeat_timeout,
            consumer.stop.clone(),
        ))));
        Ok(consumer)
    }

    async fn beat(&self) -> Result<(), BrokerError> {
        beat(
            &self.inner,
            &self.keys,
            &self.tag,
            &self.card,
            self.heartbeat_timeout,
        )
        .await
    }

    /// Returns everything in our in-flight list to the head of the queue and unregisters.
    async fn release(&self) -> Result<u64, BrokerError> {
        let keys = &[
            self.keys.consumers.as_bytes(),
            self.keys.queue.as_bytes(),
            self.keys.redelivered.as_bytes(),
            self.inflight.as_bytes(),
            self.heartbeat.as_bytes(),
            self.card_key.as_bytes(),
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
    fn fetch_keys(&self) -> [&[u8]; 5] {
        [
            self.keys.queue.as_bytes(),
            self.inflight.as_bytes(),
            self.keys.redelivered.as_bytes(),
            self.keys.consumers.as_bytes(),
            self.heartbeat.as_bytes(),
        ]
    }

    /// The fetch script's arguments: take `count`, register under our tag (with a heartbeat if ours
    /// expired), and `after-wait` when it follows a `BLMOVE`.
    fn fetch_args(&self, count: usize, after_wait: bool) -> Vec<Vec<u8>> {
        let mut args = vec![
            count.to_string().into_bytes(),
            self.tag.clone().into_bytes(),
            Utc::now().timestamp_millis().to_string().into_bytes(),
            self.heartbeat_timeout.as_millis().to_string().into_bytes(),
        ];
        if after_wait {
            args.push(b"after-wait".to_vec());
        }
        args
    }

    /// Takes up to `max` messages without waiting (registering this consumer again if it was recovered
    /// as dead meanwhile).
    async fn fetch(&self, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        let mut conn = self.inner.conn.clone();
        let args = self.fetch_args(max, false);
        let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        let pairs: Vec<(Vec<u8>, u8)> = SCRIPTS
            .fetch
            .run(&mut conn, &self.fetch_keys(), &args)
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
            finisher: self.finisher.clone(),
            queue: self.keys.queue.clone(),
            inflight: self.inflight.clone(),
            original: body.clone(),
            outstanding: self.outstanding.clone(),
            hash,
            settled: AtomicBool::new(false),
        };
        Delivery::new(body, redelivered, Box::new(acker))
    }

    /// Cuts the blocking connection, so that a `BLMOVE` left waiting by a dropped call, or sent over a link
    /// that went silent, can no longer move a message into our in-flight list: the connection is
    /// dropped and killed on the server. Until the kill succeeds it is remembered, and this fails.
    async fn cut_blocking_connection(&mut self) -> Result<(), BrokerError> {
        if let Some((conn, id)) = self.blocking.take() {
            drop(conn);
            self.killing = Some(id);
        }
        let Some(id) = &self.killing else {
            return Ok(());
        };
        // Killed by id and address together: after a failover the new server may have given that id to
        // someone else. A connection already gone counts 0, which is as good.
        let mut kill = redis::cmd("CLIENT");
        kill.arg("KILL")
            .arg("ID")
            .arg(id.id)
            .arg("ADDR")
            .arg(&id.addr);
        let killed: Result<u64, RedisError> =
            conn::on_node_of(&self.inner.conn, &self.keys.queue, kill).await;
        match killed {
            Ok(_) => {}
            Err(error) if matches!(error.kind(), redis::ErrorKind::Server(_)) => {
                tracing::debug!(%error, "could not kill the blocking fetch connection (already gone?)");
            }
            Err(error) => return Err(op("cut the blocking fetch connection")(error)),
        }
        self.killing = None;
        Ok(())
    }

    /// After a dropped call: the messages in our in-flight list that were never handed out (up to `max`).
    async fn orphans(&mut self, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        self.cut_blocking_connection().await?;
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
        let batch = match self.fetch(max).await {
            Ok(batch) => batch,
            Err(error) => {
                // The script may have run and moved messages into our in-flight list without its
                // answer reaching us (a link that broke or went silent, a master that died right
                // after): the next call hands out what sits there unclaimed.
                self.reconcile = true;
                return Err(error);
            }
        };
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

    async fn blocking_connection(&mut self) -> Result<&mut Blocking, BrokerError> {
        let switches = self.inner.endpoint.switches();
        if self.blocking.is_some() && self.blocking_switches != switches {
            tracing::info!(queue = %self.keys.queue, "the sentinels announced a new master; fetching from it");
            self.cut_blocking_connection().await?;
        }
        if self.blocking.is_none() {
            self.blocking_switches = switches;
            let mut conn = conn::blocking_connection(&self.inner.endpoint, &self.inner.config)
                .await
                .map_err(op("connect for fetching"))?;
            let info: String = conn
                .on_node_of(&self.keys.queue, redis::cmd("CLIENT").arg("INFO").clone())
                .await
                .map_err(op("connect for fetching"))?;
            let id = ClientId::parse(&info).ok_or_else(|| {
                BrokerError::operation("connect for fetching", "CLIENT INFO without id and addr")
            })?;
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
            .add_command(
                SCRIPTS
                    .fetch
                    .cmd(&self.fetch_keys(), &self.fetch_args(max - 1, true)),
            );
        let links = Links::now(&self.inner, self.states.as_ref());
        let conn = self.blocking_connection().await?;
        let replies: Result<(Option<Vec<u8>>, Vec<redis::Value>), RedisError> =
            pipe.query_async(conn).await;
        let (moved, fetched) = match replies {
            Ok(replies) => replies,
            Err(error) => {
                // A broken blocking connection is cut (killed on the server) and replaced on the next
                // call, which then hands out what sits in our in-flight list unclaimed: BLMOVE may have
                // moved a message whose answer never came (a silent link), or before the script failed
                // (NOSCRIPT after a server restart).
                self.reconcile = true;
                if error.is_timeout() {
                    // No answer within the poll period plus a second: the link is silent, and the shared
                    // connections over it most likely too.
                    tracing::warn!(queue = %self.keys.queue, "the blocking fetch got no answer within the poll period plus a second; replacing the connections");
                    links.replace(
                        &self.inner,
                        self.states.as_ref(),
                        "the blocking fetch got no answer within the poll period plus a second",
                    );
                }
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
    fn counters(&self) -> Option<Arc<crate::broker::WorkerCounters>> {
        Some(self.card.counters.clone())
    }

    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        // Cancel safety: a call dropped while its script or BLMOVE ran on the server may have moved
        // messages into our in-flight list without handing them out. The next call notices (`busy` is
        // still set), and hands out whatever is in the list but not outstanding.
        if self.busy || self.outstanding.take_unsettled() {
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
        if let Err(error) = self.cut_blocking_connection().await {
            tracing::warn!(%error, queue = %self.keys.queue, "could not kill the blocking fetch connection before returning the in-flight messages");
        }
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
