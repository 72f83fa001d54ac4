//! What the result backend stores: Go machinery's `TaskState`, `TaskResult` and `GroupMeta` records.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use super::gotime;
use super::tolerant::{wire_fields, Lenient};

/// The life-cycle state of a task, as Go machinery spells it on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum State {
    /// Sent, not yet taken by a worker.
    Pending,
    /// Taken by a worker that knows the task.
    Received,
    /// Running.
    Started,
    /// Failed and scheduled to run again.
    Retry,
    /// Finished with results.
    Success,
    /// Finished with an error.
    Failure,
    /// A state written by some other client that we do not know.
    Other(String),
}

impl State {
    /// The wire spelling: `PENDING`, `RECEIVED`, ...
    pub fn as_str(&self) -> &str {
        match self {
            State::Pending => "PENDING",
            State::Received => "RECEIVED",
            State::Started => "STARTED",
            State::Retry => "RETRY",
            State::Success => "SUCCESS",
            State::Failure => "FAILURE",
            State::Other(other) => other,
        }
    }

    /// Reads a wire spelling; unknown states are kept as [`State::Other`].
    pub fn parse(text: &str) -> State {
        match text {
            "PENDING" => State::Pending,
            "RECEIVED" => State::Received,
            "STARTED" => State::Started,
            "RETRY" => State::Retry,
            "SUCCESS" => State::Success,
            "FAILURE" => State::Failure,
            other => State::Other(other.to_owned()),
        }
    }

    /// SUCCESS or FAILURE: the task will not change any more.
    pub fn is_completed(&self) -> bool {
        matches!(self, State::Success | State::Failure)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error text of a revoked task. A revoked task is FAILURE, not a state of its own, so that Go clients,
/// which know only Go's six states, see it finished (a `REVOKED` state would make them wait forever).
pub const REVOKED_ERROR: &str = "revoked: the task was revoked before a worker ran it";

/// The error text [`Server::cancel`](crate::Server::cancel) stores for a task that no worker runs yet: a
/// worker that receives the task later acknowledges it without running it, as for a revoked one.
pub const CANCELLED_ERROR: &str = "cancelled: the task was cancelled before a worker ran it";

/// How the error text of a cancelled task starts (one cancelled before it ran, or while it ran).
pub const CANCELLED_ERROR_PREFIX: &str = "cancelled: ";

/// How the error text of an expired task ([`Signature::expires_at`](crate::Signature::expires_at))
/// starts; the rest says when it expired.
pub const EXPIRED_ERROR_PREFIX: &str = "expired: ";

/// One result value: `{"Type": "int64", "Value": 2}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskResult {
    /// The Go type tag.
    #[serde(rename = "Type")]
    pub type_tag: String,
    /// The JSON value.
    #[serde(rename = "Value")]
    pub value: Value,
}

impl TaskResult {
    /// A result with this tag and value.
    pub fn new(type_tag: impl Into<String>, value: Value) -> Self {
        TaskResult {
            type_tag: type_tag.into(),
            value,
        }
    }
}

wire_fields!(
    enum ResultField {
        Type = "Type",
        Value = "Value",
    }
);

impl<'de> Deserialize<'de> for TaskResult {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ResultVisitor;
        impl<'de> Visitor<'de> for ResultVisitor {
            type Value = TaskResult;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a machinery TaskResult object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TaskResult, A::Error> {
                let mut result = TaskResult::new("", Value::Null);
                while let Some(key) = map.next_key::<ResultField>()? {
                    match key {
                        ResultField::Type => {
                            result.type_tag = map.next_value::<Lenient<String>>()?.0
                        }
                        ResultField::Value => result.value = map.next_value()?,
                        ResultField::Unknown => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(result)
            }
        }
        d.deserialize_map(ResultVisitor)
    }
}

/// A task's record in the result backend (Go's `tasks.TaskState`).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskState {
    /// The task id.
    pub task_uuid: String,
    /// The task name (Go's worker-side states leave it empty; backends that merge keep the sender's).
    pub task_name: String,
    /// Where the task is in its life.
    pub state: State,
    /// The results: `None` (`null`) unless SUCCESS; `Some(vec![])` for a task with no result.
    pub results: Option<Vec<TaskResult>>,
    /// The error text of a FAILURE.
    pub error: String,
    /// When the task was sent (Go's zero time when unknown).
    pub created_at: DateTime<Utc>,
    /// Always 0 in JSON backends.
    pub ttl: i64,
    /// What a running task last reported with
    /// [`TaskContext::set_progress`](crate::TaskContext::set_progress), as JSON. Written as an extra
    /// `Progress` key only when there is one, so every other record is Go's byte for byte; Go machinery's
    /// JSON decoding skips the key.
    pub progress: Option<Value>,
}

impl TaskState {
    fn with_state(task_uuid: &str, task_name: &str, state: State) -> Self {
        TaskState {
            task_uuid: task_uuid.to_owned(),
            task_name: task_name.to_owned(),
            state,
            results: None,
            error: String::new(),
            created_at: gotime::zero_time(),
            ttl: 0,
            progress: None,
        }
    }

    /// PENDING, written by the sender with the creation time.
    pub fn pending(task_uuid: &str, task_name: &str) -> Self {
        let mut state = TaskState::with_state(task_uuid, task_name, State::Pending);
        state.created_at = Utc::now();
        state
    }

    /// RECEIVED, written by a worker that knows the task.
    pub fn received(task_uuid: &str, task_name: &str) -> Self {
        TaskState::with_state(task_uuid, task_name, State::Received)
    }

    /// STARTED, written just before the task runs.
    pub fn started(task_uuid: &str, task_name: &str) -> Self {
        TaskState::with_state(task_uuid, task_name, State::Started)
    }

    /// RETRY, written before a failed task is scheduled again.
    pub fn retry(task_uuid: &str, task_name: &str) -> Self {
        TaskState::with_state(task_uuid, task_name, State::Retry)
    }

    /// SUCCESS with these results.
    pub fn success(task_uuid: &str, task_name: &str, results: Vec<TaskResult>) -> Self {
        let mut state = TaskState::with_state(task_uuid, task_name, State::Success);
        state.results = Some(results);
        state
    }

    /// The same record in another state, its id, name and the rest kept: what a worker's STARTED
    /// becomes (its RECEIVED, or its SUCCESS with [`TaskState::succeeded`]) without copying the id or
    /// the name.
    pub(crate) fn in_state(mut self, state: State) -> Self {
        self.state = state;
        self
    }

    /// The same record as SUCCESS with these results ([`TaskState::in_state`]).
    pub(crate) fn succeeded(mut self, results: Vec<TaskResult>) -> Self {
        self.state = State::Success;
        self.results = Some(results);
        self
    }

    /// FAILURE with this error text.
    pub fn failure(task_uuid: &str, task_name: &str, error: impl Into<String>) -> Self {
        let mut state = TaskState::with_state(task_uuid, task_name, State::Failure);
        state.error = error.into();
        state
    }

    /// STARTED with the progress a running task reports.
    pub fn progress(task_uuid: &str, task_name: &str, progress: Value) -> Self {
        let mut state = TaskState::with_state(task_uuid, task_name, State::Started);
        state.progress = Some(progress);
        state
    }

    /// FAILURE with the revocation error, written by [`Server::revoke`](crate::Server::revoke).
    pub fn revoked(task_uuid: &str) -> Self {
        TaskState::failure(task_uuid, "", REVOKED_ERROR)
    }

    /// SUCCESS or FAILURE.
    pub fn is_completed(&self) -> bool {
        self.state.is_completed()
    }

    /// Whether this is a mark that stops a worker from starting the task: the state
    /// [`Server::revoke`](crate::Server::revoke) writes, or the one [`Server::cancel`](crate::Server::cancel)
    /// writes for a task that no worker runs yet.
    pub fn is_revoked(&self) -> bool {
        self.state == State::Failure
            && (self.error == REVOKED_ERROR || self.error == CANCELLED_ERROR)
    }

    /// Whether a worker must not store RECEIVED or STARTED over this record: a [revocation
    /// mark](TaskState::is_revoked), or a SUCCESS (every send stores PENDING first, so a SUCCESS at start
    /// means the task already ran since it was last sent, and this is a second copy of its message).
    pub fn stops_a_start(&self) -> bool {
        self.is_revoked() || self.state == State::Success
    }

    /// FAILURE with [`CANCELLED_ERROR`], written by [`Server::cancel`](crate::Server::cancel) for a task
    /// that no worker runs yet.
    pub fn cancelled(task_uuid: &str) -> Self {
        TaskState::failure(task_uuid, "", CANCELLED_ERROR)
    }

    /// Whether this is the FAILURE of a cancelled task (before or while it ran).
    pub fn is_cancelled(&self) -> bool {
        self.state == State::Failure && self.error.starts_with(CANCELLED_ERROR_PREFIX)
    }

    /// Whether this is the FAILURE of a task that expired before a worker started it.
    pub fn is_expired(&self) -> bool {
        self.state == State::Failure && self.error.starts_with(EXPIRED_ERROR_PREFIX)
    }

    /// Keeps the task name and creation time of the record this one replaces, as Go's Redis backend does.
    pub fn merge_from_previous(&mut self, previous: &TaskState) {
        if self.task_name.is_empty() {
            self.task_name.clone_from(&previous.task_name);
        }
        if self.created_at == gotime::zero_time() {
            self.created_at = previous.created_at;
        }
    }

    /// Encodes the record as Go's JSON.
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        // A record with its keys is about 150 bytes before results: start there instead of growing.
        let mut json = Vec::with_capacity(192);
        serde_json::to_writer(&mut json, self)?;
        Ok(json)
    }

    /// Decodes a record from JSON, tolerantly.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

struct Time<'a>(&'a DateTime<Utc>);

impl Serialize for Time<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        gotime::serialize(self.0, s)
    }
}

struct TimeValue(DateTime<Utc>);

impl<'de> Deserialize<'de> for TimeValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        gotime::deserialize_or_zero(d).map(TimeValue)
    }
}

impl Serialize for TaskState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let fields = if self.progress.is_some() { 8 } else { 7 };
        let mut st = s.serialize_struct("TaskState", fields)?;
        st.serialize_field("TaskUUID", &self.task_uuid)?;
        st.serialize_field("TaskName", &self.task_name)?;
        st.serialize_field("State", self.state.as_str())?;
        st.serialize_field("Results", &self.results)?;
        st.serialize_field("Error", &self.error)?;
        st.serialize_field("CreatedAt", &Time(&self.created_at))?;
        st.serialize_field("TTL", &self.ttl)?;
        if let Some(progress) = &self.progress {
            st.serialize_field("Progress", progress)?;
        }
        st.end()
    }
}

wire_fields!(
    enum StateField {
        TaskUuid = "TaskUUID",
        TaskName = "TaskName",
        State = "State",
        Results = "Results",
        Error = "Error",
        CreatedAt = "CreatedAt",
        Ttl = "TTL",
        Progress = "Progress",
    }
);

impl<'de> Deserialize<'de> for TaskState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct StateVisitor;
        impl<'de> Visitor<'de> for StateVisitor {
            type Value = TaskState;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a machinery TaskState object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TaskState, A::Error> {
                let mut st = TaskState::with_state("", "", State::Pending);
                while let Some(key) = map.next_key::<StateField>()? {
                    match key {
                        StateField::TaskUuid => {
                            st.task_uuid = map.next_value::<Lenient<String>>()?.0
                        }
                        StateField::TaskName => {
                            st.task_name = map.next_value::<Lenient<String>>()?.0
                        }
                        StateField::State => {
                            st.state = State::parse(&map.next_value::<Lenient<String>>()?.0)
                        }
                        StateField::Results => st.results = map.next_value()?,
                        StateField::Error => st.error = map.next_value::<Lenient<String>>()?.0,
                        StateField::CreatedAt => st.created_at = map.next_value::<TimeValue>()?.0,
                        StateField::Ttl => st.ttl = map.next_value::<Lenient<i64>>()?.0,
                        StateField::Progress => {
                            st.progress = map.next_value::<Option<Value>>()?;
                        }
                        StateField::Unknown => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(st)
            }
        }
        d.deserialize_map(StateVisitor)
    }
}

/// A group's record in the result backend (Go's `tasks.GroupMeta`).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupMeta {
    /// The group id.
    pub group_uuid: String,
    /// The member task ids, in group order (chord callbacks get results in this order).
    pub task_uuids: Vec<String>,
    /// Set once the chord callback has been sent.
    pub chord_triggered: bool,
    /// Go's memcache/DynamoDB chord lock flag.
    pub lock: bool,
    /// When the group was sent.
    pub created_at: DateTime<Utc>,
    /// Always 0 in JSON backends.
    pub ttl: i64,
}

impl GroupMeta {
    /// A new, untriggered group record.
    pub fn new(group_uuid: impl Into<String>, task_uuids: Vec<String>) -> Self {
        GroupMeta {
            group_uuid: group_uuid.into(),
            task_uuids,
            chord_triggered: false,
            lock: false,
            created_at: Utc::now(),
            ttl: 0,
        }
    }

    /// Encodes the record as Go's JSON.
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        // A record with its keys is about 150 bytes before results: start there instead of growing.
        let mut json = Vec::with_capacity(192);
        serde_json::to_writer(&mut json, self)?;
        Ok(json)
    }

    /// Decodes a record from JSON, tolerantly.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

impl Serialize for GroupMeta {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("GroupMeta", 6)?;
        st.serialize_field("GroupUUID", &self.group_uuid)?;
        st.serialize_field("TaskUUIDs", &self.task_uuids)?;
        st.serialize_field("ChordTriggered", &self.chord_triggered)?;
        st.serialize_field("Lock", &self.lock)?;
        st.serialize_field("CreatedAt", &Time(&self.created_at))?;
        st.serialize_field("TTL", &self.ttl)?;
        st.end()
    }
}

wire_fields!(
    enum GroupField {
        GroupUuid = "GroupUUID",
        TaskUuids = "TaskUUIDs",
        ChordTriggered = "ChordTriggered",
        Lock = "Lock",
        CreatedAt = "CreatedAt",
        Ttl = "TTL",
    }
);

impl<'de> Deserialize<'de> for GroupMeta {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct GroupVisitor;
        impl<'de> Visitor<'de> for GroupVisitor {
            type Value = GroupMeta;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a machinery GroupMeta object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<GroupMeta, A::Error> {
                let mut meta = GroupMeta::new("", Vec::new());
                meta.created_at = gotime::zero_time();
                while let Some(key) = map.next_key::<GroupField>()? {
                    match key {
                        GroupField::GroupUuid => {
                            meta.group_uuid = map.next_value::<Lenient<String>>()?.0
                        }
                        GroupField::TaskUuids => {
                            meta.task_uuids =
                                map.next_value::<Option<Vec<String>>>()?.unwrap_or_default()
                        }
                        GroupField::ChordTriggered => {
                            meta.chord_triggered = map.next_value::<Lenient<bool>>()?.0
                        }
                        GroupField::Lock => meta.lock = map.next_value::<Lenient<bool>>()?.0,
                        GroupField::CreatedAt => meta.created_at = map.next_value::<TimeValue>()?.0,
                        GroupField::Ttl => meta.ttl = map.next_value::<Lenient<i64>>()?.0,
                        GroupField::Unknown => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(meta)
            }
        }
        d.deserialize_map(GroupVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_has_null_results_and_success_without_values_has_empty_ones() {
        let failure = serde_json::to_value(TaskState::failure("t", "n", "boom")).unwrap();
        assert!(failure["Results"].is_null());
        let success = serde_json::to_value(TaskState::success("t", "n", vec![])).unwrap();
        assert_eq!(success["Results"], serde_json::json!([]));
    }

    #[test]
    fn merge_keeps_name_and_creation_time() {
        let pending = TaskState::pending("t", "add");
        let mut started = TaskState::started("t", "");
        started.merge_from_previous(&pending);
        assert_eq!(started.task_name, "add");
        assert_eq!(started.created_at, pending.created_at);
    }

    #[test]
    fn unknown_states_are_kept() {
        let st: TaskState = serde_json::from_str(r#"{"State":"REVOKED"}"#).unwrap();
        assert_eq!(st.state, State::Other("REVOKED".into()));
        assert_eq!(serde_json::to_value(&st).unwrap()["State"], "REVOKED");
    }
}
