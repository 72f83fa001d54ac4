//! Retry delays.

use std::time::Duration;

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
    fn backoff_doubles_up_to_max() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let delays: Vec<_> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 350, 350]);
    }
}
