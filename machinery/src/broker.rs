//! Brokers carry task messages from senders to workers. Each implementation sits in its transport's room
//! ([`crate::memory`], [`crate::redis`], [`crate::amqp`]) and is chosen at run time from the broker URL's
//! scheme ([`crate::connect`]). These traits know nothing of result backends: a broker that can store a
//! task state in the same step as its own write (the Redis pair) says so through the `*_with_state`
//! steps, whose defaults decline.
//!
//! Every broker honours the same contract, which the worker relies on:
//! - [`Broker::publish`] stores the message durably before it returns, and delays it until its ETA.
//! - A [`Consumer`] hands out [`Delivery`]s; a delivery stays owned by its consumer until it is
//!   [acknowledged](Delivery::ack), [requeued](Delivery::requeue) or [dead-lettered](Delivery::dead_letter).
//!   If the worker dies first, the message goes back to the queue (at-least-once delivery); a delivery
//!   dropped unsettled in a live worker goes back at once ([`Acknowledger::abandon`]).
//! - [`Consumer::next_batch`] is cancel-safe, and [`Consumer::close`] returns unfinished messages.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::wire::signature::Headers;
use crate::wire::state::TaskState;

/// Where a worker hears the ids of tasks to cancel ([`Broker::cancellations`]).
pub type CancelReceiver = tokio::sync::mpsc::UnboundedReceiver<String>;

/// A boxed error from a broker's client library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a broker operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The broker could not be reached.
    #[error("cannot connect to broker {url}: {source}")]
    Connect {
        /// The URL, without password.
        url: String,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// An operation failed (connection lost, protocol error, ...).
    #[error("broker {operation} failed: {source}")]
    Operation {
        /// What we were doing, e.g. `publish` or `fetch`.
        operation: &'static str,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// The broker refused a message (for example an AMQP publisher nack).
    #[error("broker rejected the message: {0}")]
    Rejected(String),
    /// The broker has been closed.
    #[error("broker is closed")]
    Closed,
    /// This broker cannot do that (for example list delayed tasks).
    #[error("the {broker} broker does not support {operation}")]
    Unsupported {
        /// The broker kind.
        broker: &'static str,
        /// The operation.
        operation: &'static str,
    },
}

impl BrokerError {
    /// An operation error from any client error.
    pub fn operation(operation: &'static str, source: impl Into<BoxError>) -> Self {
        BrokerError::Operation {
            operation,
            source: source.into(),
        }
    }

    /// Whether trying the same message again cannot help: the broker refused it (a message too large
    /// for it, a publisher nack), or cannot do the operation at all. Connection losses and time-outs are
    /// transient.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            BrokerError::Rejected(_) | BrokerError::Unsupported { .. }
        )
    }
}

/// A message ready to publish. Its id, name and routing key are borrowed from the signature it was
/// encoded from, which outlives the publish (a send copies none of them).
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing<'a> {
    /// The task id, for logs and brokers that index by it.
    pub uuid: &'a str,
    /// The task name, for logs.
    pub name: &'a str,
    /// The queue / routing key, already adjusted by [`Broker::route`].
    pub routing_key: &'a str,
    /// The Signature JSON.
    pub body: Vec<u8>,
    /// Deliver no earlier than this.
    pub eta: Option<DateTime<Utc>>,
    /// AMQP priority.
    pub priority: u8,
    /// The signature's headers (AMQP copies string values into message headers).
    pub headers: Headers,
}

/// What to consume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumeOptions {
    /// The queue (Redis list, AMQP queue).
    pub queue: String,
    /// Identifies this consumer (AMQP consumer tag, Redis in-flight list suffix).
    pub consumer_tag: String,
    /// How many tasks the worker runs at once.
    pub concurrency: usize,
    /// How many unacknowledged messages the broker may hand out (AMQP `basic.qos`).
    pub prefetch: usize,
}

/// Counts for one queue, as far as the broker can tell (`None`: not known to this broker).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QueueStats {
    /// The queue.
    pub queue: String,
    /// Messages waiting.
    pub pending: u64,
    /// Messages waiting for their ETA.
    pub delayed: Option<u64>,
    /// Messages taken by workers and not yet acknowledged.
    pub in_flight: Option<u64>,
    /// Messages in the dead-letter place.
    pub dead: Option<u64>,
}

/// A message the worker gave up on, with the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The queue it came from.
    pub queue: String,
    /// Why it was dead-lettered.
    pub reason: String,
    /// When.
    pub at: DateTime<Utc>,
    /// The original message body.
    pub body: Vec<u8>,
}

/// A message waiting for its ETA ([`Inspect::delayed`]).
#[derive(Debug, Clone, PartialEq)]
pub struct DelayedMessage {
    /// When it becomes due (the broker's own record: the Redis score, the memory broker's key).
    pub eta: DateTime<Utc>,
    /// The message body (Signature JSON, if well-formed).
    pub body: Vec<u8>,
}

/// A consumer of a queue as the broker sees it ([`Inspect::workers`]): one per worker process and queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// The queue it consumes.
    pub queue: String,
    /// Its consumer tag (by default `machinery-<pid>-<uuid>`).
    pub consumer_tag: String,
    /// Messages it has taken and not yet acknowledged.
    pub in_flight: u64,
    /// How long ago it last renewed its heartbeat; `None` when the broker keeps no heartbeat time (the
    /// memory broker, or a Redis heartbeat written by an older build).
    pub heartbeat_age: Option<Duration>,
    /// Whether its heartbeat is live. A dead consumer is still listed until a live one on its queue has
    /// returned its in-flight messages to the queue.
    pub alive: bool,
    /// What the worker said of itself with its last heartbeat, where the broker keeps it (Redis).
    pub card: Option<WorkerCard>,
}

/// What a worker publishes about itself with each heartbeat: who it is and how many tasks it has run,
/// so that a dashboard can tell rates without scanning results.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct WorkerCard {
    /// The host name of the worker's machine.
    pub host: String,
    /// The worker's process id.
    pub pid: u32,
    /// How many tasks it runs at once.
    pub concurrency: usize,
    /// Tasks fetched and not yet finished at the last beat.
    pub running: u64,
    /// Tasks that ended in SUCCESS since the worker started.
    pub succeeded: u64,
    /// Tasks that ended in FAILURE since the worker started.
    pub failed: u64,
    /// When the consumer started, in Unix milliseconds.
    pub started_ms: i64,
    /// When this card was written, in Unix milliseconds (the worker's clock).
    pub beat_ms: i64,
}

/// A worker's live counters: the worker updates them as it runs tasks, and a consumer that publishes a
/// [`WorkerCard`] with its heartbeat reads them ([`Consumer::counters`]).
#[derive(Debug, Default)]
pub struct WorkerCounters {
    /// Shared with the worker's slots, which count a message from its fetch to its end.
    running: Arc<AtomicUsize>,
    succeeded: AtomicU64,
    failed: AtomicU64,
}

impl WorkerCounters {
    /// Tasks fetched and not yet finished.
    pub fn running(&self) -> u64 {
        self.running.load(Ordering::Relaxed) as u64
    }

    /// Tasks that ended in SUCCESS.
    pub fn succeeded(&self) -> u64 {
        self.succeeded.load(Ordering::Relaxed)
    }

    /// Tasks that ended in FAILURE.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// The gauge the worker's slots raise and lower.
    pub(crate) fn running_gauge(&self) -> Arc<AtomicUsize> {
        self.running.clone()
    }

    /// A task's final state was stored.
    pub(crate) fn finished(&self, state: &crate::State) {
        match state {
            crate::State::Success => self.succeeded.fetch_add(1, Ordering::Relaxed),
            crate::State::Failure => self.failed.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }
}

/// A message broker.
#[async_trait]
pub trait Broker: Send + Sync + fmt::Debug + 'static {
    /// A short name for logs and errors (`memory`, `redis`, `amqp`).
    fn kind(&self) -> &'static str;

    /// The routing key a signature is published with (Go's `AdjustRoutingKey`): by default the
    /// signature's own, or the default queue when it has none.
    fn route(&self, routing_key: &str) -> String;

    /// Publishes one message; a future ETA delays it.
    async fn publish(&self, message: Outgoing<'_>) -> Result<(), BrokerError>;

    /// Publishes several messages (a group); brokers may batch them.
    async fn publish_many(&self, messages: Vec<Outgoing<'_>>) -> Result<(), BrokerError> {
        for message in messages {
            self.publish(message).await?;
        }
        Ok(())
    }

    /// Whether this broker holds the result backend's half, so that [`Broker::publish_with_state`] can
    /// take a state with the message. A broker that overrides `publish_with_state` says `true` here when
    /// it can; with the default `false` a sender stores the state through its backend and publishes,
    /// without the call.
    fn holds_states(&self) -> bool {
        false
    }

    /// Publishes `message` together with `pending` (the sender's PENDING state) in one step, the state
    /// first, when this broker holds the result backend's half (a Redis broker and backend on one
    /// database, paired by [`crate::connect`]); returns `Ok(None)` then. Gives the message back unsent,
    /// `Ok(Some(message))`, when it does not: the caller stores the state through its backend and then
    /// [publishes](Broker::publish). The default gives it back.
    async fn publish_with_state<'a>(
        &self,
        pending: &TaskState,
        message: Outgoing<'a>,
    ) -> Result<Option<Outgoing<'a>>, BrokerError> {
        let _ = pending;
        Ok(Some(message))
    }

    /// Starts consuming a queue.
    async fn consume(&self, options: ConsumeOptions) -> Result<Box<dyn Consumer>, BrokerError>;

    /// Tells every worker process on this broker to cancel the task `task_uuid` if it runs there
    /// ([`Server::cancel`](crate::Server::cancel)): Redis publishes on a pub/sub channel, RabbitMQ on a
    /// fanout exchange, the memory broker to the workers of its instance. The default cannot.
    async fn publish_cancel(&self, task_uuid: &str) -> Result<(), BrokerError> {
        let _ = task_uuid;
        Err(BrokerError::Unsupported {
            broker: self.kind(),
            operation: "cancelling running tasks",
        })
    }

    /// Listens for [`Broker::publish_cancel`]: the ids arrive on the returned channel until it is
    /// dropped. The listener reconnects by itself after a lost connection (a cancellation sent while it
    /// is down is missed). The default cannot.
    async fn cancellations(&self) -> Result<CancelReceiver, BrokerError> {
        Err(BrokerError::Unsupported {
            broker: self.kind(),
            operation: "cancelling running tasks",
        })
    }

    /// The inspection commands (counts, listings, requeue, purge) that tools such as the CLI use, or
    /// [`BrokerError::Unsupported`] for a broker that has none. The default has none.
    fn inspect(&self) -> Result<&dyn Inspect, BrokerError> {
        Err(BrokerError::Unsupported {
            broker: self.kind(),
            operation: "inspection",
        })
    }
}

/// What inspection tools (the `machinery` CLI, a dashboard) ask of a broker, apart from [`Broker`]: no
/// sender or worker needs it to move tasks. A broker that answers returns itself from
/// [`Broker::inspect`]; a question it cannot answer is [`BrokerError::Unsupported`].
#[async_trait]
pub trait Inspect: Send + Sync + fmt::Debug {
    /// Counts for a queue.
    async fn queue_stats(&self, queue: &str) -> Result<QueueStats, BrokerError>;

    /// What a metrics sampler reads every few seconds: counts that cost the broker O(1) whatever the size
    /// of its queues and sets (no scan). Fields it cannot count that cheaply are `None`; see each broker
    /// for what a field counts here. The default asks [`Inspect::queue_stats`].
    async fn queue_depth(&self, queue: &str) -> Result<QueueStats, BrokerError> {
        self.queue_stats(queue).await
    }

    /// Up to `limit` messages waiting in a queue, oldest first, without taking them.
    async fn pending(&self, queue: &str, limit: usize) -> Result<Vec<Vec<u8>>, BrokerError>;

    /// Up to `limit` dead letters of a queue, oldest first.
    async fn dead_letters(&self, queue: &str, limit: usize)
        -> Result<Vec<DeadLetter>, BrokerError>;

    /// Deletes every waiting message of a queue; returns how many.
    async fn purge(&self, queue: &str) -> Result<u64, BrokerError>;

    /// The queues this broker can find by itself, sorted, for inspection tools (the default queue is
    /// always among them). What "find" means depends on the broker: see each implementation.
    async fn queues(&self) -> Result<Vec<String>, BrokerError>;

    /// Up to `limit` messages waiting for their ETA, of every queue, earliest first, without taking them.
    async fn delayed(&self, limit: usize) -> Result<Vec<DelayedMessage>, BrokerError>;

    /// Moves dead letters of `queue` back to the tail of the queue, unchanged: every one, or only those
    /// whose message has the task id `task_uuid`. Returns how many moved. A message moves in one step
    /// (never lost, never duplicated) where the broker allows it.
    async fn requeue_dead(&self, queue: &str, task_uuid: Option<&str>) -> Result<u64, BrokerError>;

    /// The consumers the broker knows of, live or dead, sorted by queue and tag.
    async fn workers(&self) -> Result<Vec<WorkerInfo>, BrokerError>;

    /// Deletes the dead letters of `queue` whose message has the task id `task_uuid`; returns how many.
    /// The default cannot.
    async fn delete_dead(&self, queue: &str, task_uuid: &str) -> Result<u64, BrokerError> {
        let _ = (queue, task_uuid);
        Err(BrokerError::Unsupported {
            broker: "this",
            operation: "deleting dead letters",
        })
    }
}

/// A running subscription to a queue.
#[async_trait]
pub trait Consumer: Send + fmt::Debug {
    /// Waits until at least one message is available and returns up to `max` of them (never more: the
    /// worker asks for as many as it has free slots).
    ///
    /// Cancel-safe: if the future is dropped, no message is lost; anything the broker already moved to
    /// this consumer is returned by [`Consumer::close`]. An error is transient: the worker logs it, backs
    /// off and calls again, so the consumer must reconnect by itself.
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>, BrokerError>;

    /// The worker is shutting down: stop taking messages, so that the broker hands what this consumer has
    /// not yet passed to the worker to other consumers now rather than after the running tasks finish.
    /// Deliveries already returned by [`Consumer::next_batch`] are still settled through their
    /// acknowledgers, and [`Consumer::close`] follows. The default does nothing.
    async fn stop(&mut self) -> Result<(), BrokerError> {
        Ok(())
    }

    /// Stops consuming. Messages taken but not yet acknowledged go back to the queue.
    async fn close(self: Box<Self>) -> Result<(), BrokerError>;

    /// The counters this consumer publishes with its heartbeat (as a [`WorkerCard`]), for the worker to
    /// update; `None` (the default) when the broker keeps no heartbeats.
    fn counters(&self) -> Option<Arc<WorkerCounters>> {
        None
    }
}

/// What a broker does with a delivery once the worker is done with it.
#[async_trait]
pub trait Acknowledger: Send + Sync + fmt::Debug {
    /// The message was handled (its final state is stored): forget it.
    async fn ack(self: Box<Self>) -> Result<(), BrokerError>;
    /// Put `body` (the message, possibly with changed headers) back at the tail of the queue and forget
    /// the original, in one step where the broker allows it.
    async fn requeue(self: Box<Self>, body: Vec<u8>) -> Result<(), BrokerError>;
    /// Move the message to the dead-letter place with this reason.
    async fn dead_letter(self: Box<Self>, body: Vec<u8>, reason: String)
        -> Result<(), BrokerError>;

    /// Stores `state` (the task's final state) and forgets the message in one step, the state first,
    /// when this broker holds the result backend's half (see [`Broker::publish_with_state`]); returns
    /// `Ok(false)`, doing nothing, when it does not. On success the acknowledger is dropped unused; on
    /// `Ok(false)` or an error the caller stores the state through its backend and then settles the
    /// message the ordinary way. The default does not.
    async fn try_ack_with_state(&self, state: &TaskState) -> Result<bool, BrokerError> {
        let _ = state;
        Ok(false)
    }

    /// Whether [`Acknowledger::try_ack_with_state`] may store a state (its broker holds the result
    /// backend's half). An acknowledger that overrides it says `true` here when it can; with the default
    /// `false` the worker stores the state through its backend and acknowledges, without the call.
    fn acks_with_state(&self) -> bool {
        false
    }

    /// The delivery was dropped without being settled (its task cut off, or the code handling it
    /// panicked): give the message back to its queue promptly, without waiting for the consumer to
    /// close. Called from a destructor, so it must not block: a broker that needs a round trip spawns
    /// it on the current tokio runtime. The default does nothing (the message returns when the consumer
    /// closes, or when the broker notices the consumer is gone).
    fn abandon(self: Box<Self>) {}
}

/// The longest [`Broker::cancellations`] waits for its listener's first subscription: a broker that
/// does not answer by then is left to the listener's own retries, and the worker starts.
const LISTEN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A cancellation listener's word to [`Broker::cancellations`]: it listens ([`Listening::now`]), or its
/// first attempt failed ([`Listening::attempted`], or dropped) and it keeps trying on its own.
pub(crate) struct Listening(Option<tokio::sync::oneshot::Sender<()>>);

impl Listening {
    /// The listener is subscribed: requests published from now on reach it.
    pub(crate) fn now(&mut self) {
        if let Some(ready) = self.0.take() {
            let _ = ready.send(());
        }
    }

    /// The first attempt is over, whatever came of it: [`Broker::cancellations`] waits no longer.
    pub(crate) fn attempted(&mut self) {
        self.0 = None;
    }
}

/// Spawns a cancellation listener (`listen`, given where to send the ids it hears) and returns the ids'
/// receiver once it listens, its first attempt failed, or [`LISTEN_WAIT`] passed: a worker runs tasks right
/// after, and a request for one of them must find the listener in place.
pub(crate) async fn spawn_cancel_listener<F>(
    listen: impl FnOnce(tokio::sync::mpsc::UnboundedSender<String>, Listening) -> F,
) -> CancelReceiver
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    let (ready, listening) = tokio::sync::oneshot::channel();
    tokio::spawn(listen(sender, Listening(Some(ready))));
    let _ = tokio::time::timeout(LISTEN_WAIT, listening).await;
    receiver
}

/// One message handed to the worker.
///
/// Dropping a delivery without settling it ([`ack`](Delivery::ack), [`requeue`](Delivery::requeue),
/// [`dead_letter`](Delivery::dead_letter), or a successful
/// [`try_ack_with_state`](Delivery::try_ack_with_state)) gives the message back to its queue at once
/// ([`Acknowledger::abandon`]), so a task cut off by a panic or a shutdown runs again promptly.
#[derive(Debug)]
pub struct Delivery {
    /// The message body (Signature JSON, if well-formed).
    pub body: Vec<u8>,
    /// The broker delivered it before (AMQP redelivery, Redis recovery from a dead worker).
    pub redelivered: bool,
    /// `None` once settled.
    acker: Option<Box<dyn Acknowledger>>,
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(acker) = self.acker.take() {
            acker.abandon();
        }
    }
}

impl Delivery {
    /// A delivery of `body`, settled through `acker`.
    pub fn new(body: Vec<u8>, redelivered: bool, acker: Box<dyn Acknowledger>) -> Self {
        Delivery {
            body,
            redelivered,
            acker: Some(acker),
        }
    }

    /// Takes the acknowledger out, to settle the message with it.
    fn settling(&mut self) -> Result<Box<dyn Acknowledger>, BrokerError> {
        self.acker.take().ok_or(BrokerError::Closed)
    }

    /// The message was handled: forget it.
    pub async fn ack(mut self) -> Result<(), BrokerError> {
        self.settling()?.ack().await
    }

    /// Puts `body` back at the tail of the queue in place of this message.
    pub async fn requeue(mut self, body: Vec<u8>) -> Result<(), BrokerError> {
        self.settling()?.requeue(body).await
    }

    /// Stores `state` (the task's final state) and acknowledges the message in one step, where the broker
    /// holds the result backend's half (one round trip on Redis). Gives the delivery back, with nothing
    /// acknowledged, when the broker cannot do that or it failed: the caller then stores the state and
    /// acknowledges separately (the state may already be stored; storing it again is harmless).
    pub async fn try_ack_with_state(mut self, state: &TaskState) -> Result<(), Delivery> {
        let Some(acker) = self.acker.as_ref().filter(|acker| acker.acks_with_state()) else {
            return Err(self);
        };
        match acker.try_ack_with_state(state).await {
            Ok(true) => {
                // Settled: the acknowledger is dropped without giving anything back.
                self.acker = None;
                Ok(())
            }
            Ok(false) => Err(self),
            Err(error) => {
                tracing::debug!(%error, "storing the state and acknowledging in one step failed; doing it in two");
                Err(self)
            }
        }
    }

    /// Moves the message to the dead-letter place with this reason.
    pub async fn dead_letter(mut self, reason: impl Into<String>) -> Result<(), BrokerError> {
        let acker = self.settling()?;
        let body = std::mem::take(&mut self.body);
        acker.dead_letter(body, reason.into()).await
    }
}

/// Whether `body` is a task message with the id `task_uuid` (for [`Inspect::requeue_dead`]).
pub(crate) fn has_task_uuid(body: &[u8], task_uuid: &str) -> bool {
    crate::wire::signature::Signature::from_json(body)
        .is_ok_and(|signature| signature.uuid == task_uuid)
}

// Where the brokers and `connect` lived before each transport had a room of its own; these paths stay
// so that code naming them keeps compiling.

pub use crate::connect::{broker as connect, broker_schemes as supported_schemes};

/// The in-process broker (now [`crate::memory`]).
pub mod memory {
    pub use crate::memory::MemoryBroker;
}

/// The Redis broker (now [`crate::redis`]).
#[cfg(feature = "redis")]
pub mod redis {
    pub use crate::redis::{dead_letter_key, RedisBroker};
}

/// The AMQP broker (now [`crate::amqp`]).
#[cfg(feature = "amqp")]
pub mod amqp {
    pub use crate::amqp::{
        dead_letter_queue, AmqpBroker, DEAD_LETTERED_AT_HEADER, DEAD_LETTER_QUEUE_HEADER,
        DEAD_LETTER_REASON_HEADER,
    };
}
