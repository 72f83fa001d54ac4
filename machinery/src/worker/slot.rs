//! A worker slot: what one message holds from when it is fetched until its processing ends.
//!
//! A message holds a *run* permit (one of `concurrency`) until its handler returns, then a *finish*
//! permit (also one of `concurrency`) while its outcome is stored and it is acknowledged. The worker
//! fetches only for free run permits, so every fetched message starts at once, and the next fetch
//! overlaps the finishing round trip of the tasks before it. A slow backend holds messages in the
//! finishing phase; when every finish permit is taken, handlers that end keep their run permit until
//! one frees, so nothing more is fetched.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::telemetry::metrics;

/// One message's hold on the worker (see the module docs). Dropping it, however processing ends (a task
/// cancelled at shutdown included), frees everything.
#[derive(Debug)]
pub(crate) struct Slot {
    queue: Arc<str>,
    run: Option<OwnedSemaphorePermit>,
    finish: Option<OwnedSemaphorePermit>,
    finishing: Arc<Semaphore>,
    in_flight: Arc<AtomicUsize>,
}

impl Slot {
    /// A slot for a message fetched with `run`, counted in the in-flight gauge and in `in_flight`.
    pub(crate) fn new(
        queue: &Arc<str>,
        run: OwnedSemaphorePermit,
        finishing: &Arc<Semaphore>,
        in_flight: &Arc<AtomicUsize>,
    ) -> Self {
        metrics::in_flight(queue, 1.0);
        in_flight.fetch_add(1, Ordering::Relaxed);
        Slot {
            queue: queue.clone(),
            run: Some(run),
            finish: None,
            finishing: finishing.clone(),
            in_flight: in_flight.clone(),
        }
    }

    /// The handler has returned: trade the run permit for a finish permit (waiting for one if every
    /// finish permit is taken), so that the worker may fetch the next message while this one finishes.
    pub(crate) async fn handler_done(&mut self) {
        if self.run.is_none() {
            return;
        }
        // The semaphore is never closed; if it were, keeping the run permit is the safe answer.
        if let Ok(permit) = self.finishing.clone().acquire_owned().await {
            self.finish = Some(permit);
            self.run = None;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        metrics::in_flight(&self.queue, -1.0);
    }
}
