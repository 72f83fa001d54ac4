//! The machinery measurements: sending, draining a filled queue with a worker process, and send→get
//! round trips.

use std::time::{Duration, Instant};

use machinery::Server;
use redis::aio::MultiplexedConnection;
use tokio::task::JoinSet;

use crate::ceiling::share;
use crate::child::{ChildWorker, Finished, WorkerSpec};
use crate::commands::{self, Delta};
use crate::error::BenchError;

/// How long `get` waits for one round trip's result.
const GET_TIMEOUT: Duration = Duration::from_secs(10);
/// Round trips run before the measured ones (connections, subscriptions, script loading).
pub(crate) const WARM_UP_ROUND_TRIPS: usize = 10;

/// How long sending or draining `tasks` tasks may take: 30 s plus 5 ms per task (200 tasks/s).
pub(crate) fn phase_timeout(tasks: u64) -> Duration {
    Duration::from_secs(30) + Duration::from_millis(5 * tasks)
}

/// Tasks sent, and how fast.
#[derive(Debug)]
pub(crate) struct Sent {
    /// Tasks per second.
    pub(crate) rate: f64,
    /// Their ids (the result states to delete afterwards).
    pub(crate) uuids: Vec<String>,
}

/// Sends `tasks` no-op tasks, one sender awaiting each send.
pub(crate) async fn send_sequential(server: &Server, tasks: u64) -> Result<Sent, BenchError> {
    let work = async {
        let mut uuids = Vec::with_capacity(tasks as usize);
        let started = Instant::now();
        for _ in 0..tasks {
            let result = crate::noop::send(server).await?;
            uuids.push(result.uuid().to_owned());
        }
        Ok::<_, BenchError>(Sent {
            rate: tasks as f64 / started.elapsed().as_secs_f64(),
            uuids,
        })
    };
    within(phase_timeout(tasks), "sending with one sender", work).await
}

/// Sends `tasks` no-op tasks from `senders` concurrent tokio tasks sharing `server`, each awaiting its
/// sends one after another.
pub(crate) async fn send_concurrent(
    server: &Server,
    tasks: u64,
    senders: usize,
) -> Result<Sent, BenchError> {
    let work = async {
        let started = Instant::now();
        let mut set = JoinSet::new();
        for i in 0..senders {
            let server = server.clone();
            let count = share(tasks, senders, i);
            set.spawn(async move {
                let mut uuids = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    let result = crate::noop::send(&server).await?;
                    uuids.push(result.uuid().to_owned());
                }
                Ok::<_, BenchError>(uuids)
            });
        }
        let mut uuids = Vec::with_capacity(tasks as usize);
        while let Some(joined) = set.join_next().await {
            let sent =
                joined.map_err(|e| BenchError::Failed(format!("a sender failed: {e}")))??;
            uuids.extend(sent);
        }
        Ok::<_, BenchError>(Sent {
            rate: tasks as f64 / started.elapsed().as_secs_f64(),
            uuids,
        })
    };
    within(
        phase_timeout(tasks),
        &format!("sending with {senders} senders"),
        work,
    )
    .await
}

/// One drain of a filled queue.
#[derive(Debug)]
pub(crate) struct Drained {
    /// Tasks per second, from the start of the first task to the end of the last.
    pub(crate) rate: f64,
    /// What the worker process reported, with its RSS and CPU.
    pub(crate) finished: Finished,
    /// The Redis commands run meanwhile (Redis broker only).
    pub(crate) commands: Option<Delta>,
}

/// Starts a worker process on a queue already holding `spec.expect` tasks and waits until it has run
/// them all. With `stats`, snapshots `INFO commandstats` just before starting the process and right
/// after it reports `done`.
pub(crate) async fn drain(
    spec: &WorkerSpec,
    ticks: f64,
    stats: Option<&mut MultiplexedConnection>,
) -> Result<Drained, BenchError> {
    let mut stats = stats;
    let before = match stats.as_deref_mut() {
        Some(conn) => Some(commands::snapshot(conn).await?),
        None => None,
    };
    let mut child = ChildWorker::spawn(spec, ticks).await?;
    let finished = child.wait_done(phase_timeout(spec.expect)).await?;
    let commands = match (stats, before) {
        (Some(conn), Some(before)) => {
            let after = commands::snapshot(conn).await?;
            Some(Delta::between(&before, &after))
        }
        _ => None,
    };
    child.stop().await?;
    if finished.seconds <= 0.0 {
        return Err(BenchError::Failed(format!(
            "the worker reported {} s for {} tasks",
            finished.seconds, spec.expect
        )));
    }
    Ok(Drained {
        rate: spec.expect as f64 / finished.seconds,
        finished,
        commands,
    })
}

/// Round trips: `count` sequential sends, each followed by `get` of its result, after a few warm-up
/// ones. Returns each pair's time and every task id.
pub(crate) async fn round_trips(
    server: &Server,
    count: usize,
) -> Result<(Vec<Duration>, Vec<String>), BenchError> {
    let work = async {
        let mut times = Vec::with_capacity(count);
        let mut uuids = Vec::with_capacity(count + WARM_UP_ROUND_TRIPS);
        for i in 0..count + WARM_UP_ROUND_TRIPS {
            let started = Instant::now();
            let result = crate::noop::send(server).await?;
            result.get(GET_TIMEOUT).await?;
            let took = started.elapsed();
            uuids.push(result.uuid().to_owned());
            if i >= WARM_UP_ROUND_TRIPS {
                times.push(took);
            }
        }
        Ok::<_, BenchError>((times, uuids))
    };
    within(
        Duration::from_secs(60) + GET_TIMEOUT * 2 + Duration::from_millis(20 * count as u64),
        "the round trips",
        work,
    )
    .await
}

/// Runs `work` with a deadline.
async fn within<T>(
    timeout: Duration,
    what: &str,
    work: impl std::future::Future<Output = Result<T, BenchError>>,
) -> Result<T, BenchError> {
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(BenchError::Timeout {
            what: what.to_owned(),
            timeout,
        }),
    }
}

/// The value at `quantile` (0..=1) of sorted `values` (nearest rank).
pub(crate) fn quantile(sorted: &[Duration], quantile: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of `values` (the mean of the middle two for an even count); 0 for none.
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return 0.0;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let ms: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&ms, 0.5), Duration::from_millis(50));
        assert_eq!(quantile(&ms, 0.99), Duration::from_millis(99));
        assert_eq!(quantile(&ms, 1.0), Duration::from_millis(100));
    }
}
