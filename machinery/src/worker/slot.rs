//! A worker slot: what one message holds from when it is fetched until its processing ends.
//!
//! A message holds a *run* permit (one of `concurrency`) from when it is handed to a slot until its
//! handler returns, then a *finish* permit (one of three times `concurrency`, `FINISHING_PER_SLOT` in
//! `worker/run.rs`) while its outcome is stored and it is acknowledged, so that the next message starts
//! while this one finishes. A slow backend holds messages in the finishing phase; when every finish
//! permit is taken, handlers that end keep their run permit until one frees, so nothing more starts.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::telemetry::metrics;

/// One message's hold on the worker (see the module docs). Dropping it, however processing ends (a task
/// cancelled at shutdown included), frees everything.
#[derive(Debug)]
pub(crate) struct Slot {
    gauge: metrics::InFlight,
    run: Option<OwnedSemaphorePermit>,
    finish: Option<OwnedSemaphorePermit>,
    finishing: Arc<Semaphore>,
    in_flight: Arc<AtomicUsize>,
}

impl Slot {
    /// A slot for a message fetched with `run`, counted in the in-flight gauge and in `in_flight`.
    pub(crate) fn new(
        gauge: &metrics::InFlight,
        run: OwnedSemaphorePermit,
        finishing: &Arc<Semaphore>,
        in_flight: &Arc<AtomicUsize>,
    ) -> Self {
        gauge.add(1.0);
        in_flight.fetch_add(1, Ordering::Relaxed);
        Slot {
            gauge: gauge.clone(),
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
        self.gauge.add(-1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(run: &Arc<Semaphore>, finishing: &Arc<Semaphore>, count: &Arc<AtomicUsize>) -> Slot {
        let permit = run.clone().try_acquire_owned().expect("a free run permit");
        Slot::new(&metrics::InFlight::register("q"), permit, finishing, count)
    }

    #[tokio::test]
    async fn a_finished_handler_frees_its_run_slot_and_holds_a_finish_slot() {
        let (run, finishing) = (Arc::new(Semaphore::new(1)), Arc::new(Semaphore::new(1)));
        let count = Arc::new(AtomicUsize::new(0));
        let mut first = slot(&run, &finishing, &count);
        assert_eq!(run.available_permits(), 0);
        first.handler_done().await;
        assert_eq!(
            (run.available_permits(), finishing.available_permits()),
            (1, 0),
            "the next message may be fetched while this one finishes"
        );
        assert_eq!(count.load(Ordering::Relaxed), 1, "still in flight");
        drop(first);
        assert_eq!(
            (run.available_permits(), finishing.available_permits()),
            (1, 1)
        );
        assert_eq!(count.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn with_every_finish_slot_taken_a_handler_keeps_its_run_slot() {
        let (run, finishing) = (Arc::new(Semaphore::new(2)), Arc::new(Semaphore::new(1)));
        let count = Arc::new(AtomicUsize::new(0));
        let mut first = slot(&run, &finishing, &count);
        let mut second = slot(&run, &finishing, &count);
        first.handler_done().await;
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(50), second.handler_done()).await;
        assert!(waiting.is_err(), "no finish slot: it waits");
        assert_eq!(
            run.available_permits(),
            1,
            "and its run slot stays taken, so nothing more is fetched for it"
        );
        drop(first);
        second.handler_done().await;
        assert_eq!(run.available_permits(), 2);
    }
}
