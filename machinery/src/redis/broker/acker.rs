//! Settling one delivery: acknowledge, requeue or dead-letter it, by removing it from the consumer's
//! in-flight list (with its final state in the same script when the broker holds its backend half).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use redis::AsyncCommands as _;

use super::finisher::Finisher;
use super::{retrying, Envelope, Inner, REDELIVERED_MARK_SECS, SCRIPTS};
use crate::broker::{Acknowledger, BrokerError};
use crate::redis::backend::RedisBackend;
use crate::wire::state::TaskState;

/// Counts of the deliveries a consumer handed out and that are not settled yet, by body hash; and whether
/// one was dropped without being settled (its message still sits in the in-flight list, unclaimed).
#[derive(Debug, Clone, Default)]
pub(super) struct Outstanding(Arc<OutstandingInner>);

#[derive(Debug, Default)]
struct OutstandingInner {
    counts: std::sync::Mutex<HashMap<u64, usize>>,
    unsettled: AtomicBool,
}

impl Outstanding {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, usize>> {
        self.0.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a delivery was dropped unsettled since the last call (a failed acknowledgement): the
    /// consumer then hands its message out again.
    pub(super) fn take_unsettled(&self) -> bool {
        self.0.unsettled.swap(false, Ordering::SeqCst)
    }

    pub(super) fn add(&self, hash: u64) {
        *self.lock().entry(hash).or_default() += 1;
    }

    fn remove(&self, hash: u64) {
        let mut map = self.lock();
        if let Some(count) = map.get_mut(&hash) {
            *count -= 1;
            if *count == 0 {
                map.remove(&hash);
            }
        }
    }

    pub(super) fn snapshot(&self) -> HashMap<u64, usize> {
        self.lock().clone()
    }
}

/// Identifies a body in the consumer's bookkeeping (equal bodies count together).
pub(super) fn body_hash(body: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut hasher);
    hasher.finish()
}

/// Settles one delivery.
pub(super) struct RedisAcker {
    pub(super) inner: Arc<Inner>,
    pub(super) states: Option<RedisBackend>,
    /// The consumer's group commit of final states (with `states`, on a single Redis).
    pub(super) finisher: Option<Finisher>,
    pub(super) queue: String,
    pub(super) inflight: String,
    /// The bytes as taken, which identify the message in the in-flight list.
    pub(super) original: Vec<u8>,
    pub(super) outstanding: Outstanding,
    pub(super) hash: u64,
    /// Set once a settling command succeeded.
    pub(super) settled: AtomicBool,
}

impl Drop for RedisAcker {
    fn drop(&mut self) {
        // After the settling command (the methods own the acker until it is done), or when the delivery
        // is dropped unsettled: either way the consumer no longer counts this message as handed out. If
        // it was not settled (the acknowledgement failed, say over a broken link), the message is still in
        // flight: the consumer's next fetch hands it out again, so that it runs again (at-least-once).
        if !self.settled.load(Ordering::SeqCst) {
            self.outstanding.0.unsettled.store(true, Ordering::SeqCst);
        }
        self.outstanding.remove(self.hash);
    }
}

impl fmt::Debug for RedisAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisAcker")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl RedisAcker {
    async fn settle(&self, destination: &str, body: &[u8]) -> Result<(), BrokerError> {
        let keys = &[self.inflight.as_bytes(), destination.as_bytes()];
        let args = &[self.original.as_slice(), body];
        let moved: u64 = retrying("settle", &self.inner.conn, move |mut conn| async move {
            SCRIPTS.settle.run(&mut conn, keys, args).await
        })
        .await?;
        self.settled.store(true, Ordering::SeqCst);
        if moved == 0 {
            tracing::debug!(queue = %self.queue, "message was no longer in flight (returned to the queue meanwhile)");
        }
        Ok(())
    }
}

#[async_trait]
impl Acknowledger for RedisAcker {
    async fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        let (inflight, original) = (&self.inflight, &self.original);
        retrying("ack", &self.inner.conn, move |mut conn| async move {
            conn.lrem::<_, _, ()>(inflight, 1, original).await
        })
        .await?;
        self.settled.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn requeue(self: Box<Self>, body: Vec<u8>) -> Result<(), BrokerError> {
        self.settle(&self.queue, &body).await
    }

    fn acks_with_state(&self) -> bool {
        self.states.is_some()
    }

    async fn try_ack_with_state(&self, state: &TaskState) -> Result<bool, BrokerError> {
        // The state first, then the acknowledgement, in one script on the server: if anything fails
        // before the end the message stays in flight and runs again (at-least-once), never the other way
        // round.
        let Some(states) = &self.states else {
            return Ok(false);
        };
        if let Some(finisher) = &self.finisher {
            finisher.finish(state, &self.original).await?;
            self.settled.store(true, Ordering::SeqCst);
            return Ok(true);
        }
        // On a cluster the state and the in-flight list are in different slots (but by chance): the
        // worker then writes the state and acknowledges after it, two ordered steps.
        if self.inner.config.cluster_enabled
            && !crate::redis::cluster::same_slot(&state.task_uuid, &self.inflight)
        {
            return Ok(false);
        }
        let cmd = states
            .state_and_ack_cmd(state, &self.inflight, &self.original)
            .map_err(|error| BrokerError::operation("store the state and acknowledge", error))?;
        let mut pipe = redis::pipe();
        pipe.add_command(cmd).ignore();
        self.inner
            .run_fused("store the state and acknowledge", states, &pipe)
            .await?;
        self.settled.store(true, Ordering::SeqCst);
        Ok(true)
    }

    async fn dead_letter(
        self: Box<Self>,
        body: Vec<u8>,
        reason: String,
    ) -> Result<(), BrokerError> {
        let envelope = Envelope::encode(&self.queue, &reason, Utc::now(), &body);
        let dead = self.inner.keys(&self.queue).dead;
        self.settle(&dead, &envelope).await
    }

    /// Moves the message from the in-flight list back to the head of the queue, in a task of its own.
    /// The consumer keeps counting it as handed out until that is done, so that a fetch reconciling
    /// the in-flight list meanwhile does not hand it out a second time.
    fn abandon(self: Box<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::debug!(queue = %self.queue, "an unsettled delivery was dropped outside a runtime; it returns when its consumer closes");
            return;
        };
        // One more count, removed when the give-back is done (the acker's own count goes with it below).
        self.outstanding.add(self.hash);
        let (inner, outstanding, hash) = (self.inner.clone(), self.outstanding.clone(), self.hash);
        let redelivered = self.inner.keys(&self.queue).redelivered;
        let (queue, inflight, body) = (
            self.queue.clone(),
            self.inflight.clone(),
            self.original.clone(),
        );
        runtime.spawn(async move {
            let keys = &[inflight.as_bytes(), queue.as_bytes(), redelivered.as_bytes()];
            let args = &[body.as_slice(), REDELIVERED_MARK_SECS.as_bytes()];
            let moved = retrying("give back", &inner.conn, move |mut conn| async move {
                SCRIPTS.give_back.run::<u64, _>(&mut conn, keys, args).await
            })
            .await;
            match moved {
                Ok(1) => tracing::info!(%queue, "an unsettled message was given back to the head of its queue"),
                Ok(_) => tracing::debug!(%queue, "an unsettled message was no longer in flight"),
                Err(error) => tracing::warn!(%error, %queue, "cannot give an unsettled message back; it returns when its consumer closes"),
            }
            outstanding.remove(hash);
        });
    }
}
