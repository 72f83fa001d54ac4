//! What can go wrong in a command, and the exit status it gives.

use machinery::backend::BackendError;
use machinery::broker::BrokerError;
use machinery::{ConfigError, SendError};

/// Why a command failed. Each message names what was being done and what went wrong.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// The configuration could not be loaded.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The broker is the in-process `memory://` one: the tool would only see its own empty queues.
    #[error("the broker is {broker:?}, the in-process broker: this tool would inspect its own empty queues, not those of your workers and senders (no other process can reach an in-process broker). {hint}")]
    InProcessBroker {
        /// The broker URL.
        broker: String,
        /// How to name the real broker.
        hint: &'static str,
    },
    /// The broker or result backend could not be reached (or its URL is wrong).
    #[error(transparent)]
    Connect(machinery::Error),
    /// A broker operation failed.
    #[error("{what}: {source}")]
    Broker {
        /// What the command was doing.
        what: String,
        /// The broker's error.
        #[source]
        source: BrokerError,
    },
    /// The broker cannot answer this command at all.
    #[error("{what}: the {broker} broker cannot answer this: {why}")]
    Unsupported {
        /// What the command was doing.
        what: String,
        /// The broker kind.
        broker: &'static str,
        /// Why not.
        why: String,
    },
    /// A result backend operation failed.
    #[error("{what}: {source}")]
    Backend {
        /// What the command was doing.
        what: String,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
    /// Sending a task failed.
    #[error(transparent)]
    Send(#[from] SendError),
    /// The thing asked about does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A task sent with `--wait` failed or did not finish in time.
    #[error("{0}")]
    Task(String),
    /// The command line is well-formed but cannot be carried out as given.
    #[error("{0}")]
    Usage(String),
    /// The dashboard could not listen or serve.
    #[error("{what}: {source}")]
    Serve {
        /// What it was doing.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Writing the answer failed.
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

impl CliError {
    /// 2 for usage errors (as clap's own), 1 for everything else.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            _ => 1,
        }
    }
}
