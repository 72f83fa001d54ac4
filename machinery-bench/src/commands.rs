//! Counting the Redis commands a worker issues per task.
//!
//! Two ways, both on the Redis server:
//! - `INFO commandstats` before and after a drain: calls per command, server-wide. Redis counts the
//!   commands a Lua script runs (`redis.call`) under their own names as well as the `EVALSHA` that ran
//!   the script. `total_commands_processed` (`INFO stats`) counts them too (checked on Redis 7.0: an
//!   `EVAL` running ten `GET`s adds eleven), so neither tells network commands from script-internal
//!   ones, and both include any other client of the server.
//! - `MONITOR` during a separate, untimed drain: every command with the address of the client that sent
//!   it, script-internal ones marked `lua` right after the script's `EVAL`/`EVALSHA`. Keeping only the
//!   worker process's own connections (their local ports, read from /proc) splits its commands into
//!   top-level ones (sent over the network) and script-internal ones.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures_util::StreamExt as _;
use redis::aio::MultiplexedConnection;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::error::BenchError;

/// Calls per command, `total_commands_processed` and the server's CPU time at one moment.
#[derive(Debug, Clone, Default)]
pub(crate) struct Snapshot {
    calls: BTreeMap<String, u64>,
    processed: u64,
    /// `used_cpu_user` + `used_cpu_sys` (`INFO cpu`): the server process's CPU seconds so far.
    cpu_seconds: f64,
}

/// Reads `INFO commandstats` and `INFO stats` in one command.
pub(crate) async fn snapshot(conn: &mut MultiplexedConnection) -> Result<Snapshot, BenchError> {
    let text: String = redis::cmd("INFO")
        .arg("commandstats")
        .arg("stats")
        .query_async(conn)
        .await
        .map_err(BenchError::redis("reading INFO commandstats"))?;
    Ok(parse_info(&text))
}

/// The CPU seconds the Redis server process has used so far (`INFO cpu`: user plus system time of the
/// server, whatever its clients asked of it).
pub(crate) async fn server_cpu_seconds(
    conn: &mut MultiplexedConnection,
) -> Result<f64, BenchError> {
    let text: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(conn)
        .await
        .map_err(BenchError::redis("reading INFO cpu"))?;
    Ok(parse_info(&text).cpu_seconds)
}

fn parse_info(text: &str) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("cmdstat_") {
            let Some((name, fields)) = rest.split_once(':') else {
                continue;
            };
            let calls = fields
                .split(',')
                .find_map(|field| field.strip_prefix("calls="))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(calls) = calls {
                snapshot.calls.insert(name.to_owned(), calls);
            }
        } else if let Some(n) = line.strip_prefix("total_commands_processed:") {
            snapshot.processed = n.parse().unwrap_or(0);
        } else if let Some(seconds) = line
            .strip_prefix("used_cpu_user:")
            .or_else(|| line.strip_prefix("used_cpu_sys:"))
        {
            snapshot.cpu_seconds += seconds.parse::<f64>().unwrap_or(0.0);
        }
    }
    snapshot
}

/// What the server ran between two snapshots, without the `INFO` commands that took them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Delta {
    /// Calls per command (script-internal ones included), most first.
    pub(crate) calls: Vec<(String, u64)>,
    /// The change of `total_commands_processed`.
    pub(crate) processed: u64,
}

impl Delta {
    /// The difference `after - before`.
    pub(crate) fn between(before: &Snapshot, after: &Snapshot) -> Delta {
        let info = |s: &Snapshot| s.calls.get("info").copied().unwrap_or(0);
        let info_calls = info(after).saturating_sub(info(before));
        let mut calls: Vec<(String, u64)> = after
            .calls
            .iter()
            .filter(|(name, _)| name.as_str() != "info")
            .map(|(name, n)| {
                let was = before.calls.get(name).copied().unwrap_or(0);
                (name.clone(), n.saturating_sub(was))
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        calls.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Delta {
            calls,
            processed: after
                .processed
                .saturating_sub(before.processed)
                .saturating_sub(info_calls),
        }
    }

    /// All calls.
    pub(crate) fn total(&self) -> u64 {
        self.calls.iter().map(|(_, n)| n).sum()
    }
}

/// Where a `MONITOR` line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// A client connected over TCP from this local port.
    Port(u16),
    /// Inside a Lua script (run by the client of the previous top-level line).
    Lua,
    /// A unix socket or something else.
    Other,
}

/// A `MONITOR` connection collecting what it sees until [`Monitor::finish`].
#[derive(Debug)]
pub(crate) struct Monitor {
    stop: oneshot::Sender<()>,
    handle: JoinHandle<Vec<(Source, String)>>,
}

impl Monitor {
    /// Opens a `MONITOR` connection and starts collecting.
    pub(crate) async fn start(client: &redis::Client) -> Result<Monitor, BenchError> {
        let monitor = client
            .get_async_monitor()
            .await
            .map_err(BenchError::redis("starting MONITOR"))?;
        let (stop, mut stopped) = oneshot::channel();
        let handle = tokio::spawn(async move {
            let mut stream = monitor.into_on_message::<String>();
            let mut seen = Vec::new();
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    line = stream.next() => match line {
                        Some(line) => seen.extend(parse_monitor_line(&line)),
                        None => break,
                    },
                }
            }
            seen
        });
        Ok(Monitor { stop, handle })
    }

    /// Waits a moment for lines still on the way, stops, and counts the commands of the clients on
    /// `ports` (the worker process's connections).
    pub(crate) async fn finish(self, ports: &HashSet<u16>) -> Result<Tally, BenchError> {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = self.stop.send(());
        let seen = self
            .handle
            .await
            .map_err(|e| BenchError::Failed(format!("the MONITOR reader failed: {e}")))?;
        Ok(tally(&seen, ports))
    }
}

/// `1700000000.123456 [0 127.0.0.1:40692] "evalsha" "…"` → the source and the command name.
fn parse_monitor_line(line: &str) -> Option<(Source, String)> {
    let open = line.find('[')?;
    let close = open + line[open..].find(']')?;
    let (_, addr) = line[open + 1..close].split_once(' ')?;
    let source = if addr == "lua" {
        Source::Lua
    } else {
        addr.rsplit_once(':')
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .map_or(Source::Other, Source::Port)
    };
    let command = line[close + 1..]
        .split_whitespace()
        .next()?
        .trim_matches('"')
        .to_ascii_lowercase();
    Some((source, command))
}

/// Commands of the worker process seen by `MONITOR`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tally {
    /// Commands the worker sent over the network, per name, most first.
    pub(crate) top_level: Vec<(String, u64)>,
    /// Commands run inside the worker's scripts, per name, most first.
    pub(crate) scripted: Vec<(String, u64)>,
}

impl Tally {
    /// All top-level commands.
    pub(crate) fn top_level_total(&self) -> u64 {
        self.top_level.iter().map(|(_, n)| n).sum()
    }

    /// All script-internal commands.
    pub(crate) fn scripted_total(&self) -> u64 {
        self.scripted.iter().map(|(_, n)| n).sum()
    }
}

fn tally(seen: &[(Source, String)], ports: &HashSet<u16>) -> Tally {
    let mut top_level = BTreeMap::<String, u64>::new();
    let mut scripted = BTreeMap::<String, u64>::new();
    let mut last_is_ours = false;
    for (source, command) in seen {
        match source {
            Source::Lua => {
                if last_is_ours {
                    *scripted.entry(command.clone()).or_default() += 1;
                }
            }
            Source::Port(port) if ports.contains(port) => {
                last_is_ours = true;
                *top_level.entry(command.clone()).or_default() += 1;
            }
            _ => last_is_ours = false,
        }
    }
    let sorted = |map: BTreeMap<String, u64>| {
        let mut list: Vec<_> = map.into_iter().collect();
        list.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        list
    };
    Tally {
        top_level: sorted(top_level),
        scripted: sorted(scripted),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_deltas_leave_out_the_info_commands() {
        let before = parse_info(
            "# Commandstats\r\ncmdstat_get:calls=10,usec=1\r\ncmdstat_info:calls=3,usec=9\r\n\
             # Stats\r\ntotal_commands_processed:100\r\n",
        );
        let after = parse_info(
            "cmdstat_get:calls=15,usec=1\r\ncmdstat_evalsha:calls=2,usec=1\r\n\
             cmdstat_info:calls=4,usec=9\r\ntotal_commands_processed:108\r\n",
        );
        let delta = Delta::between(&before, &after);
        assert_eq!(delta.calls, [("get".into(), 5), ("evalsha".into(), 2)]);
        assert_eq!(delta.total(), 7);
        assert_eq!(delta.processed, 7);
    }

    #[test]
    fn server_cpu_is_user_plus_system_of_the_server_alone() {
        let info = parse_info(
            "# CPU\r\nused_cpu_sys:1.500000\r\nused_cpu_user:2.250000\r\n\
             used_cpu_sys_children:9.000000\r\nused_cpu_user_children:9.000000\r\n\
             used_cpu_sys_main_thread:1.400000\r\n",
        );
        assert!(
            (info.cpu_seconds - 3.75).abs() < 1e-9,
            "{}",
            info.cpu_seconds
        );
    }

    #[test]
    fn monitor_lines_are_split_by_client_and_script() {
        let lines = [
            r#"1.0 [0 127.0.0.1:4000] "evalsha" "abc" "1" "q""#,
            r#"1.1 [0 lua] "LMOVE" "q" "x""#,
            r#"1.2 [0 127.0.0.1:5000] "evalsha" "abc""#,
            r#"1.3 [0 lua] "GET" "k""#,
            r#"1.4 [0 127.0.0.1:4000] "lrem" "x" "1" "m""#,
            r#"1.5 [0 unix:/tmp/redis.sock] "ping""#,
        ];
        let seen: Vec<_> = lines.iter().filter_map(|l| parse_monitor_line(l)).collect();
        let tally = tally(&seen, &HashSet::from([4000]));
        assert_eq!(tally.top_level, [("evalsha".into(), 1), ("lrem".into(), 1)]);
        assert_eq!(tally.scripted, [("lmove".into(), 1)]);
    }
}
