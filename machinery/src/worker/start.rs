//! Whether a fetched task may run: its RECEIVED and STARTED are stored first, for a whole batch in one
//! backend call, and that write refuses to replace a revocation or a SUCCESS.
//!
//! Every send stores PENDING before it publishes, so a SUCCESS found at start means the task already ran
//! since it was last sent: this message is a second copy (the broker redelivered it after an
//! acknowledgement was lost, or a publisher sent it again after a lost confirm). The copy does not run
//! again, and only what follows the task is sent again. Writing STARTED over that SUCCESS would hide a
//! finished chord member from the member that completes the chord, which would then fail the callback.

use super::process::{Ready, Start, WorkerContext};
use crate::wire::state::{State, TaskState};

/// Stores RECEIVED and STARTED (`started`, one per task of `ready`) for a batch of tasks in one backend
/// call (one round trip on Redis), and tells for each whether it may run. A task whose states could not be stored for a transient reason does
/// not run if the backend is down ([`BackendHealth::failed`](super::health::BackendHealth::failed)): its
/// message goes back to the queue. If the backend answers, the failure was that write's alone and the
/// task runs anyway, with a warning.
pub(crate) async fn start(
    ctx: &WorkerContext,
    ready: &[Ready<'_>],
    started: &[TaskState],
) -> Vec<Start> {
    let stored = ctx.server.backend().set_started_many(started).await;
    // One probe for the batch, whose writes all went in one call.
    let down = match stored.iter().find_map(|r| r.as_ref().err()) {
        Some(error) => {
            let backend = ctx.server.backend().as_ref();
            ctx.backend_health.failed(error, backend, &ctx.queue).await
        }
        None => false,
    };
    let mut starts = Vec::with_capacity(ready.len());
    for (result, r) in stored.into_iter().zip(ready) {
        starts.push(match result {
            Ok(true) => Start::Run,
            Ok(false) => refused_start(ctx, r).await,
            Err(error) if error.is_permanent() => Start::Refused(error),
            Err(_) if down => Start::PutBack,
            Err(error) => {
                r.span()
                    .in_scope(|| tracing::warn!(%error, "cannot store RECEIVED and STARTED"));
                Start::Run
            }
        });
    }
    starts
}

/// Why the backend refused a task's start: the record it kept, read again (rare: a revoked task, or a
/// copy of a message whose task succeeded).
async fn refused_start(ctx: &WorkerContext, r: &Ready<'_>) -> Start {
    match ctx.server.backend().get_state(r.uuid()).await {
        Ok(Some(state)) if state.state == State::Success => {
            Start::Succeeded(state.results.unwrap_or_default())
        }
        Ok(Some(state)) if state.is_revoked() => Start::Revoked,
        other => {
            r.span().in_scope(|| {
                tracing::warn!(record = ?other, "the record that refused the task's start is gone or changed; the message goes back to the queue")
            });
            Start::PutBack
        }
    }
}
