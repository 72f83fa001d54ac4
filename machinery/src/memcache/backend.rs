//! The memcached result backend (`memcache://host1:port1[,host2:port2...]`), record for record what Go
//! machinery's memcache backend stores: the TaskState JSON at `<task uuid>`, the GroupMeta JSON at
//! `<group uuid>`, expiring `results_expire_in` seconds after each write.
//!
//! Keys are spread over the servers as gomemcache's `ServerList` spreads them (crc32 IEEE of the key,
//! modulo the number of servers, in URL order; see [`server_index`]), so Go and Rust clients given the
//! same server list find the same keys.
//!
//! What we do differently from Go, on purpose:
//! - A state write that needs the previous record's task name and creation time (every state but
//!   PENDING) reads it with `gets` and writes with `cas`, so concurrent writers cannot lose them; RECEIVED
//!   is refused in the same step when the task was revoked.
//! - Chords fire exactly once: each member sets its bit in a per-group progress record
//!   (`<group uuid>_chord_progress`) with `cas`; the write that completes the group names its member the
//!   winner in that same write, and the winner's calls (its first and any repeat) set `ChordTriggered`
//!   (again with `cas`) and fire.
//!   Go's memcache backend uses a read-modify-write lock flag that two workers can both pass.
//! - A record too large for memcached is an error ([`BackendError::TooLarge`]), checked before sending and
//!   again from the server's reply.
//!
//! memcached cannot notify, so [`Backend::wait_for_completion`] polls with the trait's growing interval.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

pub use super::client::MemcacheError;
use super::client::{Client, StoreMode, StoreReply};
pub use super::url::parse_url;
use crate::backend::{Backend, BackendError};
use crate::config::{Config, ConfigError};
use crate::wire::gotime;
use crate::wire::state::{GroupMeta, TaskState};

/// The port of a server given without one.
pub const DEFAULT_PORT: u16 = 11211;

/// memcached reads an expiration time above this many seconds (30 days) as a unix time.
const MAX_RELATIVE_EXPIRATION: u64 = 60 * 60 * 24 * 30;

/// How many times a `gets`/`cas` update is tried before giving up (each conflict means another writer
/// made progress, so this only runs out under extreme contention).
const MAX_CAS_ATTEMPTS: u32 = 1000;

/// The suffix of the key of a group's chord progress record.
pub const CHORD_PROGRESS_SUFFIX: &str = "_chord_progress";

/// The index of the server that holds `key` among `servers` servers (given in URL order): gomemcache's
/// `ServerList.PickServer`, i.e. `crc32.ChecksumIEEE(key) % servers`.
///
/// ```
/// use machinery::memcache::server_index;
///
/// // crc32("foo") = 0x8c736521
/// assert_eq!(server_index("foo", 2), 1);
/// assert_eq!(server_index("foo", 1), 0);
/// ```
pub fn server_index(key: &str, servers: usize) -> usize {
    super::client::server_index(key, servers)
}

/// The memcached result backend.
pub struct MemcacheBackend {
    pub(super) client: Client,
    expire_in: Duration,
}

impl fmt::Debug for MemcacheBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemcacheBackend")
            .field("servers", &self.client.addrs().collect::<Vec<_>>())
            .field("expire_in", &self.expire_in)
            .finish_non_exhaustive()
    }
}

/// A chord's progress: which members have finished, and which member's call completed the group.
#[derive(Debug, Default, Serialize, Deserialize)]
struct ChordProgress {
    /// Finished members as a bitmap over the group record's `TaskUUIDs` order, base64.
    #[serde(rename = "Finished")]
    finished: String,
    /// How many bits are set.
    #[serde(rename = "Count")]
    count: u32,
    /// The member whose call completed the group (and so sends the callback).
    #[serde(rename = "Winner")]
    winner: String,
}

/// Why [`MemcacheBackend::connect`] could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URL names no usable server list.
    #[error(transparent)]
    Url(#[from] ConfigError),
    /// No server of the list answered.
    #[error(transparent)]
    Unreachable(BackendError),
}

/// memcached's expiration time for `after`: seconds from now up to 30 days, a unix time beyond.
pub(super) fn exptime(after: Duration) -> u32 {
    let secs = after.as_secs().max(1);
    if secs <= MAX_RELATIVE_EXPIRATION {
        return secs as u32;
    }
    let now = chrono::Utc::now().timestamp().max(0) as u64;
    u32::try_from(now.saturating_add(secs)).unwrap_or(u32::MAX)
}

impl MemcacheBackend {
    /// Connects to the servers `url` names and checks that at least one answers (the others are logged).
    pub async fn connect(url: &str, config: &Config) -> Result<MemcacheBackend, ConnectError> {
        let servers = parse_url(url)?;
        let tls = super::tls::prepare(url, &config.tls.for_result_backend()).map_err(|e| {
            let (url, source) = (url.to_owned(), Box::new(e));
            ConnectError::Unreachable(BackendError::Connect { url, source })
        })?;
        let backend = MemcacheBackend {
            client: Client::with_tls(servers, tls.clone()),
            expire_in: Duration::from_secs(config.results_expire_in_secs()),
        };
        let outcomes = backend.client.probe().await;
        let reachable = outcomes.iter().filter(|(_, o)| o.is_ok()).count();
        let mut first_error = None;
        for (server, outcome) in outcomes {
            if let Err(error) = outcome {
                tracing::warn!(%server, %error, "memcached server is not reachable; keys that hash to it will fail until it is");
                first_error.get_or_insert(error);
            }
        }
        match first_error {
            Some(error) if reachable == 0 => {
                Err(ConnectError::Unreachable(BackendError::Connect {
                    url: url.to_owned(),
                    source: super::tls::explain(error, tls.as_deref()),
                }))
            }
            _ => Ok(backend),
        }
    }

    /// A backend over these `host:port` servers (in this order) whose records expire after `expire_in`.
    /// Nothing is connected until the first command.
    pub fn new(servers: Vec<String>, expire_in: Duration) -> MemcacheBackend {
        MemcacheBackend {
            client: Client::new(servers),
            expire_in,
        }
    }

    /// The expiration time to send: memcached reads values up to 30 days as seconds from now (measured by
    /// the server's clock, so client clock skew does not matter) and larger values as a unix time.
    fn expiration(&self) -> u32 {
        exptime(self.expire_in)
    }

    fn op_error(operation: &'static str, error: MemcacheError) -> BackendError {
        BackendError::operation(operation, error)
    }

    /// Refuses a value memcached would refuse, with the limit for this key.
    fn check_size(&self, key: &str, value: &[u8]) -> Result<(), BackendError> {
        let limit = self.client.max_value_len(key);
        if value.len() > limit {
            return Err(BackendError::TooLarge {
                key: key.to_owned(),
                size: value.len(),
                limit,
            });
        }
        Ok(())
    }

    /// Stores `value` with `mode`, turning memcached's "object too large" into [`BackendError::TooLarge`].
    async fn store(
        &self,
        operation: &'static str,
        mode: StoreMode,
        key: &str,
        value: &[u8],
    ) -> Result<StoreReply, BackendError> {
        self.check_size(key, value)?;
        match self.client.store(mode, key, value, self.expiration()).await {
            Ok(stored) => Ok(stored),
            Err(MemcacheError::TooLarge { key, size, .. }) => Err(BackendError::TooLarge {
                limit: self.client.max_value_len(&key).min(size.saturating_sub(1)),
                key,
                size,
            }),
            Err(error) => Err(Self::op_error(operation, error)),
        }
    }

    /// Sleeps a little, more after each conflict, with jitter so that contending writers spread out.
    async fn cas_backoff(attempt: u32) {
        let cap_us = 200u64 << attempt.min(6); // 0.2 ms .. 12.8 ms
        let jitter = uuid::Uuid::new_v4().as_u128() as u64 % cap_us;
        tokio::time::sleep(Duration::from_micros(jitter)).await;
    }

    fn too_much_contention(operation: &'static str, key: &str) -> BackendError {
        BackendError::operation(
            operation,
            format!(
                "{key}: gave up after {MAX_CAS_ATTEMPTS} conflicting compare-and-swap attempts"
            ),
        )
    }

    fn decode_state(key: &str, bytes: &[u8]) -> Result<TaskState, BackendError> {
        TaskState::from_json(bytes).map_err(|source| BackendError::Decode {
            key: key.to_owned(),
            source,
        })
    }

    fn decode_group(key: &str, bytes: &[u8]) -> Result<GroupMeta, BackendError> {
        GroupMeta::from_json(bytes).map_err(|source| BackendError::Decode {
            key: key.to_owned(),
            source,
        })
    }

    fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, BackendError> {
        serde_json::to_vec(value).map_err(|source| BackendError::Decode {
            key: key.to_owned(),
            source,
        })
    }

    /// Writes a task state: as it is if it has a name and a creation time, else merged into the previous
    /// record with `gets`/`cas` (retried on conflict). With `start_write` (RECEIVED or STARTED),
    /// returns `false` without writing when the stored record [stops a start](TaskState::stops_a_start).
    async fn write_state(
        &self,
        operation: &'static str,
        state: &TaskState,
        start_write: bool,
    ) -> Result<bool, BackendError> {
        let key = state.task_uuid.as_str();
        let value = Self::encode(key, state)?;
        let complete = !state.task_name.is_empty() && state.created_at != gotime::zero_time();
        if complete && !start_write {
            self.store(operation, StoreMode::Set, key, &value).await?;
            return Ok(true);
        }
        self.check_size(key, &value)?;
        for attempt in 0..MAX_CAS_ATTEMPTS {
            let previous = self
                .client
                .gets(key)
                .await
                .map_err(|e| Self::op_error(operation, e))?;
            let stored = match previous {
                None => self.store(operation, StoreMode::Add, key, &value).await?,
                Some((bytes, cas)) => {
                    let mut merged = state.clone();
                    match TaskState::from_json(&bytes) {
                        Ok(previous) if start_write && previous.stops_a_start() => {
                            return Ok(false)
                        }
                        Ok(previous) => merged.merge_from_previous(&previous),
                        Err(error) => {
                            tracing::warn!(task.uuid = %key, %error, "replacing a task state that is not valid JSON")
                        }
                    }
                    let merged = Self::encode(key, &merged)?;
                    self.store(operation, StoreMode::Cas(cas), key, &merged)
                        .await?
                }
            };
            match stored {
                StoreReply::Stored => return Ok(true),
                // Another writer got in between: read its record and merge again.
                StoreReply::NotStored | StoreReply::Exists | StoreReply::NotFound => {
                    Self::cas_backoff(attempt).await
                }
            }
        }
        Err(Self::too_much_contention(operation, key))
    }

    /// Sets `ChordTriggered` on the group record; `true` only for the call that changed it from `false`.
    async fn mark_chord_triggered(&self, group_uuid: &str) -> Result<bool, BackendError> {
        const OP: &str = "mark chord triggered";
        for attempt in 0..MAX_CAS_ATTEMPTS {
            let Some((bytes, cas)) = self
                .client
                .gets(group_uuid)
                .await
                .map_err(|e| Self::op_error(OP, e))?
            else {
                return Err(BackendError::UnknownGroup(group_uuid.to_owned()));
            };
            let mut meta = Self::decode_group(group_uuid, &bytes)?;
            if meta.chord_triggered {
                return Ok(false);
            }
            meta.chord_triggered = true;
            let value = Self::encode(group_uuid, &meta)?;
            match self
                .store(OP, StoreMode::Cas(cas), group_uuid, &value)
                .await?
            {
                StoreReply::Stored => return Ok(true),
                _ => Self::cas_backoff(attempt).await,
            }
        }
        Err(Self::too_much_contention(OP, group_uuid))
    }
}

#[async_trait]
impl Backend for MemcacheBackend {
    fn kind(&self) -> &'static str {
        "memcache"
    }

    /// Stores the state. PENDING (which carries the task name and creation time) is a plain `set`; later
    /// states, which Go builds without them, are merged into the previous record with `gets`/`cas`.
    async fn set_state(&self, state: &TaskState) -> Result<(), BackendError> {
        self.write_state("set state", state, false).await?;
        Ok(())
    }

    /// Stores RECEIVED unless the stored record is a revocation, in one `gets`/`cas` step, so a
    /// revocation written meanwhile is never overwritten.
    async fn set_received(&self, state: &TaskState) -> Result<bool, BackendError> {
        self.write_state("set received", state, true).await
    }

    /// Stores many states: those complete in themselves (PENDING, as a group's sender writes them) with
    /// pipelined `set`s, one write per server and 100 states; the others one by one, merged.
    async fn set_states(&self, states: &[TaskState]) -> Result<(), BackendError> {
        const OP: &str = "set states";
        let mut seen = std::collections::HashSet::with_capacity(states.len());
        if !states.iter().all(|s| seen.insert(s.task_uuid.as_str())) {
            // A task written twice in one batch: keep the order, one by one.
            for state in states {
                self.write_state(OP, state, false).await?;
            }
            return Ok(());
        }
        let mut complete = Vec::with_capacity(states.len());
        let mut partial = Vec::new();
        for state in states {
            if !state.task_name.is_empty() && state.created_at != gotime::zero_time() {
                let value = Self::encode(&state.task_uuid, state)?;
                self.check_size(&state.task_uuid, &value)?;
                complete.push((state.task_uuid.as_str(), value));
            } else {
                partial.push(state);
            }
        }
        let items: Vec<(&str, &[u8])> = complete.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        match self.client.set_many(&items, self.expiration()).await {
            Ok(()) => {}
            Err(MemcacheError::TooLarge { key, size, .. }) => {
                return Err(BackendError::TooLarge {
                    limit: self.client.max_value_len(&key).min(size.saturating_sub(1)),
                    key,
                    size,
                })
            }
            Err(error) => return Err(Self::op_error(OP, error)),
        }
        for state in partial {
            self.write_state(OP, state, false).await?;
        }
        Ok(())
    }

    async fn get_state(&self, task_uuid: &str) -> Result<Option<TaskState>, BackendError> {
        let bytes = self
            .client
            .get(task_uuid)
            .await
            .map_err(|e| Self::op_error("get state", e))?;
        bytes
            .map(|bytes| Self::decode_state(task_uuid, &bytes))
            .transpose()
    }

    async fn init_group(&self, meta: &GroupMeta) -> Result<(), BackendError> {
        let key = meta.group_uuid.as_str();
        let value = Self::encode(key, meta)?;
        self.store("init group", StoreMode::Set, key, &value)
            .await?;
        Ok(())
    }

    async fn get_group(&self, group_uuid: &str) -> Result<Option<GroupMeta>, BackendError> {
        let bytes = self
            .client
            .get(group_uuid)
            .await
            .map_err(|e| Self::op_error("get group", e))?;
        bytes
            .map(|bytes| Self::decode_group(group_uuid, &bytes))
            .transpose()
    }

    /// The members' states in group order, read with one multi-key `get` per server (and per 100 keys).
    async fn group_states(&self, group_uuid: &str) -> Result<Vec<TaskState>, BackendError> {
        let meta = crate::backend::existing_group(self, group_uuid).await?;
        let keys: Vec<&str> = meta.task_uuids.iter().map(String::as_str).collect();
        let mut found = self
            .client
            .get_many(&keys)
            .await
            .map_err(|e| Self::op_error("get group states", e))?;
        let mut states = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(bytes) = found.remove(key) {
                states.push(Self::decode_state(key, &bytes)?);
            }
        }
        Ok(states)
    }

    /// Sets the member's bit in the group's progress record with `gets`/`cas`; the write that makes the
    /// count reach `group_task_count` also names this member the winner, atomically. A call for the winning
    /// member then sets `ChordTriggered` on the group record with `cas` (unless it is set already) and
    /// gets `true`: the first winning call, and every later call for the winning member (a retry after a
    /// failure before or after setting the flag, a redelivery). A redelivered member finds its bit set
    /// and counts once; calls for any other member get `false`.
    async fn complete_group_member(
        &self,
        group_uuid: &str,
        task_uuid: &str,
        group_task_count: u32,
    ) -> Result<bool, BackendError> {
        const OP: &str = "complete group member";
        let meta = crate::backend::existing_group(self, group_uuid).await?;
        let index = meta
            .task_uuids
            .iter()
            .position(|uuid| uuid == task_uuid)
            .ok_or_else(|| {
                BackendError::operation(
                    OP,
                    format!(
                        "task {task_uuid} is not a member of group {group_uuid} ({} members)",
                        meta.task_uuids.len()
                    ),
                )
            })?;
        let key = format!("{group_uuid}{CHORD_PROGRESS_SUFFIX}");
        let base64 = base64::engine::general_purpose::STANDARD;
        for attempt in 0..MAX_CAS_ATTEMPTS {
            let read = self
                .client
                .gets(&key)
                .await
                .map_err(|e| Self::op_error(OP, e))?;
            let (mut progress, cas) = match read {
                None => (ChordProgress::default(), None),
                Some((bytes, cas)) => {
                    let progress: ChordProgress =
                        serde_json::from_slice(&bytes).map_err(|source| BackendError::Decode {
                            key: key.clone(),
                            source,
                        })?;
                    (progress, Some(cas))
                }
            };
            if progress.winner == task_uuid {
                // Another call for this member completed the group: a retry after that call failed
                // before setting the flag or lost its answer, or a duplicate delivery. The winner sends
                // the callback, so it is told again (the flag is set if that call did not get to it).
                self.mark_chord_triggered(group_uuid).await?;
                return Ok(true);
            }
            if !progress.winner.is_empty() {
                return Ok(false);
            }
            let mut bitmap = base64.decode(&progress.finished).map_err(|error| {
                BackendError::operation(
                    OP,
                    format!("{key}: the Finished bitmap is not base64: {error}"),
                )
            })?;
            if bitmap.len() < meta.task_uuids.len().div_ceil(8) {
                bitmap.resize(meta.task_uuids.len().div_ceil(8), 0);
            }
            let (byte, bit) = (index / 8, 1u8 << (index % 8));
            let newly_finished = bitmap[byte] & bit == 0;
            bitmap[byte] |= bit;
            if newly_finished {
                progress.count = progress.count.saturating_add(1);
            }
            let completes = progress.count >= group_task_count;
            if !newly_finished && !completes {
                return Ok(false); // counted before
            }
            if completes {
                if meta.chord_triggered {
                    // Someone without a progress record (a Go worker) has fired the chord already.
                    return Ok(false);
                }
                progress.winner = task_uuid.to_owned();
            }
            progress.finished = base64.encode(&bitmap);
            let value = Self::encode(&key, &progress)?;
            let mode = cas.map_or(StoreMode::Add, StoreMode::Cas);
            match self.store(OP, mode, &key, &value).await? {
                StoreReply::Stored if completes => {
                    return self.mark_chord_triggered(group_uuid).await;
                }
                StoreReply::Stored => return Ok(false),
                StoreReply::NotStored | StoreReply::Exists | StoreReply::NotFound => {
                    Self::cas_backoff(attempt).await
                }
            }
        }
        Err(Self::too_much_contention(OP, &key))
    }

    async fn purge_state(&self, task_uuid: &str) -> Result<(), BackendError> {
        self.client
            .delete(task_uuid)
            .await
            .map_err(|e| Self::op_error("purge state", e))?;
        Ok(())
    }

    async fn claim_unique(
        &self,
        key: &str,
        task_uuid: &str,
        ttl: Duration,
    ) -> Result<Option<String>, BackendError> {
        self.claim_unique_key(key, task_uuid, ttl).await
    }

    async fn release_unique(&self, key: &str, task_uuid: &str) -> Result<(), BackendError> {
        self.release_unique_key(key, task_uuid).await
    }

    async fn purge_group(&self, group_uuid: &str) -> Result<(), BackendError> {
        for key in [
            group_uuid.to_owned(),
            format!("{group_uuid}{CHORD_PROGRESS_SUFFIX}"),
        ] {
            self.client
                .delete(&key)
                .await
                .map_err(|e| Self::op_error("purge group", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_servers_in_order() {
        assert_eq!(
            parse_url("memcache://127.0.0.1:11211").unwrap(),
            ["127.0.0.1:11211"]
        );
        assert_eq!(
            parse_url("memcache://a:1, b:2,c/").unwrap(),
            ["a:1", "b:2", "c:11211"]
        );
        assert_eq!(
            parse_url("memcache://[::1]:11212,[::1]").unwrap(),
            ["[::1]:11212", "[::1]:11211"]
        );
        assert_eq!(
            parse_url("memcaches://mc.internal,b:2").unwrap(),
            ["mc.internal:11211", "b:2"]
        );
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, expected) in [
            ("memcache://", "empty server address"),
            ("memcache://a:1,,b:2", "empty server address"),
            ("memcache://a:x", "port \"x\" is not a number"),
            ("memcache://user:pw@a:1", "credentials"),
            ("redis://a:1", "expected memcache://"),
        ] {
            let error = parse_url(url).unwrap_err().to_string();
            assert!(error.contains(expected), "{url}: {error}");
        }
    }

    #[test]
    fn expirations_beyond_30_days_are_unix_times() {
        let backend = MemcacheBackend::new(vec![], Duration::from_secs(3600));
        assert_eq!(backend.expiration(), 3600);
        let backend = MemcacheBackend::new(vec![], Duration::from_secs(MAX_RELATIVE_EXPIRATION));
        assert_eq!(backend.expiration(), MAX_RELATIVE_EXPIRATION as u32);
        let forty_days = 40 * 24 * 3600;
        let backend = MemcacheBackend::new(vec![], Duration::from_secs(forty_days));
        let expected = chrono::Utc::now().timestamp() as u64 + forty_days;
        let got = u64::from(backend.expiration());
        assert!(got.abs_diff(expected) <= 2, "{got} vs {expected}");
    }
}
