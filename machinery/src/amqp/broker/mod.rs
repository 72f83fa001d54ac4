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

mod acks;
mod consume;
mod control;
mod delays;
mod ledger;
mod publish;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use lapin::types::FieldTable;

use self::consume::AmqpConsumer;
pub use self::control::CANCEL_EXCHANGE;
use super::session::{AmqpError, ChannelSlot, Mode, QueueSpec, Session};
use super::table::json_table;
use super::url::ConnectError;
use crate::broker::{Broker, BrokerError, ConsumeOptions, Consumer, Inspect, Outgoing};
use crate::config::{Config, ConfigError};

/// The header naming why a message was dead-lettered.
pub const DEAD_LETTER_REASON_HEADER: &str = "machinery_dead_letter_reason";
/// The header naming the queue a dead letter came from.
pub const DEAD_LETTER_QUEUE_HEADER: &str = "machinery_dead_letter_queue";
/// The header holding when a message was dead-lettered (RFC 3339).
pub const DEAD_LETTERED_AT_HEADER: &str = "machinery_dead_lettered_at";

/// The dead-letter queue of `queue`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

/// The AMQP broker. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct AmqpBroker {
    pub(super) inner: Arc<Inner>,
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
    /// Declare quorum queues (`AMQP_QUEUE_TYPE=quorum`).
    quorum: bool,
}

impl Settings {
    fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let a = &config.amqp;
        let quorum = match a.queue_type.trim() {
            "" | "classic" => false,
            "quorum" => true,
            other => {
                return Err(ConfigError::Invalid {
                    setting: "AMQP_QUEUE_TYPE",
                    value: other.to_owned(),
                    expected: "classic or quorum",
                })
            }
        };
        if quorum && a.queue_declare_args.contains_key("x-max-priority") {
            // RabbitMQ 3.x quorum queues have no priorities; refused here rather than by a 406 later.
            return Err(ConfigError::Invalid {
                setting: "AMQP_QUEUE_DECLARE_ARGS",
                value: "x-max-priority".into(),
                expected: "no x-max-priority with AMQP_QUEUE_TYPE=quorum (quorum queues ignore priorities)",
            });
        }
        let mut queue_args = json_table(&a.queue_declare_args);
        if quorum {
            queue_args.insert("x-queue-type".into(), quorum_type());
        }
        Ok(Settings {
            exchange: a.exchange.clone(),
            exchange_type: a.exchange_type.clone(),
            binding_key: a.binding_key.clone(),
            default_queue: config.default_queue.clone(),
            queue_args,
            binding_args: json_table(&a.queue_binding_args),
            auto_delete: a.auto_delete,
            delayed_queue: a.delayed_queue.clone(),
            quorum,
        })
    }

    /// The arguments of a delay or dead-letter queue: `args`, and the queue type when it is quorum (a
    /// classic queue lives on one node, and its messages with it).
    fn typed(&self, mut args: FieldTable) -> FieldTable {
        if self.quorum {
            args.insert("x-queue-type".into(), quorum_type());
        }
        args
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

/// What clones of an [`AmqpBroker`] and its consumers share: one connection, so one TCP link and one
/// reconnection serve every publish and subscription.
pub(super) struct Inner {
    pub(super) session: Session,
    settings: Settings,
    /// Publishes and their confirms; many in flight at once.
    publish: ChannelSlot,
    /// Declarations, kept apart so that a refused declaration (406) closes only this channel.
    topology: ChannelSlot,
}

impl AmqpBroker {
    /// Connects to the broker named by `config.broker` (several URLs with
    /// `config.multiple_broker_separator`; the first that answers is used): a URL that does not parse is
    /// [`ConnectError::Url`], no server that answers [`ConnectError::Server`].
    pub async fn new(config: &Config) -> Result<AmqpBroker, ConnectError<BrokerError>> {
        let endpoints =
            super::url::endpoints("broker", &config.broker, &config.multiple_broker_separator)
                .map_err(ConnectError::Url)?;
        let tls = crate::amqp::tls::prepare("broker", &endpoints, &config.tls.for_broker())
            .map_err(|e| {
                ConnectError::Server(BrokerError::Connect {
                    url: crate::amqp::url::display(&endpoints),
                    source: Box::new(e),
                })
            })?;
        let broker = AmqpBroker {
            inner: Arc::new(Inner {
                session: Session::new("broker", endpoints, tls),
                settings: Settings::from_config(config).map_err(ConnectError::Url)?,
                publish: ChannelSlot::new(Mode::Confirm),
                topology: ChannelSlot::recycled(Mode::Plain, 5_000),
            }),
        };
        broker.inner.session.live().await.map_err(|e| {
            ConnectError::Server(BrokerError::Connect {
                url: broker.inner.session.display(),
                source: Box::new(e),
            })
        })?;
        Ok(broker)
    }

    /// Closes the connection. Consumers still open lose their channel, so their unacknowledged messages
    /// go back to the queue.
    pub async fn close(&self) {
        self.inner.session.close().await;
    }
}

/// `x-queue-type = quorum`.
fn quorum_type() -> lapin::types::AMQPValue {
    lapin::types::AMQPValue::LongString("quorum".into())
}

/// The key under which a task queue's declaration and binding are remembered on a connection.
fn task_queue_memo(queue: &str, key: &str) -> String {
    format!("queue\0{queue}\0{key}")
}

/// A nack or a returned message is RabbitMQ refusing this message, which retrying will not change; every
/// other failure is the operation's.
pub(super) fn op_error(operation: &'static str) -> impl FnOnce(AmqpError) -> BrokerError {
    move |error| match error {
        AmqpError::Nacked { .. } | AmqpError::Unroutable { .. } => {
            BrokerError::Rejected(error.to_string())
        }
        error => BrokerError::operation(operation, error),
    }
}

#[async_trait]
impl Broker for AmqpBroker {
    async fn publish_cancel(&self, task_uuid: &str) -> Result<(), BrokerError> {
        self.publish_cancel_request(task_uuid).await
    }

    async fn cancellations(&self) -> Result<crate::broker::CancelReceiver, BrokerError> {
        Ok(self.listen_for_cancellations().await)
    }

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

    async fn publish(&self, message: Outgoing<'_>) -> Result<(), BrokerError> {
        headers_fit(&message, self.inner.session.frame_max())?;
        self.inner
            .publish(&message)
            .await
            .map_err(op_error("publish"))
    }

    /// Sends every message before waiting for any confirm, so a group costs about one round trip.
    async fn publish_many(&self, messages: Vec<Outgoing<'_>>) -> Result<(), BrokerError> {
        let frame_max = self.inner.session.frame_max();
        for message in &messages {
            headers_fit(message, frame_max)?;
        }
        self.inner
            .publish_many(&messages)
            .await
            .map_err(op_error("publish"))
    }

    async fn consume(&self, options: ConsumeOptions) -> Result<Box<dyn Consumer>, BrokerError> {
        let consumer = AmqpConsumer::subscribe(self.inner.clone(), options)
            .await
            .map_err(op_error("consume"))?;
        Ok(Box::new(consumer))
    }

    fn inspect(&self) -> Result<&dyn Inspect, BrokerError> {
        Ok(self)
    }
}

/// Room in the content-header frame for everything but the headers table: frame and header overhead, the
/// content type, delivery mode and priority, with a margin.
const HEADER_FRAME_RESERVE: usize = 512;

/// Refuses a message whose headers cannot fit in one AMQP frame, before it is sent: RabbitMQ would close
/// the whole connection (`frame_too_large`), and sending it again would do the same, for ever. The size
/// is estimated from the headers' JSON, which is at least as long as their AMQP table for the strings and
/// numbers headers carry, plus a few bytes per entry for the table's type and length fields.
fn headers_fit(message: &Outgoing<'_>, frame_max: u32) -> Result<(), BrokerError> {
    if message.headers.is_empty() {
        return Ok(());
    }
    let estimate = serde_json::to_vec(&message.headers).map_or(usize::MAX, |json| json.len())
        + 8 * message.headers.len();
    let room = (frame_max as usize).saturating_sub(HEADER_FRAME_RESERVE);
    if estimate > room {
        return Err(BrokerError::Rejected(format!(
            "the headers of task {} ({} bytes or so) do not fit in one AMQP frame of {frame_max} bytes",
            message.uuid, estimate
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_queues_are_declared_as_such_and_refuse_priorities() {
        let mut config = Config::default();
        assert!(!Settings::from_config(&config).unwrap().quorum);
        config.amqp.queue_type = "quorum".into();
        let settings = Settings::from_config(&config).unwrap();
        assert!(settings.quorum);
        assert!(settings.queue_args.inner().contains_key("x-queue-type"));
        assert!(settings
            .typed(FieldTable::default())
            .inner()
            .contains_key("x-queue-type"));
        config
            .amqp
            .queue_declare_args
            .insert("x-max-priority".into(), 10.into());
        assert!(matches!(
            Settings::from_config(&config),
            Err(ConfigError::Invalid { .. })
        ));
        config.amqp.queue_type = "stream".into();
        assert!(matches!(
            Settings::from_config(&config),
            Err(ConfigError::Invalid { .. })
        ));
    }
}
