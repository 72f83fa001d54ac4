//! The crate-wide error type, and the errors of sending.

use crate::backend::BackendError;
use crate::broker::BrokerError;
use crate::config::ConfigError;
use crate::result::ResultError;
use crate::wire::args::EncodeError;
use crate::worker::WorkerError;

/// Why a task could not be sent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// An argument could not be encoded.
    #[error("{0}")]
    Encode(String),
    /// The signature could not be written as JSON.
    #[error("cannot encode task {task} as JSON: {source}")]
    Json {
        /// The task name.
        task: String,
        /// serde's description.
        #[source]
        source: serde_json::Error,
    },
    /// The PENDING state could not be stored.
    #[error("cannot store the PENDING state of task {task}: {source}")]
    Backend {
        /// The task name.
        task: String,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
    /// The broker did not take the message.
    #[error("cannot publish task {task}: {source}")]
    Broker {
        /// The task name.
        task: String,
        /// The broker's error.
        #[source]
        source: BrokerError,
    },
    /// A workflow that cannot be sent as built (for example an empty group).
    #[error("invalid workflow: {0}")]
    Workflow(String),
}

impl SendError {
    /// Whether sending the same signature again cannot help: it cannot be encoded, the workflow is
    /// invalid, or the broker or the backend refused it for good (see [`BrokerError::is_permanent`] and
    /// [`BackendError::is_permanent`]). Lost connections and time-outs are transient.
    pub fn is_permanent(&self) -> bool {
        match self {
            SendError::Encode(_) | SendError::Json { .. } | SendError::Workflow(_) => true,
            SendError::Backend { source, .. } => source.is_permanent(),
            SendError::Broker { source, .. } => source.is_permanent(),
        }
    }
}

impl From<EncodeError> for SendError {
    fn from(e: EncodeError) -> Self {
        SendError::Encode(e.to_string())
    }
}

/// Any error of this crate, for applications that want a single type to `?` into.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The broker.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The result backend.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Sending a task.
    #[error(transparent)]
    Send(#[from] SendError),
    /// Waiting for or reading a result.
    #[error(transparent)]
    Result(#[from] ResultError),
    /// Running a worker.
    #[error(transparent)]
    Worker(#[from] WorkerError),
}
