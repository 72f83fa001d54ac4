//! Unique tasks ([`Signature::unique_for`]): the sender claims a key made from the task name and
//! arguments in the result backend before publishing; while the key is held, sending the same task again
//! returns the holder's handle. The worker releases the key when the task reaches its final state, and the
//! claim lapses by itself after the period.

use std::time::Duration;

use crate::backend::{Backend, BackendError};
use crate::error::SendError;
use crate::wire::signature::{new_task_uuid, Signature, UNIQUE_FOR_HEADER, UNIQUE_KEY_HEADER};
use crate::Server;

/// How often a claim held by a task that has already finished (its release lost, or a Go worker that
/// does not release) is taken over before giving up.
const TAKEOVERS: usize = 3;

/// The unique period a signature asks for, if any.
fn period(signature: &Signature) -> Option<Duration> {
    signature
        .header_value(UNIQUE_FOR_HEADER)
        .and_then(|v| v.as_u64())
        .map(Duration::from_millis)
}

/// The key for a task name and its arguments: a name-based (SHA-1) UUID of both, so that every process
/// derives the same key and its length does not grow with the arguments.
fn key(signature: &Signature) -> Result<String, serde_json::Error> {
    let mut text = signature.name.as_bytes().to_vec();
    text.push(0);
    text.extend(serde_json::to_vec(&signature.args)?);
    let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &text);
    Ok(format!("machinery_unique_{}", id.simple()))
}

/// For a signature that asks to be unique: gives it an id, claims its key and records the key in its
/// headers. Returns the id of the earlier task that holds the key instead, if one does (then nothing is
/// to be published). Signatures that do not ask are left alone.
pub(crate) async fn claim(
    server: &Server,
    signature: &mut Signature,
) -> Result<Option<String>, SendError> {
    let Some(ttl) = period(signature) else {
        return Ok(None);
    };
    let backend_error = |source| SendError::Backend {
        task: signature.name.clone(),
        source,
    };
    let key = key(signature).map_err(|source| SendError::Json {
        task: signature.name.clone(),
        source,
    })?;
    if signature.uuid.is_empty() {
        signature.uuid = new_task_uuid();
    }
    let backend = server.backend();
    for _ in 0..TAKEOVERS {
        let holder = backend
            .claim_unique(&key, &signature.uuid, ttl)
            .await
            .map_err(backend_error)?;
        let Some(holder) = holder else {
            signature
                .headers
                .get_or_insert_with(Default::default)
                .insert(UNIQUE_KEY_HEADER.to_owned(), key.into());
            return Ok(None);
        };
        let finished = backend
            .get_state(&holder)
            .await
            .map_err(backend_error)?
            .is_some_and(|s| s.is_completed());
        if !finished {
            tracing::debug!(task.name = %signature.name, task.uuid = %holder, "unique task already pending or running; not sent again");
            return Ok(Some(holder));
        }
        // The holder finished but its claim was not released: take the key over.
        backend
            .release_unique(&key, &holder)
            .await
            .map_err(backend_error)?;
    }
    Err(backend_error(BackendError::operation(
        "claim unique-task key",
        format!("key {key} kept being claimed by tasks that had finished"),
    )))
}

/// Releases a unique task's key (best effort: the claim lapses anyway at the end of its period).
pub(crate) async fn release(backend: &dyn Backend, signature: &Signature) {
    let Some(key) = signature
        .header_value(UNIQUE_KEY_HEADER)
        .and_then(|v| v.as_str())
    else {
        return;
    };
    if let Err(error) = backend.release_unique(key, &signature.uuid).await {
        tracing::warn!(%error, task.uuid = %signature.uuid, "cannot release the unique-task key; it lapses at the end of its period");
    }
}
