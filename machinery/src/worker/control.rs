//! The worker's side of [`Server::cancel`](crate::Server::cancel): a listener for the broker's
//! cancellation requests, and the cancellation token of each task running in this worker.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::broker::Broker;

/// How long a request for a task this worker does not run is remembered, for a task that was about to
/// start when the request came.
const REMEMBER: Duration = Duration::from_secs(60);

/// The most requests remembered.
const REMEMBER_MAX: usize = 10_000;

/// The tasks running in one worker, by id, and the cancellation requests heard lately.
#[derive(Debug)]
pub(crate) struct Control {
    /// How long a cancelled task may take to return before its future is dropped.
    pub(crate) grace: Duration,
    running: Mutex<HashMap<String, CancellationToken>>,
    heard: Mutex<VecDeque<(String, Instant)>>,
    /// The listener, stopped with the worker (when the last reference to this goes).
    listener: OnceLock<AbortOnDropHandle<()>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Control {
    /// Starts listening on `broker`. A broker that cannot tell workers about cancellations leaves them
    /// to the mark in the result backend, which stops tasks that have not started.
    pub(crate) async fn start(broker: &dyn Broker, grace: Duration) -> Arc<Control> {
        let control = Arc::new(Control {
            grace,
            running: Mutex::default(),
            heard: Mutex::default(),
            listener: OnceLock::new(),
        });
        match broker.cancellations().await {
            Ok(mut requests) => {
                let weak: Weak<Control> = Arc::downgrade(&control);
                let listener = tokio::spawn(async move {
                    while let Some(uuid) = requests.recv().await {
                        let Some(control) = weak.upgrade() else {
                            return;
                        };
                        control.cancel(&uuid);
                    }
                });
                let _ = control.listener.set(AbortOnDropHandle::new(listener));
            }
            Err(error) => {
                tracing::debug!(%error, "this broker cannot tell workers about cancellations; only tasks that have not started can be cancelled");
            }
        }
        control
    }

    /// Cancels the task if it runs here, and remembers the request in case it is about to.
    fn cancel(&self, uuid: &str) {
        if let Some(token) = lock(&self.running).get(uuid) {
            tracing::info!(task.uuid = %uuid, "cancelling a running task");
            token.cancel();
        }
        let now = Instant::now();
        let mut heard = lock(&self.heard);
        while heard
            .front()
            .is_some_and(|(_, at)| now.duration_since(*at) > REMEMBER)
            || heard.len() >= REMEMBER_MAX
        {
            heard.pop_front();
        }
        heard.push_back((uuid.to_owned(), now));
    }

    /// The token of a task about to run, cancelled already if a request for it came lately; dropping
    /// the guard forgets the task.
    pub(crate) fn register(&self, uuid: &str) -> Running<'_> {
        let token = CancellationToken::new();
        lock(&self.running).insert(uuid.to_owned(), token.clone());
        if lock(&self.heard).iter().any(|(heard, _)| heard == uuid) {
            token.cancel();
        }
        Running {
            control: self,
            uuid: uuid.to_owned(),
            token,
        }
    }
}

/// A task registered as running ([`Control::register`]).
pub(crate) struct Running<'a> {
    control: &'a Control,
    uuid: String,
    pub(crate) token: CancellationToken,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        lock(&self.control.running).remove(&self.uuid);
    }
}
