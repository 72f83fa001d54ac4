//! A small client for memcached's text protocol over tokio: the handful of commands the result backend
//! needs (`get`/`gets`, `set`, `add`, `cas`, `delete`, `stats settings`), a pool of connections per
//! server, and gomemcache's choice of server for a key. `docs/memcache.md` says why we do not use a
//! client crate.
//!
//! Every command waits for its reply (no `noreply`), so a refused write is an error, never a silent drop.
//! A connection goes back to its pool only after a complete, expected reply; after an error, a time-out
//! or a cancelled call it is dropped, so a half-read reply can never be read as the answer to the next
//! command.

mod conn;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use self::conn::{Conn, Item};
use super::tls::MemcacheTls;

/// memcached's default item size limit (`-I`, `item_size_max`): 1 MiB.
pub(crate) const DEFAULT_ITEM_SIZE_MAX: usize = 1024 * 1024;

/// What an item costs besides its key and value, as memcached 1.6 (64-bit) counts it against
/// `item_size_max`: a 48-byte header, the 8-byte CAS id, the key's NUL and the value's `\r\n`. Measured
/// against memcached 1.6.18: with the default limit a 1-byte key takes a value of at most 1 048 516 bytes.
pub(crate) const ITEM_OVERHEAD: usize = 59;

/// The longest key memcached accepts.
const MAX_KEY_LEN: usize = 250;
/// Idle connections kept per server.
const MAX_IDLE: usize = 16;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one command may take, reply included.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// Reply lines (not values) longer than this are not memcached talking.
const MAX_LINE: u64 = 4096;
/// Values longer than this in a reply are refused rather than allocated (memcached's own ceiling for
/// `-I` is 1 GiB).
const MAX_VALUE: usize = 1 << 30;
/// Keys per `get` command when reading many.
const GET_BATCH: usize = 100;

/// Why a memcached command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemcacheError {
    /// The connection failed (refused, reset, closed).
    #[error("memcached {server}: {source}")]
    Io {
        /// `host:port`.
        server: String,
        /// The socket's error.
        #[source]
        source: std::io::Error,
    },
    /// The server did not answer in time.
    #[error("memcached {server}: {command} got no reply within {timeout:?}")]
    Timeout {
        /// `host:port`.
        server: String,
        /// The command.
        command: &'static str,
        /// How long we waited.
        timeout: Duration,
    },
    /// The server answered something the protocol does not allow here.
    #[error("memcached {server}: unexpected reply to {command}: {reply:?}")]
    Protocol {
        /// `host:port`.
        server: String,
        /// The command.
        command: &'static str,
        /// What it said (cut to 200 bytes).
        reply: String,
    },
    /// The server refused the command (`ERROR`, `CLIENT_ERROR ...`, `SERVER_ERROR ...`).
    #[error("memcached {server} refused {command} {key}: {reply}")]
    Refused {
        /// `host:port`.
        server: String,
        /// The command.
        command: &'static str,
        /// The key.
        key: String,
        /// The server's error line.
        reply: String,
    },
    /// The server refused to store a value because the item would exceed its item size limit.
    #[error(
        "memcached {server} refused to store {key} ({size} bytes): object too large for cache"
    )]
    TooLarge {
        /// `host:port`.
        server: String,
        /// The key.
        key: String,
        /// The value's size.
        size: usize,
    },
    /// The client was given no servers.
    #[error("no memcached servers are configured")]
    NoServers,
    /// The key cannot be sent to memcached.
    #[error("{key:?} cannot be a memcached key: {reason}")]
    MalformedKey {
        /// The key (cut to 300 characters).
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// How a store command ended when memcached did not refuse it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreReply {
    /// `STORED`.
    Stored,
    /// `NOT_STORED`: `add` of a key that exists (or `cas` of one evicted meanwhile).
    NotStored,
    /// `EXISTS`: `cas` of an item changed since it was read.
    Exists,
    /// `NOT_FOUND`: `cas` of an item that is gone.
    NotFound,
}

/// The store commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreMode {
    /// Store unconditionally.
    Set,
    /// Store only if the key does not exist.
    Add,
    /// Store only if the item is unchanged since `gets` returned this CAS id.
    Cas(u64),
}

/// A pool of connections to each of several memcached servers.
#[derive(Debug)]
pub(crate) struct Client {
    servers: Vec<Server>,
}

struct Server {
    addr: Arc<str>,
    /// TLS for every connection (`memcaches://`).
    tls: Option<Arc<MemcacheTls>>,
    idle: Mutex<Vec<Conn>>,
    item_size_max: AtomicUsize,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .field("item_size_max", &self.item_size_max.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// crc32 (IEEE 802.3, reflected polynomial 0xEDB88320) lookup table, built at compile time.
const CRC32_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut bit = 0;
        while bit < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            bit += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// crc32 IEEE of `bytes` (the checksum of zlib, Ethernet and Go's `crc32.ChecksumIEEE`).
pub(crate) fn crc32_ieee(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc = CRC32_TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The index of the server that holds `key` among `servers` servers, as gomemcache's `ServerList` picks
/// it: crc32 IEEE of the key, modulo the number of servers.
pub(crate) fn server_index(key: &str, servers: usize) -> usize {
    if servers <= 1 {
        return 0;
    }
    // gomemcache hashes at most the key's first 256 bytes; legal keys are at most 250 bytes long.
    let bytes = &key.as_bytes()[..key.len().min(256)];
    (crc32_ieee(bytes) as usize) % servers
}

/// Checks a key as gomemcache's `legalKey` does: 1 to 250 bytes, no spaces or control characters.
pub(crate) fn check_key(key: &str) -> Result<(), MemcacheError> {
    let reason = if key.is_empty() {
        Some("it is empty")
    } else if key.len() > MAX_KEY_LEN {
        Some("it is longer than 250 bytes")
    } else if key.bytes().any(|b| b <= b' ' || b == 0x7f) {
        Some("it contains a space or a control character")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(MemcacheError::MalformedKey {
            key: key.chars().take(300).collect(),
            reason,
        }),
        None => Ok(()),
    }
}

impl Client {
    /// A client of these `host:port` servers (in this order: the order decides where keys go).
    pub(crate) fn new(addrs: Vec<String>) -> Client {
        Client::with_tls(addrs, None)
    }

    /// A client of these servers whose connections use TLS with `tls`, if given.
    pub(crate) fn with_tls(addrs: Vec<String>, tls: Option<Arc<MemcacheTls>>) -> Client {
        Client {
            servers: addrs
                .into_iter()
                .map(|addr| Server {
                    addr: addr.into(),
                    tls: tls.clone(),
                    idle: Mutex::new(Vec::new()),
                    item_size_max: AtomicUsize::new(DEFAULT_ITEM_SIZE_MAX),
                })
                .collect(),
        }
    }

    /// The servers' addresses, in order.
    pub(crate) fn addrs(&self) -> impl Iterator<Item = &str> {
        self.servers.iter().map(|s| &*s.addr)
    }

    fn server(&self, key: &str) -> Result<&Server, MemcacheError> {
        self.servers
            .get(server_index(key, self.servers.len()))
            .ok_or(MemcacheError::NoServers)
    }

    /// The largest value memcached will store under `key`: the item size limit the key's server reported
    /// (1 MiB until it has), less the key and the item's overhead.
    pub(crate) fn max_value_len(&self, key: &str) -> usize {
        let item_size_max = self.server(key).map_or(DEFAULT_ITEM_SIZE_MAX, |server| {
            server.item_size_max.load(Ordering::Relaxed)
        });
        item_size_max.saturating_sub(key.len() + ITEM_OVERHEAD)
    }

    /// Connects to every server and reads its item size limit. Returns each server's outcome.
    pub(crate) async fn probe(&self) -> Vec<(&str, Result<(), MemcacheError>)> {
        let mut outcomes = Vec::with_capacity(self.servers.len());
        for server in &self.servers {
            let outcome = server.settings().await.map(|settings| {
                if let Some(max) = settings
                    .get("item_size_max")
                    .and_then(|v| v.parse::<usize>().ok())
                {
                    server.item_size_max.store(max, Ordering::Relaxed);
                }
            });
            outcomes.push((&*server.addr, outcome));
        }
        outcomes
    }

    /// `get`: the value of `key`, if any.
    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, MemcacheError> {
        check_key(key)?;
        let items = self.server(key)?.retrieve("get", &[key]).await?;
        Ok(items.into_iter().next().map(|item| item.value))
    }

    /// `gets`: the value of `key` and its CAS id, if any.
    pub(crate) async fn gets(&self, key: &str) -> Result<Option<(Vec<u8>, u64)>, MemcacheError> {
        check_key(key)?;
        let server = self.server(key)?;
        let items = server.retrieve("gets", &[key]).await?;
        match items.into_iter().next() {
            None => Ok(None),
            Some(Item {
                value,
                cas: Some(cas),
                ..
            }) => Ok(Some((value, cas))),
            Some(_) => Err(MemcacheError::Protocol {
                server: server.addr.to_string(),
                command: "gets",
                reply: "a VALUE line without a CAS id".into(),
            }),
        }
    }

    /// `get` of many keys at once (one command per server and batch); absent keys are absent from the map.
    pub(crate) async fn get_many(
        &self,
        keys: &[&str],
    ) -> Result<HashMap<String, Vec<u8>>, MemcacheError> {
        if self.servers.is_empty() {
            return Err(MemcacheError::NoServers);
        }
        let mut per_server: Vec<Vec<&str>> = vec![Vec::new(); self.servers.len()];
        for key in keys {
            check_key(key)?;
            per_server[server_index(key, self.servers.len())].push(key);
        }
        let mut found = HashMap::with_capacity(keys.len());
        for (server, keys) in self.servers.iter().zip(per_server) {
            for batch in keys.chunks(GET_BATCH) {
                for item in server.retrieve("get", batch).await? {
                    found.insert(item.key, item.value);
                }
            }
        }
        Ok(found)
    }

    /// `set`, `add` or `cas` of `value` under `key`, expiring at `exptime` (memcached's meaning: seconds
    /// from now up to 30 days, a unix time beyond).
    pub(crate) async fn store(
        &self,
        mode: StoreMode,
        key: &str,
        value: &[u8],
        exptime: u32,
    ) -> Result<StoreReply, MemcacheError> {
        check_key(key)?;
        self.server(key)?.store(mode, key, value, exptime).await
    }

    /// `set` of many items, pipelined: per server and batch of 100, all commands are written at once and
    /// the replies read after. Fails on the first refusal.
    pub(crate) async fn set_many(
        &self,
        items: &[(&str, &[u8])],
        exptime: u32,
    ) -> Result<(), MemcacheError> {
        if self.servers.is_empty() {
            return Err(MemcacheError::NoServers);
        }
        let mut per_server: Vec<Vec<(&str, &[u8])>> = vec![Vec::new(); self.servers.len()];
        for &(key, value) in items {
            check_key(key)?;
            per_server[server_index(key, self.servers.len())].push((key, value));
        }
        for (server, items) in self.servers.iter().zip(per_server) {
            for batch in items.chunks(GET_BATCH) {
                server.set_many(batch, exptime).await?;
            }
        }
        Ok(())
    }

    /// `delete`: whether the key existed.
    pub(crate) async fn delete(&self, key: &str) -> Result<bool, MemcacheError> {
        check_key(key)?;
        self.server(key)?.delete(key).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_ieee_check_value() {
        // The standard check value of CRC-32/ISO-HDLC (zlib's crc32, Go's crc32.ChecksumIEEE).
        assert_eq!(crc32_ieee(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32_ieee(b""), 0);
    }

    #[test]
    fn server_index_is_crc32_modulo_the_server_count() {
        // crc32 values computed independently with Python's zlib.crc32.
        assert_eq!(crc32_ieee(b"foo"), 0x8C73_6521);
        assert_eq!(server_index("foo", 2), 1);
        assert_eq!(server_index("foo", 3), 0x8C73_6521 % 3);
        assert_eq!(server_index("anything", 1), 0);
        assert_eq!(server_index("anything", 0), 0);
    }

    #[test]
    fn keys_are_checked_as_gomemcache_checks_them() {
        assert!(check_key("task_0f1e2d3c-aaaa-4bbb-8ccc-000000000000").is_ok());
        assert!(check_key("").is_err());
        assert!(check_key("a b").is_err());
        assert!(check_key("a\nb").is_err());
        assert!(check_key("a\x7fb").is_err());
        assert!(check_key(&"k".repeat(250)).is_ok());
        let error = check_key(&"k".repeat(251)).unwrap_err();
        assert!(
            error.to_string().contains("longer than 250 bytes"),
            "{error}"
        );
    }
}
