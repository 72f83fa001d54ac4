//! [`AsyncResult`]: a typed handle to a sent task's result.

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::backend::BackendError;
use crate::wire::args::{decode_results, ResultDecodeError};
use crate::wire::state::{State, TaskState};
use crate::Server;

/// Why a result could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResultError {
    /// The task did not finish in time.
    #[error("task {task} ({uuid}) did not finish within {timeout:?} (last state: {})", last_state.as_ref().map_or("none", State::as_str))]
    Timeout {
        /// The task name, if known.
        task: String,
        /// The task id.
        uuid: String,
        /// How long we waited.
        timeout: Duration,
        /// The last state seen.
        last_state: Option<State>,
    },
    /// The task failed; `error` is its error text.
    #[error("task {task} ({uuid}) failed: {error}")]
    Failed {
        /// The task name.
        task: String,
        /// The task id.
        uuid: String,
        /// The FAILURE state's error text.
        error: String,
    },
    /// The task succeeded, but its results are not of the expected type.
    #[error("task {task} ({uuid}) result: {source}")]
    Decode {
        /// The task name.
        task: String,
        /// The task id.
        uuid: String,
        /// What did not fit.
        #[source]
        source: ResultDecodeError,
    },
    /// A member of a group failed (or did not finish); `index` is its 0-based position in the group.
    #[error("group {group_uuid} member {index}: {source}")]
    GroupMember {
        /// The group id.
        group_uuid: String,
        /// The member's position in the group.
        index: usize,
        /// What happened to it.
        #[source]
        source: Box<ResultError>,
    },
    /// A step of a chain failed (or did not finish); `index` is its 0-based position in the chain.
    #[error("chain step {index}: {source}")]
    ChainStep {
        /// The step's position in the chain.
        index: usize,
        /// What happened to it.
        #[source]
        source: Box<ResultError>,
    },
    /// The task's progress is not of the expected type.
    #[error("task {task} ({uuid}) progress: {source}")]
    Progress {
        /// The task name.
        task: String,
        /// The task id.
        uuid: String,
        /// serde's description.
        #[source]
        source: serde_json::Error,
    },
    /// The backend could not be read.
    #[error("reading the result of task {uuid}: {source}")]
    Backend {
        /// The task id.
        uuid: String,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
}

impl ResultError {
    /// Whether the task failed because it expired before a worker started it
    /// ([`Signature::expires_at`](crate::Signature::expires_at)).
    pub fn is_expired(&self) -> bool {
        matches!(self, ResultError::Failed { error, .. } if error.starts_with(crate::wire::state::EXPIRED_ERROR_PREFIX))
    }
}

/// The result of a sent task, typed by what the task returns.
pub struct AsyncResult<T> {
    server: Server,
    uuid: String,
    task_name: String,
    _output: PhantomData<fn() -> T>,
}

impl<T> Clone for AsyncResult<T> {
    fn clone(&self) -> Self {
        AsyncResult::new(
            self.server.clone(),
            self.uuid.clone(),
            self.task_name.clone(),
        )
    }
}

impl<T> fmt::Debug for AsyncResult<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncResult")
            .field("uuid", &self.uuid)
            .field("task", &self.task_name)
            .field("output", &std::any::type_name::<T>())
            .finish()
    }
}

impl<T> AsyncResult<T> {
    pub(crate) fn new(server: Server, uuid: String, task_name: String) -> Self {
        AsyncResult {
            server,
            uuid,
            task_name,
            _output: PhantomData,
        }
    }

    /// The task id.
    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// The task name (empty for handles made from an id alone).
    pub fn task_name(&self) -> &str {
        &self.task_name
    }

    /// The task's current state, if the backend has one.
    pub async fn state(&self) -> Result<Option<TaskState>, ResultError> {
        self.server
            .backend()
            .get_state(&self.uuid)
            .await
            .map_err(|source| ResultError::Backend {
                uuid: self.uuid.clone(),
                source,
            })
    }

    /// Waits until the task is SUCCESS or FAILURE and returns that state (a failure is not an error here).
    pub async fn wait(&self, timeout: Duration) -> Result<TaskState, ResultError> {
        let state = self
            .server
            .backend()
            .wait_for_completion(&self.uuid, timeout)
            .await
            .map_err(|source| ResultError::Backend {
                uuid: self.uuid.clone(),
                source,
            })?;
        match state {
            Some(state) if state.is_completed() => Ok(state),
            other => Err(ResultError::Timeout {
                task: self.name_from(other.as_ref()),
                uuid: self.uuid.clone(),
                timeout,
                last_state: other.map(|s| s.state),
            }),
        }
    }

    /// The progress the task last reported with
    /// [`TaskContext::set_progress`](crate::TaskContext::set_progress), read as `P`; `None` before the
    /// first report and once the task has finished (its final state replaces the running one).
    ///
    /// ```
    /// # async fn demo() -> Result<(), machinery::Error> {
    /// use std::time::Duration;
    /// use machinery::{task, Config, Server, TaskContext, TaskError, Worker};
    ///
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Done {
    ///     done: u32,
    ///     total: u32,
    /// }
    ///
    /// #[task]
    /// async fn import(ctx: &TaskContext, total: u32) -> Result<u32, TaskError> {
    ///     for done in 1..=total {
    ///         ctx.set_progress(&Done { done, total }).await?;
    ///     }
    ///     Ok(total)
    /// }
    ///
    /// let server = Server::new(Config::default()).await?;
    /// let worker = Worker::new(&server).register(import::task()).start().await?;
    /// let result = import::send(&server, 3).await?;
    /// if let Some(p) = result.progress::<Done>().await? {
    ///     assert!(p.done <= p.total);
    /// }
    /// assert_eq!(result.get(Duration::from_secs(5)).await?, 3);
    /// worker.shutdown(Duration::from_secs(5)).await?;
    /// # Ok(()) }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
    /// ```
    pub async fn progress<P: DeserializeOwned>(&self) -> Result<Option<P>, ResultError> {
        let Some(state) = self.state().await? else {
            return Ok(None);
        };
        let Some(progress) = state.progress.filter(|_| !state.state.is_completed()) else {
            return Ok(None);
        };
        serde_json::from_value(progress)
            .map(Some)
            .map_err(|source| ResultError::Progress {
                task: if state.task_name.is_empty() {
                    self.task_name.clone()
                } else {
                    state.task_name
                },
                uuid: self.uuid.clone(),
                source,
            })
    }

    fn name_from(&self, state: Option<&TaskState>) -> String {
        match state {
            Some(state) if !state.task_name.is_empty() => state.task_name.clone(),
            _ => self.task_name.clone(),
        }
    }

    /// Cancels the task, waiting or running ([`Server::cancel`]).
    pub async fn cancel(&self) -> Result<(), crate::CancelError> {
        self.server.cancel(&self.uuid).await
    }

    /// Makes the handle's type another.
    pub fn retype<U>(self) -> AsyncResult<U> {
        AsyncResult::new(self.server, self.uuid, self.task_name)
    }
}

impl<T: DeserializeOwned> AsyncResult<T> {
    /// Waits up to `timeout` for the task to finish and returns its output, or its failure as an error.
    ///
    /// Waiting does not poll with sleeps where the backend can notify (memory); elsewhere it polls with a
    /// short, growing interval.
    pub async fn get(&self, timeout: Duration) -> Result<T, ResultError> {
        let state = self.wait(timeout).await?;
        decode_state(&state, &self.name_from(Some(&state)))
    }
}

/// The output in a completed state, or its failure as an error.
pub(crate) fn decode_state<T: DeserializeOwned>(
    state: &TaskState,
    task: &str,
) -> Result<T, ResultError> {
    match &state.state {
        State::Success => {
            decode_results(state.results.as_deref().unwrap_or_default()).map_err(|source| {
                ResultError::Decode {
                    task: task.to_owned(),
                    uuid: state.task_uuid.clone(),
                    source,
                }
            })
        }
        _ => Err(ResultError::Failed {
            task: task.to_owned(),
            uuid: state.task_uuid.clone(),
            error: state.error.clone(),
        }),
    }
}
