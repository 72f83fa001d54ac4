//! Group commit of final states with their acknowledgements: the tasks of one consumer that finish
//! while earlier calls are on their way store their states and acknowledge their messages together, in
//! one `finish_many` script call ([`GroupCommit`]), instead of one round trip (and one script run) each.
//!
//! Each task still has its state written before its message leaves the in-flight list, in the same
//! atomic step on the server, and learns its own answer: a task whose write the server refused (its
//! key holds a list, say) or whose call failed falls back to the two-step road (state, then
//! acknowledgement), as a lone call's failure does.

use std::sync::Arc;

use redis::Value;

use super::Inner;
use crate::broker::BrokerError;
use crate::group_commit::{Answer, GroupCommit};
use crate::redis::backend::{finish_answers, FinishEntry, RedisBackend};
use crate::redis::conn::Healing;
use crate::wire::state::TaskState;

/// Worker slots per call that may be on its way at once: one call at concurrency 10, where tasks that
/// wait for it make bigger calls (Redis is the busier side); nine at concurrency 100, where more,
/// smaller calls overlap their round trips. (`docs/benchmarks.md`, issue 15's sixth session, three runs
/// each: at 10, one call drained 50.1k tasks/s against 47.0k with two; at 100, one call in flight
/// per 12 slots and at most 32 tasks a call drained 65.6k, against 61.7k with one per 40 and 128.)
const SLOTS_PER_CALL: usize = 12;

const OPERATION: &str = "store the states and acknowledge";

/// The handle through which the deliveries of one consumer store their final states and acknowledge.
#[derive(Clone)]
pub(super) struct Finisher {
    inner: Arc<Inner>,
    states: RedisBackend,
    inflight: Arc<str>,
    commit: GroupCommit<FinishEntry>,
}

impl Finisher {
    /// The group commit of the consumer whose in-flight list is `inflight`, for a worker running
    /// `concurrency` tasks at once.
    pub(super) fn new(
        inner: Arc<Inner>,
        states: RedisBackend,
        inflight: &str,
        concurrency: usize,
    ) -> Finisher {
        Finisher {
            inner,
            states,
            inflight: inflight.into(),
            commit: GroupCommit::new(1 + concurrency / SLOTS_PER_CALL),
        }
    }

    /// Stores `state` and then removes `message` from the in-flight list, in one step on the server,
    /// together with whatever other tasks of this consumer finish meanwhile. An error leaves the message
    /// in flight (the state may or may not be stored).
    pub(super) async fn finish(
        &self,
        state: &TaskState,
        message: &[u8],
    ) -> Result<(), BrokerError> {
        let entry = self
            .states
            .finish_entry(state, message.to_vec())
            .map_err(|error| BrokerError::operation(OPERATION, error))?;
        match self
            .commit
            .commit(entry, |entries| self.call(entries))
            .await
        {
            Answer::Done => Ok(()),
            Answer::Refused(text) | Answer::Failed(text) => {
                Err(BrokerError::operation(OPERATION, text))
            }
        }
    }

    /// One `finish_many` call (retried on connection errors; the scripts loaded again after
    /// `NOSCRIPT`).
    async fn call(&self, entries: Vec<FinishEntry>) -> Vec<Answer> {
        let mut pipe = redis::pipe();
        pipe.add_command(self.states.finish_many_cmd(&entries, &self.inflight));
        let pipe = &pipe;
        let send =
            move |conn: Healing| async move { conn.write_returning::<Vec<Value>>(pipe).await };
        match self.inner.fused(OPERATION, &self.states, send).await {
            Ok(replies) => finish_answers(replies),
            Err(error) => vec![Answer::Failed(error.to_string()); entries.len()],
        }
    }
}
