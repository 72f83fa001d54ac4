//! The `null` result backend: stores nothing, as Go's. Sending is fastest; results cannot be read and
//! chords cannot be used.

use async_trait::async_trait;

use super::{Backend, BackendError};
use crate::wire::state::{GroupMeta, TaskState};

/// Drops every state; reading one is an error.
#[derive(Debug, Clone, Copy, Default)]
pub struct NullBackend;

#[async_trait]
impl Backend for NullBackend {
    fn kind(&self) -> &'static str {
        "null"
    }

    async fn set_state(&self, _: &TaskState) -> Result<(), BackendError> {
        Ok(())
    }

    async fn set_states(&self, _: &[TaskState]) -> Result<(), BackendError> {
        Ok(())
    }

    /// Nothing is stored, so nothing can have been revoked: every task may run (the trait's defaults for
    /// RECEIVED and STARTED build on this).
    async fn set_received(&self, _: &TaskState) -> Result<bool, BackendError> {
        Ok(true)
    }

    async fn get_state(&self, _: &str) -> Result<Option<TaskState>, BackendError> {
        Err(BackendError::NotStored {
            backend: "null",
            what: "task states",
        })
    }

    async fn wait_for_completion(
        &self,
        _: &str,
        _: std::time::Duration,
    ) -> Result<Option<TaskState>, BackendError> {
        Err(BackendError::NotStored {
            backend: "null",
            what: "task states",
        })
    }

    async fn init_group(&self, _: &GroupMeta) -> Result<(), BackendError> {
        Ok(())
    }

    async fn get_group(&self, _: &str) -> Result<Option<GroupMeta>, BackendError> {
        Err(BackendError::NotStored {
            backend: "null",
            what: "groups",
        })
    }

    async fn complete_group_member(&self, _: &str, _: &str, _: u32) -> Result<bool, BackendError> {
        Err(BackendError::NotStored {
            backend: "null",
            what: "group progress, so chords cannot fire",
        })
    }

    async fn purge_state(&self, _: &str) -> Result<(), BackendError> {
        Ok(())
    }

    async fn purge_group(&self, _: &str) -> Result<(), BackendError> {
        Ok(())
    }
}
