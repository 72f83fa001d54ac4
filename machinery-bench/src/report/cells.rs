//! The cells of the report's tables: numbers with separators, rates, sizes, CPU times, the share of a
//! broker ceiling a value reaches, and whether it meets a target.

use std::time::Duration;

use crate::ceiling::{Ceiling, AMQP_PREFETCH, AMQP_WINDOW};
use crate::cli::BrokerKind;
use crate::measure::median;
use crate::rows::{CpuPer10k, Results};

/// A target of the issue, and whether a value meets it.
#[derive(Debug, Clone, Copy)]
pub(super) enum Target {
    /// At least this many per second.
    MinRate(f64),
    /// At most this many milliseconds.
    MaxMs(f64),
    /// At most this many commands per task.
    MaxPerTask(f64),
    /// At most this many MiB.
    MaxMib(f64),
}

impl Target {
    pub(super) fn judge(self, value: f64) -> String {
        let (text, met) = match self {
            Target::MinRate(min) => (format!("≥ {}/s", int(min)), value >= min),
            Target::MaxMs(max) => (format!("≤ {max} ms"), value <= max),
            Target::MaxPerTask(max) => (format!("≤ {max}"), value <= max),
            Target::MaxMib(max) => (format!("≤ {max} MiB"), value <= max),
        };
        format!("{text}: {}", if met { "**met**" } else { "**missed**" })
    }
}

/// `12345.6` → `12,346`.
pub(super) fn int(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub(super) fn rate(value: f64) -> String {
    format!("{}/s", int(value))
}

pub(super) fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

/// The servers' CPU per 10k tasks of a row: `Redis 0.24 s`, `RabbitMQ 0.90 s + Redis 0.20 s`, or `–`
/// when none could be read.
pub(super) fn server_cpu(cpu: &CpuPer10k) -> String {
    let parts: Vec<String> = [("RabbitMQ", &cpu.rabbitmq), ("Redis", &cpu.redis)]
        .into_iter()
        .filter(|(_, values)| !values.is_empty())
        .map(|(name, values)| format!("{name} {:.2} s", median(values)))
        .collect();
    if parts.is_empty() {
        "–".to_owned()
    } else {
        parts.join(" + ")
    }
}

/// The working process's CPU per 10k tasks of a row, or `–`.
pub(super) fn own_cpu(cpu: &CpuPer10k) -> String {
    if cpu.own.is_empty() {
        "–".to_owned()
    } else {
        format!("{:.2} s", median(&cpu.own))
    }
}

pub(super) fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// A short name of a ceiling for the "vs broker" columns.
pub(super) fn short(ceiling: Ceiling, senders: usize) -> String {
    match ceiling {
        Ceiling::RedisPushOne => "LPUSH ×1 conn".into(),
        Ceiling::RedisPush => format!("LPUSH ×{senders} conns"),
        Ceiling::RedisPop => format!("LPOP ×{senders} conns"),
        Ceiling::RedisPushPipelined => format!("LPUSH ×{senders} conns, pipelined"),
        Ceiling::RedisPopPipelined => format!("LPOP ×{senders} conns, pipelined"),
        Ceiling::AmqpPublishOne => "publish, confirm each".into(),
        Ceiling::AmqpPublish => format!("publish, confirm windows of {AMQP_WINDOW}"),
        Ceiling::AmqpConsume => format!("consume+ack, prefetch {AMQP_PREFETCH}"),
    }
}

/// `41% of LPUSH ×10 conns`, or empty when that ceiling was not measured.
pub(super) fn versus(results: &Results, ceiling: Ceiling, senders: usize, value: f64) -> String {
    match results.ceilings.get(&ceiling).map(|rates| median(rates)) {
        Some(top) if top > 0.0 => {
            let percent = 100.0 * value / top;
            let digits = if percent < 10.0 { 1 } else { 0 };
            format!("{percent:.digits$}% of {}", short(ceiling, senders))
        }
        _ => String::new(),
    }
}

/// The ceilings a send row is compared with: the same shape (one connection awaiting each reply for one
/// sender, as many connections as senders otherwise), and the broker's best (pipelined, or windowed
/// confirms).
pub(super) fn send_ceilings(kind: BrokerKind, senders: usize) -> (Ceiling, Ceiling) {
    match (kind, senders) {
        (BrokerKind::Redis, 1) => (Ceiling::RedisPushOne, Ceiling::RedisPushPipelined),
        (BrokerKind::Redis, _) => (Ceiling::RedisPush, Ceiling::RedisPushPipelined),
        (BrokerKind::Amqp, 1) => (Ceiling::AmqpPublishOne, Ceiling::AmqpPublish),
        (BrokerKind::Amqp, _) => (Ceiling::AmqpPublish, Ceiling::AmqpPublish),
    }
}

/// The ceilings a drain is compared with: taking one message at a time from S connections, and the
/// most the broker hands out.
pub(super) fn drain_ceilings(kind: BrokerKind) -> (Ceiling, Ceiling) {
    match kind {
        BrokerKind::Redis => (Ceiling::RedisPop, Ceiling::RedisPopPipelined),
        BrokerKind::Amqp => (Ceiling::AmqpConsume, Ceiling::AmqpConsume),
    }
}

/// The two "vs the broker" cells of a row; the second is empty when it would repeat the first.
pub(super) fn versus_pair(
    results: &Results,
    (same, best): (Ceiling, Ceiling),
    senders: usize,
    value: f64,
) -> String {
    let best = if best == same {
        String::new()
    } else {
        versus(results, best, senders, value)
    };
    format!("{} | {best}", versus(results, same, senders, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(int(0.0), "0");
        assert_eq!(int(999.4), "999");
        assert_eq!(int(1000.0), "1,000");
        assert_eq!(int(1_234_567.0), "1,234,567");
    }

    #[test]
    fn targets_say_whether_they_are_met() {
        assert_eq!(
            Target::MinRate(20_000.0).judge(21_000.0),
            "≥ 20,000/s: **met**"
        );
        assert_eq!(Target::MaxMs(0.5).judge(0.7), "≤ 0.5 ms: **missed**");
    }
}
