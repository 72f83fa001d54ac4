//! The Redis transport (`redis://`, `rediss://`, `redis+socket://`): the broker, the result backend, the
//! periodic-task lock and the inspection commands, over one connection layer, wire-compatible with Go
//! machinery's Redis broker and backend. `docs/redis.md` describes the keys and the guarantees.
//!
//! When the broker and the result backend name the same Redis database, [`connect`](crate::connect)
//! takes a broker that holds its backend half ([`RedisBroker::with_backend`]): the PENDING state rides
//! with the publish, and a final state with the acknowledgement, in one round trip.
//!
//! Every Lua script of the room is a file in `scripts/`, whose header names its KEYS and ARGV and what it
//! guarantees, so the atomic steps can be read (and reviewed) without the Rust around them.

mod backend;
mod blocking;
mod broker;
mod client;
mod cluster;
mod conn;
mod endpoint;
mod inspect;
mod lock;
mod lua;
mod named;
mod open;
mod sentinel;
pub mod url;

pub use backend::{completion_channel, RedisBackend, GO_CHORD_LOCK_KEY};
pub use broker::{cluster_dead_letter_key, dead_letter_key, RedisBroker, CANCEL_CHANNEL};
pub use lock::RedisLock;
pub use url::{RedisUrl, RedisUrlError};
