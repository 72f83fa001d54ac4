//! Whether the result backend answers, as one worker sees it (issue 13).
//!
//! A task whose outcome cannot be stored goes back to the queue and runs again; while the backend is
//! down, a worker that kept fetching would run every task again and again, repeating its side effects.
//! So when storing a state fails for a transient reason (I/O, a timeout, a refused connection), the
//! worker marks the backend down: the fetch loop takes no new message, probes the backend
//! ([`Backend::ping`](crate::backend::Backend::ping)) with a growing pause until it answers, and only then
//! fetches again; messages fetched meanwhile are put back without running. A WARN is logged once when
//! the worker pauses, an INFO when it resumes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, BackendError};
use crate::retry::Backoff;
use crate::telemetry::metrics;

/// The first pause between probes of a backend that is down, and the longest.
const PROBE_FIRST: Duration = Duration::from_millis(100);
const PROBE_MAX: Duration = Duration::from_secs(2);

/// One worker's view of its result backend: up, or down since a store failed.
#[derive(Debug, Default)]
pub(crate) struct BackendHealth {
    down: AtomicBool,
}

impl BackendHealth {
    /// Whether a transient store failure was seen and no probe has answered since.
    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    /// A state could not be stored because of `error`: if it is transient, the backend counts as down
    /// until a probe answers (the first call logs a WARN; later ones are silent). A permanent error says
    /// the backend answered, so it changes nothing.
    pub(crate) fn failed(&self, error: &BackendError, backend: &dyn Backend, queue: &str) {
        if error.is_permanent() {
            return;
        }
        if !self.down.swap(true, Ordering::SeqCst) {
            tracing::warn!(%error, backend = backend.kind(), %queue, "the result backend cannot be reached; the worker stops fetching until it answers, and puts back what it fetched");
            metrics::backend_outage(backend.kind());
        }
    }

    /// Probes `backend` with a growing pause ([`PROBE_FIRST`] doubling to [`PROBE_MAX`]) until it answers,
    /// then marks it up and logs an INFO. Returns `false` if `stop` is cancelled first.
    pub(crate) async fn wait_until_up(
        &self,
        backend: &dyn Backend,
        queue: &str,
        stop: &CancellationToken,
    ) -> bool {
        let since = Instant::now();
        let mut backoff = Backoff::new(PROBE_FIRST, PROBE_MAX);
        let mut probes = 0u32;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = stop.cancelled() => return false,
            }
            probes += 1;
            let answer = tokio::select! {
                answer = backend.ping() => answer,
                _ = stop.cancelled() => return false,
            };
            match answer {
                // A refusal is an answer: the backend is there.
                Ok(()) => break,
                Err(error) if error.is_permanent() => break,
                Err(error) => {
                    tracing::debug!(%error, probes, "the result backend still does not answer");
                }
            }
        }
        self.down.store(false, Ordering::SeqCst);
        tracing::info!(backend = backend.kind(), %queue, paused = ?since.elapsed(), probes, "the result backend answers again; the worker fetches again");
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_transient_failure_marks_it_down_until_a_probe_answers() {
        let health = BackendHealth::default();
        // The `null` backend answers every probe (with a refusal: it stores nothing).
        let config = crate::Config::new("memory://", "null");
        let backend = crate::connect::backend(&config)
            .await
            .expect("the null backend");
        let backend = backend.as_ref();
        let permanent = BackendError::NotStored {
            backend: "null",
            what: "states",
        };
        health.failed(&permanent, backend, "q");
        assert!(!health.is_down(), "a refusal is an answer");
        let transient = BackendError::operation("set state", std::io::Error::other("reset"));
        health.failed(&transient, backend, "q");
        health.failed(&transient, backend, "q");
        assert!(health.is_down());
        assert!(
            health
                .wait_until_up(backend, "q", &CancellationToken::new())
                .await
        );
        assert!(!health.is_down());
        health.failed(&transient, backend, "q");
        let stop = CancellationToken::new();
        stop.cancel();
        assert!(!health.wait_until_up(backend, "q", &stop).await);
        assert!(health.is_down(), "stopped before a probe answered");
    }
}
