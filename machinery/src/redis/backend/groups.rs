//! Group records (Go's `GroupMeta` under the group uuid) and the chord progress we keep beside them, for
//! an exactly-once chord trigger that stays safe beside Go workers and their `TriggerChordMutex` lock.

use std::time::Duration;

use redis::AsyncCommands as _;

use super::{op, RedisBackend, SCRIPTS};
use crate::backend::BackendError;
use crate::retry::Backoff;
use crate::wire::state::{GroupMeta, TaskState};

/// The key Go machinery's workers lock (redsync) around their chord trigger.
pub const GO_CHORD_LOCK_KEY: &str = "TriggerChordMutex";

/// The keys of a group's chord progress, beside Go's group record; on a Redis Cluster
/// `{<group uuid>}:chord…`, in the group record's slot.
fn chord_keys(group_uuid: &str, cluster: bool) -> [String; 3] {
    if cluster {
        return [
            format!("{{{group_uuid}}}:chord:done"),
            format!("{{{group_uuid}}}:chord:members"),
            format!("{{{group_uuid}}}:chord"),
        ];
    }
    [
        format!("machinery:chord:{group_uuid}:done"),
        format!("machinery:chord:{group_uuid}:members"),
        format!("machinery:chord:{group_uuid}"),
    ]
}

/// The bodies of the group methods of [`Backend`](crate::backend::Backend) for [`RedisBackend`].
impl RedisBackend {
    /// `SET <group uuid> <GroupMeta JSON> EX <expiry>`, as Go stores it.
    pub(super) async fn store_group(&self, meta: &GroupMeta) -> Result<(), BackendError> {
        self.check_key(&meta.group_uuid)?;
        let json = meta.to_json().map_err(|source| BackendError::Decode {
            key: meta.group_uuid.clone(),
            source,
        })?;
        // Durable: a chord whose record a failover lost could never complete.
        let mut pipe = redis::pipe();
        pipe.set_ex(&meta.group_uuid, json, self.inner.expire_secs)
            .ignore();
        self.inner
            .conn
            .write(&pipe)
            .await
            .map_err(op("store group"))
    }

    /// Go's group record, if it is still there.
    pub(super) async fn read_group(
        &self,
        group_uuid: &str,
    ) -> Result<Option<GroupMeta>, BackendError> {
        let mut conn = self.inner.conn.clone();
        let raw: Option<Vec<u8>> = conn.get(group_uuid).await.map_err(op("get group"))?;
        raw.map(|bytes| {
            GroupMeta::from_json(&bytes).map_err(|source| BackendError::Decode {
                key: group_uuid.to_owned(),
                source,
            })
        })
        .transpose()
    }

    pub(super) async fn read_group_states(
        &self,
        group_uuid: &str,
    ) -> Result<Vec<TaskState>, BackendError> {
        let meta = crate::backend::existing_group(self, group_uuid).await?;
        if meta.task_uuids.is_empty() {
            return Ok(Vec::new());
        }
        // One MGET for all members (Go: one per member on go-redis), in group order.
        let mut conn = self.inner.conn.clone();
        let raw: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&meta.task_uuids)
            .query_async(&mut conn)
            .await
            .map_err(op("get group states"))?;
        raw.into_iter()
            .zip(&meta.task_uuids)
            .filter_map(|(bytes, uuid)| {
                bytes.map(|bytes| {
                    TaskState::from_json(&bytes).map_err(|source| BackendError::Decode {
                        key: uuid.clone(),
                        source,
                    })
                })
            })
            .collect()
    }

    /// Runs the `complete_member` script, waiting (up to 10 s) while a Go worker holds its chord lock.
    pub(super) async fn count_group_member(
        &self,
        group_uuid: &str,
        task_uuid: &str,
        group_task_count: u32,
    ) -> Result<bool, BackendError> {
        let cluster = self.inner.cluster;
        let [done, members, progress] = chord_keys(group_uuid, cluster);
        let count = group_task_count.to_string();
        let expire = self.inner.expire_secs.to_string();
        let mut keys = vec![
            group_uuid.as_bytes(),
            done.as_bytes(),
            members.as_bytes(),
            progress.as_bytes(),
        ];
        let mut args = vec![task_uuid.as_bytes(), count.as_bytes(), expire.as_bytes()];
        if cluster {
            // Go's lock is another slot; members finished by Go workers are not counted (docs/redis.md).
            args.push(b"own");
        } else {
            keys.push(GO_CHORD_LOCK_KEY.as_bytes());
        }
        // A Go worker holds its chord lock for a GET and a SET; it expires after 8 s if that worker died.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut backoff = Backoff::new(Duration::from_millis(2), Duration::from_millis(100));
        loop {
            // Durable: a member counted on a master that a failover then lost would leave its chord
            // waiting for ever, the message being acknowledged already.
            let outcome: i64 = self
                .inner
                .conn
                .run_durably(&SCRIPTS.complete_member, &keys, &args)
                .await
                .map_err(op("record chord progress"))?;
            match outcome {
                1 => return Ok(true),
                -2 => return Err(BackendError::UnknownGroup(group_uuid.to_owned())),
                -1 if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                -1 => {
                    return Err(BackendError::operation(
                        "record chord progress",
                        format!("Go's chord lock {GO_CHORD_LOCK_KEY} stayed held for 10 s"),
                    ))
                }
                _ => return Ok(false),
            }
        }
    }

    /// Deletes Go's group record and our chord progress beside it.
    pub(super) async fn delete_group(&self, group_uuid: &str) -> Result<(), BackendError> {
        self.check_key(group_uuid)?;
        let [done, members, progress] = chord_keys(group_uuid, self.inner.cluster);
        let mut conn = self.inner.conn.clone();
        conn.del::<_, ()>(&[group_uuid.to_owned(), done, members, progress])
            .await
            .map_err(op("delete group"))
    }
}
