//! Waiting for a task's final state without polling: the `set_state` script announces a final state on
//! `machinery:done:<task uuid>`, and one shared pub/sub connection per backend wakes the waiters. States
//! written by Go workers are not announced, so a slow poll runs as well.
//!
//! The pub/sub connection is only a shortcut: a `SUBSCRIBE` unanswered within [`ANSWER_TIMEOUT`] (a
//! silent link) leaves the waiter polling and makes the notifier open a new connection, so a waiter never
//! hangs on it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use redis::aio::PubSubSink;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::task::AbortOnDropHandle;

use super::{completion_channel, decode_state, op, RedisBackend};
use crate::backend::BackendError;
use crate::redis::conn::{is_transient, Endpoint};
use crate::retry::Backoff;
use crate::wire::state::TaskState;

impl RedisBackend {
    /// The body of [`Backend::wait_for_completion`](crate::backend::Backend::wait_for_completion): an
    /// announcement or the poll, whichever sees the final state first.
    pub(super) async fn wait_announced(
        &self,
        task_uuid: &str,
        timeout: Duration,
    ) -> Result<Option<TaskState>, BackendError> {
        let deadline = tokio::time::Instant::now() + timeout;
        // Subscribe before the first read, so that a completion between the two is not missed.
        let mut waiter = self.notifier().await.register(task_uuid).await;
        let mut poll = Backoff::new(Duration::from_millis(10), Duration::from_millis(200));
        loop {
            // Seen before the read: an announcement after it wakes the wait below.
            waiter.announced.borrow_and_update();
            // A read lost to the connection (a silent link is replaced meanwhile) is tried again after
            // the nap, while time remains.
            let state = match self.get_raw_state(task_uuid).await {
                Ok(raw) => decode_state(task_uuid, raw)?,
                Err(error) if is_transient(&error) => {
                    tracing::debug!(%error, "cannot read a task's state while waiting; trying again");
                    None
                }
                Err(error) => return Err(op("get task state")(error)),
            };
            if state.as_ref().is_some_and(TaskState::is_completed) {
                return Ok(state);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(state);
            }
            let nap = poll.next_delay().min(deadline - now);
            tokio::select! {
                changed = waiter.announced.changed() => {
                    // The announcement carries the state: no need to read it back.
                    let announced = waiter.announced.borrow_and_update().clone();
                    if let Some(state) = announced
                        .and_then(|json| TaskState::from_json(&json).ok())
                        .filter(|s| s.task_uuid == task_uuid && s.is_completed())
                    {
                        return Ok(Some(state));
                    }
                    if changed.is_err() {
                        // The notifier is gone: polling only.
                        tokio::time::sleep(nap).await;
                    }
                }
                _ = tokio::time::sleep(nap) => {}
            }
        }
    }

    async fn notifier(&self) -> &Notifier {
        self.inner
            .notifier
            .get_or_init(|| async { Notifier::start(self.inner.endpoint.clone()) })
            .await
    }
}

/// How long the notifier waits for a `SUBSCRIBE` to be confirmed, or for its connection to open, before it
/// counts the link as silent.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Wakes waiters when their task's completion is announced. One pub/sub connection per backend, opened on
/// the first wait; it reconnects by itself, and waiters keep polling meanwhile.
pub(super) struct Notifier {
    shared: Arc<NotifierShared>,
    _reader: AbortOnDropHandle<()>,
}

#[derive(Default)]
struct NotifierShared {
    /// Channel → (number of waiters, the last announcement: a state's JSON, or `None` for "look again").
    waiters: Mutex<HashMap<String, (usize, Announcer)>>,
    sink: Mutex<Option<PubSubSink>>,
    unsubscribe: Mutex<Option<mpsc::UnboundedSender<String>>>,
    /// Told when the connection went silent: the reader drops it and opens a new one.
    silent: Notify,
}

impl NotifierShared {
    fn waiters(&self) -> std::sync::MutexGuard<'_, HashMap<String, (usize, Announcer)>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sink(&self) -> Option<PubSubSink> {
        self.sink.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// One waiter's registration; unregisters on drop.
struct Waiter {
    shared: Arc<NotifierShared>,
    channel: String,
    announced: watch::Receiver<Option<Arc<[u8]>>>,
}

type Announcer = watch::Sender<Option<Arc<[u8]>>>;

impl Drop for Waiter {
    fn drop(&mut self) {
        let last = {
            let mut waiters = self.shared.waiters();
            match waiters.get_mut(&self.channel) {
                Some((count, _)) if *count > 1 => {
                    *count -= 1;
                    false
                }
                Some(_) => {
                    waiters.remove(&self.channel);
                    true
                }
                None => false,
            }
        };
        if last {
            let sender = self
                .shared
                .unsubscribe
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some(sender) = sender {
                let _ = sender.send(std::mem::take(&mut self.channel));
            }
        }
    }
}

impl Notifier {
    fn start(endpoint: Endpoint) -> Notifier {
        let shared = Arc::new(NotifierShared::default());
        let (sender, receiver) = mpsc::unbounded_channel();
        *shared.unsubscribe.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender);
        let reader =
            AbortOnDropHandle::new(tokio::spawn(Self::read(endpoint, shared.clone(), receiver)));
        Notifier {
            shared,
            _reader: reader,
        }
    }

    async fn register(&self, task_uuid: &str) -> Waiter {
        let channel = completion_channel(task_uuid);
        let (announced, first) = {
            let mut waiters = self.shared.waiters();
            let entry = waiters
                .entry(channel.clone())
                .or_insert_with(|| (0, watch::channel(None).0));
            entry.0 += 1;
            (entry.1.subscribe(), entry.0 == 1)
        };
        let waiter = Waiter {
            shared: self.shared.clone(),
            channel,
            announced,
        };
        if first {
            if let Some(mut sink) = self.shared.sink() {
                match tokio::time::timeout(ANSWER_TIMEOUT, sink.subscribe(&waiter.channel)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "cannot subscribe to a completion channel; polling instead");
                    }
                    Err(_) => {
                        tracing::warn!("the completion notification connection went silent; polling, and reconnecting it");
                        *self.shared.sink.lock().unwrap_or_else(|p| p.into_inner()) = None;
                        self.shared.silent.notify_one();
                    }
                }
            }
        }
        waiter
    }

    /// Owns the pub/sub connection: wakes waiters, unsubscribes channels nobody waits on, reconnects (to
    /// the master the sentinels name then, or to the next seed of a cluster, any of which relays every
    /// announcement).
    async fn read(
        endpoint: Endpoint,
        shared: Arc<NotifierShared>,
        mut unsubscribe: mpsc::UnboundedReceiver<String>,
    ) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut next = 0;
        loop {
            let attempt = next;
            next += 1;
            let opened = tokio::time::timeout(CONNECT_TIMEOUT, async {
                endpoint.pubsub_client(attempt).await?.pubsub().await
            })
            .await
            .unwrap_or_else(|_| {
                Err(redis::RedisError::from(std::io::Error::from(
                    std::io::ErrorKind::TimedOut,
                )))
            });
            match opened {
                Ok(pubsub) => {
                    backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
                    let (mut sink, mut stream) = pubsub.split();
                    // Publish the sink first, then subscribe whoever is waiting: a waiter that registers in
                    // between subscribes itself, or is in this list (a double SUBSCRIBE is harmless).
                    *shared.sink.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink.clone());
                    let channels: Vec<String> = shared.waiters().keys().cloned().collect();
                    if !channels.is_empty() {
                        match tokio::time::timeout(ANSWER_TIMEOUT, sink.subscribe(&channels)).await
                        {
                            Ok(Ok(())) => {}
                            Ok(Err(error)) => {
                                tracing::debug!(%error, "cannot resubscribe to completion channels");
                            }
                            Err(_) => shared.silent.notify_one(),
                        }
                    }
                    // Anything announced while we were away: let every waiter look again.
                    for (_, announcer) in shared.waiters().values() {
                        announcer.send_replace(None);
                    }
                    loop {
                        tokio::select! {
                            () = shared.silent.notified() => break,
                            message = stream.next() => match message {
                                Some(message) => {
                                    if let Some((_, announcer)) =
                                        shared.waiters().get(message.get_channel_name())
                                    {
                                        announcer.send_replace(Some(Arc::from(message.get_payload_bytes())));
                                    }
                                }
                                None => break,
                            },
                            channel = unsubscribe.recv() => match channel {
                                Some(channel) => {
                                    if !shared.waiters().contains_key(&channel) {
                                        let unsubscribed =
                                            tokio::time::timeout(ANSWER_TIMEOUT, sink.unsubscribe(&channel)).await;
                                        if unsubscribed.is_err() {
                                            break;
                                        }
                                    }
                                }
                                None => return,
                            },
                        }
                    }
                    *shared.sink.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    tracing::debug!("completion notifications lost their connection; reconnecting");
                }
                Err(error) => {
                    tracing::debug!(%error, "cannot open the completion notification connection");
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}
