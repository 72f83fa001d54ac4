//! What can stop a benchmark run.

use std::time::Duration;

/// Why the benchmark (or its worker process) stopped. Each message says what was being done.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BenchError {
    /// The options do not make a runnable benchmark.
    #[error("{0}")]
    Usage(String),
    /// machinery refused or failed (connecting, sending, waiting for a result, running the worker).
    #[error(transparent)]
    Machinery(#[from] machinery::Error),
    /// A raw Redis command of the benchmark itself failed.
    #[error("{what}: {source}")]
    Redis {
        /// What the benchmark was doing.
        what: String,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
    /// A raw AMQP operation of the benchmark itself failed.
    #[error("{what}: {source}")]
    Amqp {
        /// What the benchmark was doing.
        what: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// The worker process misbehaved: it could not be started, said something unexpected, or died.
    #[error("worker process: {0}")]
    Child(String),
    /// Something did not happen in time.
    #[error("{what} did not finish within {timeout:?}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// Something the benchmark did not expect (a measurement that cannot be trusted).
    #[error("{0}")]
    Failed(String),
    /// Reading /proc, talking to the worker process or writing the record failed.
    #[error("{what}: {source}")]
    Io {
        /// What the benchmark was doing.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl From<machinery::SendError> for BenchError {
    fn from(e: machinery::SendError) -> Self {
        BenchError::Machinery(e.into())
    }
}

impl From<machinery::ResultError> for BenchError {
    fn from(e: machinery::ResultError) -> Self {
        BenchError::Machinery(e.into())
    }
}

impl From<machinery::WorkerError> for BenchError {
    fn from(e: machinery::WorkerError) -> Self {
        BenchError::Machinery(e.into())
    }
}

impl BenchError {
    /// A Redis error with what we were doing.
    pub(crate) fn redis(what: impl Into<String>) -> impl FnOnce(redis::RedisError) -> BenchError {
        let what = what.into();
        move |source| BenchError::Redis { what, source }
    }

    /// An AMQP error with what we were doing.
    pub(crate) fn amqp(what: impl Into<String>) -> impl FnOnce(lapin::Error) -> BenchError {
        let what = what.into();
        move |source| BenchError::Amqp { what, source }
    }

    /// An I/O error with what we were doing.
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
        let what = what.into();
        move |source| BenchError::Io { what, source }
    }
}
