//! The worker loop: keep a buffer of fetched messages topped up in the background (a fetch runs while
//! the tasks do), hand buffered messages to free slots as they free (one backend call per handed-out
//! batch to start them), run each batch in a tokio task of its own, and on shutdown return what was
//! fetched ahead, drain or cancel what runs and close the consumer.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::process::{self, WorkerContext};
use super::slot::Slot;
use super::Stopped;
use crate::broker::{BrokerError, Consumer, Delivery};
use crate::retry::Backoff;
use crate::telemetry::metrics;

/// The most messages fetched in one call, however many slots are free.
const MAX_BATCH: usize = 128;

/// Tasks that may be finishing (storing their outcome, acknowledging) at once, per run slot. With quick
/// tasks the finishing round trip is most of a message's time in the worker, and one finish slot per run
/// slot capped a drain at the concurrency ÷ that round trip: Redis with the `null` backend at
/// concurrency 10 drained 58k tasks/s with one, 67k with three (`machinery-bench`, docs/benchmarks.md).
const FINISHING_PER_SLOT: usize = 3;

/// How much the loop runs and holds at once.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sizes {
    /// Tasks running at once.
    pub(super) concurrency: usize,
    /// Messages held fetched beyond the free slots.
    pub(super) fetch_ahead: usize,
}

/// A fetch running beside the loop.
type Fetch = Pin<Box<dyn Future<Output = Result<Vec<Delivery>, BrokerError>> + Send>>;

/// The consumer, shared by the loop and the fetch in flight; taken out when the loop ends.
type SharedConsumer = Arc<Mutex<Option<Box<dyn Consumer>>>>;

/// A fetch of up to `max` messages that holds the consumer until it is done or dropped.
fn fetch(consumer: &SharedConsumer, max: usize) -> Fetch {
    let consumer = consumer.clone();
    Box::pin(async move {
        match consumer.lock_owned().await.as_mut() {
            Some(consumer) => consumer.next_batch(max).await,
            None => Ok(Vec::new()),
        }
    })
}

/// Awaits `future` if there is one, else never finishes (a `select!` branch that is switched off).
async fn if_any<F: Future + Unpin>(future: Option<&mut F>) -> F::Output {
    match future {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// How many messages a new fetch may ask for: enough to fill the free slots and the buffer, never so
/// many that the running, the buffered and the fetched together exceed the concurrency plus
/// `fetch_ahead`. `None` while the buffer is still more than half full (the fetch waits for more room,
/// so that one call serves many slots).
fn refill_size(fetch_ahead: usize, free_slots: usize, buffered: usize) -> Option<usize> {
    if buffered > fetch_ahead / 2 {
        return None;
    }
    let room = (fetch_ahead + free_slots).saturating_sub(buffered);
    (room > 0).then_some(room.min(MAX_BATCH))
}

pub(super) async fn run(
    context: Arc<WorkerContext>,
    consumer: Box<dyn Consumer>,
    Sizes {
        concurrency,
        fetch_ahead,
    }: Sizes,
    stop: CancellationToken,
    abort: CancellationToken,
) -> Stopped {
    let slots = Arc::new(Semaphore::new(concurrency));
    // One tokio task per handed-out batch, and the count of messages being processed, for the shutdown
    // report.
    let mut running = JoinSet::new();
    let in_flight = context.counters.running_gauge();
    let finishing = Arc::new(Semaphore::new(concurrency * FINISHING_PER_SLOT));
    let in_flight_gauge = metrics::InFlight::register(&context.queue);
    // Shared with the fetch in flight, which may be dropped half-way (the consumer is cancel-safe).
    let consumer: SharedConsumer = Arc::new(Mutex::new(Some(consumer)));
    let mut fetching: Option<Fetch> = None;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    let mut fetch_failing = false;
    // After a failed fetch, no new one before this.
    let mut pause: Option<Pin<Box<tokio::time::Sleep>>> = None;
    // Fetched, not yet handed to a slot.
    let mut ahead: VecDeque<Delivery> = VecDeque::new();
    // Samples the queue's size for the metrics while the loop runs; dropped (and so stopped) with it.
    #[cfg(feature = "metrics")]
    let _sampler =
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(sample_queue(context.clone())));
    loop {
        while let Some(done) = running.try_join_next() {
            report_crash(done);
        }
        if stop.is_cancelled() {
            break;
        }
        // While the result backend is down, start nothing and fetch nothing: a task run now could not
        // store its outcome and would only run again. Probe until it answers (`worker/health.rs`).
        if context.backend_health.is_down() {
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
        if fetching.is_none() && pause.is_none() {
            if let Some(max) = refill_size(fetch_ahead, slots.available_permits(), ahead.len()) {
                fetching = Some(fetch(&consumer, max));
            }
        }
        let idle = fetching.is_none() && pause.is_none() && ahead.is_empty();
        tokio::select! {
            permit = slots.clone().acquire_owned(), if !ahead.is_empty() => {
                let Ok(first) = permit else { break };
                // No round trip: the free slots take what was fetched (one start call for them all).
                let mut permits = Vec::with_capacity(ahead.len().min(slots.available_permits() + 1));
                permits.push(first);
                while permits.len() < ahead.len() {
                    match slots.clone().try_acquire_owned() {
                        Ok(permit) => permits.push(permit),
                        Err(_) => break,
                    }
                }
                let deliveries: Vec<Delivery> = ahead.drain(..permits.len()).collect();
                let batch = with_slots(deliveries, permits, &in_flight_gauge, &finishing, &in_flight);
                running.spawn(run_batch(context.clone(), batch));
            }
            fetched = if_any(fetching.as_mut()), if fetching.is_some() => {
                fetching = None;
                match fetched {
                    Ok(deliveries) => {
                        ahead.extend(deliveries);
                        backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
                        if std::mem::take(&mut fetch_failing) {
                            tracing::info!(queue = %context.queue, "fetching from the broker works again");
                            metrics::broker_reconnected(context.server.broker().kind());
                        }
                    }
                    Err(error) => {
                        fetch_failing = true;
                        let delay = backoff.next_delay();
                        tracing::warn!(%error, retry_in = ?delay, queue = %context.queue, "fetching from the broker failed");
                        context.hooks.error(&error);
                        pause = Some(Box::pin(tokio::time::sleep(delay)));
                    }
                }
            }
            _ = if_any(pause.as_mut()), if pause.is_some() => {
                pause = None;
            }
            // Every slot is busy and nothing may be fetched ahead: wait for one to free, then fetch for it.
            permit = slots.acquire(), if idle => drop(permit),
            _ = stop.cancelled() => break,
        }
    }

    // A fetch cut off here is safe: the consumer hands back whatever it had taken when it closes.
    drop(fetching);
    while let Some(done) = running.try_join_next() {
        report_crash(done);
    }
    if !ahead.is_empty() {
        // Never started: dropped unsettled, each goes back to its queue at once (`Acknowledger::abandon`).
        tracing::debug!(queue = %context.queue, returned = ahead.len(), "returning the messages fetched ahead");
        ahead.clear();
    }
    tracing::info!(queue = %context.queue, running = in_flight.load(Ordering::Relaxed), "worker stopping; waiting for running tasks");
    // Dropping the fetch released its hold on the consumer.
    let mut consumer = consumer.lock().await.take();
    if let Some(consumer) = consumer.as_mut() {
        // Stop consuming first, so other workers get the messages this one would not start anyway.
        tokio::select! {
            stopped = consumer.stop() => if let Err(error) = stopped {
                tracing::warn!(%error, queue = %context.queue, "stopping the consumer failed; its messages return when it closes");
            },
            _ = abort.cancelled() => {}
        }
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
    if let Some(consumer) = consumer {
        if let Err(error) = consumer.close().await {
            tracing::warn!(%error, queue = %context.queue, "closing the consumer failed; unfinished messages return when the broker notices");
        }
    }
    tracing::info!(queue = %context.queue, aborted, "worker stopped");
    Stopped { aborted }
}

/// Pairs each delivery with a run slot (one permit each; permits left over are released).
fn with_slots(
    deliveries: Vec<Delivery>,
    permits: Vec<tokio::sync::OwnedSemaphorePermit>,
    gauge: &metrics::InFlight,
    finishing: &Arc<Semaphore>,
    in_flight: &Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<(Delivery, Slot)> {
    deliveries
        .into_iter()
        .zip(permits)
        .map(|(delivery, permit)| (delivery, Slot::new(gauge, permit, finishing, in_flight)))
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
    let started: Vec<_> = ready.iter().map(process::Ready::started_state).collect();
    let starts = super::start::start(&context, &ready, &started).await;
    let mut runs: FuturesUnordered<_> = ready
        .into_iter()
        .zip(starts)
        .zip(started)
        .zip(slots)
        // Boxed where it is made: a run's future is a few KB, which FuturesUnordered would otherwise
        // copy on its way into the set.
        .map(|(((task, start), started), slot)| {
            Box::pin(process::run(&context, task, start, started, slot))
        })
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

#[cfg(test)]
mod tests {
    use super::refill_size;

    #[test]
    fn a_refill_fills_the_free_slots_and_the_buffer_and_no_more() {
        // Concurrency 10, 20 ahead: nothing running and nothing held asks for 30.
        assert_eq!(refill_size(20, 10, 0), Some(30));
        // All slots busy, 10 buffered: 10 more, so 10 + 10 + 10 are held.
        assert_eq!(refill_size(20, 0, 10), Some(10));
        // More than half the buffer left: wait.
        assert_eq!(refill_size(20, 5, 11), None);
        // Never more than one fetch may take.
        assert_eq!(refill_size(400, 100, 0), Some(128));
    }

    #[test]
    fn without_fetching_ahead_a_refill_is_for_free_slots_only() {
        assert_eq!(refill_size(0, 3, 0), Some(3));
        assert_eq!(refill_size(0, 0, 0), None);
        assert_eq!(refill_size(0, 2, 1), None);
    }
}
