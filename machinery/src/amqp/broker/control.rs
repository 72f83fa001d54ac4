//! Cancelling running tasks over RabbitMQ: [`Broker::publish_cancel`](crate::broker::Broker) publishes
//! the task id to the fanout exchange [`CANCEL_EXCHANGE`]; every worker process binds a private,
//! exclusive queue to it.

use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use tokio::sync::mpsc;

use super::{AmqpBroker, Inner};
use crate::amqp::session::{declare_exchange, open_channel, short, AmqpError, Mode};
use crate::broker::{spawn_cancel_listener, BrokerError, CancelReceiver, Listening};
use crate::retry::Backoff;

/// The fanout exchange of cancellation requests (durable, like every exchange we declare).
pub const CANCEL_EXCHANGE: &str = "machinery_control_cancel";

impl AmqpBroker {
    pub(super) async fn publish_cancel_request(&self, task_uuid: &str) -> Result<(), BrokerError> {
        let publish = async {
            let live = self.inner.session.live().await?;
            let channel = open_channel(&live, Mode::Plain).await?;
            declare_exchange(&channel, CANCEL_EXCHANGE, "fanout").await?;
            channel
                .basic_publish(
                    short("exchange name", CANCEL_EXCHANGE)?,
                    "".into(),
                    BasicPublishOptions::default(),
                    task_uuid.as_bytes(),
                    BasicProperties::default(),
                )
                .await
                .map_err(|e| AmqpError::lapin("publishing a cancellation", e))?;
            let _ = channel.close(200, "done".into()).await;
            Ok::<(), AmqpError>(())
        };
        publish
            .await
            .map_err(|e| BrokerError::operation("publish a cancellation", e))
    }

    /// Returns once the private queue is bound and consumed (see [`spawn_cancel_listener`]).
    pub(super) async fn listen_for_cancellations(&self) -> CancelReceiver {
        let inner = self.inner.clone();
        spawn_cancel_listener(|sender, listening| listen(inner, sender, listening)).await
    }
}

/// Binds a private queue to [`CANCEL_EXCHANGE`] and forwards each id, again after a lost connection,
/// until the receiver is dropped.
async fn listen(
    inner: Arc<Inner>,
    sender: mpsc::UnboundedSender<String>,
    mut listening: Listening,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let consumed = tokio::select! {
            consumed = consume(&inner, &sender, &mut listening) => consumed,
            () = sender.closed() => return,
        };
        listening.attempted();
        match consumed {
            Ok(()) => {
                backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
                tracing::debug!("the cancellation queue's consumer ended; binding again");
            }
            Err(error) => tracing::debug!(%error, "cannot listen for cancellations"),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff.next_delay()) => {}
            () = sender.closed() => return,
        }
    }
}

/// One life of the listener: until its channel or connection goes.
async fn consume(
    inner: &Inner,
    sender: &mpsc::UnboundedSender<String>,
    listening: &mut Listening,
) -> Result<(), AmqpError> {
    let live = inner.session.live().await?;
    let channel = open_channel(&live, Mode::Plain).await?;
    declare_exchange(&channel, CANCEL_EXCHANGE, "fanout").await?;
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
        .map_err(|e| AmqpError::lapin("declaring the cancellation queue", e))?;
    channel
        .queue_bind(
            queue.name().clone(),
            short("exchange name", CANCEL_EXCHANGE)?,
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| AmqpError::lapin("binding the cancellation queue", e))?;
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
        .map_err(|e| AmqpError::lapin("consuming the cancellation queue", e))?;
    listening.now();
    loop {
        let next = std::future::poll_fn(|cx| std::pin::Pin::new(&mut consumer).poll_next(cx)).await;
        let Some(Ok(delivery)) = next else {
            return Ok(());
        };
        if let Ok(uuid) = String::from_utf8(delivery.data) {
            if sender.send(uuid).is_err() {
                return Ok(());
            }
        }
    }
}
