//! Load under a fault, for the high-availability tests (`tests/tests/ha_*.rs`): a sender keeps sending
//! single tasks, chains and chords while two workers run them and the test breaks the topology; then
//! every acknowledged send is waited for and counted.
//!
//! A send that fails is sent again (a clone, so the same ids where the workflow has them) until it is
//! acknowledged: only acknowledged sends are counted, and one of those that never completes is lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use machinery::{task, AsyncResult, Chain, Chord, Group, Server, TaskError};

/// Sleeps `ms`, returns `x + 1` (`partial(ms)` takes the previous step's output as `x`).
#[task]
pub async fn ha_step(ms: i64, x: i64) -> Result<i64, TaskError> {
    tokio::time::sleep(Duration::from_millis(ms.max(0) as u64)).await;
    Ok(x + 1)
}

/// A chord callback: the sum of the members' outputs.
#[task]
pub async fn ha_total(xs: Vec<i64>) -> Result<i64, TaskError> {
    Ok(xs.iter().sum())
}

/// How long each task sleeps: the workers are busy when the fault strikes.
const TASK_MS: i64 = 20;

/// What was sent and acknowledged: the handle to wait on, and the output it must give.
struct Expected {
    kind: &'static str,
    result: AsyncResult<i64>,
    value: i64,
}

/// The sends of one kind: acknowledged, and completed with the right output.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    /// Acknowledged sends.
    pub sent: usize,
    /// Of those, completed with the expected output.
    pub completed: usize,
}

impl Count {
    /// Acknowledged but never completed (or completed wrong).
    pub fn lost(&self) -> usize {
        self.sent - self.completed
    }
}

/// The outcome of a run under a fault.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Single tasks.
    pub singles: Count,
    /// Chains of three steps.
    pub chains: Count,
    /// Chords of three members and a callback.
    pub chords: Count,
    /// Sends that failed and were sent again.
    pub resends: usize,
    /// What the lost ones ended with (an error, or a wrong output), for the report.
    pub failures: Vec<String>,
}

impl Tally {
    /// Acknowledged sends of every kind.
    pub fn sent(&self) -> usize {
        self.singles.sent + self.chains.sent + self.chords.sent
    }

    /// Acknowledged sends that never completed.
    pub fn lost(&self) -> usize {
        self.singles.lost() + self.chains.lost() + self.chords.lost()
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} acknowledged sends, {} lost (singles {}/{}, chains {}/{}, chords {}/{} completed), {} sends retried",
            self.sent(),
            self.lost(),
            self.singles.completed,
            self.singles.sent,
            self.chains.completed,
            self.chains.sent,
            self.chords.completed,
            self.chords.sent,
            self.resends
        )
    }
}

/// Sends until it is acknowledged, for up to a minute; counts the resends.
macro_rules! until_sent {
    ($resends:expr, $send:expr) => {{
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            match $send.await {
                Ok(result) => break Some(result),
                Err(error) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(%error, "send failed; sending again");
                    $resends += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => {
                    eprintln!("a send kept failing for a minute: {error}");
                    break None;
                }
            }
        }
    }};
}

/// A sender running rounds (a single task, a chain, a chord) until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    sender: tokio::task::JoinHandle<(Vec<Expected>, usize)>,
}

impl Load {
    /// Starts sending through `server`, one round every `pace`.
    pub fn start(server: Server, pace: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let sender = tokio::spawn(async move {
            let mut sent = Vec::new();
            let mut resends = 0;
            let mut round: i64 = 0;
            while !stopped.load(Ordering::SeqCst) {
                round += 1;
                let x = round * 10;
                let single = ha_step::signature(TASK_MS, x);
                if let Some(result) = until_sent!(resends, server.send(single.clone())) {
                    sent.push(Expected {
                        kind: "single",
                        result,
                        value: x + 1,
                    });
                }
                let chain = Chain::new(ha_step::signature(TASK_MS, x))
                    .then(ha_step::partial(TASK_MS))
                    .then(ha_step::partial(TASK_MS));
                if let Some(result) = until_sent!(resends, server.send_chain(chain.clone())) {
                    sent.push(Expected {
                        kind: "chain",
                        result: result.last().clone(),
                        value: x + 3,
                    });
                }
                let group = Group::new([
                    ha_step::signature(TASK_MS, x),
                    ha_step::signature(TASK_MS, x + 1),
                    ha_step::signature(TASK_MS, x + 2),
                ]);
                let chord = Chord::new(group, ha_total::partial());
                if let Some(result) = until_sent!(resends, server.send_chord(chord.clone())) {
                    sent.push(Expected {
                        kind: "chord",
                        result: result.callback().clone(),
                        value: 3 * x + 6,
                    });
                }
                tokio::time::sleep(pace).await;
            }
            (sent, resends)
        });
        Load { stop, sender }
    }

    /// Stops sending, then waits up to `timeout` for every acknowledged send and counts.
    pub async fn finish(self, timeout: Duration) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        let (sent, resends) = self.sender.await.expect("the sender task");
        let mut waits = tokio::task::JoinSet::new();
        for expected in sent {
            waits.spawn(async move {
                let outcome = expected.result.get(timeout).await;
                let ok = matches!(&outcome, Ok(value) if *value == expected.value);
                let failure = (!ok).then(|| {
                    format!(
                        "{} {}: {:?} (expected {})",
                        expected.kind,
                        expected.result.uuid(),
                        outcome,
                        expected.value
                    )
                });
                (expected.kind, failure)
            });
        }
        let mut tally = Tally {
            resends,
            ..Tally::default()
        };
        while let Some(joined) = waits.join_next().await {
            let (kind, failure) = joined.expect("a result waiter");
            let count = match kind {
                "single" => &mut tally.singles,
                "chain" => &mut tally.chains,
                _ => &mut tally.chords,
            };
            count.sent += 1;
            match failure {
                None => count.completed += 1,
                Some(failure) => tally.failures.push(failure),
            }
        }
        tally
    }
}
