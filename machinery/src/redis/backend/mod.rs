//! The Redis result backend (`redis://`, `rediss://`, `redis+socket://`), wire-compatible with Go
//! machinery's.
//!
//! Records are where Go keeps them: `SET <task uuid> <TaskState JSON> EX <results_expire_in>` and
//! `SET <group uuid> <GroupMeta JSON> EX <results_expire_in>`. A state write keeps the previous record's
//! `TaskName` and `CreatedAt` when the new state has none, as Go's `mergeNewTaskState` does, but on the
//! server in one round trip: a Lua script splices the old values into the new JSON text without
//! re-encoding it (so big integers in results stay exact).
//!
//! Beyond Go:
//! - **Waiting without polling.** A final state (SUCCESS or FAILURE) written by us is also announced on
//!   the channel `machinery:done:<task uuid>`; [`Backend::wait_for_completion`] subscribes through one
//!   shared pub/sub connection and wakes at once. States written by Go workers are not announced, so a
//!   slow poll (10 ms doubling to 200 ms) runs as well.
//! - **One winning member per chord** (told again when it calls again) with an atomic per-group step
//!   (see [`Backend::complete_group_member`] and `docs/redis.md`), safe beside Go workers that use the
//!   `TriggerChordMutex` lock.

mod commands;
mod control;
mod finals;
mod groups;
mod notifier;

use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use redis::{AsyncCommands as _, RedisError, RedisResult};
use tokio::sync::OnceCell;

pub(crate) use self::finals::{answers as finish_answers, FinishEntry};
pub use self::groups::GO_CHORD_LOCK_KEY;
use self::notifier::Notifier;
use super::conn::{self, Endpoint, Healing};
use super::lua::{is_noscript, Lua};
use super::url::RedisUrl;
use crate::backend::{Backend, BackendError};
use crate::config::Config;
use crate::wire::state::{GroupMeta, TaskState};

/// The channel on which a final state of `task_uuid` is announced.
pub fn completion_channel(task_uuid: &str) -> String {
    format!("machinery:done:{task_uuid}")
}

/// The Redis result backend.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    url: RedisUrl,
    endpoint: Endpoint,
    conn: Healing,
    /// On a Redis Cluster: chord progress keys in the cluster layout, and no cross-slot reads.
    cluster: bool,
    expire_secs: u64,
    notifier: OnceCell<Notifier>,
    /// Keys a task or group id must not name: the default queue, its dead letters, the delayed-task set.
    /// A state written there would turn a queue into a string (Go does that).
    reserved: [String; 3],
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("url", &self.inner.url)
            .field("expire_secs", &self.inner.expire_secs)
            .finish_non_exhaustive()
    }
}

/// The backend's Lua scripts, kept in `scripts/<name>.lua` where each file's header names its KEYS and
/// ARGV and what it does atomically.
struct Scripts {
    set_state: Lua,
    start_many: Lua,
    finish_many: Lua,
    complete_member: Lua,
}

/// Each state-writing script is the shared `store_state` function followed by its own part.
static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    set_state: Lua::new(concat!(
        include_str!("../scripts/state_lib.lua"),
        include_str!("../scripts/set_state.lua")
    )),
    start_many: Lua::new(concat!(
        include_str!("../scripts/state_lib.lua"),
        include_str!("../scripts/start_many.lua")
    )),
    finish_many: Lua::new(concat!(
        include_str!("../scripts/state_lib.lua"),
        include_str!("../scripts/finish_many.lua")
    )),
    complete_member: Lua::new(include_str!("../scripts/complete_member.lua")),
});

/// A failed Redis command as a backend error: a [refusal](BackendError::Refused) when the server
/// refused the command itself ([`is_refusal`]), else an operation error (transient).
fn op(operation: &'static str) -> impl FnOnce(RedisError) -> BackendError {
    move |error| {
        if is_refusal(&error) {
            BackendError::refused(operation, error)
        } else {
            BackendError::operation(operation, error)
        }
    }
}

/// Whether the server refused a command for a reason that repeating it cannot fix: `WRONGTYPE` and
/// other server errors (`ERR ...`, `NOPERM`, a script that raised), but not those about the server's
/// condition (loading, read-only, out of memory, a busy script, a missing script, cluster states), and
/// never I/O, timeouts or refused connections.
pub(crate) fn is_refusal(error: &RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    if error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
    {
        return false;
    }
    match error.kind() {
        ErrorKind::Server(
            ServerErrorKind::ResponseError
            | ServerErrorKind::ExecAbort
            | ServerErrorKind::CrossSlot
            | ServerErrorKind::NoPerm,
        ) => true,
        ErrorKind::Extension => !matches!(
            error.code(),
            Some("OOM" | "BUSY" | "MISCONF" | "LOADING" | "NOREPLICAS" | "UNBLOCKED")
        ),
        _ => false,
    }
}

/// One task's answer to its STARTED write (`start_many`, or `set_state` on a cluster): 1 written, 0
/// refused by the record it would replace (revoked, or SUCCESS already), or the text of the error that
/// refused it: the script's own `WRONGTYPE` for a key that is not a task state, a refusal that writing
/// again cannot mend (the worker dead-letters the task without running it, as its outcome could not be
/// stored either).
fn start_answer(answer: Option<redis::Value>) -> Result<bool, BackendError> {
    match answer {
        Some(redis::Value::Int(1)) => Ok(true),
        Some(redis::Value::Int(0)) => Ok(false),
        Some(redis::Value::BulkString(text)) => Err(BackendError::refused(
            "set task state",
            String::from_utf8_lossy(&text).into_owned(),
        )),
        Some(redis::Value::SimpleString(text)) => {
            Err(BackendError::refused("set task state", text))
        }
        other => Err(BackendError::operation(
            "set task state",
            format!("unexpected answer from the start script: {other:?}"),
        )),
    }
}

/// A stored state's JSON as a [`TaskState`].
fn decode_state(task_uuid: &str, raw: Option<Vec<u8>>) -> Result<Option<TaskState>, BackendError> {
    raw.map(|bytes| {
        TaskState::from_json(&bytes).map_err(|source| BackendError::Decode {
            key: task_uuid.to_owned(),
            source,
        })
    })
    .transpose()
}

impl RedisBackend {
    /// Connects to the Redis server named by `config.result_backend`.
    pub async fn connect(config: &Config) -> Result<RedisBackend, BackendError> {
        let (url, endpoint, conn) = conn::open(
            &config.result_backend,
            &config.redis,
            &config.tls.for_result_backend(),
            "result backend",
        )
        .await
        .map_err(|e| BackendError::Connect {
            url: e.url,
            source: e.source,
        })?;
        tracing::debug!(url = %url, "connected to the redis result backend");
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                url,
                endpoint,
                conn,
                cluster: config.redis.cluster_enabled,
                expire_secs: config.results_expire_in_secs(),
                notifier: OnceCell::new(),
                reserved: [
                    config.default_queue.clone(),
                    crate::redis::dead_letter_key(&config.default_queue),
                    config.redis.delayed_tasks_key.clone(),
                ],
            }),
        })
    }

    /// The server this backend talks to (password redacted when displayed).
    pub fn url(&self) -> &RedisUrl {
        &self.inner.url
    }

    /// The connection its commands go over (a broker holding this backend replaces it when it sees the
    /// link go silent).
    pub(crate) fn link(&self) -> &Healing {
        &self.inner.conn
    }

    /// The stored JSON of a task's state, if any.
    pub(super) async fn get_raw_state(&self, task_uuid: &str) -> RedisResult<Option<Vec<u8>>> {
        let mut conn = self.inner.conn.clone();
        conn.get(task_uuid).await
    }

    /// Refuses an id that names one of our keys: the default queue, its dead letters, the delayed-task
    /// set, or anything under `machinery:` (in-flight lists, heartbeats, chord records). Other lists (a
    /// custom queue that holds messages) are refused by the server itself (`WRONGTYPE`), as the state
    /// writes never replace a key that is not a string.
    pub(crate) fn check_key(&self, key: &str) -> Result<(), BackendError> {
        let reason = if key.starts_with("machinery:") {
            "ids under machinery: are the queue's own keys"
        } else if self.inner.reserved.iter().any(|reserved| reserved == key) {
            "the id names a queue, its dead letters or the delayed-task set"
        } else {
            return Ok(());
        };
        Err(BackendError::ReservedKey {
            key: key.to_owned(),
            reason: reason.to_owned(),
        })
    }

    /// Runs a pipeline and returns its replies, loading the scripts and trying once more if the server
    /// did not know them.
    async fn query_pipeline<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        pipe: &redis::Pipeline,
    ) -> Result<T, BackendError> {
        let mut conn = self.inner.conn.clone();
        match pipe.query_async::<T>(&mut conn).await {
            Err(error) if is_noscript(&error) => {
                self.load_scripts(&mut conn).await?;
                pipe.query_async::<T>(&mut conn)
                    .await
                    .map_err(op(operation))
            }
            other => other.map_err(op(operation)),
        }
    }
}

#[async_trait]
impl Backend for RedisBackend {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn set_state(&self, state: &TaskState) -> Result<(), BackendError> {
        self.set_states(std::slice::from_ref(state)).await
    }

    async fn set_states(&self, states: &[TaskState]) -> Result<(), BackendError> {
        if states.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for state in states {
            pipe.add_command(self.state_cmd(state)?).ignore();
        }
        let conn = self.inner.conn.clone();
        match conn.write(&pipe).await {
            Err(error) if is_noscript(&error) => {
                self.load_scripts(&mut conn.clone()).await?;
                conn.write(&pipe).await.map_err(op("set task state"))
            }
            other => other.map_err(op("set task state")),
        }
    }

    async fn set_received(&self, state: &TaskState) -> Result<bool, BackendError> {
        // The check (revocation, SUCCESS) and the write in one script: one round trip, and no window in
        // which either could slip between them.
        let cmd = self.state_or_start_cmd(state, true)?;
        let mut conn = self.inner.conn.clone();
        let written: i64 = match cmd.query_async(&mut conn).await {
            Err(error) if is_noscript(&error) => {
                self.load_scripts(&mut conn).await?;
                cmd.query_async(&mut conn).await
            }
            other => other,
        }
        .map_err(op("set task state"))?;
        Ok(written == 1)
    }

    async fn set_received_and_started(
        &self,
        received: &TaskState,
        started: &TaskState,
    ) -> Result<bool, BackendError> {
        if !commands::usual_start(received, started) {
            return crate::backend::received_then_started(self, received, started).await;
        }
        let mut results = self.set_started_many(std::slice::from_ref(started)).await;
        results.pop().unwrap_or(Ok(true))
    }

    async fn set_started_many(&self, started: &[TaskState]) -> Vec<Result<bool, BackendError>> {
        let mut keys = Vec::with_capacity(started.len());
        let mut pieces = Vec::with_capacity(started.len());
        // One entry per task: its answer already, or `None` for one of the batch's writes below.
        let mut results = Vec::with_capacity(started.len());
        for state in started {
            match self.start_pieces(state) {
                Ok(Some(task_pieces)) => {
                    keys.push(state.task_uuid.as_str());
                    pieces.push(task_pieces);
                    results.push(None);
                }
                // Not a start: the two calls, on their own.
                Ok(None) => results.push(Some(crate::backend::start_in_turn(self, state).await)),
                Err(error) => results.push(Some(Err(error))),
            }
        }
        let answers = if keys.is_empty() {
            Ok(Vec::new())
        } else if self.inner.cluster {
            // The keys share no slot: one `set_state` call each, in one pipeline.
            let mut pipe = redis::pipe();
            for (key, task_pieces) in keys.iter().zip(pieces) {
                pipe.add_command(self.started_cmd(key, task_pieces));
            }
            self.query_pipeline::<Vec<redis::Value>>("set task state", &pipe)
                .await
        } else {
            // One `start_many` call for the batch, with an answer per task.
            let mut pipe = redis::pipe();
            pipe.add_command(self.start_many_cmd(&keys, pieces));
            self.query_pipeline::<(Vec<redis::Value>,)>("set task state", &pipe)
                .await
                .map(|(answers,)| answers)
        };
        match answers {
            Ok(answers) => {
                let mut answers = answers.into_iter();
                results
                    .into_iter()
                    .map(|r| r.unwrap_or_else(|| start_answer(answers.next())))
                    .collect()
            }
            Err(error) => {
                let text = error.to_string();
                results
                    .into_iter()
                    .map(|r| {
                        r.unwrap_or_else(|| {
                            Err(BackendError::operation("set task state", text.clone()))
                        })
                    })
                    .collect()
            }
        }
    }

    async fn get_state(&self, task_uuid: &str) -> Result<Option<TaskState>, BackendError> {
        let raw = self
            .get_raw_state(task_uuid)
            .await
            .map_err(op("get task state"))?;
        decode_state(task_uuid, raw)
    }

    async fn wait_for_completion(
        &self,
        task_uuid: &str,
        timeout: Duration,
    ) -> Result<Option<TaskState>, BackendError> {
        self.wait_announced(task_uuid, timeout).await
    }

    async fn init_group(&self, meta: &GroupMeta) -> Result<(), BackendError> {
        self.store_group(meta).await
    }

    async fn get_group(&self, group_uuid: &str) -> Result<Option<GroupMeta>, BackendError> {
        self.read_group(group_uuid).await
    }

    async fn group_states(&self, group_uuid: &str) -> Result<Vec<TaskState>, BackendError> {
        self.read_group_states(group_uuid).await
    }

    async fn complete_group_member(
        &self,
        group_uuid: &str,
        task_uuid: &str,
        group_task_count: u32,
    ) -> Result<bool, BackendError> {
        self.count_group_member(group_uuid, task_uuid, group_task_count)
            .await
    }

    async fn claim_unique(
        &self,
        key: &str,
        task_uuid: &str,
        ttl: Duration,
    ) -> Result<Option<String>, BackendError> {
        self.claim_unique_key(key, task_uuid, ttl).await
    }

    async fn release_unique(&self, key: &str, task_uuid: &str) -> Result<(), BackendError> {
        self.release_unique_key(key, task_uuid).await
    }

    async fn reserve_rate_slot(
        &self,
        key: &str,
        interval: Duration,
    ) -> Result<Option<Duration>, BackendError> {
        self.reserve_rate(key, interval).await.map(Some)
    }

    async fn purge_state(&self, task_uuid: &str) -> Result<(), BackendError> {
        self.check_key(task_uuid)?;
        let mut conn = self.inner.conn.clone();
        conn.del::<_, ()>(task_uuid)
            .await
            .map_err(op("delete task state"))
    }

    async fn purge_group(&self, group_uuid: &str) -> Result<(), BackendError> {
        self.delete_group(group_uuid).await
    }
}
