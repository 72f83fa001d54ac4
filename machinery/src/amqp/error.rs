//! What can go wrong talking to RabbitMQ, and whether trying again on a fresh connection can help.

use std::time::Duration;

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::ErrorKind;

/// An AMQP failure with the operation it interrupted. Never carries a password: URLs are redacted before
/// they get here, and lapin's own errors do not contain the URL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum AmqpError {
    /// No URL of the list could be connected to.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL, password replaced by `***`.
        url: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// The TLS set-up or handshake failed: a certificate or key, which no retry mends.
    #[error("cannot connect to {url}: {source}")]
    Tls {
        /// The URL, password replaced by `***`.
        url: String,
        /// What is wrong, in plain words.
        #[source]
        source: crate::tls::TlsError,
    },
    /// Connecting took too long.
    #[error("connecting to {url} timed out after {timeout:?}")]
    ConnectTimeout {
        /// The URL, password replaced by `***`.
        url: String,
        /// The limit.
        timeout: Duration,
    },
    /// An AMQP method failed.
    #[error("{what}: {source}")]
    Lapin {
        /// What we were doing, with the names involved.
        what: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// The broker answered a publish with a nack: it could not store the message.
    #[error("RabbitMQ refused (nacked) the message published to exchange {exchange:?} with routing key {routing_key:?}")]
    Nacked {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
    },
    /// RabbitMQ did not confirm a publish in time (it may still store the message).
    #[error("RabbitMQ did not confirm the message published to exchange {exchange:?} with routing key {routing_key:?} within {timeout:?} (is it blocking publishers? see its memory and disk alarms)")]
    Unconfirmed {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
        /// The limit.
        timeout: Duration,
    },
    /// No queue is bound for the routing key, so RabbitMQ returned the message instead of dropping it.
    #[error("no queue is bound to exchange {exchange:?} with routing key {routing_key:?}: RabbitMQ returned the message ({reply})")]
    Unroutable {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
        /// RabbitMQ's reply text.
        reply: String,
    },
    /// A name is longer than AMQP's 255-byte limit for queue names and routing keys.
    #[error("{what} {name:?} is {len} bytes long; AMQP allows at most 255")]
    NameTooLong {
        /// Which name.
        what: &'static str,
        /// The name, cut short.
        name: String,
        /// Its length.
        len: usize,
    },
    /// An operation did not finish in time.
    #[error("{what} did not finish within {timeout:?}")]
    Timeout {
        /// What we waited for.
        what: String,
        /// The limit.
        timeout: Duration,
    },
    /// A JSON record (group record, task state) could not be encoded or decoded.
    #[error("{what}: {source}")]
    Json {
        /// Which record.
        what: String,
        /// serde's description.
        #[source]
        source: serde_json::Error,
    },
    /// An acknowledgement could not be sent (its channel or connection failed on the way).
    #[error("acknowledging a message of queue {queue:?} failed: {reason}")]
    Unacknowledged {
        /// The queue.
        queue: String,
        /// What lapin said.
        reason: String,
    },
    /// The consumer was cancelled by the broker (its queue was deleted) or its channel closed.
    #[error("the consumer of queue {queue:?} was cancelled or its channel closed")]
    ConsumerGone {
        /// The queue.
        queue: String,
    },
}

impl AmqpError {
    /// Wraps a lapin error with what we were doing.
    pub(crate) fn lapin(what: impl Into<String>, source: lapin::Error) -> Self {
        AmqpError::Lapin {
            what: what.into(),
            source,
        }
    }

    /// Whether the failure is about the connection or channel rather than the request, so that the same
    /// request on a fresh connection or channel may succeed.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            AmqpError::Connect { .. }
            | AmqpError::ConnectTimeout { .. }
            | AmqpError::Timeout { .. }
            | AmqpError::ConsumerGone { .. }
            | AmqpError::Unacknowledged { .. } => true,
            AmqpError::Lapin { source, .. } => lapin_is_transient(source),
            AmqpError::Nacked { .. }
            | AmqpError::Unconfirmed { .. }
            | AmqpError::Unroutable { .. }
            | AmqpError::NameTooLong { .. }
            | AmqpError::Json { .. }
            | AmqpError::Tls { .. } => false,
        }
    }

    /// The AMQP reply code of a channel error (404 NOT_FOUND, 406 PRECONDITION_FAILED, ...).
    pub(crate) fn soft_error(&self) -> Option<AMQPSoftError> {
        match self {
            AmqpError::Lapin { source, .. } => soft_error(source),
            _ => None,
        }
    }
}

/// Connection-level failures (I/O, heartbeat, a connection closed by the broker or an admin) and uses of
/// a channel that an earlier failure closed are transient; channel errors the broker raised because of
/// the request itself (404, 406, 403, ...) are not.
fn lapin_is_transient(error: &lapin::Error) -> bool {
    match error.kind() {
        ErrorKind::IOError(_)
        | ErrorKind::RuntimeShutdownError(_)
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::InvalidChannel(_)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::ParsingError(_)
        | ErrorKind::SerialisationError(_) => true,
        ErrorKind::ProtocolError(amqp) => matches!(amqp.kind(), AMQPErrorKind::Hard(_)),
        _ => false,
    }
}

/// The soft (channel-level) AMQP error inside a lapin error, if any.
fn soft_error(error: &lapin::Error) -> Option<AMQPSoftError> {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}
