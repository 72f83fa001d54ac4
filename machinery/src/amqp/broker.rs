//! The AMQP 0-9-1 broker (`amqp://`, `amqps://`) on RabbitMQ, wire-compatible with Go machinery
//! (reference §3.3, `reference/wire/amqp.md`).
//!
//! What goes on the wire is what Go does, so Go and Rust senders and workers share queues:
//! - the exchange is declared durable, not auto-deleted, of the configured type; task queues durable,
//!   not auto-deleted, with `queue_declare_args` (e.g. `x-max-priority`), so RabbitMQ accepts Go's
//!   declarations after ours and ours after Go's (a mismatch would be answered with 406);
//! - messages are persistent `application/json` with the signature's priority and headers, routed with
//!   Go's `AdjustRoutingKey` (no routing key: the binding key on a direct exchange, else the default queue);
//! - a future ETA goes through Go's dead-letter TTL queues `delay.<ms>.<exchange>.<routing key>` (or the
//!   single `delayed_queue`).
//!
//! Where Go loses or spins, we do not: publisher confirms are always awaited (also for delayed messages)
//! and many can be in flight on the one publishing channel; delayed messages keep their priority; the
//! target queue is declared before a delayed message is parked, so it is not dropped when its TTL fires;
//! one connection serves every publish and consumer; a lost connection is re-opened with back-off; unknown
//! tasks and malformed messages go to `<queue>.dead` with the reason in a header.
//!
//! Two deliberate differences in declarations, both explained in `docs/amqp.md`: on a direct exchange a
//! sender publishing with the binding key declares the worker's default queue, not a second queue named
//! after the binding key that nobody consumes (Go's duplicate-queue trap); and a worker on a custom queue
//! binds it with its own name rather than the binding key, so default tasks are not copied into it.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_core::Stream;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicQosOptions, QueuePurgeOptions,
};
use lapin::protocol::AMQPSoftError;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel};
use tokio::time::Instant;

use super::session::{
    self, bind, declare_exchange, declare_queue, json_properties, open_channel, short, AmqpError,
    ChannelSlot, Live, Mode, QueueSpec, Session,
};
use super::table::{json_table, string_field};
use crate::broker::{
    Acknowledger, Broker, BrokerError, ConsumeOptions, Consumer, DeadLetter, Delivery, Inspect,
    Outgoing, QueueStats,
};
use crate::config::Config;

/// The header naming why a message was dead-lettered.
pub const DEAD_LETTER_REASON_HEADER: &str = "machinery_dead_letter_reason";
/// The header naming the queue a dead letter came from.
pub const DEAD_LETTER_QUEUE_HEADER: &str = "machinery_dead_letter_queue";
/// The header holding when a message was dead-lettered (RFC 3339).
pub const DEAD_LETTERED_AT_HEADER: &str = "machinery_dead_lettered_at";

/// How long a publish keeps retrying through a lost connection before it reports the failure.
const PUBLISH_DEADLINE: Duration = Duration::from_secs(30);

/// The dead-letter queue of `queue`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

/// The AMQP broker. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

impl fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpBroker")
            .field("url", &self.inner.session.display())
            .field("exchange", &self.inner.settings.exchange)
            .finish_non_exhaustive()
    }
}

/// The parts of the configuration the broker uses.
#[derive(Debug, Clone)]
struct Settings {
    exchange: String,
    exchange_type: String,
    binding_key: String,
    default_queue: String,
    queue_args: FieldTable,
    binding_args: FieldTable,
    auto_delete: bool,
    delayed_queue: String,
}

impl Settings {
    fn from_config(config: &Config) -> Self {
        let a = &config.amqp;
        Settings {
            exchange: a.exchange.clone(),
            exchange_type: a.exchange_type.clone(),
            binding_key: a.binding_key.clone(),
            default_queue: config.default_queue.clone(),
            queue_args: json_table(&a.queue_declare_args),
            binding_args: json_table(&a.queue_binding_args),
            auto_delete: a.auto_delete,
            delayed_queue: a.delayed_queue.clone(),
        }
    }

    fn direct(&self) -> bool {
        self.exchange_type == "direct"
    }

    fn task_queue(&self) -> QueueSpec {
        QueueSpec {
            durable: true,
            auto_delete: false,
            exclusive: false,
            args: self.queue_args.clone(),
        }
    }

    /// The key a worker binds its queue with: Go's binding key for the default queue; a custom queue's
    /// own name, which is the routing key senders use for it.
    fn consumer_binding(&self, queue: &str) -> String {
        if queue == self.default_queue {
            self.binding_key.clone()
        } else {
            queue.to_owned()
        }
    }

    /// The queue (and its binding key) a sender declares before publishing with `routing_key`, so that
    /// the message has a queue to land in even before any worker started. Go declares a queue named after
    /// the routing key on a direct exchange; when that key is the binding key of the default queue, that
    /// queue is a duplicate nobody consumes, so we declare the default queue itself instead.
    fn publish_target(&self, routing_key: &str) -> (String, String) {
        if !self.direct() || routing_key == self.binding_key {
            (self.default_queue.clone(), self.binding_key.clone())
        } else {
            (routing_key.to_owned(), routing_key.to_owned())
        }
    }
}

struct Inner {
    session: Session,
    settings: Settings,
    /// Publishes and their confirms; many in flight at once.
    publish: ChannelSlot,
    /// Declarations, kept apart so that a refused declaration (406) closes only this channel.
    topology: ChannelSlot,
}

impl AmqpBroker {
    /// Connects to the broker named by `config.broker` (several URLs with
    /// `config.multiple_broker_separator`; the first that answers is used). A URL that does not parse is
    /// reported as [`BrokerError::Connect`] too, with the configuration error as its source.
    pub async fn new(config: &Config) -> Result<AmqpBroker, BrokerError> {
        let endpoints =
            super::url::endpoints("broker", &config.broker, &config.multiple_broker_separator)
                .map_err(|e| BrokerError::Connect {
                    url: super::url::shown(&e),
                    source: Box::new(e),
                })?;
        let broker = AmqpBroker {
            inner: Arc::new(Inner {
                session: Session::new("broker", endpoints),
                settings: Settings::from_config(config),
                publish: ChannelSlot::new(Mode::Confirm),
                topology: ChannelSlot::recycled(Mode::Plain, 5_000),
            }),
        };
        broker
            .inner
            .session
            .live()
            .await
            .map_err(|e| BrokerError::Connect {
                url: broker.inner.session.display(),
                source: Box::new(e),
            })?;
        Ok(broker)
    }

    /// Closes the connection. Consumers still open lose their channel, so their unacknowledged messages
    /// go back to the queue.
    pub async fn close(&self) {
        self.inner.session.close().await;
    }
}

/// The key under which a task queue's declaration and binding are remembered on a connection.
fn task_queue_memo(queue: &str, key: &str) -> String {
    format!("queue\0{queue}\0{key}")
}

fn op_error(operation: &'static str) -> impl FnOnce(AmqpError) -> BrokerError {
    move |error| match error {
        AmqpError::Nacked { .. } | AmqpError::Unroutable { .. } => {
            BrokerError::Rejected(error.to_string())
        }
        error => BrokerError::operation(operation, error),
    }
}

impl Inner {
    fn properties(&self, message: &Outgoing) -> BasicProperties {
        let mut properties = json_properties();
        // amqp091 leaves out a zero priority and an empty header table; so do we.
        if message.priority > 0 {
            properties = properties.with_priority(message.priority);
        }
        if !message.headers.is_empty() {
            properties = properties.with_headers(json_table(&message.headers));
        }
        properties
    }

    async fn ensure_exchange(&self, live: &Live, channel: &Channel) -> Result<(), AmqpError> {
        let s = &self.settings;
        if s.exchange.is_empty() || live.declared("exchange", None) {
            return Ok(());
        }
        declare_exchange(channel, &s.exchange, &s.exchange_type).await?;
        live.mark_declared("exchange".into());
        Ok(())
    }

    /// Declares `queue` as a task queue and binds it with `key` (once per connection).
    async fn ensure_task_queue(
        &self,
        live: &Live,
        channel: &Channel,
        queue: &str,
        key: &str,
    ) -> Result<(), AmqpError> {
        let memo = task_queue_memo(queue, key);
        if live.declared(&memo, None) {
            return Ok(());
        }
        self.ensure_exchange(live, channel).await?;
        declare_queue(channel, queue, &self.settings.task_queue()).await?;
        if !self.settings.exchange.is_empty() {
            bind(
                channel,
                queue,
                &self.settings.exchange,
                key,
                &self.settings.binding_args,
            )
            .await?;
        }
        live.mark_declared(memo);
        Ok(())
    }

    async fn ensure_route(&self, routing_key: &str) -> Result<(), AmqpError> {
        let (queue, key) = self.settings.publish_target(routing_key);
        // The common case, already declared on this connection, needs no channel.
        let live = self.session.live().await?;
        if live.declared(&task_queue_memo(&queue, &key), None) {
            return Ok(());
        }
        let (live, channel) = self.topology.get(&self.session).await?;
        self.ensure_task_queue(&live, &channel, &queue, &key).await
    }

    /// Sends a message now (no confirm awaited yet).
    async fn send_now(&self, message: &Outgoing) -> Result<session::Sent, AmqpError> {
        self.ensure_route(&message.routing_key).await?;
        let (_, channel) = self.publish.get(&self.session).await?;
        session::send(
            &channel,
            &self.settings.exchange,
            &message.routing_key,
            &message.body,
            self.properties(message),
        )
        .await
    }

    /// Parks a message in a dead-letter TTL queue until its ETA, as Go does, but with its priority kept and
    /// its confirm awaited. The target queue is declared first: RabbitMQ drops a dead-lettered message
    /// that no queue is bound for.
    async fn send_delayed(
        &self,
        message: &Outgoing,
        delay_ms: i64,
    ) -> Result<session::Sent, AmqpError> {
        self.ensure_route(&message.routing_key).await?;
        let s = &self.settings;
        let (live, topology) = self.topology.get(&self.session).await?;
        self.ensure_exchange(&live, &topology).await?;
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(s.exchange.as_bytes())),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(message.routing_key.as_bytes())),
        );
        let mut properties = self.properties(message);
        let queue = if s.delayed_queue.is_empty() {
            // One queue per delay. Declared on every use, as Go does: `x-expires` counts from the last
            // declaration, and publishing does not reset it.
            let queue = format!("delay.{delay_ms}.{}.{}", s.exchange, message.routing_key);
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(delay_ms));
            args.insert(
                "x-expires".into(),
                AMQPValue::LongLongInt(delay_ms.saturating_mul(2)),
            );
            self.declare_delay_queue(&topology, &queue, args).await?;
            queue
        } else {
            // Go's single delay queue: per-message expiration. Its dead-letter routing key is part of the
            // declaration, so (as in Go) it serves one routing key only.
            let queue = s.delayed_queue.clone();
            let memo = format!("delayed\0{queue}\0{}", message.routing_key);
            if !live.declared(&memo, None) {
                self.declare_delay_queue(&topology, &queue, args).await?;
                live.mark_declared(memo);
            }
            properties = properties.with_expiration(delay_ms.to_string().into());
            queue
        };
        let (_, channel) = self.publish.get(&self.session).await?;
        session::send(&channel, &s.exchange, &queue, &message.body, properties).await
    }

    /// Declares a delay queue (durable, with the dead-letter arguments in `args`) and binds it to the
    /// exchange under its own name, as Go does.
    async fn declare_delay_queue(
        &self,
        topology: &Channel,
        queue: &str,
        args: FieldTable,
    ) -> Result<(), AmqpError> {
        let s = &self.settings;
        let spec = QueueSpec {
            durable: true,
            auto_delete: s.auto_delete,
            exclusive: false,
            args,
        };
        declare_queue(topology, queue, &spec).await?;
        if !s.exchange.is_empty() {
            bind(topology, queue, &s.exchange, queue, &s.binding_args).await?;
        }
        Ok(())
    }

    async fn send(&self, message: &Outgoing) -> Result<session::Sent, AmqpError> {
        if let Some(eta) = message.eta {
            let delay_ms = (eta - Utc::now()).num_milliseconds();
            if delay_ms > 0 {
                return self.send_delayed(message, delay_ms).await;
            }
        }
        self.send_now(message).await
    }

    /// Publishes straight into `queue` through the default exchange (requeue, dead letters), confirmed.
    async fn publish_to_queue(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), AmqpError> {
        let (_, channel) = self.publish.get(&self.session).await?;
        session::send(&channel, "", queue, body, properties)
            .await?
            .confirmed()
            .await
    }

    async fn ensure_dead_letter_queue(&self, queue: &str) -> Result<String, AmqpError> {
        let dead = dead_letter_queue(queue);
        let (live, channel) = self.topology.get(&self.session).await?;
        let memo = format!("dead\0{dead}");
        if !live.declared(&memo, None) {
            let spec = QueueSpec {
                durable: true,
                ..QueueSpec::default()
            };
            declare_queue(&channel, &dead, &spec).await?;
            live.mark_declared(memo);
        }
        Ok(dead)
    }

    /// Takes up to `limit` ready messages of `queue` with `basic.get` and puts them all back by closing
    /// the channel: RabbitMQ returns unacknowledged messages to their places, marked redelivered.
    async fn peek(
        &self,
        queue: &str,
        limit: usize,
    ) -> Result<Vec<lapin::message::Delivery>, AmqpError> {
        if limit == 0 || self.session.ready_count(queue).await?.is_none() {
            return Ok(Vec::new());
        }
        let channel = self.session.scratch_channel().await?;
        let mut taken = Vec::new();
        let name = short("queue name", queue)?;
        let result = async {
            while taken.len() < limit {
                let got = channel
                    .basic_get(name.clone(), BasicGetOptions { no_ack: false })
                    .await
                    .map_err(|e| AmqpError::lapin(format!("reading queue {queue:?}"), e))?;
                let Some(message) = got else { break };
                let more = message.message_count > 0;
                taken.push(message.delivery);
                if !more {
                    break;
                }
            }
            Ok::<_, AmqpError>(())
        }
        .await;
        let _ = channel.close(200, "OK".into()).await;
        result.map(|()| taken)
    }

    /// Moves the dead letters of `queue` (all, or those of one task id) back to the queue: each is taken
    /// with `basic.get`, published to the queue with a publisher confirm (without our dead-letter
    /// headers), and only then acknowledged. A failure in between leaves a copy in both places, never in
    /// neither. Dead letters that do not match stay unacknowledged and return to their places when the
    /// channel closes. At most as many messages as the dead-letter queue held at the start are looked at.
    async fn requeue_dead(&self, queue: &str, task_uuid: Option<&str>) -> Result<u64, AmqpError> {
        let dead = dead_letter_queue(queue);
        let Some(total) = self.session.ready_count(&dead).await? else {
            return Ok(0);
        };
        let channel = self.session.scratch_channel().await?;
        let name = short("queue name", &dead)?;
        let mut moved = 0;
        let result = async {
            for _ in 0..total {
                let got = channel
                    .basic_get(name.clone(), BasicGetOptions { no_ack: false })
                    .await
                    .map_err(|e| AmqpError::lapin(format!("reading queue {dead:?}"), e))?;
                let Some(message) = got else { break };
                let delivery = message.delivery;
                if !task_uuid.is_none_or(|uuid| crate::broker::has_task_uuid(&delivery.data, uuid))
                {
                    continue;
                }
                let ours = [
                    DEAD_LETTER_REASON_HEADER,
                    DEAD_LETTER_QUEUE_HEADER,
                    DEAD_LETTERED_AT_HEADER,
                ];
                let headers: std::collections::BTreeMap<_, _> = delivery
                    .properties
                    .headers()
                    .as_ref()
                    .map(|table| {
                        table
                            .inner()
                            .iter()
                            .filter(|(key, _)| !ours.contains(&key.as_str()))
                            .map(|(key, value)| (key.clone(), value.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                let properties = delivery.properties.clone().with_headers(headers.into());
                self.publish_to_queue(queue, &delivery.data, properties)
                    .await?;
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|e| {
                        AmqpError::lapin(format!("acknowledging a message of {dead:?}"), e)
                    })?;
                moved += 1;
            }
            Ok::<_, AmqpError>(())
        }
        .await;
        let _ = channel.close(200, "OK".into()).await;
        result.map(|()| moved)
    }
}

#[async_trait]
impl Broker for AmqpBroker {
    fn kind(&self) -> &'static str {
        "amqp"
    }

    /// Go's `AdjustRoutingKey`: a signature without a routing key goes with the binding key on a direct
    /// exchange and with the default queue's name otherwise.
    fn route(&self, routing_key: &str) -> String {
        let s = &self.inner.settings;
        if !routing_key.is_empty() {
            routing_key.to_owned()
        } else if s.direct() {
            s.binding_key.clone()
        } else {
            s.default_queue.clone()
        }
    }

    async fn publish(&self, message: Outgoing) -> Result<(), BrokerError> {
        let inner = &self.inner;
        session::retry_transient("publish", Instant::now() + PUBLISH_DEADLINE, || async {
            inner.send(&message).await?.confirmed().await
        })
        .await
        .map_err(op_error("publish"))
    }

    /// Sends every message before waiting for any confirm, so a group costs about one round trip.
    async fn publish_many(&self, messages: Vec<Outgoing>) -> Result<(), BrokerError> {
        let inner = &self.inner;
        let deadline = Instant::now() + PUBLISH_DEADLINE;
        let mut todo: Vec<&Outgoing> = messages.iter().collect();
        let mut backoff =
            crate::retry::Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            let mut sent = Vec::with_capacity(todo.len());
            let mut failed = Vec::new();
            let mut last_error = None;
            for message in todo {
                match inner.send(message).await {
                    Ok(s) => sent.push((message, s)),
                    Err(e) => {
                        failed.push(message);
                        last_error = Some(e);
                    }
                }
            }
            for (message, s) in sent {
                if let Err(e) = s.confirmed().await {
                    failed.push(message);
                    last_error = Some(e);
                }
            }
            let Some(error) = last_error else {
                return Ok(());
            };
            if !error.is_transient() || Instant::now() >= deadline {
                return Err(op_error("publish")(error));
            }
            tracing::debug!(%error, failed = failed.len(), "publishing a batch partly failed; retrying the rest");
            tokio::time::sleep(backoff.next_delay()).await;
            todo = failed;
        }
    }

    async fn consume(&self, options: ConsumeOptions) -> Result<Box<dyn Consumer>, BrokerError> {
        let mut consumer = AmqpConsumer {
            inner: self.inner.clone(),
            options,
            active: None,
            ledger: Arc::default(),
        };
        // Declare and subscribe now, so that a declaration RabbitMQ refuses (406) is reported to whoever
        // starts the worker rather than retried in the background.
        consumer.start().await.map_err(op_error("consume"))?;
        Ok(Box::new(consumer))
    }

    fn inspect(&self) -> Result<&dyn Inspect, BrokerError> {
        Ok(self)
    }
}

#[async_trait]
impl Inspect for AmqpBroker {
    /// Ready messages (`basic.qos` holds the rest as unacknowledged, which AMQP does not count; see
    /// `rabbitmqctl list_queues messages_unacknowledged`) and dead letters.
    async fn queue_stats(&self, queue: &str) -> Result<QueueStats, BrokerError> {
        let pending = self
            .inner
            .session
            .ready_count(queue)
            .await
            .map_err(op_error("queue statistics"))?;
        let dead = self
            .inner
            .session
            .ready_count(&dead_letter_queue(queue))
            .await
            .map_err(op_error("queue statistics"))?;
        Ok(QueueStats {
            queue: queue.to_owned(),
            pending: u64::from(pending.unwrap_or(0)),
            delayed: None,
            in_flight: None,
            dead: Some(u64::from(dead.unwrap_or(0))),
        })
    }

    /// Reads with `basic.get` and returns the messages at once (they come back marked redelivered). While
    /// they are held, consumers do not see them; a worker may get them a moment later than otherwise.
    async fn pending(&self, queue: &str, limit: usize) -> Result<Vec<Vec<u8>>, BrokerError> {
        let messages = self
            .inner
            .peek(queue, limit)
            .await
            .map_err(op_error("listing pending messages"))?;
        Ok(messages.into_iter().map(|d| d.data).collect())
    }

    async fn dead_letters(
        &self,
        queue: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        let messages = self
            .inner
            .peek(&dead_letter_queue(queue), limit)
            .await
            .map_err(op_error("listing dead letters"))?;
        Ok(messages
            .into_iter()
            .map(|d| {
                let headers = d.properties.headers().as_ref();
                let at = string_field(headers, DEAD_LETTERED_AT_HEADER)
                    .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                    .map(|t| t.with_timezone(&Utc))
                    .or_else(|| {
                        d.properties
                            .timestamp()
                            .and_then(|t| DateTime::from_timestamp(i64::try_from(t).ok()?, 0))
                    })
                    .unwrap_or_default();
                DeadLetter {
                    queue: string_field(headers, DEAD_LETTER_QUEUE_HEADER)
                        .unwrap_or_else(|| queue.to_owned()),
                    reason: string_field(headers, DEAD_LETTER_REASON_HEADER).unwrap_or_default(),
                    at,
                    body: d.data,
                }
            })
            .collect())
    }

    /// Not atomic per message as on Redis (AMQP has no transaction spanning a get and a publish): each
    /// message is published to the queue and confirmed before its dead letter is acknowledged, so a
    /// failure in between can leave a copy in both places, never in neither.
    async fn requeue_dead(&self, queue: &str, task_uuid: Option<&str>) -> Result<u64, BrokerError> {
        self.inner
            .requeue_dead(queue, task_uuid)
            .await
            .map_err(op_error("requeueing dead letters"))
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let inner = &self.inner;
        let result = async {
            let channel = inner.session.scratch_channel().await?;
            let purged = channel
                .queue_purge(short("queue name", queue)?, QueuePurgeOptions::default())
                .await
                .map_err(|e| AmqpError::lapin(format!("purging queue {queue:?}"), e));
            let _ = channel.close(200, "OK".into()).await;
            match purged {
                Ok(n) => Ok(u64::from(n)),
                Err(e) if e.soft_error() == Some(AMQPSoftError::NOTFOUND) => Ok(0),
                Err(e) => Err(e),
            }
        }
        .await;
        result.map_err(op_error("purging a queue"))
    }

    async fn queues(&self) -> Result<Vec<String>, BrokerError> {
        Err(unsupported("listing queues"))
    }

    async fn delayed(
        &self,
        _limit: usize,
    ) -> Result<Vec<crate::broker::DelayedMessage>, BrokerError> {
        Err(unsupported("listing delayed messages"))
    }

    async fn workers(&self) -> Result<Vec<crate::broker::WorkerInfo>, BrokerError> {
        Err(unsupported("listing workers"))
    }
}

/// What AMQP 0-9-1 gives no way to ask (`docs/amqp.md`: what the CLI can and cannot answer).
fn unsupported(operation: &'static str) -> BrokerError {
    BrokerError::Unsupported {
        broker: "amqp",
        operation,
    }
}

/// A subscription (`basic.consume`) on its own channel with `basic.qos(prefetch)`.
struct AmqpConsumer {
    inner: Arc<Inner>,
    options: ConsumeOptions,
    active: Option<Active>,
    ledger: Arc<Ledger>,
}

/// The messages this consumer handed to the worker, so that a copy RabbitMQ delivers again after a lost
/// channel does not run a second time in this process.
///
/// When a channel closes, RabbitMQ puts back every message delivered on it and not yet acknowledged,
/// including the tasks this worker is still running; after the consumer subscribes again, they come back
/// marked redelivered. Their first run goes on, stores its outcome, and then fails to acknowledge (the old
/// channel is gone). So a redelivered message whose body matches one still running here is held back until
/// that run is settled, and then acknowledged (or returned, if the run did not finish); one whose run
/// already finished without its acknowledgement getting through is acknowledged at once. Only this
/// process's own runs are recognised: a message another worker was running when it died runs again
/// (at-least-once).
#[derive(Default)]
struct Ledger {
    entries: Mutex<HashMap<Vec<u8>, LedgerEntry>>,
}

enum LedgerEntry {
    /// Handed to the worker (`count` copies, normally one) and not settled yet; `parked`: redelivered
    /// copies held back meanwhile.
    InFlight {
        count: usize,
        parked: Vec<lapin::Acker>,
    },
    /// Handled to the end, but the acknowledgement was lost with its channel: RabbitMQ delivers it again.
    Handled { at: std::time::Instant },
}

/// What the ledger says to do with a delivery.
enum Admission {
    /// Hand it to the worker.
    Run(lapin::Acker),
    /// A copy is running here: held back.
    Parked,
    /// A copy was handled here already: acknowledge it.
    AlreadyHandled(lapin::Acker),
}

/// How long the ledger remembers a handled message whose acknowledgement was lost.
const LEDGER_MEMORY: Duration = Duration::from_secs(600);

impl Ledger {
    fn admit(&self, body: &[u8], redelivered: bool, acker: lapin::Acker) -> Admission {
        let mut entries = session::lock(&self.entries);
        if redelivered {
            match entries.get_mut(body) {
                Some(LedgerEntry::InFlight { parked, .. }) => {
                    parked.push(acker);
                    return Admission::Parked;
                }
                Some(LedgerEntry::Handled { .. }) => {
                    entries.remove(body);
                    return Admission::AlreadyHandled(acker);
                }
                None => {}
            }
        }
        match entries.get_mut(body) {
            Some(LedgerEntry::InFlight { count, .. }) => *count += 1,
            _ => {
                entries.insert(
                    body.to_vec(),
                    LedgerEntry::InFlight {
                        count: 1,
                        parked: Vec::new(),
                    },
                );
            }
        }
        Admission::Run(acker)
    }

    /// The worker is done with one copy: `handled` if it was processed to the end (acknowledged, or
    /// replaced by a republished copy), `acked` if RabbitMQ got the acknowledgement. Returns the parked
    /// copies, to acknowledge if `handled` and to return otherwise.
    fn settle(&self, body: &[u8], handled: bool, acked: bool) -> Vec<lapin::Acker> {
        let mut entries = session::lock(&self.entries);
        let Some(LedgerEntry::InFlight { count, parked }) = entries.get_mut(body) else {
            return Vec::new();
        };
        *count = count.saturating_sub(1);
        if *count > 0 {
            return Vec::new();
        }
        let parked = std::mem::take(parked);
        if handled && !acked && parked.is_empty() {
            let now = std::time::Instant::now();
            entries.retain(|_, e| match e {
                LedgerEntry::Handled { at } => now.duration_since(*at) < LEDGER_MEMORY,
                LedgerEntry::InFlight { .. } => true,
            });
            entries.insert(body.to_vec(), LedgerEntry::Handled { at: now });
        } else {
            entries.remove(body);
        }
        parked
    }
}

/// Acknowledges (`handled`) or returns the copies that were held back while their twin ran.
async fn settle_parked(parked: Vec<lapin::Acker>, handled: bool) {
    for acker in parked {
        let result = if handled {
            acker.ack(BasicAckOptions::default()).await
        } else {
            acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await
        };
        if let Err(error) = result {
            tracing::debug!(%error, "settling a redelivered copy failed; it comes back when its channel closes");
        }
    }
}

struct Active {
    channel: Channel,
    consumer: lapin::Consumer,
    /// `basic.cancel` was sent ([`Consumer::stop`]).
    cancelled: bool,
}

impl fmt::Debug for AmqpConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConsumer")
            .field("queue", &self.options.queue)
            .field("consumer_tag", &self.options.consumer_tag)
            .field("prefetch", &self.options.prefetch)
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl AmqpConsumer {
    /// Declares the exchange and the queue as Go's worker does, sets the prefetch, and subscribes.
    async fn start(&mut self) -> Result<(), AmqpError> {
        let inner = &self.inner;
        let s = &inner.settings;
        let queue = &self.options.queue;
        let live = inner.session.live().await?;
        let channel = open_channel(&live, Mode::Plain).await?;
        if !s.exchange.is_empty() {
            declare_exchange(&channel, &s.exchange, &s.exchange_type).await?;
        }
        declare_queue(&channel, queue, &s.task_queue()).await?;
        if !s.exchange.is_empty() {
            bind(
                &channel,
                queue,
                &s.exchange,
                &s.consumer_binding(queue),
                &s.binding_args,
            )
            .await?;
        }
        live.mark_declared(task_queue_memo(queue, &s.consumer_binding(queue)));
        // The prefetch bounds the unacknowledged messages RabbitMQ hands this consumer: the worker then
        // never holds more than that. 0 would mean no limit; the worker passes its concurrency instead.
        let prefetch = u16::try_from(self.options.prefetch.max(1)).unwrap_or(u16::MAX);
        channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await
            .map_err(|e| AmqpError::lapin(format!("setting prefetch {prefetch}"), e))?;
        let consumer = channel
            .basic_consume(
                short("queue name", queue)?,
                short("consumer tag", &self.options.consumer_tag)?,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| AmqpError::lapin(format!("consuming queue {queue:?}"), e))?;
        tracing::debug!(queue = %queue, prefetch, generation = live.generation, "consuming");
        self.active = Some(Active {
            channel,
            consumer,
            cancelled: false,
        });
        Ok(())
    }

    /// Turns a lapin delivery into one for the worker, unless the ledger holds it back.
    fn wrap(&self, delivery: lapin::message::Delivery) -> Option<Result<Delivery, lapin::Acker>> {
        let lapin::message::Delivery {
            data,
            redelivered,
            properties,
            acker,
            ..
        } = delivery;
        match self.ledger.admit(&data, redelivered, acker) {
            Admission::Run(acker) => Some(Ok(Delivery::new(
                data.clone(),
                redelivered,
                Box::new(AmqpAcker {
                    inner: self.inner.clone(),
                    queue: self.options.queue.clone(),
                    acker,
                    properties,
                    ledger: self.ledger.clone(),
                    key: data,
                    settled: false,
                }),
            ))),
            Admission::Parked => {
                tracing::debug!(queue = %self.options.queue, "holding back a redelivered copy of a task running here");
                None
            }
            Admission::AlreadyHandled(acker) => Some(Err(acker)),
        }
    }
}

/// Polls the stream once without waiting.
fn try_next(
    consumer: &mut lapin::Consumer,
) -> Poll<Option<lapin::Result<lapin::message::Delivery>>> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    std::pin::Pin::new(consumer).poll_next(&mut cx)
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        loop {
            if self.active.is_none() {
                self.start().await.map_err(op_error("consume"))?;
            }
            let Some(active) = self.active.as_mut() else {
                return Err(BrokerError::Closed);
            };
            // Dropping this future while it waits takes nothing: a delivery leaves lapin's buffer only
            // in the poll that returns it.
            let first =
                std::future::poll_fn(|cx| std::pin::Pin::new(&mut active.consumer).poll_next(cx))
                    .await;
            let mut raw = match first {
                Some(Ok(delivery)) => vec![delivery],
                Some(Err(error)) => {
                    self.active = None;
                    return Err(op_error("consume")(AmqpError::lapin(
                        format!("consuming queue {:?}", self.options.queue),
                        error,
                    )));
                }
                None => {
                    self.active = None;
                    return Err(op_error("consume")(AmqpError::ConsumerGone {
                        queue: self.options.queue.clone(),
                    }));
                }
            };
            while raw.len() < max {
                match try_next(&mut active.consumer) {
                    Poll::Ready(Some(Ok(delivery))) => raw.push(delivery),
                    // An error or the end is reported by the next call, after this batch is handed out.
                    Poll::Ready(_) | Poll::Pending => break,
                }
            }
            let mut batch = Vec::with_capacity(raw.len());
            let mut handled = Vec::new();
            for delivery in raw {
                match self.wrap(delivery) {
                    Some(Ok(delivery)) => batch.push(delivery),
                    Some(Err(acker)) => handled.push(acker),
                    None => {}
                }
            }
            if !handled.is_empty() {
                tracing::debug!(
                    count = handled.len(),
                    "acknowledging redelivered copies of tasks already handled here"
                );
                settle_parked(handled, true).await;
            }
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }

    /// Cancels the subscription (RabbitMQ sends nothing more) and returns what was delivered but not yet
    /// handed to the worker with `basic.nack(requeue)`, so other consumers get it at once.
    async fn stop(&mut self) -> Result<(), BrokerError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        if active.cancelled {
            return Ok(());
        }
        let tag = short("consumer tag", &self.options.consumer_tag).map_err(op_error("stop"))?;
        active
            .channel
            .basic_cancel(tag, BasicCancelOptions::default())
            .await
            .map_err(|e| op_error("stop")(AmqpError::lapin("cancelling the consumer", e)))?;
        active.cancelled = true;
        let mut returned = 0;
        while let Poll::Ready(Some(Ok(delivery))) = try_next(&mut active.consumer) {
            let requeue = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            if delivery.acker.nack(requeue).await.unwrap_or(false) {
                returned += 1;
            }
        }
        tracing::debug!(queue = %self.options.queue, returned, "consumer stopped");
        Ok(())
    }

    /// Cancels the subscription and closes the channel; RabbitMQ puts back what was delivered to it and
    /// not acknowledged (prefetched messages, and tasks cut off by a shutdown deadline).
    async fn close(mut self: Box<Self>) -> Result<(), BrokerError> {
        let Some(active) = self.active.take() else {
            return Ok(());
        };
        if !active.cancelled {
            let tag =
                short("consumer tag", &self.options.consumer_tag).map_err(op_error("close"))?;
            if let Err(error) = active
                .channel
                .basic_cancel(tag, BasicCancelOptions::default())
                .await
            {
                tracing::debug!(%error, "cancelling the consumer failed");
            }
        }
        drop(active.consumer);
        active
            .channel
            .close(200, "consumer closed".into())
            .await
            .map_err(|e| op_error("close")(AmqpError::lapin("closing the consumer channel", e)))
    }
}

/// Settles one delivery on the consumer's channel.
struct AmqpAcker {
    inner: Arc<Inner>,
    queue: String,
    acker: lapin::Acker,
    properties: BasicProperties,
    ledger: Arc<Ledger>,
    /// The body as delivered, the ledger's key.
    key: Vec<u8>,
    settled: bool,
}

impl fmt::Debug for AmqpAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpAcker")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl AmqpAcker {
    /// Acknowledges the message after it was handled (done, or replaced by a republished copy), and
    /// settles the copies held back meanwhile.
    async fn ack_handled(&mut self, operation: &'static str) -> Result<(), BrokerError> {
        let result = match self.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => Ok(()),
            // The channel is gone and RabbitMQ has put the message back; the ledger acknowledges the
            // copy when it comes back instead of running it again.
            Ok(false) => Err(BrokerError::operation(
                operation,
                AmqpError::ConsumerGone {
                    queue: self.queue.clone(),
                },
            )),
            Err(e) => Err(op_error(operation)(AmqpError::lapin("acknowledging", e))),
        };
        self.settled = true;
        let parked = self.ledger.settle(&self.key, true, result.is_ok());
        settle_parked(parked, true).await;
        result
    }

    /// Returns the message (not handled) and the copies held back meanwhile.
    async fn give_back_all(&mut self) {
        self.give_back().await;
        self.settled = true;
        let parked = self.ledger.settle(&self.key, false, false);
        settle_parked(parked, false).await;
    }

    /// Gives the message back to the queue as it was (after a failed requeue or dead-lettering).
    async fn give_back(&self) {
        let options = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        if let Err(error) = self.acker.nack(options).await {
            tracing::debug!(%error, "nack failed; the message returns when the channel closes");
        }
    }
}

#[async_trait]
impl Acknowledger for AmqpAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), BrokerError> {
        self.ack_handled("ack").await
    }

    /// Publishes the new body straight into the queue (through the default exchange, so no other queue
    /// bound with the routing key gets a copy), confirmed, and then acknowledges the original. A crash in
    /// between leaves both, never neither.
    async fn requeue(mut self: Box<Self>, body: Vec<u8>) -> Result<(), BrokerError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let republished = session::retry_transient("requeue", deadline, || {
            self.inner
                .publish_to_queue(&self.queue, &body, self.properties.clone())
        })
        .await;
        match republished {
            Ok(()) => self.ack_handled("requeue").await,
            Err(error) => {
                self.give_back_all().await;
                Err(op_error("requeue")(error))
            }
        }
    }

    /// Publishes the message to `<queue>.dead` with the reason, the queue and the time in headers,
    /// confirmed, then acknowledges the original.
    async fn dead_letter(
        mut self: Box<Self>,
        body: Vec<u8>,
        reason: String,
    ) -> Result<(), BrokerError> {
        let now = Utc::now();
        let mut headers = self.properties.headers().clone().unwrap_or_default();
        headers.insert(
            DEAD_LETTER_REASON_HEADER.into(),
            AMQPValue::LongString(LongString::from(reason.as_bytes())),
        );
        headers.insert(
            DEAD_LETTER_QUEUE_HEADER.into(),
            AMQPValue::LongString(LongString::from(self.queue.as_bytes())),
        );
        headers.insert(
            DEAD_LETTERED_AT_HEADER.into(),
            AMQPValue::LongString(LongString::from(now.to_rfc3339().as_bytes())),
        );
        let properties = self
            .properties
            .clone()
            .with_headers(headers)
            .with_timestamp(u64::try_from(now.timestamp()).unwrap_or_default());
        let deadline = Instant::now() + Duration::from_secs(10);
        let inner = &self.inner;
        let queue = &self.queue;
        let stored = session::retry_transient("dead-letter", deadline, || {
            let properties = properties.clone();
            let body = &body;
            async move {
                let dead = inner.ensure_dead_letter_queue(queue).await?;
                inner.publish_to_queue(&dead, body, properties).await
            }
        })
        .await;
        match stored {
            Ok(()) => self.ack_handled("dead-letter").await,
            Err(error) => {
                // Put it back, after a pause so that a dead-letter queue we cannot write to does not
                // turn into a busy loop of redeliveries.
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.give_back_all().await;
                Err(op_error("dead-letter")(error))
            }
        }
    }
}

impl Drop for AmqpAcker {
    fn drop(&mut self) {
        if !self.settled {
            // Dropped unsettled (a task cut off at shutdown): the message and any copy held back stay
            // unacknowledged and return to the queue when the consumer's channel closes.
            let parked = self.ledger.settle(&self.key, false, false);
            drop(parked);
        }
    }
}
