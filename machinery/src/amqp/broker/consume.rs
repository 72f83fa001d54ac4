//! The consumer: a `basic.consume` subscription with a prefetch, its deliveries handed to the worker in
//! batches, and the acknowledger that settles each one (ack, requeue, dead-letter to `<queue>.dead`).

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use futures_core::Stream;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel};
use tokio::time::Instant;

use super::acks::{Acks, Tagged};
use super::ledger::{Admission, Ledger};
use super::{
    dead_letter_queue, op_error, task_queue_memo, Inner, DEAD_LETTERED_AT_HEADER,
    DEAD_LETTER_QUEUE_HEADER, DEAD_LETTER_REASON_HEADER,
};
use crate::amqp::session::{
    self, bind, declare_exchange, declare_queue, open_channel, short, AmqpError, Mode, QueueSpec,
};
use crate::broker::{Acknowledger, BrokerError, ConsumeOptions, Consumer, Delivery};
use crate::group_commit::Answer;

/// A subscription (`basic.consume`) on its own channel with `basic.qos(prefetch)`.
pub(super) struct AmqpConsumer {
    inner: Arc<Inner>,
    options: ConsumeOptions,
    active: Option<Active>,
    ledger: Arc<Ledger>,
}

impl Inner {
    /// Declares `<queue>.dead` once per connection; it is durable so that dead letters outlive restarts.
    async fn ensure_dead_letter_queue(&self, queue: &str) -> Result<String, AmqpError> {
        let dead = dead_letter_queue(queue);
        let (live, channel) = self.topology.get(&self.session).await?;
        let memo = format!("dead\0{dead}");
        if !live.declared(&memo, None) {
            let spec = QueueSpec {
                durable: true,
                args: self.settings.typed(lapin::types::FieldTable::default()),
                ..QueueSpec::default()
            };
            declare_queue(&channel, &dead, &spec).await?;
            live.mark_declared(memo);
        }
        Ok(dead)
    }
}

/// Acknowledges (`handled`) or returns the copies that were held back while their twin ran.
async fn settle_parked(parked: Vec<Tagged>, handled: bool) {
    for copy in parked {
        if handled {
            if let Answer::Failed(error) | Answer::Refused(error) = copy.ack().await {
                tracing::debug!(%error, "acknowledging a redelivered copy failed; it comes back when its channel closes");
            }
        } else if let Err(error) = copy.give_back().await {
            tracing::debug!(%error, "returning a redelivered copy failed; it comes back when its channel closes");
        }
    }
}

struct Active {
    channel: Channel,
    consumer: lapin::Consumer,
    /// The channel's acknowledgements (its delivery tags are its own).
    acks: Arc<Acks>,
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
    /// Declares and subscribes now, so that a declaration RabbitMQ refuses (406) is reported to whoever
    /// starts the worker rather than retried in the background.
    pub(super) async fn subscribe(
        inner: Arc<Inner>,
        options: ConsumeOptions,
    ) -> Result<AmqpConsumer, AmqpError> {
        let mut consumer = AmqpConsumer {
            inner,
            options,
            active: None,
            ledger: Arc::default(),
        };
        consumer.start().await?;
        Ok(consumer)
    }

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
            acks: Arc::default(),
            cancelled: false,
        });
        Ok(())
    }

    /// Turns a lapin delivery into one for the worker, unless the ledger holds it back.
    fn wrap(
        &self,
        acks: &Arc<Acks>,
        delivery: lapin::message::Delivery,
    ) -> Option<Result<Delivery, Tagged>> {
        let lapin::message::Delivery {
            delivery_tag,
            data,
            redelivered,
            properties,
            acker,
            ..
        } = delivery;
        let tagged = acks.delivered(delivery_tag, acker);
        match self.ledger.admit(&data, redelivered, tagged) {
            Admission::Run(tagged) => Some(Ok(Delivery::new(
                data.clone(),
                redelivered,
                Box::new(AmqpAcker {
                    inner: self.inner.clone(),
                    queue: self.options.queue.clone(),
                    delivery: tagged,
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
            Admission::AlreadyHandled(copy) => Some(Err(copy)),
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
            let acks = active.acks.clone();
            let mut batch = Vec::with_capacity(raw.len());
            let mut handled = Vec::new();
            for delivery in raw {
                match self.wrap(&acks, delivery) {
                    Some(Ok(delivery)) => batch.push(delivery),
                    Some(Err(copy)) => handled.push(copy),
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
    delivery: Tagged,
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
        let result = match self.delivery.ack().await {
            Answer::Done => Ok(()),
            // The channel is gone and RabbitMQ has put the message back; the ledger acknowledges the
            // copy when it comes back instead of running it again.
            Answer::Refused(_) => Err(BrokerError::operation(
                operation,
                AmqpError::ConsumerGone {
                    queue: self.queue.clone(),
                },
            )),
            Answer::Failed(reason) => Err(op_error(operation)(AmqpError::Unacknowledged {
                queue: self.queue.clone(),
                reason,
            })),
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
        if let Err(error) = self.delivery.give_back().await {
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
        let mut properties = self
            .properties
            .clone()
            .with_headers(headers)
            .with_timestamp(u64::try_from(now.timestamp()).unwrap_or_default());
        // A body that is not JSON (why it is here, often) must not be labelled as JSON.
        if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
            properties = properties.with_content_type("application/octet-stream".into());
        }
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
            // Dropped unsettled (a task cut off by a panic or a shutdown): give the message and any copy
            // held back to the queue now (`basic.nack` with requeue), rather than when the consumer's
            // channel closes. Without a runtime to send the nack on, they return when it closes.
            let parked = self.ledger.settle(&self.key, false, false);
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return;
            };
            let delivery = self.delivery.clone();
            let queue = self.queue.clone();
            runtime.spawn(async move {
                match delivery.give_back().await {
                    Ok(_) => tracing::info!(%queue, "an unsettled message was given back to its queue"),
                    Err(error) => tracing::debug!(%error, %queue, "nack of an unsettled message failed; it returns when its channel closes"),
                }
                settle_parked(parked, false).await;
            });
        }
    }
}
