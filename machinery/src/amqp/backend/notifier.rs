//! Waiting for results without polling: one private, exclusive queue per backend connection, bound to the
//! exchange with the ids someone in this process waits for, so RabbitMQ routes a copy of each new state
//! there. A wait falls back to reading now and then if the notifications stop (a lost connection).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_core::Stream;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use super::Inner;
use crate::amqp::session::{lock, open_channel, short, AmqpError, Mode};
use crate::backend::BackendError;
use crate::wire::state::TaskState;

impl Inner {
    /// The live notifier of this connection, started on first use and again after it died with its
    /// channel; `None` means waits poll.
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

    /// Subscribes to the task's states through the process's notification queue, reads the stored state
    /// once, then waits for a notification, reading again now and then in case notifications stopped
    /// (a lost connection).
    pub(super) async fn wait_for_completion(
        &self,
        task_uuid: &str,
        timeout: Duration,
    ) -> Result<Option<TaskState>, BackendError> {
        let deadline = Instant::now() + timeout;
        let mut subscription = match self.notifier().await {
            Some(notifier) => notifier.subscribe(task_uuid).await.ok(),
            None => None,
        };
        let mut last = self.read_state(task_uuid).await?;
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
                    match self.read_state(task_uuid).await {
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
}

type Waiters = Arc<Mutex<HashMap<String, Vec<(u64, mpsc::UnboundedSender<TaskState>)>>>>;

/// One private queue per backend connection that gets a copy of the states of the tasks someone in this
/// process waits for (bound with their ids), so waiting needs no polling.
pub(super) struct Notifier {
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
