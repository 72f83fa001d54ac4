//! One run of a task's handler: its context, its time limit, and a panic turned into a FAILURE.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::FutureExt as _;

use super::process::WorkerContext;
use crate::task::{FailureKind, RunInfo, TaskContext, TaskDef, TaskFailure, TaskOutcome};
use crate::wire::signature::{Arg, Signature, TIME_LIMIT_HEADER};
use crate::wire::state::{CANCELLED_ERROR_PREFIX, EXPIRED_ERROR_PREFIX};

/// Runs the handler, unless the task expired (then it fails without running), turning a panic into a
/// FAILURE and cancelling it (by dropping it) at its time limit. It runs inside its batch's tokio task rather than a task of its own: one spawn and one
/// cross-task wake-up less per message.
pub(super) async fn call(
    ctx: &WorkerContext,
    def: &'static TaskDef,
    signature: Arc<Signature>,
    redelivered: bool,
) -> TaskOutcome {
    if let Some(at) = signature.expires().filter(|at| *at <= Utc::now()) {
        return Err(TaskFailure::new(
            FailureKind::Expired,
            format!(
                "{EXPIRED_ERROR_PREFIX}the task was not started before {}",
                at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            ),
        ));
    }
    let time_limit = signature
        .header_value(TIME_LIMIT_HEADER)
        .and_then(|v| v.as_u64())
        .map(Duration::from_millis)
        .or(def.options.timeout);
    let running = ctx.control.register(&signature);
    if running.token.is_cancelled() {
        // Cancelled while it was on its way here (held for its rate limit, say): it does not run.
        return Err(TaskFailure::new(
            FailureKind::Cancelled,
            format!("{CANCELLED_ERROR_PREFIX}the task was cancelled before it ran"),
        ));
    }
    let run_info = RunInfo {
        redelivered,
        deadline: time_limit.and_then(|limit| std::time::Instant::now().checked_add(limit)),
        cancel: running.token.clone(),
    };
    let task_context = TaskContext::new(signature.clone(), ctx.server.clone(), run_info);
    let args: Vec<Arg> = signature.args.clone();
    let run = AssertUnwindSafe((def.handler)(task_context, args)).catch_unwind();
    let work = async {
        let finished = match time_limit {
            Some(limit) => match tokio::time::timeout(limit, run).await {
                Ok(finished) => finished,
                Err(_) => {
                    return Err(TaskFailure::new(
                        FailureKind::TimeLimit,
                        format!(
                            "task {} exceeded its time limit of {limit:?} and was cancelled",
                            def.name
                        ),
                    ))
                }
            },
            None => run.await,
        };
        finished.unwrap_or_else(|payload| {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "task panicked".to_owned());
            Err(TaskFailure::new(FailureKind::Panic, message))
        })
    };
    tokio::pin!(work);
    let grace = ctx.control.grace;
    let returned = tokio::select! {
        biased;
        outcome = &mut work => {
            if !running.token.is_cancelled() {
                return outcome;
            }
            // It saw its cancellation and returned: whatever it returned, it was cancelled.
            true
        }
        // The task has seen `ctx.cancelled()` resolve: it may return within the grace, or be dropped.
        () = running.token.cancelled() => tokio::time::timeout(grace, &mut work).await.is_ok(),
    };
    let message = if returned {
        format!("{CANCELLED_ERROR_PREFIX}the task was cancelled while it ran (it returned in time)")
    } else {
        format!(
            "{CANCELLED_ERROR_PREFIX}the task was cancelled while it ran (it was dropped after the grace of {grace:?})"
        )
    };
    Err(TaskFailure::new(FailureKind::Cancelled, message))
}
