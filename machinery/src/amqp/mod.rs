//! The AMQP 0-9-1 transport (`amqp://`, `amqps://`) on RabbitMQ: the broker and the result backend,
//! wire-compatible with Go machinery's. `docs/amqp.md` describes the declarations and the guarantees.
//!
//! `session` holds what both roles share: a connection per role that reconnects with back-off, reusable
//! channels, checked declarations, confirmed publishing. `broker` and `backend` are the two roles, each
//! split along its own seams (publishing, ETA, consuming; task states, groups, notifications);
//! `inspect` answers what the CLI and the worker may ask the broker about its queues.

mod backend;
mod broker;
mod error;
mod inspect;
mod session;
mod table;
mod tls;
mod url;

pub use backend::{group_record_queue, group_states_queue, AmqpBackend};
pub use broker::{
    dead_letter_queue, AmqpBroker, CANCEL_EXCHANGE, DEAD_LETTERED_AT_HEADER,
    DEAD_LETTER_QUEUE_HEADER, DEAD_LETTER_REASON_HEADER,
};
pub use url::ConnectError;
