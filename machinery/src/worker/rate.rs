//! The worker's side of rate limits ([`crate::rate_limit`]): a fetched task of a limited type runs at
//! its reserved start, held for a moment at most; a start further away sends it back to the broker with
//! that start as its ETA, so that it holds no worker slot while it waits.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::process::{settle, WorkerContext};
use crate::broker::Delivery;
use crate::rate_limit::{self, RateLimit};
use crate::task::TaskDef;
use crate::wire::signature::{Signature, RATE_SLOT_HEADER};

/// The longest a worker holds a fetched task (and its slot) until its start; a start further away sends
/// the task back to the broker.
const HOLD: Duration = Duration::from_millis(100);

/// The start reserved earlier for this message, if it carries one.
fn reserved(signature: &Signature) -> Option<DateTime<Utc>> {
    let text = signature.header_value(RATE_SLOT_HEADER)?.as_str()?;
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|at| at.with_timezone(&Utc))
}

/// Reserves the task's next start: in the backend's shared schedule, or in this process's where the
/// backend keeps none (or cannot be reached: the task is limited per process rather than not at all).
async fn reserve(ctx: &WorkerContext, name: &str, limit: RateLimit) -> DateTime<Utc> {
    let key = rate_limit::key(name);
    let interval = limit.interval();
    let wait = match ctx.server.backend().reserve_rate_slot(&key, interval).await {
        Ok(Some(wait)) => wait,
        Ok(None) => rate_limit::reserve_locally(&key, interval),
        Err(error) => {
            tracing::warn!(%error, task.name = %name, "cannot reserve a start in the shared rate-limit schedule; limiting in this process");
            rate_limit::reserve_locally(&key, interval)
        }
    };
    Utc::now() + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX)
}

/// Lets a fetched task run (after waiting up to [`HOLD`] for its start), giving its delivery back, or
/// sends it back until its start and settles its delivery, returning `None`. Tasks without a rate limit
/// run at once.
pub(super) async fn admit(
    ctx: &WorkerContext,
    def: &'static TaskDef,
    signature: &Signature,
    delivery: Delivery,
) -> Option<Delivery> {
    let Some(limit) = def.options.rate_limit else {
        return Some(delivery);
    };
    let start = match reserved(signature) {
        Some(start) => start,
        None => reserve(ctx, def.name, limit).await,
    };
    let wait = (start - Utc::now()).to_std().unwrap_or_default();
    if wait <= HOLD {
        tokio::time::sleep(wait).await;
        return Some(delivery);
    }
    let mut later = signature.clone().header(
        RATE_SLOT_HEADER,
        start.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    );
    // Due a moment early, so that it is held until its start rather than delivered after it.
    later.eta = Some(start - chrono::Duration::from_std(HOLD / 2).unwrap_or_default());
    tracing::debug!(rate_limit = %limit, start = %start, "rate-limited: the task goes back to the broker until its start");
    match ctx.server.publish(&mut later).await {
        Ok(()) => settle("ack", delivery.ack()).await,
        Err(error) => {
            tracing::warn!(%error, "cannot send a rate-limited task back until its start; it goes back to the queue");
            let body = delivery.body.clone();
            settle("requeue", delivery.requeue(body)).await;
        }
    }
    None
}
