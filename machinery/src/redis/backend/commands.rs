//! The commands that write a task's state: the `set_state` script (or a plain `SET`) built from the
//! record's JSON in pieces, alone, with an acknowledgement, or as the worker's STARTED.

use super::{completion_channel, op, RedisBackend, SCRIPTS};
use crate::backend::BackendError;
use crate::redis::conn::Healing;
use crate::wire::gotime;
use crate::wire::state::{TaskState, CANCELLED_ERROR, REVOKED_ERROR};

/// The channel a state is announced on: its completion channel for a final state, none ('') otherwise.
pub(super) fn announced_on(state: &TaskState) -> Vec<u8> {
    if state.is_completed() {
        completion_channel(&state.task_uuid).into_bytes()
    } else {
        Vec::new()
    }
}

/// A state as the five pieces of JSON text the `set_state` script joins: the TaskName and CreatedAt values
/// are empty when the previous record should supply them.
fn state_pieces(state: &TaskState) -> Result<[Vec<u8>; 5], serde_json::Error> {
    let prefix = format!(
        "{{\"TaskUUID\":{},\"TaskName\":",
        serde_json::to_string(&state.task_uuid)?
    );
    let name = if state.task_name.is_empty() {
        String::new()
    } else {
        serde_json::to_string(&state.task_name)?
    };
    let middle = format!(
        ",\"State\":{},\"Results\":{},\"Error\":{},\"CreatedAt\":",
        serde_json::to_string(state.state.as_str())?,
        serde_json::to_string(&state.results)?,
        serde_json::to_string(&state.error)?,
    );
    let created = if state.created_at == gotime::zero_time() {
        String::new()
    } else {
        serde_json::to_string(&gotime::format(&state.created_at))?
    };
    let suffix = match &state.progress {
        None => format!(",\"TTL\":{}}}", state.ttl),
        Some(progress) => format!(
            ",\"TTL\":{},\"Progress\":{}}}",
            state.ttl,
            serde_json::to_string(progress)?
        ),
    };
    Ok([
        prefix.into_bytes(),
        name.into_bytes(),
        middle.into_bytes(),
        created.into_bytes(),
        suffix.into_bytes(),
    ])
}

impl RedisBackend {
    /// The one command that stores `state`: a plain `SET … EX` when nothing must come from the previous
    /// record and nobody needs telling, else the `set_state` script.
    pub(crate) fn state_cmd(&self, state: &TaskState) -> Result<redis::Cmd, BackendError> {
        self.state_or_start_cmd(state, false)
    }

    /// [`RedisBackend::state_cmd`], or with `start_write` (RECEIVED or STARTED) the script that refuses
    /// to replace a record that [stops a start](TaskState::stops_a_start) (it returns 0 then).
    pub(super) fn state_or_start_cmd(
        &self,
        state: &TaskState,
        start_write: bool,
    ) -> Result<redis::Cmd, BackendError> {
        let pieces = self.pieces(state)?;
        let completed = state.is_completed();
        if !pieces[1].is_empty() && !pieces[3].is_empty() && !completed && !start_write {
            // GET makes the server refuse (WRONGTYPE) to replace a key that is not a string, such as a
            // queue's list, where a plain SET would.
            let mut cmd = redis::cmd("SET");
            cmd.arg(&state.task_uuid)
                .arg(pieces.concat())
                .arg("EX")
                .arg(self.inner.expire_secs)
                .arg("GET");
            return Ok(cmd);
        }
        let channel = announced_on(state);
        let [prefix, name, middle, created, suffix] = pieces;
        Ok(self.script_cmd(
            &state.task_uuid,
            [prefix, name, created, suffix],
            channel,
            start_write,
            vec![middle],
            None,
        ))
    }

    /// The `set_state` script storing `state`, then removing `message` from the list `inflight` (a Redis
    /// broker's acknowledgement): both in one step on the server.
    pub(crate) fn state_and_ack_cmd(
        &self,
        state: &TaskState,
        inflight: &str,
        message: &[u8],
    ) -> Result<redis::Cmd, BackendError> {
        let channel = announced_on(state);
        let [prefix, name, middle, created, suffix] = self.pieces(state)?;
        Ok(self.script_cmd(
            &state.task_uuid,
            [prefix, name, created, suffix],
            channel,
            false,
            vec![middle],
            Some((inflight, message)),
        ))
    }

    pub(super) fn pieces(&self, state: &TaskState) -> Result<[Vec<u8>; 5], BackendError> {
        self.check_key(&state.task_uuid)?;
        state_pieces(state).map_err(|source| BackendError::Decode {
            key: state.task_uuid.clone(),
            source,
        })
    }

    /// The `set_state` script writing one state per middle piece.
    fn script_cmd(
        &self,
        task_uuid: &str,
        [prefix, name, created, suffix]: [Vec<u8>; 4],
        channel: Vec<u8>,
        start_write: bool,
        middles: Vec<Vec<u8>>,
        ack: Option<(&str, &[u8])>,
    ) -> redis::Cmd {
        let expire = self.inner.expire_secs.to_string().into_bytes();
        let revoked = if start_write {
            format!("{REVOKED_ERROR}\n{CANCELLED_ERROR}").into_bytes()
        } else {
            Vec::new()
        };
        let mut args = vec![prefix, name, created, suffix, expire, channel, revoked];
        args.extend(middles);
        match ack {
            Some((inflight, message)) => {
                args.push(message.to_vec());
                SCRIPTS
                    .set_state
                    .cmd(&[task_uuid.as_bytes(), inflight.as_bytes()], &args)
            }
            None => SCRIPTS.set_state.cmd(&[task_uuid.as_bytes()], &args),
        }
    }

    /// Loads this backend's scripts (after `NOSCRIPT` in a pipeline).
    pub(crate) async fn load_scripts(&self, conn: &mut Healing) -> Result<(), BackendError> {
        SCRIPTS
            .set_state
            .load(conn)
            .await
            .map_err(op("load scripts"))?;
        SCRIPTS
            .start_many
            .load(conn)
            .await
            .map_err(op("load scripts"))?;
        SCRIPTS
            .finish_many
            .load(conn)
            .await
            .map_err(op("load scripts"))?;
        SCRIPTS
            .complete_member
            .load(conn)
            .await
            .map_err(op("load scripts"))
    }

    /// The `start_many` script storing STARTED for each task of a batch (whose pieces
    /// [`RedisBackend::start_pieces`] made) unless its record is a revocation or a SUCCESS, in one call.
    pub(super) fn start_many_cmd(&self, keys: &[&str], pieces: Vec<[Vec<u8>; 5]>) -> redis::Cmd {
        let mut args = Vec::with_capacity(2 + 5 * pieces.len());
        args.push(self.inner.expire_secs.to_string().into_bytes());
        args.push(format!("{REVOKED_ERROR}\n{CANCELLED_ERROR}").into_bytes());
        for [prefix, name, middle, created, suffix] in pieces {
            args.extend([prefix, name, created, suffix, middle]);
        }
        SCRIPTS.start_many.cmd(keys, &args)
    }

    /// The pieces of a task's STARTED (for [`RedisBackend::start_many_cmd`] or
    /// [`RedisBackend::started_cmd`]), `None` when `started` is a final state, which is no start: then
    /// its RECEIVED and it are written in turn.
    pub(super) fn start_pieces(
        &self,
        started: &TaskState,
    ) -> Result<Option<[Vec<u8>; 5]>, BackendError> {
        if started.is_completed() {
            return Ok(None);
        }
        self.pieces(started).map(Some)
    }

    /// The `set_state` call that stores one task's STARTED (RECEIVED, replaced in the same atomic step,
    /// could never be seen) unless its record is a revocation or a SUCCESS, reading it once: on a cluster,
    /// where a batch's keys share no slot.
    pub(super) fn started_cmd(
        &self,
        task_uuid: &str,
        [prefix, name, started_middle, created, suffix]: [Vec<u8>; 5],
    ) -> redis::Cmd {
        self.script_cmd(
            task_uuid,
            [prefix, name, created, suffix],
            Vec::new(),
            true,
            vec![started_middle],
            None,
        )
    }
}

/// Whether RECEIVED and STARTED are the worker's usual pair: one task's, differing in their state alone
/// (then one write of STARTED stands for both: RECEIVED, replaced in the same atomic step, could never be
/// seen).
pub(super) fn usual_start(received: &TaskState, started: &TaskState) -> bool {
    let same_task = (
        &received.task_uuid,
        &received.task_name,
        received.created_at,
        received.ttl,
    ) == (
        &started.task_uuid,
        &started.task_name,
        started.created_at,
        started.ttl,
    );
    same_task && !received.is_completed() && !started.is_completed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::state::TaskResult;

    #[test]
    fn state_pieces_join_into_the_records_json() {
        let mut state = TaskState::success(
            "task_1",
            "add",
            vec![TaskResult::new(
                "uint64",
                serde_json::json!(18446744073709551615u64),
            )],
        );
        state.created_at = chrono::Utc::now();
        let joined: Vec<u8> = state_pieces(&state).unwrap().concat();
        assert_eq!(joined, state.to_json().unwrap());
    }

    #[test]
    fn progress_joins_into_the_records_json() {
        let mut state =
            TaskState::progress("task_1", "add", serde_json::json!({"done": 1, "total": 2}));
        state.created_at = chrono::Utc::now();
        let joined: Vec<u8> = state_pieces(&state).unwrap().concat();
        assert_eq!(joined, state.to_json().unwrap());
    }

    #[test]
    fn missing_name_and_time_leave_their_pieces_empty() {
        let pieces = state_pieces(&TaskState::started("t", "")).unwrap();
        assert!(pieces[1].is_empty() && pieces[3].is_empty());
    }
}
