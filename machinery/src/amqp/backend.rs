//! The AMQP result backend (`amqp://`, `amqps://`): Go machinery's "one queue per task" layout
//! (reference §4.4), so Go clients read the states we write and we read theirs.
//!
//! ## Layout
//! - Each task has a queue named by its id (`task_<uuid>`), declared as Go declares it: not durable,
//!   auto-deleted, `x-message-ttl` and `x-expires` = `results_expire_in` in milliseconds as 32-bit
//!   integers, bound to the exchange with the task id as key. Every state change is one persistent
//!   `application/json` message of Go's `TaskState` JSON, published to the exchange with the task id as
//!   routing key and confirmed.
//! - Reading is where we part from Go. Go's `GetState` takes one message and acknowledges it, so each
//!   state can be read once, by one reader. We read without consuming: every message of the queue is
//!   fetched with `basic.get` and put back with `basic.nack(requeue)`, and the newest state (the newest
//!   SUCCESS or FAILURE if there is one) is returned. **Limits** (see `docs/amqp.md`): a Go client that
//!   reads a task consumes its states, so our readers see them no more; while one reader holds the
//!   messages (a few milliseconds) another sees fewer of them, so concurrent readers may briefly see an
//!   older state or none. Waiting for a result ([`Backend::wait_for_completion`]) does not depend on
//!   reading: the process binds one private, exclusive queue to the exchange with the ids it waits for,
//!   and RabbitMQ routes each new state there too, so a result arrives without polling.
//!
//! ## Groups and chords
//! Go's AMQP chord bookkeeping is racy (§9.4): it counts messages in a `<group>` queue and relies on an
//! exclusive consumer to elect the chord trigger. Ours is a compare-and-set register made of one message:
//! - `<group>_meta` (durable) holds exactly one message, the group record: Go's `GroupMeta` plus the ids
//!   of the members that have finished and who triggered the chord. [`Backend::init_group`] creates it.
//! - A member that finishes takes the record with `basic.get` on a channel in transaction mode, adds
//!   itself (once: a redelivered member is not counted twice), publishes the new record and acknowledges
//!   the old one, and commits: the publish and the ack happen together or not at all. While the record is
//!   taken, other members find the queue empty and try again a moment later; if the holder dies, its
//!   channel closes and RabbitMQ gives the record back. The member whose update completes the group sets
//!   `ChordTriggered` and is the only one told to send the callback.
//! - `<group>_states` (durable) is bound to the exchange with every member id, so RabbitMQ files a copy
//!   of each member state there as it is written; the chord's results are read from it, not from the
//!   member queues that result readers may be holding at that moment.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_core::Stream;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicQosOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::AMQPSoftError;
use lapin::types::{AMQPValue, FieldTable};
use lapin::Channel;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use super::session::{
    self, bind, declare_exchange, declare_queue, json_properties, lock, open_channel, short,
    AmqpError, ChannelSlot, Live, Mode, QueueSpec, Session,
};
use crate::backend::{Backend, BackendError};
use crate::config::Config;
use crate::wire::state::{GroupMeta, TaskState};

/// How long a write keeps retrying through a lost connection.
const WRITE_DEADLINE: Duration = Duration::from_secs(30);
/// How long a group update waits for the record while other members hold it.
const GROUP_DEADLINE: Duration = Duration::from_secs(30);

/// The group record queue of a group.
pub fn group_record_queue(group_uuid: &str) -> String {
    format!("{group_uuid}_meta")
}

/// The queue that collects copies of a group's member states.
pub fn group_states_queue(group_uuid: &str) -> String {
    format!("{group_uuid}_states")
}

/// The AMQP result backend. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct AmqpBackend {
    inner: Arc<Inner>,
}

impl fmt::Debug for AmqpBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpBackend")
            .field("url", &self.inner.session.display())
            .field("exchange", &self.inner.exchange)
            .finish_non_exhaustive()
    }
}

struct Inner {
    session: Session,
    exchange: String,
    exchange_type: String,
    /// `results_expire_in` in milliseconds, as Go sends it: a 32-bit integer.
    expire_ms: i32,
    /// State writes, confirmed, many in flight.
    publish: ChannelSlot,
    /// Declarations of per-task queues (recycled: lapin remembers each one per channel).
    topology: ChannelSlot,
    /// `basic.get` reads and their nacks.
    read: ChannelSlot,
    /// The transaction channel for group records; a transaction spans the whole channel, so one at a
    /// time per process.
    group: tokio::sync::Mutex<Option<(u64, Channel)>>,
    /// Result notifications.
    notifier: tokio::sync::Mutex<Option<Arc<Notifier>>>,
}

/// The group record stored in `<group>_meta`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct GroupRecord {
    #[serde(rename = "Group")]
    meta: GroupMeta,
    #[serde(rename = "FinishedTaskUUIDs", default)]
    finished: Vec<String>,
    #[serde(rename = "TriggeredBy", default)]
    triggered_by: String,
}

fn op_error(operation: &'static str) -> impl Fn(AmqpError) -> BackendError {
    move |error| BackendError::operation(operation, error)
}

impl AmqpBackend {
    /// Connects to the result backend named by `config.result_backend`. A URL that does not parse is
    /// reported as [`BackendError::Connect`] too, with the configuration error as its source.
    pub async fn new(config: &Config) -> Result<AmqpBackend, BackendError> {
        let endpoints = super::url::endpoints(
            "result backend",
            &config.result_backend,
            &config.multiple_broker_separator,
        )
        .map_err(|e| BackendError::Connect {
            url: super::url::shown(&e),
            source: Box::new(e),
        })?;
        let expire_ms = i32::try_from(config.results_expire_in_secs().saturating_mul(1000))
            .unwrap_or_else(|_| {
                tracing::warn!(
                    results_expire_in = config.results_expire_in,
                    "results_expire_in is longer than AMQP's 32-bit millisecond limit (24.8 days); using the limit"
                );
                i32::MAX
            });
        let backend = AmqpBackend {
            inner: Arc::new(Inner {
                session: Session::new("result backend", endpoints),
                exchange: config.amqp.exchange.clone(),
                exchange_type: config.amqp.exchange_type.clone(),
                expire_ms,
                publish: ChannelSlot::new(Mode::Confirm),
                topology: ChannelSlot::recycled(Mode::Plain, 5_000),
                read: ChannelSlot::new(Mode::Plain),
                group: tokio::sync::Mutex::new(None),
                notifier: tokio::sync::Mutex::new(None),
            }),
        };
        backend
            .inner
            .session
            .live()
            .await
            .map_err(|e| BackendError::Connect {
                url: backend.inner.session.display(),
                source: Box::new(e),
            })?;
        Ok(backend)
    }

    /// Closes the connection.
    pub async fn close(&self) {
        *self.inner.notifier.lock().await = None;
        self.inner.session.close().await;
    }
}

impl Inner {
    fn expire(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.expire_ms).unwrap_or(0))
    }

    /// Go's declaration of a per-task queue: not durable, auto-deleted, TTL and expiry as int32.
    fn task_queue_spec(&self) -> QueueSpec {
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongInt(self.expire_ms));
        args.insert("x-expires".into(), AMQPValue::LongInt(self.expire_ms));
        QueueSpec {
            durable: false,
            auto_delete: true,
            exclusive: false,
            args,
        }
    }

    fn group_queue_spec(&self, with_ttl: bool) -> QueueSpec {
        let mut args = FieldTable::default();
        if with_ttl {
            args.insert("x-message-ttl".into(), AMQPValue::LongInt(self.expire_ms));
        }
        args.insert("x-expires".into(), AMQPValue::LongInt(self.expire_ms));
        QueueSpec {
            durable: true,
            auto_delete: false,
            exclusive: false,
            args,
        }
    }

    async fn ensure_exchange(&self, live: &Live, channel: &Channel) -> Result<(), AmqpError> {
        if self.exchange.is_empty() || live.declared("exchange", None) {
            return Ok(());
        }
        declare_exchange(channel, &self.exchange, &self.exchange_type).await?;
        live.mark_declared("exchange".into());
        Ok(())
    }

    /// Declares and binds a task's queue, at most once per half expiry period per connection: the queue
    /// expires `x-expires` after its last declaration or read, and publishing does not count.
    async fn ensure_task_queue(&self, uuid: &str) -> Result<(), AmqpError> {
        let memo = format!("task\0{uuid}");
        let live = self.session.live().await?;
        if live.declared(&memo, Some(self.expire() / 2)) {
            return Ok(());
        }
        let (live, channel) = self.topology.get(&self.session).await?;
        self.ensure_exchange(&live, &channel).await?;
        declare_queue(&channel, uuid, &self.task_queue_spec()).await?;
        if !self.exchange.is_empty() {
            bind(&channel, uuid, &self.exchange, uuid, &FieldTable::default()).await?;
        }
        live.mark_declared(memo);
        Ok(())
    }

    async fn send_state(&self, state: &TaskState) -> Result<session::Sent, AmqpError> {
        let body = state.to_json().map_err(|source| AmqpError::Json {
            what: format!("encoding the state of {}", state.task_uuid),
            source,
        })?;
        self.ensure_task_queue(&state.task_uuid).await?;
        let (_, channel) = self.publish.get(&self.session).await?;
        session::send(
            &channel,
            &self.exchange,
            &state.task_uuid,
            &body,
            json_properties(),
        )
        .await
    }

    /// Every message of `queue` through `basic.get` on the read channel, each put back with a nack.
    async fn peek_all(&self, queue: &str) -> Result<Vec<Vec<u8>>, AmqpError> {
        let (_, channel) = self.read.get(&self.session).await?;
        let name = short("queue name", queue)?;
        let mut bodies = Vec::new();
        let mut ackers = Vec::new();
        let result = async {
            loop {
                let got = channel
                    .basic_get(name.clone(), BasicGetOptions { no_ack: false })
                    .await
                    .map_err(|e| AmqpError::lapin(format!("reading queue {queue:?}"), e))?;
                let Some(message) = got else { break };
                let more = message.message_count > 0;
                let delivery = message.delivery;
                bodies.push(delivery.data);
                ackers.push(delivery.acker);
                if !more {
                    break;
                }
            }
            Ok::<_, AmqpError>(())
        }
        .await;
        let requeue = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        for acker in ackers {
            // If the channel is gone, RabbitMQ has put the messages back already.
            let _ = acker.nack(requeue).await;
        }
        result.map(|()| bodies)
    }

    async fn read_state(&self, uuid: &str) -> Result<Option<TaskState>, BackendError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let bodies = session::retry_transient("reading a task state", deadline, || async {
            // Declared first, as Go's GetState does: a get on a missing queue would close the channel.
            self.ensure_task_queue(uuid).await?;
            self.peek_all(uuid).await
        })
        .await
        .map_err(op_error("get state"))?;
        let mut states = Vec::with_capacity(bodies.len());
        for body in bodies {
            states.push(
                TaskState::from_json(&body).map_err(|source| BackendError::Decode {
                    key: uuid.to_owned(),
                    source,
                })?,
            );
        }
        Ok(latest(states))
    }

    /// The open transaction channel for group records.
    async fn group_channel(&self, slot: &mut Option<(u64, Channel)>) -> Result<Channel, AmqpError> {
        let live = self.session.live().await?;
        if let Some((generation, channel)) = slot.as_ref() {
            if *generation == live.generation && channel.status().connected() {
                return Ok(channel.clone());
            }
        }
        let channel = open_channel(&live, Mode::Tx).await?;
        *slot = Some((live.generation, channel.clone()));
        Ok(channel)
    }

    /// One attempt at adding `task` to the group record. `Ok(None)`: the record is held by someone else.
    async fn try_complete(
        &self,
        channel: &Channel,
        group: &str,
        task: &str,
        count: u32,
        uncertain: bool,
    ) -> Result<Option<bool>, AmqpError> {
        let queue = group_record_queue(group);
        let got = channel
            .basic_get(
                short("queue name", &queue)?,
                BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(|e| AmqpError::lapin(format!("taking the group record {queue:?}"), e))?;
        let Some(message) = got else {
            return Ok(None);
        };
        let delivery = message.delivery;
        let mut record: GroupRecord = match serde_json::from_slice(&delivery.data) {
            Ok(record) => record,
            Err(source) => {
                // Not ours to fix: put it back and report.
                let _ = delivery
                    .acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await;
                let _ = channel.tx_commit().await;
                return Err(AmqpError::Json {
                    what: format!("decoding the group record {queue:?}"),
                    source,
                });
            }
        };
        let newly_finished = !record.finished.iter().any(|t| t == task);
        if newly_finished {
            record.finished.push(task.to_owned());
        }
        let complete = record.finished.len() >= count as usize;
        let won = if complete && !record.meta.chord_triggered {
            record.meta.chord_triggered = true;
            record.triggered_by = task.to_owned();
            true
        } else {
            // Our previous attempt's commit may have gone through with its answer lost: then we are the
            // one that triggered, and must still say so.
            uncertain && record.triggered_by == task
        };
        let changed = newly_finished || (won && !uncertain);
        if changed {
            let body = serde_json::to_vec(&record).map_err(|source| AmqpError::Json {
                what: format!("encoding the group record {queue:?}"),
                source,
            })?;
            session::send(channel, "", &queue, &body, json_properties())
                .await?
                .confirmed()
                .await?;
            delivery
                .acker
                .ack(lapin::options::BasicAckOptions::default())
                .await
                .map_err(|e| AmqpError::lapin("acknowledging the old group record", e))?;
        } else {
            delivery
                .acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await
                .map_err(|e| AmqpError::lapin("returning the group record", e))?;
        }
        channel
            .tx_commit()
            .await
            .map_err(|e| AmqpError::lapin(format!("committing the group record {queue:?}"), e))?;
        Ok(Some(won))
    }

    /// Reads every message of a durable queue without consuming it: a consumer with a prefetch of the
    /// queue's size, then the channel is closed and RabbitMQ puts the messages back.
    async fn read_durable_queue(&self, queue: &str) -> Result<Vec<Vec<u8>>, AmqpError> {
        let Some(count) = self.session.ready_count(queue).await? else {
            return Ok(Vec::new());
        };
        if count == 0 {
            return Ok(Vec::new());
        }
        let channel = self.session.scratch_channel().await?;
        let result = async {
            let prefetch = u16::try_from(count).unwrap_or(u16::MAX);
            channel
                .basic_qos(prefetch, BasicQosOptions { global: false })
                .await
                .map_err(|e| AmqpError::lapin("setting the prefetch", e))?;
            let mut consumer = channel
                .basic_consume(
                    short("queue name", queue)?,
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| AmqpError::lapin(format!("reading queue {queue:?}"), e))?;
            let mut bodies = Vec::with_capacity(count as usize);
            let timeout = Duration::from_secs(10);
            while bodies.len() < count as usize {
                let next =
                    std::future::poll_fn(|cx| std::pin::Pin::new(&mut consumer).poll_next(cx));
                match tokio::time::timeout(Duration::from_millis(500), next).await {
                    Ok(Some(Ok(delivery))) => bodies.push(delivery.data),
                    Ok(Some(Err(e))) => {
                        return Err(AmqpError::lapin(format!("reading queue {queue:?}"), e))
                    }
                    Ok(None) => {
                        return Err(AmqpError::ConsumerGone {
                            queue: queue.to_owned(),
                        })
                    }
                    // Fewer than counted: some expired or were taken meanwhile.
                    Err(_) => break,
                }
                if bodies.len() > 100_000 {
                    return Err(AmqpError::Timeout {
                        what: format!("reading queue {queue:?}"),
                        timeout,
                    });
                }
            }
            Ok(bodies)
        }
        .await;
        let _ = channel.close(200, "OK".into()).await;
        result
    }

    async fn delete_queue(&self, queue: &str) -> Result<(), AmqpError> {
        let channel = self.session.scratch_channel().await?;
        let result = channel
            .queue_delete(short("queue name", queue)?, QueueDeleteOptions::default())
            .await
            .map_err(|e| AmqpError::lapin(format!("deleting queue {queue:?}"), e));
        let _ = channel.close(200, "OK".into()).await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.soft_error() == Some(AMQPSoftError::NOTFOUND) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn notifier(&self) -> Option<Arc<Notifier>> {
        if self.exchange.is_empty() {
            // The default exchange cannot be bound to: no notifications, polling only.
            return None;
        }
        let mut slot = self.notifier.lock().await;
        if let Some(notifier) = slot.as_ref() {
            if notifier.alive() {
                return Some(notifier.clone());
            }
        }
        match Notifier::start(self).await {
            Ok(notifier) => {
                let notifier = Arc::new(notifier);
                *slot = Some(notifier.clone());
                Some(notifier)
            }
            Err(error) => {
                tracing::debug!(%error, "result notifications unavailable; polling");
                None
            }
        }
    }
}

/// The state a reader should see among a task's messages (oldest first): the newest SUCCESS or FAILURE,
/// as a redelivered task may write RECEIVED again after its first run finished, else the newest.
fn latest(states: Vec<TaskState>) -> Option<TaskState> {
    let completed = states.iter().rposition(TaskState::is_completed);
    match completed {
        Some(i) => states.into_iter().nth(i),
        None => states.into_iter().last(),
    }
}

type Waiters = Arc<Mutex<HashMap<String, Vec<(u64, mpsc::UnboundedSender<TaskState>)>>>>;

/// One private queue per backend connection that gets a copy of the states of the tasks someone in this
/// process waits for (bound with their ids), so waiting needs no polling.
struct Notifier {
    channel: Channel,
    queue: String,
    exchange: String,
    waiters: Waiters,
    next_id: std::sync::atomic::AtomicU64,
    task: AbortOnDropHandle<()>,
}

impl Notifier {
    async fn start(inner: &Inner) -> Result<Notifier, AmqpError> {
        let live = inner.session.live().await?;
        let channel = open_channel(&live, Mode::Plain).await?;
        inner.ensure_exchange(&live, &channel).await?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| AmqpError::lapin("declaring the result notification queue", e))?;
        let name = queue.name().as_str().to_owned();
        let mut consumer = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| AmqpError::lapin("consuming the result notification queue", e))?;
        let waiters: Waiters = Arc::default();
        let dispatch = waiters.clone();
        let task = tokio::spawn(async move {
            loop {
                let next =
                    std::future::poll_fn(|cx| std::pin::Pin::new(&mut consumer).poll_next(cx))
                        .await;
                let Some(Ok(delivery)) = next else { break };
                let Ok(state) = TaskState::from_json(&delivery.data) else {
                    continue;
                };
                let key = delivery.routing_key.as_str();
                if let Some(list) = lock(&dispatch).get(key) {
                    for (_, sender) in list {
                        let _ = sender.send(state.clone());
                    }
                }
            }
            tracing::debug!("result notification consumer ended");
            // Dropping the senders ends every wait's subscription: they fall back to polling.
            lock(&dispatch).clear();
        });
        Ok(Notifier {
            channel,
            queue: name,
            exchange: inner.exchange.clone(),
            waiters,
            next_id: std::sync::atomic::AtomicU64::new(0),
            task: AbortOnDropHandle::new(task),
        })
    }

    fn alive(&self) -> bool {
        self.channel.status().connected() && !self.task.is_finished()
    }

    /// Starts forwarding the states of `uuid`; the binding is made by the first subscriber of an id.
    async fn subscribe(self: &Arc<Self>, uuid: &str) -> Result<Subscription, AmqpError> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let first = {
            let mut waiters = lock(&self.waiters);
            let list = waiters.entry(uuid.to_owned()).or_default();
            list.push((id, sender));
            list.len() == 1
        };
        let subscription = Subscription {
            notifier: self.clone(),
            uuid: uuid.to_owned(),
            id,
            receiver,
        };
        if first {
            self.channel
                .queue_bind(
                    short("queue name", &self.queue)?,
                    short("exchange name", &self.exchange)?,
                    short("binding key", uuid)?,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| AmqpError::lapin("binding the result notification queue", e))?;
        }
        Ok(subscription)
    }
}

/// A wait's share of the notifier; dropping it stops the forwarding (the binding goes when the last
/// subscriber of the id unsubscribes, or with the connection).
struct Subscription {
    notifier: Arc<Notifier>,
    uuid: String,
    id: u64,
    receiver: mpsc::UnboundedReceiver<TaskState>,
}

impl Subscription {
    /// Removes this wait; returns whether it was the last for its id.
    fn leave(&self) -> bool {
        let mut waiters = lock(&self.notifier.waiters);
        let Some(list) = waiters.get_mut(&self.uuid) else {
            return false;
        };
        list.retain(|(id, _)| *id != self.id);
        if list.is_empty() {
            waiters.remove(&self.uuid);
            true
        } else {
            false
        }
    }

    async fn close(self) {
        if self.leave() {
            if let (Ok(queue), Ok(exchange), Ok(key)) = (
                short("queue name", &self.notifier.queue),
                short("exchange name", &self.notifier.exchange),
                short("binding key", &self.uuid),
            ) {
                let _ = self
                    .notifier
                    .channel
                    .queue_unbind(queue, exchange, key, FieldTable::default())
                    .await;
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.leave();
    }
}

#[async_trait]
impl Backend for AmqpBackend {
    fn kind(&self) -> &'static str {
        "amqp"
    }

    async fn set_state(&self, state: &TaskState) -> Result<(), BackendError> {
        let inner = &self.inner;
        session::retry_transient(
            "storing a task state",
            Instant::now() + WRITE_DEADLINE,
            || async { inner.send_state(state).await?.confirmed().await },
        )
        .await
        .map_err(op_error("set state"))
    }

    /// Sends every state before waiting for the confirms.
    async fn set_states(&self, states: &[TaskState]) -> Result<(), BackendError> {
        let inner = &self.inner;
        session::retry_transient(
            "storing task states",
            Instant::now() + WRITE_DEADLINE,
            || async {
                let mut sent = Vec::with_capacity(states.len());
                for state in states {
                    sent.push(inner.send_state(state).await?);
                }
                for s in sent {
                    s.confirmed().await?;
                }
                Ok(())
            },
        )
        .await
        .map_err(op_error("set state"))
    }

    async fn get_state(&self, task_uuid: &str) -> Result<Option<TaskState>, BackendError> {
        self.inner.read_state(task_uuid).await
    }

    /// One read for the revocation check, then both states sent before either confirm is awaited.
    async fn set_received_and_started(
        &self,
        received: &TaskState,
        started: &TaskState,
    ) -> Result<bool, BackendError> {
        if self
            .get_state(&received.task_uuid)
            .await?
            .is_some_and(|s| s.is_revoked())
        {
            return Ok(false);
        }
        self.set_states(&[received.clone(), started.clone()])
            .await?;
        Ok(true)
    }

    /// Subscribes to the task's states through the process's notification queue, reads the stored state
    /// once, then waits for a notification, reading again now and then in case notifications stopped
    /// (a lost connection).
    async fn wait_for_completion(
        &self,
        task_uuid: &str,
        timeout: Duration,
    ) -> Result<Option<TaskState>, BackendError> {
        let deadline = Instant::now() + timeout;
        let mut subscription = match self.inner.notifier().await {
            Some(notifier) => notifier.subscribe(task_uuid).await.ok(),
            None => None,
        };
        let mut last = self.get_state(task_uuid).await?;
        let mut poll = if subscription.is_some() {
            Duration::from_millis(200)
        } else {
            Duration::from_millis(2)
        };
        let max_poll = if subscription.is_some() {
            Duration::from_secs(2)
        } else {
            Duration::from_millis(100)
        };
        let result = loop {
            if last.as_ref().is_some_and(TaskState::is_completed) {
                break Ok(last);
            }
            let now = Instant::now();
            if now >= deadline {
                break Ok(last);
            }
            let wake = (now + poll).min(deadline);
            let notified = async {
                match subscription.as_mut() {
                    Some(s) => s.receiver.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                state = notified => match state {
                    Some(state) => {
                        if state.is_completed() || last.is_none() {
                            last = Some(state);
                        }
                    }
                    None => {
                        // The notifier is gone (connection lost): poll from now on.
                        subscription = None;
                        poll = Duration::from_millis(5);
                    }
                },
                _ = tokio::time::sleep_until(wake) => {
                    match self.get_state(task_uuid).await {
                        Ok(state) => last = state.or(last),
                        Err(error) => tracing::debug!(%error, "reading a state while waiting failed"),
                    }
                    poll = (poll * 2).min(max_poll);
                }
            }
        };
        if let Some(subscription) = subscription {
            subscription.close().await;
        }
        result
    }

    /// Creates the group record in `<group>_meta` and binds `<group>_states` with every member id. Does
    /// nothing if the record exists already.
    async fn init_group(&self, meta: &GroupMeta) -> Result<(), BackendError> {
        let inner = &self.inner;
        let record = GroupRecord {
            meta: meta.clone(),
            finished: Vec::new(),
            triggered_by: String::new(),
        };
        let body = serde_json::to_vec(&record).map_err(|source| BackendError::Decode {
            key: meta.group_uuid.clone(),
            source,
        })?;
        let states_queue = group_states_queue(&meta.group_uuid);
        let record_queue = group_record_queue(&meta.group_uuid);
        session::retry_transient(
            "creating a group",
            Instant::now() + WRITE_DEADLINE,
            || async {
                let live = inner.session.live().await?;
                // Its own channel: the binds are sent without waiting for each answer, and a failure would
                // close the channel under anyone else's feet.
                let channel = open_channel(&live, Mode::Confirm).await?;
                let result = async {
                    inner.ensure_exchange(&live, &channel).await?;
                    if !inner.exchange.is_empty() {
                        declare_queue(&channel, &states_queue, &inner.group_queue_spec(true))
                            .await?;
                        let queue = short("queue name", &states_queue)?;
                        let exchange = short("exchange name", &inner.exchange)?;
                        for uuid in &meta.task_uuids {
                            channel
                                .queue_bind(
                                    queue.clone(),
                                    exchange.clone(),
                                    short("binding key", uuid)?,
                                    QueueBindOptions { nowait: true },
                                    FieldTable::default(),
                                )
                                .await
                                .map_err(|e| {
                                    AmqpError::lapin("binding the group states queue", e)
                                })?;
                        }
                    }
                    // A synchronous method after the nowait binds: if one failed, the channel is closed and
                    // this fails.
                    let ready =
                        declare_queue(&channel, &record_queue, &inner.group_queue_spec(false))
                            .await?;
                    if ready == 0 {
                        session::send(&channel, "", &record_queue, &body, json_properties())
                            .await?
                            .confirmed()
                            .await?;
                    }
                    Ok(())
                }
                .await;
                let _ = channel.close(200, "OK".into()).await;
                result
            },
        )
        .await
        .map_err(op_error("init group"))
    }

    async fn get_group(&self, group_uuid: &str) -> Result<Option<GroupMeta>, BackendError> {
        let inner = &self.inner;
        let queue = group_record_queue(group_uuid);
        if inner
            .session
            .ready_count(&queue)
            .await
            .map_err(op_error("get group"))?
            .is_none()
        {
            return Ok(None);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut backoff =
            crate::retry::Backoff::new(Duration::from_millis(1), Duration::from_millis(50));
        loop {
            let bodies =
                session::retry_transient("reading a group", deadline, || inner.peek_all(&queue))
                    .await
                    .map_err(op_error("get group"))?;
            if let Some(body) = bodies.last() {
                let record: GroupRecord =
                    serde_json::from_slice(body).map_err(|source| BackendError::Decode {
                        key: queue.clone(),
                        source,
                    })?;
                return Ok(Some(record.meta));
            }
            // Taken by a member updating it: it comes back in a moment.
            if Instant::now() >= deadline {
                return Err(BackendError::operation(
                    "get group",
                    AmqpError::Timeout {
                        what: format!(
                            "waiting for the group record {queue:?} held by another process"
                        ),
                        timeout: Duration::from_secs(5),
                    },
                ));
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// The members' states from `<group>_states` (the newest SUCCESS or FAILURE of each), in group order;
    /// a member with no copy there is read from its own queue.
    async fn group_states(&self, group_uuid: &str) -> Result<Vec<TaskState>, BackendError> {
        let meta = crate::backend::existing_group(self, group_uuid).await?;
        let queue = group_states_queue(group_uuid);
        let inner = &self.inner;
        let bodies = session::retry_transient(
            "reading group states",
            Instant::now() + Duration::from_secs(10),
            || inner.read_durable_queue(&queue),
        )
        .await
        .map_err(op_error("group states"))?;
        let mut by_task: HashMap<String, Vec<TaskState>> = HashMap::new();
        for body in bodies {
            let state = TaskState::from_json(&body).map_err(|source| BackendError::Decode {
                key: queue.clone(),
                source,
            })?;
            by_task
                .entry(state.task_uuid.clone())
                .or_default()
                .push(state);
        }
        let mut states = Vec::with_capacity(meta.task_uuids.len());
        for uuid in &meta.task_uuids {
            let state = match by_task.remove(uuid).and_then(latest) {
                Some(state) => Some(state),
                None => self.get_state(uuid).await?,
            };
            states.extend(state);
        }
        Ok(states)
    }

    /// See the module docs: a transactional take-update-put of the group record.
    async fn complete_group_member(
        &self,
        group_uuid: &str,
        task_uuid: &str,
        group_task_count: u32,
    ) -> Result<bool, BackendError> {
        let inner = &self.inner;
        let deadline = Instant::now() + GROUP_DEADLINE;
        let mut slot = inner.group.lock().await;
        let mut held_backoff =
            crate::retry::Backoff::new(Duration::from_millis(1), Duration::from_millis(50));
        let mut error_backoff =
            crate::retry::Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let mut uncertain = false;
        loop {
            let attempt = async {
                let channel = inner.group_channel(&mut slot).await?;
                inner
                    .try_complete(&channel, group_uuid, task_uuid, group_task_count, uncertain)
                    .await
            }
            .await;
            match attempt {
                Ok(Some(won)) => return Ok(won),
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(held_backoff.next_delay()).await;
                }
                Err(error) if error.soft_error() == Some(AMQPSoftError::NOTFOUND) => {
                    return Err(BackendError::UnknownGroup(group_uuid.to_owned()));
                }
                Err(error) if error.is_transient() && Instant::now() < deadline => {
                    // The commit may or may not have happened; the record will tell on the next try.
                    uncertain = true;
                    tokio::time::sleep(error_backoff.next_delay()).await;
                }
                Ok(None) => {
                    return Err(BackendError::operation(
                        "complete group member",
                        AmqpError::Timeout {
                            what: format!(
                                "taking the record of group {group_uuid} (held by other workers)"
                            ),
                            timeout: GROUP_DEADLINE,
                        },
                    ))
                }
                Err(error) => return Err(op_error("complete group member")(error)),
            }
        }
    }

    async fn purge_state(&self, task_uuid: &str) -> Result<(), BackendError> {
        let inner = &self.inner;
        session::retry_transient(
            "deleting a task state",
            Instant::now() + WRITE_DEADLINE,
            || async {
                inner.delete_queue(task_uuid).await?;
                if let Ok(live) = inner.session.live().await {
                    live.forget(&format!("task\0{task_uuid}"));
                }
                Ok(())
            },
        )
        .await
        .map_err(op_error("purge state"))
    }

    async fn purge_group(&self, group_uuid: &str) -> Result<(), BackendError> {
        let inner = &self.inner;
        session::retry_transient(
            "deleting a group",
            Instant::now() + WRITE_DEADLINE,
            || async {
                inner.delete_queue(&group_record_queue(group_uuid)).await?;
                inner.delete_queue(&group_states_queue(group_uuid)).await
            },
        )
        .await
        .map_err(op_error("purge group"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_completed_state_wins_over_later_progress() {
        let states = vec![
            TaskState::pending("t", "add"),
            TaskState::success("t", "", vec![]),
            TaskState::received("t", ""),
        ];
        assert_eq!(latest(states).unwrap().state, crate::State::Success);
        let states = vec![TaskState::pending("t", "add"), TaskState::started("t", "")];
        assert_eq!(latest(states).unwrap().state, crate::State::Started);
        assert!(latest(Vec::new()).is_none());
    }

    #[test]
    fn the_group_record_keeps_go_group_meta_inside() {
        let record = GroupRecord {
            meta: GroupMeta::new("group_1", vec!["task_a".into(), "task_b".into()]),
            finished: vec!["task_a".into()],
            triggered_by: String::new(),
        };
        let json: serde_json::Value = serde_json::to_value(&record).unwrap();
        assert_eq!(json["Group"]["TaskUUIDs"][1], "task_b");
        assert_eq!(json["FinishedTaskUUIDs"][0], "task_a");
        let back: GroupRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back.meta, record.meta);
    }
}
