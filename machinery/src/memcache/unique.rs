//! Unique-task claims on memcached: the claim is an `add` of the key with the holder's task id, which
//! memcached stores only if the key does not exist, expiring at the end of the unique period.

use std::time::Duration;

use super::backend::{exptime, MemcacheBackend};
use super::client::{StoreMode, StoreReply};
use crate::backend::BackendError;

/// Claims of a key that lapsed between our `add` and our read are tried again this many times.
const CLAIM_ATTEMPTS: u32 = 10;

impl MemcacheBackend {
    /// Claims `key` for `task_uuid` for `ttl`; returns the holder's id if another task holds it.
    pub(super) async fn claim_unique_key(
        &self,
        key: &str,
        task_uuid: &str,
        ttl: Duration,
    ) -> Result<Option<String>, BackendError> {
        const OP: &str = "claim unique-task key";
        for _ in 0..CLAIM_ATTEMPTS {
            let stored = self
                .client
                .store(StoreMode::Add, key, task_uuid.as_bytes(), exptime(ttl))
                .await
                .map_err(|e| BackendError::operation(OP, e))?;
            if matches!(stored, StoreReply::Stored) {
                return Ok(None);
            }
            let holder = self
                .client
                .get(key)
                .await
                .map_err(|e| BackendError::operation(OP, e))?;
            match holder {
                // A claim made again by its own task (a retried send) is still its own.
                Some(holder) if holder.as_slice() == task_uuid.as_bytes() => return Ok(None),
                Some(holder) => return Ok(Some(String::from_utf8_lossy(&holder).into_owned())),
                // It lapsed in between: claim it again.
                None => continue,
            }
        }
        Err(BackendError::operation(
            OP,
            format!("{key}: the claim kept lapsing between add and get"),
        ))
    }

    /// Deletes `key` if `task_uuid` holds it. memcached has no conditional delete: a claim that lapsed
    /// and was taken by another task between the read and the delete is deleted too (that task's
    /// duplicate can then be sent; the window is one round trip at the end of a period).
    pub(super) async fn release_unique_key(
        &self,
        key: &str,
        task_uuid: &str,
    ) -> Result<(), BackendError> {
        const OP: &str = "release unique-task key";
        let holder = self
            .client
            .get(key)
            .await
            .map_err(|e| BackendError::operation(OP, e))?;
        if holder.as_deref() == Some(task_uuid.as_bytes()) {
            self.client
                .delete(key)
                .await
                .map_err(|e| BackendError::operation(OP, e))?;
        }
        Ok(())
    }
}
