//! The in-process broker (`memory://`), the default: queues in memory, shared by every [`Server`] of the
//! process that names the same instance (`memory://` alone is private to one server; `memory://name`
//! is shared by name).
//!
//! It keeps the same promises as the network brokers, so code tested on it behaves the same elsewhere:
//! messages taken by a consumer stay in flight until acknowledged, and return to the queue when the
//! consumer closes or is dropped; ETAs are honoured; dead letters keep their reason.
//!
//! [`Server`]: crate::Server

use std::cmp::Reverse;
use std::collections::{BTreeMap, VecDeque};

use foldhash::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use crate::broker::{
    Acknowledger, Broker, BrokerError, ConsumeOptions, Consumer, DeadLetter, DelayedMessage,
    Delivery, Inspect, Outgoing, QueueStats, WorkerInfo,
};
use crate::config::Config;

/// The in-process broker.
#[derive(Clone)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
    name: String,
    default_queue: String,
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Default)]
struct State {
    queues: HashMap<String, Queue>,
    /// Delayed messages by (ETA, sequence number), with their queue.
    delayed: BTreeMap<(DateTime<Utc>, u64), (String, Vec<u8>)>,
    /// Live consumers by id: (consumer tag, queue), for [`Inspect::workers`].
    consumers: HashMap<u64, (String, String)>,
    next_id: u64,
    /// The workers listening for cancellations ([`Broker::cancellations`]).
    cancel_listeners: Vec<tokio::sync::mpsc::UnboundedSender<String>>,
}

#[derive(Default)]
struct Queue {
    ready: VecDeque<Entry>,
    in_flight: HashMap<u64, (u64, Entry)>,
    dead: Vec<DeadLetter>,
}

struct Entry {
    id: u64,
    body: Vec<u8>,
    redelivered: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters more
        // than losing the whole broker, so a poisoned lock is simply taken over.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn push(&mut self, queue: &str, body: Vec<u8>) {
        let entry = Entry {
            id: self.next_id(),
            body,
            redelivered: false,
        };
        // Looked up first: the queue's name is copied only when the queue is new.
        match self.queues.get_mut(queue) {
            Some(q) => q.ready.push_back(entry),
            None => self
                .queues
                .entry(queue.to_owned())
                .or_default()
                .ready
                .push_back(entry),
        }
    }

    fn promote_due(&mut self, now: DateTime<Utc>) {
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (queue, body) = entry.remove();
            self.push(&queue, body);
        }
    }

    fn earliest_eta(&self) -> Option<DateTime<Utc>> {
        self.delayed.keys().next().map(|(eta, _)| *eta)
    }

    /// Puts back everything `consumer` holds, in the order it was taken, at the head of its queue.
    fn return_in_flight(&mut self, queue: &str, consumer: u64) -> usize {
        let Some(q) = self.queues.get_mut(queue) else {
            return 0;
        };
        let mut mine: Vec<u64> = q
            .in_flight
            .iter()
            .filter(|(_, (owner, _))| *owner == consumer)
            .map(|(id, _)| *id)
            .collect();
        mine.sort_by_key(|id| Reverse(*id));
        let count = mine.len();
        for id in mine {
            if let Some((_, mut entry)) = q.in_flight.remove(&id) {
                entry.redelivered = true;
                q.ready.push_front(entry);
            }
        }
        count
    }
}

impl MemoryBroker {
    /// A broker for `memory://` (a private instance) or `memory://name` (shared by name in this process).
    pub fn connect(url: &str, config: &Config) -> Arc<dyn Broker> {
        Arc::new(MemoryBroker::new(url, &config.default_queue))
    }

    /// Creates or joins the instance named by `url`.
    pub fn new(url: &str, default_queue: &str) -> Self {
        let (name, shared) = super::named::instance::<Shared>(url);
        MemoryBroker {
            shared,
            name: name.to_owned(),
            default_queue: default_queue.to_owned(),
        }
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish_cancel(&self, task_uuid: &str) -> Result<(), BrokerError> {
        let mut state = self.shared.lock();
        state
            .cancel_listeners
            .retain(|listener| listener.send(task_uuid.to_owned()).is_ok());
        Ok(())
    }

    async fn cancellations(&self) -> Result<crate::broker::CancelReceiver, BrokerError> {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        self.shared.lock().cancel_listeners.push(sender);
        Ok(receiver)
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn route(&self, routing_key: &str) -> String {
        if routing_key.is_empty() {
            self.default_queue.clone()
        } else {
            routing_key.to_owned()
        }
    }

    async fn publish(&self, message: Outgoing<'_>) -> Result<(), BrokerError> {
        {
            let mut state = self.shared.lock();
            match message.eta {
                Some(eta) if eta > Utc::now() => {
                    let seq = state.next_id();
                    state
                        .delayed
                        .insert((eta, seq), (message.routing_key.to_owned(), message.body));
                }
                _ => state.push(message.routing_key, message.body),
            }
        }
        self.shared.changed.notify_waiters();
        Ok(())
    }

    async fn consume(&self, options: ConsumeOptions) -> Result<Box<dyn Consumer>, BrokerError> {
        let id = {
            let mut state = self.shared.lock();
            let id = state.next_id();
            state
                .consumers
                .insert(id, (options.consumer_tag.clone(), options.queue.clone()));
            id
        };
        Ok(Box::new(MemoryConsumer {
            shared: self.shared.clone(),
            queue: options.queue.into(),
            id,
        }))
    }

    fn inspect(&self) -> Result<&dyn Inspect, BrokerError> {
        Ok(self)
    }
}

#[async_trait]
impl Inspect for MemoryBroker {
    async fn queue_stats(&self, queue: &str) -> Result<QueueStats, BrokerError> {
        let state = self.shared.lock();
        let delayed = state.delayed.values().filter(|(q, _)| q == queue).count() as u64;
        let q = state.queues.get(queue);
        Ok(QueueStats {
            queue: queue.to_owned(),
            pending: q.map_or(0, |q| q.ready.len() as u64),
            delayed: Some(delayed),
            in_flight: Some(q.map_or(0, |q| q.in_flight.len() as u64)),
            dead: Some(q.map_or(0, |q| q.dead.len() as u64)),
        })
    }

    async fn pending(&self, queue: &str, limit: usize) -> Result<Vec<Vec<u8>>, BrokerError> {
        let state = self.shared.lock();
        Ok(state
            .queues
            .get(queue)
            .map(|q| q.ready.iter().take(limit).map(|e| e.body.clone()).collect())
            .unwrap_or_default())
    }

    async fn dead_letters(
        &self,
        queue: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        let state = self.shared.lock();
        Ok(state
            .queues
            .get(queue)
            .map(|q| q.dead.iter().take(limit).cloned().collect())
            .unwrap_or_default())
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let mut state = self.shared.lock();
        Ok(state.queues.get_mut(queue).map_or(0, |q| {
            let n = q.ready.len() as u64;
            q.ready.clear();
            n
        }))
    }

    /// Every queue that has held a message or had a consumer in this instance, the queues of delayed
    /// messages, and the default queue.
    async fn queues(&self) -> Result<Vec<String>, BrokerError> {
        let state = self.shared.lock();
        let mut queues: std::collections::BTreeSet<String> = state.queues.keys().cloned().collect();
        queues.extend(state.delayed.values().map(|(queue, _)| queue.clone()));
        queues.insert(self.default_queue.clone());
        Ok(queues.into_iter().collect())
    }

    async fn delayed(&self, limit: usize) -> Result<Vec<DelayedMessage>, BrokerError> {
        let state = self.shared.lock();
        Ok(state
            .delayed
            .iter()
            .take(limit)
            .map(|((eta, _), (_, body))| DelayedMessage {
                eta: *eta,
                body: body.clone(),
            })
            .collect())
    }

    async fn delete_dead(&self, queue: &str, task_uuid: &str) -> Result<u64, BrokerError> {
        let mut state = self.shared.lock();
        let Some(q) = state.queues.get_mut(queue) else {
            return Ok(0);
        };
        let before = q.dead.len();
        q.dead
            .retain(|letter| !crate::broker::has_task_uuid(&letter.body, task_uuid));
        Ok((before - q.dead.len()) as u64)
    }

    async fn requeue_dead(&self, queue: &str, task_uuid: Option<&str>) -> Result<u64, BrokerError> {
        let moved = {
            let mut state = self.shared.lock();
            let Some(q) = state.queues.get_mut(queue) else {
                return Ok(0);
            };
            let (chosen, kept): (Vec<DeadLetter>, Vec<DeadLetter>) =
                std::mem::take(&mut q.dead).into_iter().partition(|letter| {
                    task_uuid.is_none_or(|uuid| crate::broker::has_task_uuid(&letter.body, uuid))
                });
            q.dead = kept;
            let moved = chosen.len() as u64;
            for letter in chosen {
                state.push(queue, letter.body);
            }
            moved
        };
        if moved > 0 {
            self.shared.changed.notify_waiters();
        }
        Ok(moved)
    }

    /// The live consumers of this instance (in-process, so always alive and without heartbeat).
    async fn workers(&self) -> Result<Vec<WorkerInfo>, BrokerError> {
        let state = self.shared.lock();
        let mut workers: Vec<WorkerInfo> = state
            .consumers
            .iter()
            .map(|(id, (tag, queue))| WorkerInfo {
                queue: queue.clone(),
                consumer_tag: tag.clone(),
                in_flight: state.queues.get(queue).map_or(0, |q| {
                    q.in_flight
                        .values()
                        .filter(|(owner, _)| owner == id)
                        .count() as u64
                }),
                heartbeat_age: None,
                alive: true,
                card: None,
            })
            .collect();
        workers.sort_by(|a, b| (&a.queue, &a.consumer_tag).cmp(&(&b.queue, &b.consumer_tag)));
        Ok(workers)
    }
}

/// A consumer of one in-memory queue.
struct MemoryConsumer {
    shared: Arc<Shared>,
    /// Shared with the acknowledgers of its deliveries (one copy of the name, not one per message).
    queue: Arc<str>,
    id: u64,
}

impl fmt::Debug for MemoryConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryConsumer")
            .field("queue", &self.queue)
            .field("id", &self.id)
            .finish()
    }
}

impl MemoryConsumer {
    /// Takes up to `max` ready messages; none are taken if the queue is empty.
    fn take(&self, max: usize) -> (Vec<Delivery>, Option<DateTime<Utc>>) {
        let mut state = self.shared.lock();
        state.promote_due(Utc::now());
        let earliest = state.earliest_eta();
        if !state.queues.contains_key(&*self.queue) {
            state
                .queues
                .insert(self.queue.to_string(), Default::default());
        }
        let Some(queue) = state.queues.get_mut(&*self.queue) else {
            return (Vec::new(), earliest);
        };
        let mut batch = Vec::new();
        while batch.len() < max {
            let Some(entry) = queue.ready.pop_front() else {
                break;
            };
            let delivery = Delivery::new(
                entry.body.clone(),
                entry.redelivered,
                Box::new(MemoryAcker {
                    shared: self.shared.clone(),
                    queue: self.queue.clone(),
                    id: entry.id,
                }),
            );
            queue.in_flight.insert(entry.id, (self.id, entry));
            batch.push(delivery);
        }
        (batch, earliest)
    }
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        let max = max.max(1);
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // Taking happens without an await after it, so dropping this future never loses a message.
            let (batch, earliest) = self.take(max);
            if !batch.is_empty() {
                return Ok(batch);
            }
            match earliest {
                Some(eta) => {
                    let wait = (eta - Utc::now()).to_std().unwrap_or_default();
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                None => changed.await,
            }
        }
    }

    async fn close(self: Box<Self>) -> Result<(), BrokerError> {
        drop(self);
        Ok(())
    }
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        let returned = {
            let mut state = self.shared.lock();
            state.consumers.remove(&self.id);
            state.return_in_flight(&self.queue, self.id)
        };
        if returned > 0 {
            tracing::debug!(queue = %self.queue, returned, "returned unacknowledged messages to the queue");
            self.shared.changed.notify_waiters();
        }
    }
}

#[derive(Debug)]
struct MemoryAcker {
    shared: Arc<Shared>,
    queue: Arc<str>,
    id: u64,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Shared")
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        // Dropped unsettled (settling removes the message from the in-flight set first): back to the
        // head of the queue, marked redelivered.
        let returned = {
            let mut state = self.shared.lock();
            let Some(queue) = state.queues.get_mut(&*self.queue) else {
                return;
            };
            match queue.in_flight.remove(&self.id) {
                Some((_, mut entry)) => {
                    entry.redelivered = true;
                    queue.ready.push_front(entry);
                    true
                }
                None => false,
            }
        };
        if returned {
            self.shared.changed.notify_waiters();
        }
    }
}

impl MemoryAcker {
    /// Removes the message from the in-flight set; `false` if it is no longer there (its consumer closed
    /// and it went back to the queue).
    fn settle(&self, state: &mut State) -> bool {
        state
            .queues
            .get_mut(&*self.queue)
            .is_some_and(|q| q.in_flight.remove(&self.id).is_some())
    }
}

#[async_trait]
impl Acknowledger for MemoryAcker {
    async fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        self.settle(&mut self.shared.lock());
        Ok(())
    }

    async fn requeue(self: Box<Self>, body: Vec<u8>) -> Result<(), BrokerError> {
        {
            let mut state = self.shared.lock();
            if self.settle(&mut state) {
                state.push(&self.queue, body);
            }
        }
        self.shared.changed.notify_waiters();
        Ok(())
    }

    async fn dead_letter(
        self: Box<Self>,
        body: Vec<u8>,
        reason: String,
    ) -> Result<(), BrokerError> {
        let mut state = self.shared.lock();
        if self.settle(&mut state) {
            let queue = state.queues.entry(self.queue.to_string()).or_default();
            queue.dead.push(DeadLetter {
                queue: self.queue.to_string(),
                reason,
                at: Utc::now(),
                body,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "broker_tests.rs"]
mod tests;
