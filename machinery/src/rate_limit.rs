//! Rate limits (`#[task(rate_limit = "100/s")]`): at most `count` starts of a task per `period`, spaced
//! evenly, one start every `period / count`.
//!
//! Each start reserves the next free instant of its task's schedule ("generic cell rate" scheduling):
//! in the result backend where every worker shares it (Redis: one atomic script), else in this process
//! (`reserve_locally`). A task whose instant is more than a moment away is not held by the worker: it
//! goes back to the broker with that instant as its ETA and the reservation in a header, and runs when it
//! comes back, without reserving again. So a limited task waits, but does not hold a worker slot while it
//! waits, and other tasks keep flowing.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// At most `count` starts per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    count: u32,
    period: Duration,
}

impl RateLimit {
    /// At most `count` starts per `period`; a `count` of zero counts as one.
    pub const fn new(count: u32, period: Duration) -> Self {
        RateLimit {
            count: if count == 0 { 1 } else { count },
            period,
        }
    }

    /// The starts allowed per period.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The period.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// The time between two starts: `period / count`.
    pub fn interval(&self) -> Duration {
        self.period / self.count
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.period.as_secs() {
            1 => write!(f, "{}/s", self.count),
            60 => write!(f, "{}/m", self.count),
            3600 => write!(f, "{}/h", self.count),
            _ => write!(f, "{} per {:?}", self.count, self.period),
        }
    }
}

/// The key of a task's schedule, in the backend and in this process.
pub(crate) fn key(task_name: &str) -> String {
    format!("machinery_rate_{task_name}")
}

/// Reserves the next start of `key` in this process's schedules: how long from now it is.
pub(crate) fn reserve_locally(key: &str, interval: Duration) -> Duration {
    static SCHEDULES: OnceLock<Mutex<HashMap<String, Instant>>> = OnceLock::new();
    let mut schedules = SCHEDULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let now = Instant::now();
    let next = schedules.entry(key.to_owned()).or_insert(now);
    let at = (*next).max(now);
    *next = at + interval;
    at - now
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_are_spaced_by_the_interval() {
        let limit = RateLimit::new(50, Duration::from_secs(1));
        assert_eq!(limit.interval(), Duration::from_millis(20));
        assert_eq!(limit.to_string(), "50/s");
        let key = key("rate_limit_unit_test");
        let waits: Vec<Duration> = (0..5)
            .map(|_| reserve_locally(&key, limit.interval()))
            .collect();
        assert!(waits[0] < Duration::from_millis(5));
        // Reserved back to back: each is one interval after the one before (less the time taken).
        assert!(waits[4] > Duration::from_millis(70) && waits[4] <= Duration::from_millis(80));
    }
}
