//! The in-process lock: exclusive within one process only.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::lock::{Lock, LockError};

/// Keys held until their expiry, in this process.
#[derive(Debug, Default)]
pub struct MemoryLock {
    held: Mutex<HashMap<String, Instant>>,
}

#[async_trait]
impl Lock for MemoryLock {
    async fn try_acquire(&self, key: &str, ttl: Duration) -> Result<bool, LockError> {
        let now = Instant::now();
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.retain(|_, expires| *expires > now);
        if held.contains_key(key) {
            return Ok(false);
        }
        held.insert(key.to_owned(), now + ttl);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_is_held_until_it_expires() {
        let lock = MemoryLock::default();
        assert!(lock
            .try_acquire("k", Duration::from_millis(30))
            .await
            .unwrap());
        assert!(!lock
            .try_acquire("k", Duration::from_millis(30))
            .await
            .unwrap());
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(lock
            .try_acquire("k", Duration::from_millis(30))
            .await
            .unwrap());
    }
}
