//! A message naming a task this worker does not know: requeued a bounded number of times for a worker
//! that knows it, then dead-lettered with the reason.

use super::process::{settle, store_dead_letter_state, WorkerContext};
use crate::broker::Delivery;
use crate::telemetry::metrics;
use crate::wire::signature::{Signature, UNKNOWN_TASK_REQUEUES_HEADER};

/// Go requeues unknown tasks forever (a busy loop); we requeue a bounded number of times, counting in a
/// header, so that another worker that knows the task can take it, then dead-letter it.
pub(super) async fn unknown_task(ctx: &WorkerContext, signature: Signature, delivery: Delivery) {
    if signature.ignore_when_task_not_registered {
        tracing::info!(task.name = %signature.name, task.uuid = %signature.uuid, "dropping a task this worker does not know (IgnoreWhenTaskNotRegistered)");
        settle("ack", delivery.ack()).await;
        return;
    }
    let requeues = signature
        .header_value(UNKNOWN_TASK_REQUEUES_HEADER)
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let limit = u64::from(ctx.server.config().unknown_task_requeues);
    if requeues >= limit {
        let reason = format!(
            "unknown task name {}: no worker on queue {} knows it (requeued {requeues} times; this worker knows {})",
            signature.quoted_name(),
            ctx.queue,
            ctx.registry.names().join(", ")
        );
        tracing::warn!(task.uuid = %signature.uuid, %reason, "dead-lettering a task no worker knows");
        metrics::dead_lettered(&ctx.queue, metrics::DeadLetterReason::UnknownTask);
        store_dead_letter_state(ctx, &signature.uuid, &signature.name, &reason).await;
        settle("dead-letter", delivery.dead_letter(reason)).await;
        return;
    }
    let signature = signature.header(UNKNOWN_TASK_REQUEUES_HEADER, requeues + 1);
    match signature.to_json() {
        Ok(body) => {
            tracing::debug!(task.name = %signature.name, requeues = requeues + 1, "requeueing a task this worker does not know");
            settle("requeue", delivery.requeue(body)).await;
        }
        Err(error) => {
            settle(
                "dead-letter",
                delivery.dead_letter(format!("cannot re-encode message: {error}")),
            )
            .await
        }
    }
}
