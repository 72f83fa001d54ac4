//! Final states written together with their acknowledgements: the `finish_many` script storing the
//! states of tasks of one Redis broker consumer that finished while earlier writes were on their way, in
//! one call, and removing each task's message from the in-flight list after its state, each task with
//! its own answer. The broker's consumers batch them (`redis/broker/finisher.rs`, with
//! [`GroupCommit`](crate::group_commit::GroupCommit)); the backend builds the call, as it builds
//! every state write.

use redis::Value;

use super::commands::announced_on;
use super::{RedisBackend, SCRIPTS};
use crate::backend::BackendError;
use crate::group_commit::Answer;
use crate::wire::state::TaskState;

/// A final state (and its message, to acknowledge) ready for one `finish_many` call with others
/// ([`RedisBackend::finish_entry`]).
pub(crate) struct FinishEntry {
    task_uuid: String,
    /// The script's seven pieces of this task, in its order (`finish_many.lua`).
    pieces: [Vec<u8>; 7],
}

impl RedisBackend {
    /// One task's part of a `finish_many` call: `state` and `message`, the exact bytes of its message in
    /// the consumer's in-flight list.
    pub(crate) fn finish_entry(
        &self,
        state: &TaskState,
        message: Vec<u8>,
    ) -> Result<FinishEntry, BackendError> {
        let channel = announced_on(state);
        let [prefix, name, middle, created, suffix] = self.pieces(state)?;
        Ok(FinishEntry {
            task_uuid: state.task_uuid.clone(),
            pieces: [prefix, name, created, suffix, channel, middle, message],
        })
    }

    /// The `finish_many` call storing each entry's state and then removing its message from the list
    /// `inflight`, with an answer per entry.
    pub(crate) fn finish_many_cmd(&self, entries: &[FinishEntry], inflight: &str) -> redis::Cmd {
        let mut keys: Vec<&[u8]> = entries
            .iter()
            .map(|entry| entry.task_uuid.as_bytes())
            .collect();
        keys.push(inflight.as_bytes());
        let expire = self.inner.expire_secs.to_string();
        let count = entries.len().to_string();
        let mut args = Vec::with_capacity(2 + 7 * entries.len());
        args.extend([expire.as_bytes(), count.as_bytes()]);
        args.extend(
            entries
                .iter()
                .flat_map(|entry| entry.pieces.iter().map(Vec::as_slice)),
        );
        SCRIPTS.finish_many.cmd(&keys, &args)
    }
}

/// The answers of a `finish_many` call, one per task: 1 done, a text the server's refusal of that
/// task's write. (The group commit fails every task of a call whose answers do not match its tasks.)
pub(crate) fn answers(replies: Vec<Value>) -> Vec<Answer> {
    replies
        .into_iter()
        .map(|reply| match reply {
            Value::Int(1) => Answer::Done,
            Value::BulkString(text) => Answer::Refused(String::from_utf8_lossy(&text).into_owned()),
            other => Answer::Failed(format!(
                "unexpected answer from the finish script: {other:?}"
            )),
        })
        .collect()
}
