//! Periodic tasks: send a task, group, chain or chord on a cron schedule, once per tick across every
//! process that registers it.
//!
//! Specs are Go machinery's: five cron fields (`*/5 * * * *`), an optional sixth leading seconds field
//! (`*/10 * * * * *`), descriptors (`@hourly`, `@daily`, ...) and `@every <duration>` (`@every 5s`,
//! `@every 1m30s`). Times are UTC. `@every` ticks are aligned to multiples of the interval since the Unix
//! epoch, so that every process computes the same ticks (Go counts from each process's start, which is
//! why its processes cannot agree on them).
//!
//! Each message a tick sends carries the tick (Unix milliseconds) in the header `machinery_periodic_tick`.
//!
//! Each tick takes the lock key `machinery_periodic:<name>:<spec>:<tick unix ms>` (`SET NX PX` on Redis)
//! before sending; only the process that gets it sends. See [`crate::lock`] for which lock is used.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::task::AbortOnDropHandle;

use crate::error::SendError;
use crate::wire::signature::Signature;
use crate::workflow::{Chain, Chord, Group};
use crate::Server;

/// Why a periodic task could not be registered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeriodicError {
    /// The schedule does not parse.
    #[error("invalid periodic schedule {spec:?}: {reason}")]
    Spec {
        /// The spec.
        spec: String,
        /// What is wrong.
        reason: String,
    },
}

/// When a periodic task fires.
#[derive(Debug, Clone)]
pub struct Schedule {
    spec: String,
    kind: ScheduleKind,
}

#[derive(Debug, Clone)]
enum ScheduleKind {
    Every(Duration),
    Cron(Box<croner::Cron>),
}

impl Schedule {
    /// Parses a spec (see the module docs).
    pub fn parse(spec: &str) -> Result<Schedule, PeriodicError> {
        let error = |reason: String| PeriodicError::Spec {
            spec: spec.to_owned(),
            reason,
        };
        let trimmed = spec.trim();
        let kind = if let Some(interval) = trimmed.strip_prefix("@every") {
            let interval = parse_go_duration(interval.trim()).map_err(error)?;
            if interval < Duration::from_secs(1) {
                return Err(error("@every needs an interval of at least 1s".into()));
            }
            ScheduleKind::Every(interval)
        } else {
            let cron = croner::parser::CronParser::new()
                .parse(trimmed)
                .map_err(|e| error(e.to_string()))?;
            ScheduleKind::Cron(Box::new(cron))
        };
        Ok(Schedule {
            spec: trimmed.to_owned(),
            kind,
        })
    }

    /// The first tick strictly after `time`.
    pub fn next_after(&self, time: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.kind {
            ScheduleKind::Every(interval) => {
                let step = i64::try_from(interval.as_millis()).ok()?;
                let now = time.timestamp_millis();
                let next = (now.div_euclid(step) + 1).checked_mul(step)?;
                DateTime::from_timestamp_millis(next)
            }
            ScheduleKind::Cron(cron) => cron.find_next_occurrence(&time, false).ok(),
        }
    }

    /// The spec as written.
    pub fn spec(&self) -> &str {
        &self.spec
    }
}

/// Go's `time.ParseDuration` subset: a sequence of `<number><unit>` with units `h`, `m`, `s`, `ms`.
fn parse_go_duration(text: &str) -> Result<Duration, String> {
    if text.is_empty() {
        return Err("@every needs a duration such as 5s or 1m30s".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(digits);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("bad number {number:?} in duration {text:?}"))?;
        let seconds = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => {
                return Err(format!(
                    "bad unit {unit:?} in duration {text:?}; use h, m, s or ms"
                ))
            }
        };
        total += Duration::from_secs_f64(value * seconds);
        rest = tail;
    }
    Ok(total)
}

/// The header in which a periodic task's messages carry the tick that sent them (Unix milliseconds).
pub const PERIODIC_TICK_HEADER: &str = "machinery_periodic_tick";

/// Sends one tick's copy; the second argument is the tick in Unix milliseconds.
type SendFn = Arc<
    dyn Fn(Server, i64) -> Pin<Box<dyn Future<Output = Result<(), SendError>> + Send>>
        + Send
        + Sync,
>;

/// A registered periodic task; it stops when this handle is dropped or [`stop`](PeriodicTask::stop)ped.
#[must_use = "a periodic task stops when its handle is dropped"]
pub struct PeriodicTask {
    name: String,
    _runner: AbortOnDropHandle<()>,
}

impl fmt::Debug for PeriodicTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeriodicTask")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl PeriodicTask {
    /// The name it was registered under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops firing.
    pub fn stop(self) {}
}

impl Server {
    /// Sends `signature` (a fresh copy each time) on the schedule `spec`, once per tick across all
    /// processes that register the same `name` and `spec` with the same lock.
    pub fn register_periodic<T: 'static>(
        &self,
        spec: &str,
        name: &str,
        signature: Signature<T>,
    ) -> Result<PeriodicTask, PeriodicError> {
        let template = signature.erase();
        self.periodic(
            spec,
            name,
            Arc::new(move |server: Server, tick: i64| {
                let sig = template.clone().header(PERIODIC_TICK_HEADER, tick);
                Box::pin(async move { server.send(sig).await.map(drop) })
            }),
        )
    }

    /// Sends a group on a schedule (see [`register_periodic`](Server::register_periodic)).
    pub fn register_periodic_group<T: 'static>(
        &self,
        spec: &str,
        name: &str,
        group: Group<T>,
    ) -> Result<PeriodicTask, PeriodicError> {
        let template = Arc::new(group);
        self.periodic(
            spec,
            name,
            Arc::new(move |server: Server, tick: i64| {
                let group = template
                    .as_ref()
                    .clone()
                    .with_header(PERIODIC_TICK_HEADER, tick);
                Box::pin(async move { server.send_group(group).await.map(drop) })
            }),
        )
    }

    /// Sends a chain on a schedule (see [`register_periodic`](Server::register_periodic)).
    pub fn register_periodic_chain<T: 'static>(
        &self,
        spec: &str,
        name: &str,
        chain: Chain<T>,
    ) -> Result<PeriodicTask, PeriodicError> {
        let template = Arc::new(chain);
        self.periodic(
            spec,
            name,
            Arc::new(move |server: Server, tick: i64| {
                let chain = template
                    .as_ref()
                    .clone()
                    .with_header(PERIODIC_TICK_HEADER, tick);
                Box::pin(async move { server.send_chain(chain).await.map(drop) })
            }),
        )
    }

    /// Sends a chord on a schedule (see [`register_periodic`](Server::register_periodic)).
    pub fn register_periodic_chord<O: 'static>(
        &self,
        spec: &str,
        name: &str,
        chord: Chord<O>,
    ) -> Result<PeriodicTask, PeriodicError> {
        let template = Arc::new(chord);
        self.periodic(
            spec,
            name,
            Arc::new(move |server: Server, tick: i64| {
                let chord = template
                    .as_ref()
                    .clone()
                    .with_header(PERIODIC_TICK_HEADER, tick);
                Box::pin(async move { server.send_chord(chord).await.map(drop) })
            }),
        )
    }

    fn periodic(
        &self,
        spec: &str,
        name: &str,
        send: SendFn,
    ) -> Result<PeriodicTask, PeriodicError> {
        let schedule = Schedule::parse(spec)?;
        let server = self.clone();
        let task_name = name.to_owned();
        let runner = tokio::spawn(async move {
            let mut after = Utc::now();
            while let Some(tick) = schedule.next_after(after) {
                let wait = (tick - Utc::now()).to_std().unwrap_or_default();
                tokio::time::sleep(wait).await;
                after = tick;
                let period = schedule
                    .next_after(tick)
                    .and_then(|next| (next - tick).to_std().ok())
                    .unwrap_or(Duration::from_secs(60));
                // Long enough to outlive clock skew between processes; each tick has its own key anyway.
                let ttl = (period * 2).clamp(Duration::from_secs(10), Duration::from_secs(86_400));
                let key = format!(
                    "machinery_periodic:{task_name}:{}:{}",
                    schedule.spec(),
                    tick.timestamp_millis()
                );
                match server.lock().try_acquire(&key, ttl).await {
                    Ok(true) => {
                        if let Err(error) = send(server.clone(), tick.timestamp_millis()).await {
                            tracing::error!(%error, periodic = %task_name, "cannot send the periodic task");
                        } else {
                            tracing::debug!(periodic = %task_name, %tick, "sent periodic task");
                        }
                    }
                    Ok(false) => {
                        tracing::debug!(periodic = %task_name, %tick, "another process took this tick")
                    }
                    Err(error) => {
                        tracing::error!(%error, periodic = %task_name, "cannot take the periodic lock; skipping this tick")
                    }
                }
            }
            tracing::warn!(periodic = %task_name, "the schedule has no further ticks");
        });
        Ok(PeriodicTask {
            name: name.to_owned(),
            _runner: AbortOnDropHandle::new(runner),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        crate::wire::gotime::parse(text).unwrap()
    }

    #[test]
    fn five_field_specs_and_descriptors() {
        let s = Schedule::parse("*/5 * * * *").unwrap();
        assert_eq!(
            s.next_after(at("2026-01-01T10:02:30Z")),
            Some(at("2026-01-01T10:05:00Z"))
        );
        let s = Schedule::parse("@hourly").unwrap();
        assert_eq!(
            s.next_after(at("2026-01-01T10:02:30Z")),
            Some(at("2026-01-01T11:00:00Z"))
        );
        let s = Schedule::parse("*/10 * * * * *").unwrap();
        assert_eq!(
            s.next_after(at("2026-01-01T10:02:31Z")),
            Some(at("2026-01-01T10:02:40Z"))
        );
    }

    #[test]
    fn every_is_aligned_to_the_epoch() {
        let s = Schedule::parse("@every 5s").unwrap();
        assert_eq!(
            s.next_after(at("2026-01-01T10:02:31.2Z")),
            Some(at("2026-01-01T10:02:35Z"))
        );
        assert_eq!(
            s.next_after(at("2026-01-01T10:02:35Z")),
            Some(at("2026-01-01T10:02:40Z"))
        );
        let s = Schedule::parse("@every 1m30s").unwrap();
        assert_eq!(
            s.next_after(at("1970-01-01T00:01:00Z")),
            Some(at("1970-01-01T00:01:30Z"))
        );
    }

    #[test]
    fn bad_specs_are_errors() {
        assert!(Schedule::parse("every day").is_err());
        assert!(Schedule::parse("@every").is_err());
        assert!(Schedule::parse("@every 5x").is_err());
        assert!(Schedule::parse("@every 10ms").is_err());
        assert!(Schedule::parse("61 * * * *").is_err());
    }
}
