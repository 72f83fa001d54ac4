//! The in-process transport (`memory://`), the default: a broker, a result backend and a lock that live in
//! the process. `memory://` is private to one [`Server`](crate::Server); `memory://name` is shared by every
//! server of the process that names it.

mod backend;
mod broker;
mod lock;
mod named;
mod states;

pub use backend::MemoryBackend;
pub use broker::MemoryBroker;
pub use lock::MemoryLock;
