//! The redelivery ledger of a consumer: which messages it is running, so that the copies RabbitMQ hands
//! back after a lost channel do not run twice in this process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use super::acks::Tagged;
use crate::amqp::session;

/// The messages this consumer handed to the worker, so that a copy RabbitMQ delivers again after a lost
/// channel does not run a second time in this process.
///
/// When a channel closes, RabbitMQ puts back every message delivered on it and not yet acknowledged,
/// including the tasks this worker is still running; after the consumer subscribes again, they come back
/// marked redelivered. Their first run goes on, stores its outcome, and then fails to acknowledge (the old
/// channel is gone). So a redelivered message whose body matches one still running here is held back until
/// that run is settled, and then acknowledged (or returned, if the run did not finish); one whose run
/// already finished without its acknowledgement getting through is acknowledged at once. Only this
/// process's own runs are recognised: a message another worker was running when it died runs again
/// (at-least-once).
#[derive(Default)]
pub(super) struct Ledger {
    entries: Mutex<HashMap<Vec<u8>, LedgerEntry>>,
}

enum LedgerEntry {
    /// Handed to the worker (`count` copies, normally one) and not settled yet; `parked`: redelivered
    /// copies held back meanwhile.
    InFlight { count: usize, parked: Vec<Tagged> },
    /// Handled to the end, but the acknowledgement was lost with its channel: RabbitMQ delivers it again.
    Handled { at: std::time::Instant },
}

/// What the ledger says to do with a delivery.
pub(super) enum Admission {
    /// Hand it to the worker.
    Run(Tagged),
    /// A copy is running here: held back.
    Parked,
    /// A copy was handled here already: acknowledge it.
    AlreadyHandled(Tagged),
}

/// How long the ledger remembers a handled message whose acknowledgement was lost.
const LEDGER_MEMORY: Duration = Duration::from_secs(600);

impl Ledger {
    /// What to do with a delivery: run it, hold it back while its twin runs here, or acknowledge it
    /// because its twin already finished here.
    pub(super) fn admit(&self, body: &[u8], redelivered: bool, delivery: Tagged) -> Admission {
        let mut entries = session::lock(&self.entries);
        if redelivered {
            match entries.get_mut(body) {
                Some(LedgerEntry::InFlight { parked, .. }) => {
                    parked.push(delivery);
                    return Admission::Parked;
                }
                Some(LedgerEntry::Handled { .. }) => {
                    entries.remove(body);
                    return Admission::AlreadyHandled(delivery);
                }
                None => {}
            }
        }
        match entries.get_mut(body) {
            Some(LedgerEntry::InFlight { count, .. }) => *count += 1,
            _ => {
                entries.insert(
                    body.to_vec(),
                    LedgerEntry::InFlight {
                        count: 1,
                        parked: Vec::new(),
                    },
                );
            }
        }
        Admission::Run(delivery)
    }

    /// The worker is done with one copy: `handled` if it was processed to the end (acknowledged, or
    /// replaced by a republished copy), `acked` if RabbitMQ got the acknowledgement. Returns the parked
    /// copies, to acknowledge if `handled` and to return otherwise.
    pub(super) fn settle(&self, body: &[u8], handled: bool, acked: bool) -> Vec<Tagged> {
        let mut entries = session::lock(&self.entries);
        let Some(LedgerEntry::InFlight { count, parked }) = entries.get_mut(body) else {
            return Vec::new();
        };
        *count = count.saturating_sub(1);
        if *count > 0 {
            return Vec::new();
        }
        let parked = std::mem::take(parked);
        if handled && !acked && parked.is_empty() {
            let now = std::time::Instant::now();
            entries.retain(|_, e| match e {
                LedgerEntry::Handled { at } => now.duration_since(*at) < LEDGER_MEMORY,
                LedgerEntry::InFlight { .. } => true,
            });
            entries.insert(body.to_vec(), LedgerEntry::Handled { at: now });
        } else {
            entries.remove(body);
        }
        parked
    }
}
