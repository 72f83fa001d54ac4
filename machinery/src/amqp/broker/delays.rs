//! ETA through Go's dead-letter TTL queues: a message due later waits in `delay.<ms>.<exchange>.<routing
//! key>` (or the configured single `delayed_queue`), and RabbitMQ dead-letters it to the exchange with its
//! routing key when its TTL runs out. A Go worker and ours both read it from there.

use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::Channel;

use super::Inner;
use crate::amqp::session::{self, bind, declare_queue, AmqpError, QueueSpec};
use crate::broker::Outgoing;

/// The shortest delay parked in Go's own delay queue (`delay.<ms>.<exchange>.<routing key>`, expiring
/// after twice the delay); shorter ones wait in `machinery.delay.<ms>.…`, which expires after
/// [`SHORT_DELAY_QUEUE_EXPIRES_MS`].
const GO_DELAY_QUEUE_MIN_MS: i64 = 1_000;

/// How long an unused short-delay queue lives.
const SHORT_DELAY_QUEUE_EXPIRES_MS: i64 = 10_000;

impl Inner {
    /// Parks a message in a dead-letter TTL queue until its ETA, as Go does, but with its priority kept and
    /// its confirm awaited. The target queue is declared first: RabbitMQ drops a dead-lettered message
    /// that no queue is bound for.
    pub(super) async fn send_delayed(
        &self,
        message: &Outgoing<'_>,
        delay_ms: i64,
    ) -> Result<session::Sent, AmqpError> {
        self.ensure_route(message.routing_key).await?;
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
            // declaration, and publishing does not reset it. Go's queue expires twice its delay after
            // that, so the message has one delay's time to be published and dead-lettered before the
            // queue, message and all, is deleted: seconds for a delay of seconds, but a loaded broker
            // misses a window of a few milliseconds, and the task is lost. A short delay therefore gets
            // a queue of our own name (no clash with Go's declaration of its name) that lives longer;
            // where it waits does not matter to Go workers, which read the exchange it is routed to.
            let (queue, expires) = if delay_ms >= GO_DELAY_QUEUE_MIN_MS {
                (
                    format!("delay.{delay_ms}.{}.{}", s.exchange, message.routing_key),
                    delay_ms.saturating_mul(2),
                )
            } else {
                (
                    format!(
                        "machinery.delay.{delay_ms}.{}.{}",
                        s.exchange, message.routing_key
                    ),
                    SHORT_DELAY_QUEUE_EXPIRES_MS,
                )
            };
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(delay_ms));
            args.insert("x-expires".into(), AMQPValue::LongLongInt(expires));
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
        // A quorum queue cannot be auto-deleted; its `x-expires` removes it once unused.
        let spec = QueueSpec {
            durable: true,
            auto_delete: s.auto_delete && !s.quorum,
            exclusive: false,
            args: s.typed(args),
        };
        declare_queue(topology, queue, &spec).await?;
        if !s.exchange.is_empty() {
            bind(topology, queue, &s.exchange, queue, &s.binding_args).await?;
        }
        Ok(())
    }
}
