//! Retry delays: Go's Fibonacci sequence, other back-off strategies for `#[task(backoff = ..)]`, and the
//! back-off used for reconnecting.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// How long to wait before retry number `attempt` (1 for the first retry) of a failed task.
///
/// Name one in `#[task(backoff = ..)]` with a constant expression:
///
/// ```
/// use std::time::Duration;
/// use machinery::retry::{BackoffStrategy, Exponential};
///
/// const BACKOFF: Exponential = Exponential::new(Duration::from_secs(1), Duration::from_secs(60)).with_jitter();
/// let third = BACKOFF.delay(3);
/// assert!(third <= Duration::from_secs(4));
/// ```
pub trait BackoffStrategy: Sync + fmt::Debug {
    /// The delay before retry `attempt` (1-based).
    fn delay(&self, attempt: u32) -> Duration;
}

/// `base · 2^(attempt−1)`, at most `max`; with jitter, a uniformly random delay between zero and that
/// ("full jitter"), which spreads out retries of tasks that failed together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exponential {
    base: Duration,
    max: Duration,
    jitter: bool,
}

impl Exponential {
    /// Doubling from `base`, capped at `max`.
    pub const fn new(base: Duration, max: Duration) -> Self {
        Exponential {
            base,
            max,
            jitter: false,
        }
    }

    /// With full jitter.
    pub const fn with_jitter(mut self) -> Self {
        self.jitter = true;
        self
    }
}

impl BackoffStrategy for Exponential {
    fn delay(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        let ceiling = self.base.saturating_mul(factor).min(self.max);
        if !self.jitter {
            return ceiling;
        }
        // Randomness from std's per-process hash keys: enough to spread retries, no extra dependency.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(attempt);
        let fraction = (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64;
        ceiling.mul_f64(fraction)
    }
}

/// The same delay before every retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fixed(pub Duration);

impl BackoffStrategy for Fixed {
    fn delay(&self, _attempt: u32) -> Duration {
        self.0
    }
}

/// The smallest Fibonacci number strictly greater than `n` (Go's `retry.FibonacciNext`): 0→1, 1→2, 2→3,
/// 3→5, 5→8, 10→13. Go machinery grows a task's `RetryTimeout` (seconds) this way between retries.
pub fn fibonacci_next(n: u32) -> u32 {
    let (mut a, mut b) = (1u32, 2u32);
    if n < 1 {
        return 1;
    }
    while b <= n {
        let next = a.saturating_add(b);
        if next == b {
            return u32::MAX;
        }
        a = b;
        b = next;
    }
    b
}

/// A back-off for reconnecting and retrying I/O: doubles from `start` up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `start`, doubling up to `max`.
    pub fn new(start: Duration, max: Duration) -> Self {
        Backoff { next: start, max }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fibonacci_matches_go() {
        let cases = [
            (0, 1),
            (1, 2),
            (2, 3),
            (3, 5),
            (5, 8),
            (8, 13),
            (10, 13),
            (13, 21),
        ];
        for (n, next) in cases {
            assert_eq!(fibonacci_next(n), next, "fibonacci_next({n})");
        }
        assert_eq!(fibonacci_next(u32::MAX), u32::MAX);
    }

    #[test]
    fn exponential_doubles_and_jitter_stays_below_the_ceiling() {
        let exp = Exponential::new(Duration::from_secs(1), Duration::from_secs(10));
        let delays: Vec<_> = (1..=5).map(|a| exp.delay(a).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 10]);
        let jittered = exp.with_jitter();
        for attempt in 1..=5 {
            assert!(jittered.delay(attempt) <= exp.delay(attempt));
        }
        assert_eq!(
            Fixed(Duration::from_millis(5)).delay(9),
            Duration::from_millis(5)
        );
    }

    #[test]
    fn backoff_doubles_up_to_max() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let delays: Vec<_> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 350, 350]);
    }
}
