//! The targets a report judges its rows by: issue 15's (docs/benchmarks.md holds the issue, with Go
//! machinery's reference rows measured on this machine).

use super::cells::Target;
use crate::cli::BrokerKind;

/// Sends with results from several concurrent senders: at least 100k/s on Redis (the issue's "stay
/// ≥ 100k/s"); RabbitMQ keeps the earlier issue's 15k/s, as issue 15 sets none.
pub(super) fn send_target(kind: BrokerKind, backend: &str, senders: usize) -> Option<Target> {
    if senders < 2 || backend == "null" {
        return None;
    }
    Some(Target::MinRate(match kind {
        BrokerKind::Redis => 100_000.0,
        BrokerKind::Amqp => 15_000.0,
    }))
}

/// Drains: with Redis as broker, 45k/s with Redis results at concurrency 10 (5× Go's 9.1k), 60k/s at
/// 100, 85k/s without results at 10 (2× Go's 42.3k); with RabbitMQ, 20k/s with Redis results (3× Go's
/// 6k) and 1,400/s with RabbitMQ results (10× Go's ~140/s), at concurrency 10.
pub(super) fn drain_target(kind: BrokerKind, backend: &str, concurrency: usize) -> Option<Target> {
    let min = match (kind, backend, concurrency) {
        (BrokerKind::Redis, "redis", 10) => 45_000.0,
        (BrokerKind::Redis, "redis", 100) => 60_000.0,
        (BrokerKind::Redis, "null", 10) => 85_000.0,
        (BrokerKind::Amqp, "redis", 10) => 20_000.0,
        (BrokerKind::Amqp, "amqp", 10) => 1_400.0,
        _ => return None,
    };
    Some(Target::MinRate(min))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judged(target: Option<Target>, value: f64) -> String {
        target.map_or(String::new(), |t| t.judge(value))
    }

    #[test]
    fn drains_are_judged_by_issue_15s_targets() {
        let redis = BrokerKind::Redis;
        assert_eq!(
            judged(drain_target(redis, "redis", 10), 34_600.0),
            "≥ 45,000/s: **missed**"
        );
        assert_eq!(
            judged(drain_target(redis, "redis", 100), 61_600.0),
            "≥ 60,000/s: **met**"
        );
        assert_eq!(
            judged(drain_target(redis, "null", 10), 64_300.0),
            "≥ 85,000/s: **missed**"
        );
        assert_eq!(judged(drain_target(redis, "null", 100), 95_000.0), "");
        let amqp = BrokerKind::Amqp;
        assert_eq!(
            judged(drain_target(amqp, "redis", 10), 13_300.0),
            "≥ 20,000/s: **missed**"
        );
        assert_eq!(
            judged(drain_target(amqp, "amqp", 10), 1_973.0),
            "≥ 1,400/s: **met**"
        );
    }

    #[test]
    fn only_sends_with_results_from_several_senders_have_a_target() {
        let redis = BrokerKind::Redis;
        assert_eq!(
            judged(send_target(redis, "redis", 10), 84_000.0),
            "≥ 100,000/s: **missed**"
        );
        assert_eq!(judged(send_target(redis, "null", 10), 84_000.0), "");
        assert_eq!(judged(send_target(redis, "redis", 1), 10_000.0), "");
    }
}
