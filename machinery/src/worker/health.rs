//! Whether the result backend answers, as one worker sees it (issue 13).
//!
//! A task whose outcome cannot be stored goes back to the queue and runs again; while the backend is
//! down, a worker that kept fetching would run every task again and again, repeating its side effects.
//! So when storing a state fails for a transient reason (I/O, a timeout, a refused connection) and a
//! probe right after gets no answer either, the worker marks the backend down (a failure the probe
//! contradicts belongs to that one write, as a pipeline some other record broke: the backend stays up):
//! the fetch loop takes no new message, probes the backend
//! ([`Backend::ping`]) with a growing pause until it answers, and only then
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

    /// A state could not be stored because of `error`; returns whether the backend is down. A permanent
    /// error says the backend answered, so it is not. For a transient one the backend is probed once
    /// (unless it is down already): if the probe gets no answer either, the backend counts as down until
    /// a probe in [`BackendHealth::wait_until_up`] answers (the first call logs a WARN; later ones are
    /// silent).
    pub(crate) async fn failed(
        &self,
        error: &BackendError,
        backend: &dyn Backend,
        queue: &str,
    ) -> bool {
        if error.is_permanent() {
            return false;
        }
        if self.is_down() {
            return true;
        }
        if answers(backend).await {
            tracing::debug!(%error, "a state could not be stored, but the result backend answers");
            return false;
        }
        if !self.down.swap(true, Ordering::SeqCst) {
            tracing::warn!(%error, backend = backend.kind(), %queue, "the result backend cannot be reached; the worker stops fetching until it answers, and puts back what it fetched");
            metrics::backend_outage(backend.kind());
        }
        true
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
            tokio::select! {
                answered = answers(backend) => if answered { break },
                _ = stop.cancelled() => return false,
            }
        }
        self.down.store(false, Ordering::SeqCst);
        tracing::info!(backend = backend.kind(), %queue, paused = ?since.elapsed(), probes, "the result backend answers again; the worker fetches again");
        true
    }
}

/// Whether `backend` answers a [`ping`](Backend::ping); a refusal is an answer: the backend is there.
async fn answers(backend: &dyn Backend) -> bool {
    match backend.ping().await {
        Ok(()) => true,
        Err(error) if error.is_permanent() => true,
        Err(error) => {
            tracing::debug!(%error, "the result backend does not answer");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `null` backend answers every probe (with a refusal: it stores nothing). A backend that does
    /// not answer is `tests/tests/faults_backend.rs`'s (behind a fault proxy).
    async fn answering() -> std::sync::Arc<dyn Backend> {
        let config = crate::Config::new("memory://", "null");
        crate::connect::backend(&config)
            .await
            .expect("the null backend")
    }

    #[tokio::test]
    async fn a_failure_the_probe_contradicts_leaves_it_up() {
        let health = BackendHealth::default();
        let backend = answering().await;
        let permanent = BackendError::NotStored {
            backend: "null",
            what: "states",
        };
        assert!(!health.failed(&permanent, backend.as_ref(), "q").await);
        let transient = BackendError::operation("set state", std::io::Error::other("reset"));
        assert!(!health.failed(&transient, backend.as_ref(), "q").await);
        assert!(!health.is_down(), "the backend answered the probe");
    }

    #[tokio::test]
    async fn once_down_it_stays_down_until_a_probe_answers() {
        let health = BackendHealth::default();
        let backend = answering().await;
        health.down.store(true, Ordering::SeqCst);
        let transient = BackendError::operation("set state", std::io::Error::other("reset"));
        assert!(health.failed(&transient, backend.as_ref(), "q").await);
        let stop = CancellationToken::new();
        stop.cancel();
        assert!(!health.wait_until_up(backend.as_ref(), "q", &stop).await);
        assert!(health.is_down(), "stopped before a probe answered");
        let started = Instant::now();
        assert!(
            health
                .wait_until_up(backend.as_ref(), "q", &CancellationToken::new())
                .await
        );
        assert!(!health.is_down());
        assert!(started.elapsed() >= PROBE_FIRST, "the first probe waits");
    }
}
