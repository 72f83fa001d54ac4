//! What the CLI and the worker may ask an AMQP broker about its queues: counts, a look at pending
//! messages and dead letters without consuming them, moving dead letters back, purging. AMQP 0-9-1 has no
//! way to list queues, delayed messages or workers; those are [`BrokerError::Unsupported`].

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions};
use lapin::protocol::AMQPSoftError;

use super::broker::{op_error, Inner};
use super::session::{short, AmqpError};
use super::table::string_field;
use super::{
    dead_letter_queue, AmqpBroker, DEAD_LETTERED_AT_HEADER, DEAD_LETTER_QUEUE_HEADER,
    DEAD_LETTER_REASON_HEADER,
};
use crate::broker::{BrokerError, DeadLetter, Inspect, QueueStats};

impl Inner {
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
    /// With `publish` false the chosen dead letters are only acknowledged (deleted).
    async fn requeue_dead(
        &self,
        queue: &str,
        task_uuid: Option<&str>,
        publish: bool,
    ) -> Result<u64, AmqpError> {
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
                if publish {
                    self.publish_to_queue(queue, &delivery.data, properties)
                        .await?;
                }
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
            .requeue_dead(queue, task_uuid, true)
            .await
            .map_err(op_error("requeueing dead letters"))
    }

    /// Takes the matching dead letters with `basic.get` and acknowledges them; the others go back.
    async fn delete_dead(&self, queue: &str, task_uuid: &str) -> Result<u64, BrokerError> {
        self.inner
            .requeue_dead(queue, Some(task_uuid), false)
            .await
            .map_err(op_error("deleting dead letters"))
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
