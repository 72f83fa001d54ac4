//! The worker loop: fetch as many messages as there are free slots (and a few ahead, handed to the next
//! slots that free), start them together (one backend call per batch), run each batch in a tokio task of
//! its own, and on shutdown return what was fetched ahead, drain or cancel what runs and close the
//! consumer.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::process::{self, WorkerContext};
use super::slot::Slot;
use super::Stopped;
use crate::broker::{Consumer, Delivery};
use crate::retry::Backoff;
use crate::telemetry::metrics;

/// The most messages fetched in one call, however many slots are free.
const MAX_BATCH: usize = 128;

/// How long the loop waits for more free slots before fetching for fewer than it would like.
const GATHER: Duration = Duration::from_millis(1);

/// How many free slots a fetch waits for (up to [`GATHER`]): half the concurrency, at least one.
fn gather_target(concurrency: usize) -> usize {
    (concurrency / 2).clamp(1, MAX_BATCH)
}

/// How much the loop runs and holds at once.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sizes {
    /// Tasks running at once.
    pub(super) concurrency: usize,
    /// Messages held fetched beyond the free slots.
    pub(super) fetch_ahead: usize,
}

pub(super) async fn run(
    context: Arc<WorkerContext>,
    mut consumer: Box<dyn Consumer>,
    Sizes {
        concurrency,
        fetch_ahead,
    }: Sizes,
    stop: CancellationToken,
    abort: CancellationToken,
) -> Stopped {
    let slots = Arc::new(Semaphore::new(concurrency));
    // One tokio task per fetched batch, and the count of messages being processed, for the shutdown
    // report.
    let mut running = JoinSet::new();
    let in_flight = context.counters.running_gauge();
    let finishing = Arc::new(Semaphore::new(concurrency));
    let queue: Arc<str> = Arc::from(context.queue.as_str());
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    let mut fetch_failing = false;
    // Fetched ahead of free slots; handed out before anything is fetched again.
    let mut ahead: VecDeque<Delivery> = VecDeque::new();
    // Samples the queue's size for the metrics while the loop runs; dropped (and so stopped) with it.
    #[cfg(feature = "metrics")]
    let _sampler =
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(sample_queue(context.clone())));
    loop {
        while let Some(done) = running.try_join_next() {
            report_crash(done);
        }
        let first = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = stop.cancelled() => break,
        };
        let mut permits = vec![first];
        while permits.len() < MAX_BATCH {
            match slots.clone().try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }
        // While tasks still run, wait a moment for more of them to finish, so that one fetch serves several
        // free slots instead of one round trip per finished task. Never longer than GATHER: a slot freed
        // beside long-running tasks is filled almost at once.
        let wanted = gather_target(concurrency);
        if ahead.is_empty() && permits.len() < wanted {
            let gather = tokio::time::sleep(GATHER);
            tokio::pin!(gather);
            while permits.len() < wanted {
                tokio::select! {
                    permit = slots.clone().acquire_owned() => match permit {
                        Ok(permit) => permits.push(permit),
                        Err(_) => break,
                    },
                    _ = &mut gather => break,
                    _ = stop.cancelled() => break,
                }
            }
            if stop.is_cancelled() {
                break;
            }
        }
        // While the result backend is down, fetch nothing: a task run now could not store its outcome
        // and would only run again. Probe until it answers (`worker/health.rs`).
        if context.backend_health.is_down() {
            drop(permits);
            let backend = context.server.backend().as_ref();
            if !context
                .backend_health
                .wait_until_up(backend, &context.queue, &stop)
                .await
            {
                break;
            }
            continue;
        }
        if !ahead.is_empty() {
            // No round trip: the free slots take what was fetched ahead (any slot left over goes back).
            permits.truncate(ahead.len());
            let deliveries: Vec<Delivery> = ahead.drain(..permits.len()).collect();
            let batch = with_slots(deliveries, permits, &queue, &finishing, &in_flight);
            running.spawn(run_batch(context.clone(), batch));
            continue;
        }
        let batch = tokio::select! {
            batch = consumer.next_batch(permits.len() + fetch_ahead) => batch,
            _ = stop.cancelled() => break,
        };
        match batch {
            Ok(mut deliveries) => {
                if deliveries.len() > permits.len() {
                    ahead.extend(deliveries.drain(permits.len()..));
                }
                backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
                if std::mem::take(&mut fetch_failing) {
                    tracing::info!(queue = %context.queue, "fetching from the broker works again");
                    metrics::broker_reconnected(context.server.broker().kind());
                }
                let batch = with_slots(deliveries, permits, &queue, &finishing, &in_flight);
                running.spawn(run_batch(context.clone(), batch));
            }
            Err(error) => {
                fetch_failing = true;
                let delay = backoff.next_delay();
                tracing::warn!(%error, retry_in = ?delay, queue = %context.queue, "fetching from the broker failed");
                context.hooks.error(&error);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => break,
                }
            }
        }
    }

    while let Some(done) = running.try_join_next() {
        report_crash(done);
    }
    if !ahead.is_empty() {
        // Never started: dropped unsettled, each goes back to its queue at once (`Acknowledger::abandon`).
        tracing::debug!(queue = %context.queue, returned = ahead.len(), "returning the messages fetched ahead");
        ahead.clear();
    }
    tracing::info!(queue = %context.queue, running = in_flight.load(Ordering::Relaxed), "worker stopping; waiting for running tasks");
    // Stop consuming first, so other workers get the messages this one would not start anyway.
    tokio::select! {
        stopped = consumer.stop() => if let Err(error) = stopped {
            tracing::warn!(%error, queue = %context.queue, "stopping the consumer failed; its messages return when it closes");
        },
        _ = abort.cancelled() => {}
    }
    let mut aborted = 0;
    loop {
        tokio::select! {
            done = running.join_next() => match done {
                Some(done) => report_crash(done),
                None => break,
            },
            _ = abort.cancelled() => {
                aborted = in_flight.load(Ordering::Relaxed);
                running.abort_all();
                while running.join_next().await.is_some() {}
                break;
            }
        }
    }
    if let Err(error) = consumer.close().await {
        tracing::warn!(%error, queue = %context.queue, "closing the consumer failed; unfinished messages return when the broker notices");
    }
    tracing::info!(queue = %context.queue, aborted, "worker stopped");
    Stopped { aborted }
}

/// Pairs each delivery with a run slot (one permit each; permits left over are released).
fn with_slots(
    deliveries: Vec<Delivery>,
    permits: Vec<tokio::sync::OwnedSemaphorePermit>,
    queue: &Arc<str>,
    finishing: &Arc<Semaphore>,
    in_flight: &Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<(Delivery, Slot)> {
    deliveries
        .into_iter()
        .zip(permits)
        .map(|(delivery, permit)| (delivery, Slot::new(queue, permit, finishing, in_flight)))
        .collect()
}

/// Decodes a fetched batch, stores the RECEIVED and STARTED states of its tasks in one backend call, and
/// runs its tasks concurrently within this one tokio task: no spawn and no cross-thread wake-up per
/// message (batches still run on every runtime thread). A handler that computes for long stretches holds
/// up the rest of its batch, as it would hold up any async code on its thread: such work belongs in
/// `spawn_blocking`. Each message's slot goes with it; aborting this task cancels its tasks.
async fn run_batch(context: Arc<WorkerContext>, batch: Vec<(Delivery, Slot)>) {
    let mut ready = Vec::with_capacity(batch.len());
    let mut slots = Vec::with_capacity(batch.len());
    for (delivery, slot) in batch {
        if let Some(task) = process::decode(&context, delivery).await {
            ready.push(task);
            slots.push(slot);
        }
    }
    let starts = process::start(&context, &ready).await;
    let mut runs: FuturesUnordered<_> = ready
        .into_iter()
        .zip(starts)
        .zip(slots)
        .map(|((task, start), slot)| process::run(&context, task, start, slot))
        .collect();
    while runs.next().await.is_some() {}
}

/// How often a worker samples its queue's size for the metrics.
#[cfg(feature = "metrics")]
const SAMPLE_EVERY: Duration = Duration::from_secs(15);

#[cfg(feature = "metrics")]
async fn sample_queue(context: Arc<WorkerContext>) {
    loop {
        let broker = context.server.broker();
        // A broker with no inspection commands has no queue size to sample.
        let Ok(inspect) = broker.inspect() else {
            return;
        };
        // The cheap counts: the full statistics scan the delayed set, which can be millions of entries.
        if let Ok(stats) = inspect.queue_depth(&context.queue).await {
            metrics::queue_sampled(&context.queue, stats.pending, stats.delayed);
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
}

fn report_crash(done: Result<(), tokio::task::JoinError>) {
    if let Err(error) = done {
        if error.is_panic() {
            tracing::error!(%error, "a worker task panicked outside the task itself; its message returns to the queue");
        }
    }
}
