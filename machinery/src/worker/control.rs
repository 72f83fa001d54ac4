//! The worker's side of [`Server::cancel`](crate::Server::cancel): a listener for the broker's
//! cancellation requests, and the cancellation token of each task running in this worker.

use std::borrow::Borrow;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};

use foldhash::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::broker::Broker;
use crate::wire::signature::Signature;

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
    running: Mutex<HashMap<ById, CancellationToken>>,
    heard: Mutex<Heard>,
    /// The listener, stopped with the worker (when the last reference to this goes).
    listener: OnceLock<AbortOnDropHandle<()>>,
}

/// A running task's key: its signature, shared with the run, found by its id (so that registering a
/// task copies nothing).
#[derive(Debug)]
struct ById(Arc<Signature>);

impl Borrow<str> for ById {
    fn borrow(&self) -> &str {
        &self.0.uuid
    }
}

impl PartialEq for ById {
    fn eq(&self, other: &ById) -> bool {
        self.0.uuid == other.0.uuid
    }
}

impl Eq for ById {}

impl Hash for ById {
    /// As the id's own hash: a `&str` finds its entry ([`Borrow`]).
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.uuid.as_str().hash(state);
    }
}

/// The cancellation requests heard lately: in the order they came (to forget the oldest), and counted
/// by id (so that a task about to start is looked up at once, however many there are).
#[derive(Debug, Default)]
struct Heard {
    order: VecDeque<(String, Instant)>,
    ids: HashMap<String, usize>,
}

impl Heard {
    fn forget_oldest(&mut self) {
        let Some((uuid, _)) = self.order.pop_front() else {
            return;
        };
        if let Some(count) = self.ids.get_mut(&uuid) {
            *count -= 1;
            if *count == 0 {
                self.ids.remove(&uuid);
            }
        }
    }

    fn remember(&mut self, uuid: &str, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(_, at)| now.duration_since(*at) > REMEMBER)
            || self.order.len() >= REMEMBER_MAX
        {
            self.forget_oldest();
        }
        self.order.push_back((uuid.to_owned(), now));
        *self.ids.entry(uuid.to_owned()).or_default() += 1;
    }

    fn contains(&self, uuid: &str) -> bool {
        self.ids.contains_key(uuid)
    }
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
        lock(&self.heard).remember(uuid, Instant::now());
    }

    /// The token of a task about to run, cancelled already if a request for it came lately; dropping
    /// the guard forgets the task.
    pub(crate) fn register<'a>(&'a self, signature: &'a Arc<Signature>) -> Running<'a> {
        let token = CancellationToken::new();
        lock(&self.running).insert(ById(signature.clone()), token.clone());
        if lock(&self.heard).contains(&signature.uuid) {
            token.cancel();
        }
        Running {
            control: self,
            uuid: &signature.uuid,
            token,
        }
    }
}

/// A task registered as running ([`Control::register`]).
pub(crate) struct Running<'a> {
    control: &'a Control,
    uuid: &'a str,
    pub(crate) token: CancellationToken,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        lock(&self.control.running).remove(self.uuid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heard_requests_are_found_by_id_and_the_oldest_forgotten_first() {
        let mut heard = Heard::default();
        let now = Instant::now();
        heard.remember("a", now);
        heard.remember("b", now);
        heard.remember("a", now);
        assert!(heard.contains("a") && heard.contains("b") && !heard.contains("c"));
        heard.forget_oldest(); // the first "a"; the second still counts
        assert!(heard.contains("a"));
        heard.forget_oldest(); // "b"
        assert!(!heard.contains("b"));
        heard.forget_oldest(); // the second "a"
        assert!(!heard.contains("a"));
        assert!(heard.order.is_empty() && heard.ids.is_empty());
    }

    #[test]
    fn requests_older_than_a_minute_are_forgotten_when_the_next_comes() {
        let mut heard = Heard::default();
        let Some(long_ago) = Instant::now().checked_sub(REMEMBER + Duration::from_secs(1)) else {
            return; // a clock too young to go back a minute
        };
        heard.remember("old", long_ago);
        heard.remember("new", Instant::now());
        assert!(!heard.contains("old"));
        assert!(heard.contains("new"));
    }
}
