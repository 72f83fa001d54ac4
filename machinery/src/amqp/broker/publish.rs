//! Publishing with publisher confirms: the declarations a sender makes so that a message has a queue to
//! land in, and sends that many can have in flight on the one confirm channel before any is awaited.

use std::time::Duration;

use chrono::Utc;
use lapin::{BasicProperties, Channel};
use tokio::time::Instant;

use super::{task_queue_memo, Inner};
use crate::amqp::session::{
    self, bind, declare_exchange, declare_queue, json_properties, AmqpError, Live,
};
use crate::amqp::table::json_table;
use crate::broker::Outgoing;

/// How long a publish keeps retrying through a lost connection before it reports the failure.
const PUBLISH_DEADLINE: Duration = Duration::from_secs(30);

impl Inner {
    pub(super) fn properties(&self, message: &Outgoing<'_>) -> BasicProperties {
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

    /// Declares the exchange once per connection (the default exchange, named "", is never declared).
    pub(super) async fn ensure_exchange(
        &self,
        live: &Live,
        channel: &Channel,
    ) -> Result<(), AmqpError> {
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

    /// Declares the queue a message with `routing_key` lands in (`Settings::publish_target`), so that it
    /// is not dropped when no worker has declared that queue yet.
    pub(super) async fn ensure_route(&self, routing_key: &str) -> Result<(), AmqpError> {
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
    async fn send_now(&self, message: &Outgoing<'_>) -> Result<session::Sent, AmqpError> {
        self.ensure_route(message.routing_key).await?;
        let (_, channel) = self.publish.get(&self.session).await?;
        session::send(
            &channel,
            &self.settings.exchange,
            message.routing_key,
            &message.body,
            self.properties(message),
        )
        .await
    }

    /// Sends a message now, or parks it until its ETA (no confirm awaited yet).
    async fn send(&self, message: &Outgoing<'_>) -> Result<session::Sent, AmqpError> {
        if let Some(eta) = message.eta {
            let delay_ms = (eta - Utc::now()).num_milliseconds();
            if delay_ms > 0 {
                return self.send_delayed(message, delay_ms).await;
            }
        }
        self.send_now(message).await
    }

    /// Publishes straight into `queue` through the default exchange (requeue, dead letters), confirmed.
    pub(in crate::amqp) async fn publish_to_queue(
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

    /// Publishes one message and awaits its confirm, retrying through a lost connection until
    /// [`PUBLISH_DEADLINE`].
    pub(super) async fn publish(&self, message: &Outgoing<'_>) -> Result<(), AmqpError> {
        session::retry_transient("publish", Instant::now() + PUBLISH_DEADLINE, || async {
            self.send(message).await?.confirmed().await
        })
        .await
    }

    /// Sends every message before awaiting any confirm; after a transient failure only the messages that
    /// were not confirmed are sent again.
    pub(super) async fn publish_many(&self, messages: &[Outgoing<'_>]) -> Result<(), AmqpError> {
        let deadline = Instant::now() + PUBLISH_DEADLINE;
        let mut todo: Vec<&Outgoing<'_>> = messages.iter().collect();
        let mut backoff =
            crate::retry::Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            let mut sent = Vec::with_capacity(todo.len());
            let mut failed = Vec::new();
            let mut last_error = None;
            for message in todo {
                match self.send(message).await {
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
                return Err(error);
            }
            tracing::debug!(%error, failed = failed.len(), "publishing a batch partly failed; retrying the rest");
            tokio::time::sleep(backoff.next_delay()).await;
            todo = failed;
        }
    }
}
