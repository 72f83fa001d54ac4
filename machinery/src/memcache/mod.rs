//! The memcached transport (`memcache://host1:port1[,host2:port2...]`, over TLS `memcaches://…`): a
//! result backend, record for record what Go machinery's memcache backend stores, over a small
//! text-protocol client of our own (`docs/memcache.md` says why).

mod backend;
mod client;
mod tls;
mod unique;
mod url;

pub use backend::{
    parse_url, server_index, ConnectError, MemcacheBackend, MemcacheError, CHORD_PROGRESS_SUFFIX,
    DEFAULT_PORT,
};
