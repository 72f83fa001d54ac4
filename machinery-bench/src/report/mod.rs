//! The results of a run, the markdown tables made of them, and the record in docs/benchmarks.md.

use std::io::Write as _;
use std::path::Path;

use crate::cli::{backend_label, BrokerKind, Settings};
use crate::commands::Delta;
use crate::error::BenchError;
use crate::measure::{median, WARM_UP_ROUND_TRIPS};
use crate::rows::{Machine, Results, COUNTED_CONCURRENCY};
use crate::servers::RESULTS_EXPIRE_SECS;

mod cells;
mod targets;

use cells::{
    drain_ceilings, int, mib, ms, own_cpu, rate, send_ceilings, server_cpu, short, versus_pair,
    Target,
};
use targets::{drain_target, send_target};

/// The top of docs/benchmarks.md, written when the file does not exist yet.
pub(crate) const INTRO: &str = include_str!("../intro.md");

fn senders_text(senders: usize) -> String {
    if senders == 1 {
        "1 sender awaiting each send".into()
    } else {
        format!("{senders} concurrent senders")
    }
}

/// The global allocator of this build (the `mimalloc` feature, on by default).
const ALLOCATOR: &str = if cfg!(feature = "mimalloc") {
    "mimalloc as its allocator"
} else {
    "the system allocator"
};

/// The whole report: a heading, the command and machine, and the tables.
pub(crate) fn render(settings: &Settings, machine: &Machine, results: &Results) -> String {
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    let kind = settings.kind;
    let configured = backend_label(&settings.backend);
    line(format!(
        "## {}{} — {} broker, {} backend{}",
        machine.date,
        machine
            .commit
            .as_ref()
            .map_or(String::new(), |c| format!(", commit {c}")),
        kind.name(),
        configured,
        if settings.quick { " (quick)" } else { "" }
    ));
    line(String::new());
    line(format!("Command: `{}`", command_line(settings)));
    line(String::new());
    let mut servers = Vec::new();
    if let Some(v) = &machine.redis {
        servers.push(format!("Redis {v}"));
    }
    if let Some(v) = &machine.rabbitmq {
        servers.push(format!("RabbitMQ {v}"));
    }
    line(format!(
        "Machine: nproc {}, {}{}{}. Broker `{}`, backend `{}`.",
        machine.nproc,
        machine.cpu,
        machine.memory.map_or(String::new(), |m| format!(
            ", {:.1} GiB RAM",
            m as f64 / (1u64 << 30) as f64
        )),
        if servers.is_empty() {
            String::new()
        } else {
            format!("; {}", servers.join(", "))
        },
        machinery::config::redact_url(&settings.broker),
        machinery::config::redact_url(&settings.backend),
    ));
    line(String::new());
    let prefetch = match (kind, settings.prefetch) {
        (BrokerKind::Amqp, Some(0)) => ", AMQP prefetch = the worker's concurrency".to_owned(),
        (BrokerKind::Amqp, Some(p)) => format!(", AMQP prefetch {p}"),
        (BrokerKind::Amqp, None) => format!(
            ", AMQP prefetch {} (the library's default)",
            machinery::AmqpConfig::default().prefetch_count
        ),
        (BrokerKind::Redis, _) => String::new(),
    };
    line(format!(
        "The worker process runs on a {}, with {}.",
        settings.worker_runtime.describe(),
        ALLOCATOR
    ));
    line(format!(
        "Sizes: {} tasks per measurement ({} for one sender and at concurrency 1), {} senders, {}, {} round trips, \
         messages of {} bytes{prefetch}. The run took {:.0} s.",
        int(settings.tasks as f64),
        int(settings.tasks_at(1) as f64),
        settings.senders,
        if settings.repeat == 1 {
            "1 run of each measurement".to_owned()
        } else {
            format!("each rate the median of {} runs", settings.repeat)
        },
        int(settings.round_trips as f64),
        results.payload_len,
        results.elapsed.as_secs_f64(),
    ));
    line(String::new());

    // The summary.
    line("| measurement | result | target | vs the broker alone, same shape | vs the broker's best |".into());
    line("|---|---:|---|---|---|".into());
    for row in &results.sends {
        let value = median(&row.rates);
        line(format!(
            "| send, {}, {} backend ({} tasks) | {} | {} | {} |",
            senders_text(row.senders),
            row.backend,
            int(row.tasks as f64),
            rate(value),
            send_target(settings.kind, row.backend, row.senders)
                .map_or(String::new(), |t| t.judge(value)),
            versus_pair(
                results,
                send_ceilings(kind, row.senders),
                settings.senders,
                value
            ),
        ));
    }
    for row in &results.drains {
        let value = median(&row.rates);
        line(format!(
            "| drain, {} backend, concurrency {} ({} tasks) | {} | {} | {} |",
            row.backend,
            row.concurrency,
            int(row.tasks as f64),
            rate(value),
            drain_target(settings.kind, row.backend, row.concurrency)
                .map_or(String::new(), |t| t.judge(value)),
            versus_pair(results, drain_ceilings(kind), settings.senders, value),
        ));
    }
    match (&results.round_trip, &results.round_trip_skipped) {
        (Some(rt), _) => {
            let p50_target = (kind == BrokerKind::Redis)
                .then(|| Target::MaxMs(0.5).judge(rt.p50.as_secs_f64() * 1000.0));
            line(format!(
                "| round trip send→get, p50 ({} sequential, {configured} backend) | {} | {} | | |",
                int(rt.count as f64),
                ms(rt.p50),
                p50_target.unwrap_or_default()
            ));
            line(format!(
                "| round trip send→get, p99 | {} | | | |",
                ms(rt.p99)
            ));
            line(format!(
                "| round trip send→get, max | {} | | | |",
                ms(rt.max)
            ));
        }
        (None, Some(why)) => line(format!(
            "| round trip send→get | not measured: {why} | | | |"
        )),
        (None, None) => {}
    }
    if let Some(count) = &results.commands {
        let per_task: Vec<f64> = count
            .runs
            .iter()
            .map(|d| d.total() as f64 / count.tasks.max(1) as f64)
            .collect();
        let value = median(&per_task);
        // The target counts round trips: what the worker sends (pipelined commands share one round trip,
        // so this is an upper bound), not what its scripts run on the server. Without MONITOR's split,
        // the server-wide count is judged instead.
        let judged_here = count.tally.is_none();
        line(format!(
            "| Redis commands per task, worker path ({configured} backend, concurrency \
             {COUNTED_CONCURRENCY}; INFO commandstats, scripts' commands included) | {value:.2} | {} | | |",
            if judged_here {
                Target::MaxPerTask(3.0).judge(value)
            } else {
                String::new()
            }
        ));
        if let Some(tally) = &count.tally {
            let tasks = count.monitored_tasks.max(1) as f64;
            let sent = tally.top_level_total() as f64 / tasks;
            line(format!(
                "| … of which sent by the worker (MONITOR: top-level commands, {} tasks; its round trips are at most these) | {sent:.2} | {} | | |",
                int(count.monitored_tasks as f64),
                Target::MaxPerTask(3.0).judge(sent)
            ));
            line(format!(
                "| … and run inside its Lua scripts (MONITOR) | {:.2} | | | |",
                tally.scripted_total() as f64 / tasks
            ));
        }
    }
    if let Some(idle) = results.idle_rss {
        line(format!(
            "| worker RSS, idle (concurrency 10, empty queue, after 1 s) | {} | {} | | |",
            mib(idle as f64),
            Target::MaxMib(15.0).judge(idle as f64 / (1024.0 * 1024.0))
        ));
    }
    let main_drain = results
        .drains
        .iter()
        .find(|r| r.backend == configured && r.concurrency == 10)
        .or_else(|| results.drains.iter().find(|r| r.backend == configured));
    if let Some(row) = main_drain {
        line(format!(
            "| worker RSS at the end of the drain ({} backend, concurrency {}) | {} | | | |",
            row.backend,
            row.concurrency,
            mib(median(&row.rss_end))
        ));
        line(format!(
            "| worker CPU per 10k tasks ({} backend, concurrency {}) | {:.2} s | | | |",
            row.backend,
            row.concurrency,
            median(&row.cpu.own)
        ));
    }
    line(String::new());

    // Sends in detail.
    line("Sends: CPU of this program (the senders) and of the servers, per 10k tasks.".into());
    line(String::new());
    line("| senders | backend | tasks | send rate | sender CPU per 10k tasks | servers' CPU per 10k tasks |".into());
    line("|---:|---|---:|---:|---:|---:|".into());
    for row in &results.sends {
        line(format!(
            "| {} | {} | {} | {} | {} | {} |",
            row.senders,
            row.backend,
            int(row.tasks as f64),
            rate(median(&row.rates)),
            own_cpu(&row.cpu),
            server_cpu(&row.cpu),
        ));
    }
    line(String::new());

    // Drains in detail.
    line("Drains: the worker process, started on a queue already holding the tasks.".into());
    line(String::new());
    line(
        "| backend | concurrency | tasks | drain rate | vs the broker alone, same shape | vs the broker's best | worker CPU per 10k tasks | servers' CPU per 10k tasks | worker RSS at end | Redis commands per task |"
            .into(),
    );
    line("|---|---:|---:|---:|---|---|---:|---:|---:|---:|".into());
    for row in &results.drains {
        let value = median(&row.rates);
        line(format!(
            "| {} | {} | {} | {} | {} | {:.2} s | {} | {} | {} |",
            row.backend,
            row.concurrency,
            int(row.tasks as f64),
            rate(value),
            versus_pair(results, drain_ceilings(kind), settings.senders, value),
            median(&row.cpu.own),
            server_cpu(&row.cpu),
            mib(median(&row.rss_end)),
            if row.commands_per_task.is_empty() {
                "–".to_owned()
            } else {
                format!("{:.2}", median(&row.commands_per_task))
            }
        ));
    }
    line(String::new());

    // The broker alone.
    line(format!(
        "The broker alone, same run, same client crate ({}), messages of {} bytes:",
        match kind {
            BrokerKind::Redis => "redis",
            BrokerKind::Amqp => "lapin",
        },
        results.payload_len
    ));
    line(String::new());
    line("| broker ceiling | rate | short name |".into());
    line("|---|---:|---|".into());
    for (ceiling, rates) in &results.ceilings {
        line(format!(
            "| {} | {} | {} |",
            ceiling.label(settings.senders),
            rate(median(rates)),
            short(*ceiling, settings.senders)
        ));
    }
    line(String::new());

    // The Redis commands, by name.
    if let Some(count) = &results.commands {
        let mut runs: Vec<&Delta> = count.runs.iter().collect();
        runs.sort_by_key(|d| d.total());
        if let Some(delta) = runs.get(runs.len() / 2) {
            line(format!(
                "Redis commands per task of the worker path, by command (concurrency {COUNTED_CONCURRENCY}, \
                 {configured} backend; INFO commandstats of the median run, every client of the server):"
            ));
            line(String::new());
            let tally = count.tally.as_ref();
            line("| command | INFO commandstats, per task | MONITOR, sent by the worker, per task | MONITOR, inside its scripts, per task |".into());
            line("|---|---:|---:|---:|".into());
            let tasks = count.tasks.max(1) as f64;
            let monitored = count.monitored_tasks.max(1) as f64;
            let mut names: Vec<String> = delta.calls.iter().map(|(n, _)| n.clone()).collect();
            if let Some(t) = tally {
                for (name, _) in t.top_level.iter().chain(&t.scripted) {
                    if !names.contains(name) {
                        names.push(name.clone());
                    }
                }
            }
            let find = |list: &[(String, u64)], name: &str| {
                list.iter().find(|(n, _)| n == name).map(|(_, c)| *c)
            };
            for name in names.iter().take(15) {
                let stat = find(&delta.calls, name)
                    .map_or("–".to_owned(), |c| format!("{:.3}", c as f64 / tasks));
                let (top, inside) = match tally {
                    Some(t) => (
                        find(&t.top_level, name)
                            .map_or("–".to_owned(), |c| format!("{:.3}", c as f64 / monitored)),
                        find(&t.scripted, name)
                            .map_or("–".to_owned(), |c| format!("{:.3}", c as f64 / monitored)),
                    ),
                    None => ("–".to_owned(), "–".to_owned()),
                };
                line(format!("| {name} | {stat} | {top} | {inside} |"));
            }
            line(format!(
                "| **all** | {:.3} | {} | {} |",
                delta.total() as f64 / tasks,
                tally.map_or("–".to_owned(), |t| format!(
                    "{:.3}",
                    t.top_level_total() as f64 / monitored
                )),
                tally.map_or("–".to_owned(), |t| format!(
                    "{:.3}",
                    t.scripted_total() as f64 / monitored
                )),
            ));
            line(format!(
                "| total_commands_processed (INFO stats) | {:.3} | | |",
                delta.processed as f64 / tasks
            ));
            line(String::new());
        }
    }

    // Notes.
    let mut notes = vec![
        format!(
            "Send: `noop::send(&server)` on one shared `Server`, the PENDING state written unless the \
             backend is null. \"Same shape\" compares a row with the broker doing the same thing the \
             same way: {}. \"Best\" is the most the broker does: {}.",
            match kind {
                BrokerKind::Redis => "one sender with LPUSH from one connection, S senders with LPUSH \
                                      from S connections, drains with LPOP from S connections, each \
                                      reply awaited",
                BrokerKind::Amqp => "one sender with publishes awaiting each confirm, S senders with \
                                     windowed confirms, drains with consuming and acking",
            },
            match kind {
                BrokerKind::Redis => "the same commands pipelined by 100",
                BrokerKind::Amqp => "the same (one channel)",
            },
        ),
        format!(
            "Drain rate = tasks ÷ (end of the last task − start of the first), as the worker process \
             reports it; its CPU (utime+stime from /proc) is counted from `ready` to the last task, its \
             RSS read when the last task finished. Round trips follow {WARM_UP_ROUND_TRIPS} unmeasured \
             ones. Results expire after {RESULTS_EXPIRE_SECS} s."
        ),
    ];
    if kind == BrokerKind::Redis && results.commands.is_some() {
        notes.push(
            "Redis counts the commands a Lua script runs in INFO commandstats, and in \
             total_commands_processed too (on Redis 7.0 an EVAL running ten GETs adds eleven), so \
             neither tells the commands a worker sends from those its scripts run; MONITOR does, in a \
             separate untimed drain, keeping only the worker process's own connections. Pipelined \
             commands are counted one by one, so round trips can be fewer."
                .into(),
        );
    }
    if let Some(count) = &results.commands {
        if count.background_per_second >= 1.0 {
            notes.push(format!(
                "Other clients ran about {:.0} commands/s on this Redis just before a counted drain; \
                 INFO commandstats counts them too.",
                count.background_per_second
            ));
        }
    }
    if configured == "amqp" {
        notes.push(format!(
            "The AMQP result backend keeps one queue per task (`task_<uuid>`); the benchmark leaves them \
             to expire after {RESULTS_EXPIRE_SECS} s."
        ));
    }
    let failures: u64 = results.drains.iter().map(|r| r.failures).sum();
    if failures > 0 {
        notes.push(format!(
            "{failures} tasks ended in FAILURE during the drains."
        ));
    }
    notes.extend(results.notes.iter().cloned());
    for note in notes {
        line(format!("- {note}"));
    }
    out
}

/// How this run was started, passwords hidden.
fn command_line(settings: &Settings) -> String {
    let args: Vec<String> = settings
        .args
        .iter()
        .map(|arg| {
            let arg = if arg.contains("://") {
                machinery::config::redact_url(arg)
            } else {
                arg.clone()
            };
            if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || c == '\'') {
                format!("'{}'", arg.replace('\'', r"'\''"))
            } else {
                arg
            }
        })
        .collect();
    if args.is_empty() {
        "cargo run --release -p machinery-bench".to_owned()
    } else {
        format!(
            "cargo run --release -p machinery-bench -- {}",
            args.join(" ")
        )
    }
}

/// Appends `text` to the record at `path`, starting the file with the introduction if it is new.
pub(crate) fn append(path: &Path, text: &str) -> Result<(), BenchError> {
    let shown = path.display().to_string();
    let exists = path.exists();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(BenchError::io(format!("opening {shown}")))?;
    let mut body = String::new();
    if !exists {
        body.push_str(INTRO);
    }
    body.push('\n');
    body.push_str(text);
    file.write_all(body.as_bytes())
        .map_err(BenchError::io(format!("writing {shown}")))
}
