//! The two INFO lines a worker writes per task, as Go machinery and Celery do: one when a task is
//! received, one when it finishes. They go to the `tracing` target [`TASK_LOG_TARGET`], so that a filter
//! can turn them down without silencing the rest of the worker: `RUST_LOG=info,machinery::task=warn`.

use std::time::Duration;

use crate::wire::signature::Signature;
use crate::wire::state::TaskState;

/// The `tracing` target of the per-task lines (the macros below spell it out: they take a literal).
pub const TASK_LOG_TARGET: &str = "machinery::task";

/// "task received": name, id, and whether the broker delivered it before.
pub(super) fn received(signature: &Signature, redelivered: bool) {
    tracing::event!(
        target: "machinery::task",
        tracing::Level::INFO,
        task.name = %signature.name,
        task.uuid = %signature.uuid,
        redelivered,
        "task received"
    );
}

/// "task finished": name, id, the final state stored, and how long the run took.
pub(super) fn finished(signature: &Signature, state: &TaskState, took: Duration) {
    let outcome = state.state.as_str();
    let took_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
    if state.error.is_empty() {
        tracing::event!(target: "machinery::task", tracing::Level::INFO, task.name = %signature.name, task.uuid = %signature.uuid, outcome, took_ms, "task finished");
    } else {
        tracing::event!(target: "machinery::task", tracing::Level::INFO, task.name = %signature.name, task.uuid = %signature.uuid, outcome, took_ms, error = %state.error, "task finished");
    }
}
