//! The sampler: every few seconds it finds the queues, reads their depth (the broker's cheap count, no
//! scan) and the workers' cards, and keeps an hour of samples per queue in memory for the charts and the
//! per-minute rates. The history is bounded: at most [`HOUR`] worth of samples per queue and at most
//! [`MAX_QUEUES`] queues.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::Utc;
use machinery::broker::WorkerInfo;

use super::Shared;

/// How much history is kept.
pub(crate) const HOUR: Duration = Duration::from_secs(3600);
/// The most queues whose history is kept (the queues sampled longest ago are forgotten first).
const MAX_QUEUES: usize = 200;
/// The window a rate is measured over.
const RATE_WINDOW_MS: i64 = 60_000;

/// One reading of one queue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Sample {
    /// Unix milliseconds.
    pub(crate) at_ms: i64,
    /// Messages waiting.
    pub(crate) pending: u64,
    /// Tasks its workers finished with SUCCESS so far (counted from the sampler's start); `None` when
    /// the broker keeps no worker cards.
    pub(crate) succeeded: Option<u64>,
    /// Likewise for FAILURE.
    pub(crate) failed: Option<u64>,
}

/// Succeeded and failed tasks per minute over the last minute of samples.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Rates {
    pub(crate) succeeded: Option<f64>,
    pub(crate) failed: Option<f64>,
}

#[derive(Debug, Default)]
struct State {
    history: BTreeMap<String, VecDeque<Sample>>,
    /// Each queue's running totals, built from the differences between cards.
    totals: HashMap<String, (u64, u64)>,
    /// The cards of the previous round: (queue, tag) → (succeeded, failed).
    cards: HashMap<(String, String), (u64, u64)>,
    last_round_ms: Option<i64>,
    queues: Vec<String>,
    discovered: Option<Instant>,
}

/// The in-memory history, shared by the sampling task and the handlers.
#[derive(Debug)]
pub(crate) struct Sampler {
    pub(crate) every: Duration,
    state: Mutex<State>,
}

impl Sampler {
    pub(crate) fn new(every: Duration) -> Sampler {
        Sampler {
            every,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind: keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The queues found at most one sampling period ago, if any were.
    pub(crate) fn cached_queues(&self) -> Option<Vec<String>> {
        let state = self.lock();
        match state.discovered {
            Some(at) if at.elapsed() < self.every => Some(state.queues.clone()),
            _ => None,
        }
    }

    /// Remembers the queues just found.
    pub(crate) fn found_queues(&self, queues: &[String]) {
        let mut state = self.lock();
        state.queues = queues.to_vec();
        state.discovered = Some(Instant::now());
    }

    /// A queue's samples, oldest first.
    pub(crate) fn history(&self, queue: &str) -> Vec<Sample> {
        self.lock()
            .history
            .get(queue)
            .map(|h| h.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Every queue's samples.
    pub(crate) fn all(&self) -> BTreeMap<String, Vec<Sample>> {
        self.lock()
            .history
            .iter()
            .map(|(q, h)| (q.clone(), h.iter().copied().collect()))
            .collect()
    }

    /// A queue's succeeded and failed per minute over the last minute (`None`: not known yet).
    pub(crate) fn rates(&self, queue: &str) -> Rates {
        rates(&self.history(queue))
    }

    /// Records one round: each queue's depth, and the workers' cards (`None` when the broker has none).
    pub(crate) fn record(&self, depths: &[(String, u64)], workers: Option<&[WorkerInfo]>) {
        let now = Utc::now().timestamp_millis();
        let mut state = self.lock();
        let previous_round = state.last_round_ms;
        state.last_round_ms = Some(now);
        let mut cards = HashMap::new();
        for worker in workers.unwrap_or_default() {
            let Some(card) = &worker.card else { continue };
            let key = (worker.queue.clone(), worker.consumer_tag.clone());
            let delta = match state.cards.get(&key) {
                Some(&(s, f)) => (
                    card.succeeded.saturating_sub(s),
                    card.failed.saturating_sub(f),
                ),
                // A worker that started after the last round: everything it did is new.
                None if previous_round.is_some_and(|t| card.started_ms >= t) => {
                    (card.succeeded, card.failed)
                }
                None => (0, 0),
            };
            let total = state.totals.entry(worker.queue.clone()).or_default();
            total.0 += delta.0;
            total.1 += delta.1;
            cards.insert(key, (card.succeeded, card.failed));
        }
        state.cards = cards;
        let keep = (HOUR.as_millis() / self.every.as_millis().max(1)) as usize + 1;
        for (queue, pending) in depths {
            let (succeeded, failed) = match (workers, state.totals.get(queue)) {
                (None, _) => (None, None),
                (Some(_), Some(&(s, f))) => (Some(s), Some(f)),
                (Some(_), None) => (Some(0), Some(0)),
            };
            let history = state.history.entry(queue.clone()).or_default();
            history.push_back(Sample {
                at_ms: now,
                pending: *pending,
                succeeded,
                failed,
            });
            while history.len() > keep
                || history
                    .front()
                    .is_some_and(|s| now - s.at_ms > HOUR.as_millis() as i64)
            {
                history.pop_front();
            }
        }
        while state.history.len() > MAX_QUEUES {
            let stalest = state
                .history
                .iter()
                .min_by_key(|(_, h)| h.back().map_or(i64::MIN, |s| s.at_ms))
                .map(|(q, _)| q.clone());
            match stalest {
                Some(queue) => state.history.remove(&queue),
                None => break,
            };
        }
    }
}

/// Per-minute rates over the last [`RATE_WINDOW_MS`] of `samples`.
pub(crate) fn rates(samples: &[Sample]) -> Rates {
    let Some(last) = samples.last() else {
        return Rates::default();
    };
    let first = samples
        .iter()
        .find(|s| last.at_ms - s.at_ms <= RATE_WINDOW_MS)
        .unwrap_or(last);
    if first.at_ms == last.at_ms {
        return Rates::default();
    }
    let minutes = (last.at_ms - first.at_ms) as f64 / 60_000.0;
    let per_minute = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?) as f64 / minutes);
    Rates {
        succeeded: per_minute(first.succeeded, last.succeeded),
        failed: per_minute(first.failed, last.failed),
    }
}

/// The queues to show: those the broker finds (or the default queue where it cannot list them), the
/// ones named with `--queue`, and those with history. Found at most once per sampling period.
pub(crate) async fn queues(web: &Shared) -> Result<Vec<String>, super::WebError> {
    if let Some(queues) = web.sampler.cached_queues() {
        return Ok(queues);
    }
    let inspect = web.inspect()?;
    let mut set: BTreeSet<String> = match inspect.queues().await {
        Ok(found) => found.into_iter().collect(),
        Err(machinery::broker::BrokerError::Unsupported { .. }) => {
            BTreeSet::from([web.config.default_queue.clone()])
        }
        Err(e) => return Err(web.broker_error("listing queues", e)),
    };
    set.extend(web.named.iter().cloned());
    let queues: Vec<String> = set.into_iter().collect();
    web.sampler.found_queues(&queues);
    Ok(queues)
}

/// Samples until the process ends.
pub(crate) async fn run(web: Shared) {
    let mut tick = tokio::time::interval(web.sampler.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        match round(&web).await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("sampling the queues works again");
            }
            Ok(()) => {}
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(%error, "sampling the queues failed; the charts have a gap until it works");
            }
            Err(_) => {}
        }
    }
}

async fn round(web: &Shared) -> Result<(), super::WebError> {
    let inspect = web.inspect()?;
    let queues = queues(web).await?;
    let mut depths = Vec::with_capacity(queues.len());
    for queue in queues {
        let stats = inspect
            .queue_depth(&queue)
            .await
            .map_err(|e| web.broker_error(format!("reading the depth of queue {queue:?}"), e))?;
        depths.push((queue, stats.pending));
    }
    let workers = inspect.workers().await.ok();
    web.sampler.record(&depths, workers.as_deref());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use machinery::broker::WorkerCard;

    fn worker(queue: &str, tag: &str, succeeded: u64, failed: u64) -> WorkerInfo {
        WorkerInfo {
            queue: queue.into(),
            consumer_tag: tag.into(),
            in_flight: 0,
            heartbeat_age: None,
            alive: true,
            card: Some(WorkerCard {
                succeeded,
                failed,
                started_ms: 0,
                ..WorkerCard::default()
            }),
        }
    }

    #[test]
    fn totals_grow_by_the_differences_between_cards() {
        let sampler = Sampler::new(Duration::from_secs(1));
        let depth = [("q".to_owned(), 3)];
        sampler.record(&depth, Some(&[worker("q", "a", 10, 1)]));
        sampler.record(&depth, Some(&[worker("q", "a", 15, 3)]));
        // A restarted worker's counters start again from zero: nothing is subtracted.
        sampler.record(&depth, Some(&[worker("q", "a", 2, 0)]));
        let history = sampler.history("q");
        let totals: Vec<_> = history.iter().map(|s| (s.succeeded, s.failed)).collect();
        assert_eq!(
            totals,
            [(Some(0), Some(0)), (Some(5), Some(2)), (Some(5), Some(2))]
        );
        assert_eq!(history[0].pending, 3);
        sampler.record(&depth, None);
        assert_eq!(sampler.history("q").last().unwrap().succeeded, None);
    }

    #[test]
    fn rates_are_per_minute_over_the_last_minute() {
        let at = |secs: i64, s: u64| Sample {
            at_ms: secs * 1000,
            pending: 0,
            succeeded: Some(s),
            failed: None,
        };
        let rates = rates(&[at(0, 0), at(100, 10), at(130, 40)]);
        assert_eq!(rates.succeeded, Some(60.0));
        assert_eq!(rates.failed, None);
        assert_eq!(super::rates(&[at(0, 5)]), Rates::default());
    }
}
