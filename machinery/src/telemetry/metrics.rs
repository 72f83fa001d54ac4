//! Metrics through the [`metrics`](https://docs.rs/metrics) facade: the application picks the exporter
//! (Prometheus, StatsD, ...) by installing a recorder; without one, recording costs next to nothing.
//! A worker registers its per-task counters and its in-flight gauge once, when it starts
//! (`TaskMetrics`, `InFlight`): install the recorder before starting workers.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `machinery_tasks_received_total` | counter | `task` | messages of a known task taken by a worker |
//! | `machinery_tasks_succeeded_total` | counter | `task` | runs that ended in SUCCESS |
//! | `machinery_tasks_failed_total` | counter | `task` | runs that ended in FAILURE |
//! | `machinery_tasks_retried_total` | counter | `task` | runs that failed and were scheduled again |
//! | `machinery_task_duration_seconds` | histogram | `task` | how long one run took |
//! | `machinery_tasks_in_flight` | gauge | `queue` | messages a worker holds right now |
//! | `machinery_tasks_dead_lettered_total` | counter | `queue`, `reason` (`malformed`, `unknown_task`) | messages given up on |
//! | `machinery_queue_depth` | gauge | `queue` | messages waiting, sampled by each worker |
//! | `machinery_queue_delayed` | gauge | `queue` | messages waiting for their ETA, sampled (where the broker can tell; on Redis, every queue's: the set is shared) |
//! | `machinery_broker_reconnects_total` | counter | `broker` | times a worker got messages again after broker errors |
//! | `machinery_tasks_not_run_again_total` | counter | `task` | messages delivered again whose SUCCESS was stored: follow-ups sent, the task not run |
//! | `machinery_backend_outages_total` | counter | `backend` | times a worker stopped fetching because it could not store states |

use std::time::Duration;

#[cfg(feature = "metrics")]
use ::metrics::{counter, gauge, histogram};

/// One task's counters and duration histogram, registered once when a worker starts (building a key
/// and its labels on every call cost about 2,000 instructions a task, recorder or not). A recorder
/// installed after the worker started is not seen by it: install it first, as `metrics` asks.
#[derive(Debug)]
pub(crate) struct TaskMetrics {
    #[cfg(feature = "metrics")]
    received: ::metrics::Counter,
    #[cfg(feature = "metrics")]
    succeeded: ::metrics::Counter,
    #[cfg(feature = "metrics")]
    failed: ::metrics::Counter,
    #[cfg(feature = "metrics")]
    retried: ::metrics::Counter,
    #[cfg(feature = "metrics")]
    duration: ::metrics::Histogram,
}

impl TaskMetrics {
    /// The handles of `task` (registered tasks' names are static: the labels borrow them).
    pub(crate) fn register(task: &'static str) -> TaskMetrics {
        let _ = task;
        TaskMetrics {
            #[cfg(feature = "metrics")]
            received: counter!("machinery_tasks_received_total", "task" => task),
            #[cfg(feature = "metrics")]
            succeeded: counter!("machinery_tasks_succeeded_total", "task" => task),
            #[cfg(feature = "metrics")]
            failed: counter!("machinery_tasks_failed_total", "task" => task),
            #[cfg(feature = "metrics")]
            retried: counter!("machinery_tasks_retried_total", "task" => task),
            #[cfg(feature = "metrics")]
            duration: histogram!("machinery_task_duration_seconds", "task" => task),
        }
    }

    /// A message of the task was taken.
    pub(crate) fn received(&self) {
        #[cfg(feature = "metrics")]
        self.received.increment(1);
    }

    /// A run ended.
    pub(crate) fn finished(&self, outcome: Outcome, took: Duration) {
        #[cfg(feature = "metrics")]
        {
            match outcome {
                Outcome::Succeeded => &self.succeeded,
                Outcome::Failed => &self.failed,
                Outcome::Retried => &self.retried,
            }
            .increment(1);
            self.duration.record(took.as_secs_f64());
        }
        let _ = (outcome, took);
    }
}

/// How a run ended, for the outcome counters.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
    Succeeded,
    Failed,
    Retried,
}

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy)]
pub(crate) enum DeadLetterReason {
    Malformed,
    UnknownTask,
    /// The task's final state can never be stored.
    Unstorable,
}

/// A message was dead-lettered.
pub(crate) fn dead_lettered(queue: &str, reason: DeadLetterReason) {
    #[cfg(feature = "metrics")]
    {
        let reason = match reason {
            DeadLetterReason::Malformed => "malformed",
            DeadLetterReason::UnknownTask => "unknown_task",
            DeadLetterReason::Unstorable => "unstorable",
        };
        counter!("machinery_tasks_dead_lettered_total", "queue" => queue.to_owned(), "reason" => reason)
            .increment(1);
    }
    let _ = (queue, reason);
}

/// The gauge of the messages a worker holds, registered once when the worker starts (see
/// [`TaskMetrics`]).
#[derive(Debug, Clone)]
pub(crate) struct InFlight {
    #[cfg(feature = "metrics")]
    gauge: ::metrics::Gauge,
}

impl InFlight {
    /// The gauge of `queue`.
    pub(crate) fn register(queue: &str) -> InFlight {
        let _ = queue;
        InFlight {
            #[cfg(feature = "metrics")]
            gauge: gauge!("machinery_tasks_in_flight", "queue" => queue.to_owned()),
        }
    }

    /// The number of messages held changed by `delta`.
    pub(crate) fn add(&self, delta: f64) {
        #[cfg(feature = "metrics")]
        self.gauge.increment(delta);
        let _ = delta;
    }
}

/// A sample of a queue's size.
#[cfg(feature = "metrics")]
pub(crate) fn queue_sampled(queue: &str, pending: u64, delayed: Option<u64>) {
    gauge!("machinery_queue_depth", "queue" => queue.to_owned()).set(pending as f64);
    if let Some(delayed) = delayed {
        gauge!("machinery_queue_delayed", "queue" => queue.to_owned()).set(delayed as f64);
    }
}

/// A message came again for a task whose SUCCESS is stored: its follow-ups were sent without running it.
pub(crate) fn not_run_again(task: &str) {
    #[cfg(feature = "metrics")]
    counter!("machinery_tasks_not_run_again_total", "task" => task.to_owned()).increment(1);
    let _ = task;
}

/// A worker stopped fetching because its result backend could not be reached.
pub(crate) fn backend_outage(backend: &'static str) {
    #[cfg(feature = "metrics")]
    counter!("machinery_backend_outages_total", "backend" => backend).increment(1);
    let _ = backend;
}

/// A worker fetched messages again after the broker had failed.
pub(crate) fn broker_reconnected(broker: &'static str) {
    #[cfg(feature = "metrics")]
    counter!("machinery_broker_reconnects_total", "broker" => broker).increment(1);
    let _ = broker;
}
