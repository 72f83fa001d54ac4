//! The worker card a consumer writes beside its heartbeat, `machinery:worker:<queue>:<consumer tag>`:
//! JSON of [`WorkerCard`] (host, pid, concurrency, task counters), renewed with every beat. It outlives
//! the heartbeat by [`GONE_KEPT`], so that inspection tools can show a worker whose heartbeat lapsed as
//! gone, with its last counters, and then drop it. A consumer that closes deletes it (`release.lua`).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use crate::broker::{WorkerCard, WorkerCounters};

/// How long a card stays after its worker's last beat.
pub(in crate::redis) const GONE_KEPT: Duration = Duration::from_secs(300);

/// The key prefix of every card; the queue and the consumer tag follow (`<queue>:<tag>`: tags have no
/// colon, queue names may).
pub(in crate::redis) const CARD_PREFIX: &str = "machinery:worker:";

/// What a consumer knows to put on its card.
#[derive(Debug, Clone)]
pub(in crate::redis) struct CardWriter {
    host: String,
    concurrency: usize,
    started_ms: i64,
    pub(in crate::redis) counters: Arc<WorkerCounters>,
}

impl CardWriter {
    pub(in crate::redis) fn new(concurrency: usize) -> CardWriter {
        CardWriter {
            host: host_name(),
            concurrency,
            started_ms: Utc::now().timestamp_millis(),
            counters: Arc::default(),
        }
    }

    /// The card as of now, as JSON.
    pub(in crate::redis) fn json(&self) -> String {
        let card = WorkerCard {
            host: self.host.clone(),
            pid: std::process::id(),
            concurrency: self.concurrency,
            running: self.counters.running(),
            succeeded: self.counters.succeeded(),
            failed: self.counters.failed(),
            started_ms: self.started_ms,
            beat_ms: Utc::now().timestamp_millis(),
        };
        serde_json::to_string(&card).unwrap_or_default()
    }
}

/// Reads a card; `None` for anything else (a card of a future build with other fields still reads).
pub(in crate::redis) fn parse(text: &[u8]) -> Option<WorkerCard> {
    serde_json::from_slice(text).ok()
}

/// The machine's name, as the kernel has it (no libc call needed), else `$HOSTNAME`, else `-`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "-".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_card_reads_back_with_its_counters() {
        let writer = CardWriter::new(4);
        writer.counters.finished(&crate::State::Success);
        writer.counters.finished(&crate::State::Failure);
        writer.counters.finished(&crate::State::Success);
        let card = parse(writer.json().as_bytes()).unwrap();
        assert_eq!(
            (card.concurrency, card.succeeded, card.failed, card.pid),
            (4, 2, 1, std::process::id())
        );
        assert!(!card.host.is_empty());
        assert!(parse(b"1700000000000").is_none());
    }
}
