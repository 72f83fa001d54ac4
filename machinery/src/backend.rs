//! Result backends store task states and group records. Each implementation sits in its transport's room
//! ([`crate::memory`], [`crate::redis`], [`crate::amqp`], [`crate::memcache`]; the `null` backend here)
//! and is chosen at run time from the result backend URL's scheme ([`crate::connect`]). The trait knows
//! nothing of brokers.

pub mod null;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::wire::state::{GroupMeta, State, TaskState};

/// A boxed error from a backend's client library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The backend could not be reached.
    #[error("cannot connect to result backend {url}: {source}")]
    Connect {
        /// The URL, without password.
        url: String,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// An operation failed.
    #[error("result backend {operation} failed: {source}")]
    Operation {
        /// What we were doing.
        operation: &'static str,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// The server refused the operation for a reason that trying again cannot fix (Redis `WRONGTYPE`
    /// on the task's key and other server errors that are not about the connection; an AMQP queue name
    /// over 255 bytes). The worker dead-letters a task whose final state fails so.
    #[error("result backend {operation} refused: {source}")]
    Refused {
        /// What we were doing.
        operation: &'static str,
        /// The server's or client's error.
        #[source]
        source: BoxError,
    },
    /// A stored record is not valid JSON of the expected shape.
    #[error("result backend record {key}: {source}")]
    Decode {
        /// The key.
        key: String,
        /// serde's description.
        #[source]
        source: serde_json::Error,
    },
    /// A record is larger than the backend can store.
    #[error("result backend record {key} is {size} bytes; the limit is {limit} bytes")]
    TooLarge {
        /// The key.
        key: String,
        /// Its size.
        size: usize,
        /// The backend's limit.
        limit: usize,
    },
    /// This backend does not keep results (the `null` backend).
    #[error("the {backend} result backend does not store {what}")]
    NotStored {
        /// The backend kind.
        backend: &'static str,
        /// What it does not store.
        what: &'static str,
    },
    /// The group record is missing.
    #[error("group {0} is not in the result backend")]
    UnknownGroup(String),
    /// The id names a key the backend keeps for something else (a queue, its own bookkeeping): a record
    /// stored there would destroy it, so the backend will never store it.
    #[error("result backend refuses record {key}: {reason}")]
    ReservedKey {
        /// The key (task or group id).
        key: String,
        /// Why.
        reason: String,
    },
}

impl BackendError {
    /// An operation error from any client error.
    pub fn operation(operation: &'static str, source: impl Into<BoxError>) -> Self {
        BackendError::Operation {
            operation,
            source: source.into(),
        }
    }

    /// A [refusal](BackendError::Refused) from any client error.
    pub fn refused(operation: &'static str, source: impl Into<BoxError>) -> Self {
        BackendError::Refused {
            operation,
            source: source.into(),
        }
    }

    /// Whether trying the same operation again cannot help (a refusal, a record too large, a backend
    /// that stores nothing), as opposed to a transient failure (I/O, a timeout, a refused connection).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            BackendError::Refused { .. }
                | BackendError::ReservedKey { .. }
                | BackendError::TooLarge { .. }
                | BackendError::NotStored { .. }
        )
    }
}

/// A result backend.
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// A short name for logs and errors (`memory`, `redis`, ...).
    fn kind(&self) -> &'static str;

    /// Stores a task's state, replacing the previous one. Backends that can (Redis, memory) keep the
    /// previous record's task name and creation time when the new one has none, as Go's Redis backend does.
    async fn set_state(&self, state: &TaskState) -> Result<(), BackendError>;

    /// Stores several states at once (a batch of RECEIVED states, a group's PENDING states).
    async fn set_states(&self, states: &[TaskState]) -> Result<(), BackendError> {
        for state in states {
            self.set_state(state).await?;
        }
        Ok(())
    }

    /// Stores RECEIVED unless the stored record [stops a start](TaskState::stops_a_start): the task was
    /// [revoked](crate::Server::revoke), or its SUCCESS is stored (this is a second copy of its message);
    /// then returns `false`, storing nothing. The default reads then writes; backends may do it in one
    /// step.
    async fn set_received(&self, state: &TaskState) -> Result<bool, BackendError> {
        if self
            .get_state(&state.task_uuid)
            .await?
            .is_some_and(|s| s.stops_a_start())
        {
            return Ok(false);
        }
        self.set_state(state).await?;
        Ok(true)
    }

    /// Stores RECEIVED then STARTED, as a worker does before running a task, unless the stored record
    /// [stops a start](TaskState::stops_a_start) (revoked, or SUCCESS): then returns `false` and stores
    /// nothing. The default calls
    /// [`Backend::set_received`] and [`Backend::set_state`]; backends that pipeline (Redis) write both in
    /// one round trip.
    async fn set_received_and_started(
        &self,
        received: &TaskState,
        started: &TaskState,
    ) -> Result<bool, BackendError> {
        received_then_started(self, received, started).await
    }

    /// [`Backend::set_received_and_started`] for a batch of tasks (what a worker fetched at once), given
    /// each task's STARTED (its RECEIVED is the same record in state RECEIVED), with one result per task
    /// in order. The default makes the calls concurrently; backends that pipeline (Redis) write the whole
    /// batch in one round trip, and backends that can write both states in one atomic step write
    /// STARTED alone (RECEIVED could never be seen). A worker keeps each STARTED to become the task's
    /// final state, so the batch costs no copies of the ids and names.
    async fn set_started_many(&self, started: &[TaskState]) -> Vec<Result<bool, BackendError>> {
        futures_util::future::join_all(started.iter().map(|started| start_in_turn(self, started)))
            .await
    }

    /// The stored state of a task, if any.
    async fn get_state(&self, task_uuid: &str) -> Result<Option<TaskState>, BackendError>;

    /// Checks that the backend answers, cheaply: a worker that could not store a state probes with it
    /// before it fetches again. An error that [is permanent](BackendError::is_permanent) still counts
    /// as an answer. The default reads the state of [`PING_ID`], which no task has.
    async fn ping(&self) -> Result<(), BackendError> {
        self.get_state(PING_ID).await.map(|_| ())
    }

    /// Waits until the task is SUCCESS or FAILURE, or `timeout` passes; returns the last state seen.
    ///
    /// The default polls with a short, growing interval (1 ms to 50 ms); backends that can be notified
    /// do better.
    async fn wait_for_completion(
        &self,
        task_uuid: &str,
        timeout: Duration,
    ) -> Result<Option<TaskState>, BackendError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut interval = Duration::from_millis(1);
        loop {
            let state = self.get_state(task_uuid).await?;
            if state.as_ref().is_some_and(TaskState::is_completed) {
                return Ok(state);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(state);
            }
            tokio::time::sleep(interval.min(deadline - now)).await;
            interval = (interval * 2).min(Duration::from_millis(50));
        }
    }

    /// Stores a new group record (written by the sender before the members are published).
    async fn init_group(&self, meta: &GroupMeta) -> Result<(), BackendError>;

    /// The group record, if any.
    async fn get_group(&self, group_uuid: &str) -> Result<Option<GroupMeta>, BackendError>;

    /// The states of a group's members in group order (missing states are skipped).
    async fn group_states(&self, group_uuid: &str) -> Result<Vec<TaskState>, BackendError> {
        let meta = existing_group(self, group_uuid).await?;
        let mut states = Vec::with_capacity(meta.task_uuids.len());
        for uuid in &meta.task_uuids {
            if let Some(state) = self.get_state(uuid).await? {
                states.push(state);
            }
        }
        Ok(states)
    }

    /// Records that member `task_uuid` of the group has finished (its final state is stored), and
    /// returns `true` for exactly one member per group: the one whose call completes the group (the
    /// winner), which then sends the chord callback. Calling again for the same member (a redelivered
    /// message, a retry after a lost reply) counts it once; the winner's later calls return `true`
    /// again, so a winner whose answer was lost still sends the callback (at least once), while every
    /// other member's calls return `false`. The group record's `ChordTriggered` flag is set by the
    /// winning call.
    async fn complete_group_member(
        &self,
        group_uuid: &str,
        task_uuid: &str,
        group_task_count: u32,
    ) -> Result<bool, BackendError>;

    /// Claims the unique-task key `key` for task `task_uuid` for `ttl`, unless another task holds it
    /// (see [`Signature::unique_for`](crate::Signature::unique_for)): returns `None` once `task_uuid`
    /// holds it, else the id of the task that does. The check and the claim are one atomic step across
    /// every process sharing the backend. The default refuses: a backend without such a step (RabbitMQ,
    /// memcached, `null`) cannot make tasks unique.
    async fn claim_unique(
        &self,
        key: &str,
        task_uuid: &str,
        ttl: Duration,
    ) -> Result<Option<String>, BackendError> {
        let _ = (key, task_uuid, ttl);
        Err(BackendError::NotStored {
            backend: self.kind(),
            what: "unique-task keys (use a Redis or in-memory result backend for unique tasks)",
        })
    }

    /// Releases the unique-task key `key` if task `task_uuid` holds it (a task that reached its final
    /// state). The default has nothing to release.
    async fn release_unique(&self, key: &str, task_uuid: &str) -> Result<(), BackendError> {
        let _ = (key, task_uuid);
        Ok(())
    }

    /// Reserves the next start in the rate-limit schedule `key` (one start per `interval`), shared by
    /// every process that uses this backend, and returns how long from now it is. `None`: the backend
    /// keeps no shared schedules, and each worker process keeps its own (the default).
    async fn reserve_rate_slot(
        &self,
        key: &str,
        interval: Duration,
    ) -> Result<Option<Duration>, BackendError> {
        let _ = (key, interval);
        Ok(None)
    }

    /// Deletes a task's state.
    async fn purge_state(&self, task_uuid: &str) -> Result<(), BackendError>;

    /// Deletes a group record.
    async fn purge_group(&self, group_uuid: &str) -> Result<(), BackendError>;
}

/// The id [`Backend::ping`] reads by default: no task has it (task ids are `task_<uuid>`).
pub const PING_ID: &str = "machinery_backend_ping";

/// The group record, or [`BackendError::UnknownGroup`] when there is none.
pub(crate) async fn existing_group<B: Backend + ?Sized>(
    backend: &B,
    group_uuid: &str,
) -> Result<GroupMeta, BackendError> {
    backend
        .get_group(group_uuid)
        .await?
        .ok_or_else(|| BackendError::UnknownGroup(group_uuid.to_owned()))
}

/// [`Backend::set_received_and_started`] for one task given its STARTED (its RECEIVED made from it).
pub(crate) async fn start_in_turn<B: Backend + ?Sized>(
    backend: &B,
    started: &TaskState,
) -> Result<bool, BackendError> {
    let received = started.clone().in_state(State::Received);
    backend.set_received_and_started(&received, started).await
}

/// [`Backend::set_received`], then [`Backend::set_state`] for STARTED unless the task was revoked: the
/// two calls in turn, for backends with no single step for the pair.
pub(crate) async fn received_then_started<B: Backend + ?Sized>(
    backend: &B,
    received: &TaskState,
    started: &TaskState,
) -> Result<bool, BackendError> {
    if !backend.set_received(received).await? {
        return Ok(false);
    }
    backend.set_state(started).await?;
    Ok(true)
}

// Where the backends and `connect` lived before each transport had a room of its own; these paths stay
// so that code naming them keeps compiling.

pub use crate::connect::{backend as connect, backend_schemes as supported_schemes};

/// The in-process result backend (now [`crate::memory`]).
pub mod memory {
    pub use crate::memory::MemoryBackend;
}

/// The Redis result backend (now [`crate::redis`]).
#[cfg(feature = "redis")]
pub mod redis {
    pub use crate::redis::{completion_channel, RedisBackend, GO_CHORD_LOCK_KEY};
}

/// The AMQP result backend (now [`crate::amqp`]).
#[cfg(feature = "amqp")]
pub mod amqp {
    pub use crate::amqp::{group_record_queue, group_states_queue, AmqpBackend};
}

/// The memcached result backend (now [`crate::memcache`]).
#[cfg(feature = "memcache")]
pub mod memcache {
    pub use crate::memcache::{
        parse_url, server_index, MemcacheBackend, MemcacheError, CHORD_PROGRESS_SUFFIX,
        DEFAULT_PORT,
    };
}
