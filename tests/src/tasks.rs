//! Tasks for worker-level tests, written as plain [`TaskDef`]s (what `#[task]` generates), with a probe
//! that records how they ran.
//!
//! - `probe(key: String, tag: i64, ms: i64) -> i64`: records its start and end under `key` (running count,
//!   most running at once, the order tags started in), sleeps `ms`, returns `tag`.
//! - `collect(key: String, values: ...i64) -> i64`: records a run under `key` and returns the sum of
//!   the values (a chord callback: the members' results are appended to its arguments).
//! - `sleep_add(a: i64, b: i64, ms: i64) -> i64`: appends a line to the file named by
//!   `MACHINERY_TEST_MARKER` (if set) when it starts, sleeps `ms`, returns `a + b`.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use machinery::args::{encode_result, ArgReader};
use machinery::{
    Arg, FailureKind, HandlerFuture, TaskContext, TaskDef, TaskFailure, TaskOptions, TaskResult,
};

const NO_OPTIONS: TaskOptions = TaskOptions {
    queue: None,
    retries: 0,
    retry_timeout: 0,
    timeout: None,
};

/// What the probe saw for one key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeRecord {
    /// Runs started.
    pub started: usize,
    /// Runs finished.
    pub finished: usize,
    /// Runs in progress now.
    pub running: usize,
    /// The most runs in progress at once.
    pub max_running: usize,
    /// The `tag` of each run, in the order they started.
    pub order: Vec<i64>,
}

fn probes() -> &'static Mutex<HashMap<String, ProbeRecord>> {
    static PROBES: OnceLock<Mutex<HashMap<String, ProbeRecord>>> = OnceLock::new();
    PROBES.get_or_init(Default::default)
}

/// What the probe recorded under `key` so far.
pub fn probe_record(key: &str) -> ProbeRecord {
    probes()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(key)
        .cloned()
        .unwrap_or_default()
}

fn update(key: &str, f: impl FnOnce(&mut ProbeRecord)) {
    let mut probes = probes().lock().unwrap_or_else(|p| p.into_inner());
    f(probes.entry(key.to_owned()).or_default());
}

fn bad_args(error: impl std::fmt::Display) -> TaskFailure {
    TaskFailure::new(FailureKind::BadArguments, error.to_string())
}

fn output(value: i64) -> Result<Vec<TaskResult>, TaskFailure> {
    encode_result(&value)
        .map(|r| vec![r])
        .map_err(|e| TaskFailure::new(FailureKind::Encode, e.to_string()))
}

fn probe_handler(_ctx: TaskContext, args: Vec<Arg>) -> HandlerFuture {
    Box::pin(async move {
        let mut reader = ArgReader::new("probe", &args, 3, false);
        let key: String = reader.next().map_err(bad_args)?;
        let tag: i64 = reader.next().map_err(bad_args)?;
        let ms: i64 = reader.next().map_err(bad_args)?;
        update(&key, |r| {
            r.started += 1;
            r.running += 1;
            r.max_running = r.max_running.max(r.running);
            r.order.push(tag);
        });
        tokio::time::sleep(Duration::from_millis(ms.max(0) as u64)).await;
        update(&key, |r| {
            r.running -= 1;
            r.finished += 1;
        });
        output(tag)
    })
}

fn collect_handler(_ctx: TaskContext, args: Vec<Arg>) -> HandlerFuture {
    Box::pin(async move {
        let mut reader = ArgReader::new("collect", &args, 2, true);
        let key: String = reader.next().map_err(bad_args)?;
        let values: Vec<i64> = reader.rest().map_err(bad_args)?;
        update(&key, |r| {
            r.started += 1;
            r.finished += 1;
            r.order.extend(values.iter().copied());
        });
        output(values.iter().sum())
    })
}

fn sleep_add_handler(_ctx: TaskContext, args: Vec<Arg>) -> HandlerFuture {
    Box::pin(async move {
        let mut reader = ArgReader::new("sleep_add", &args, 3, false);
        let a: i64 = reader.next().map_err(bad_args)?;
        let b: i64 = reader.next().map_err(bad_args)?;
        let ms: i64 = reader.next().map_err(bad_args)?;
        if let Ok(path) = std::env::var("MACHINERY_TEST_MARKER") {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| TaskFailure::new(FailureKind::Error, e.to_string()))?;
            writeln!(file, "started {a} {b} pid {}", std::process::id())
                .map_err(|e| TaskFailure::new(FailureKind::Error, e.to_string()))?;
        }
        tokio::time::sleep(Duration::from_millis(ms.max(0) as u64)).await;
        output(a + b)
    })
}

/// `probe(key, tag, ms) -> tag`.
pub static PROBE: TaskDef = TaskDef {
    name: "probe",
    rust_path: "machinery_tests::tasks::probe",
    handler: probe_handler,
    options: NO_OPTIONS,
};

/// `collect(key, values...) -> sum`.
pub static COLLECT: TaskDef = TaskDef {
    name: "collect",
    rust_path: "machinery_tests::tasks::collect",
    handler: collect_handler,
    options: NO_OPTIONS,
};

/// `sleep_add(a, b, ms) -> a + b`.
pub static SLEEP_ADD: TaskDef = TaskDef {
    name: "sleep_add",
    rust_path: "machinery_tests::tasks::sleep_add",
    handler: sleep_add_handler,
    options: NO_OPTIONS,
};

/// The signature of `probe(key, tag, ms)`.
pub fn probe_signature(key: &str, tag: i64, ms: i64) -> machinery::Signature {
    machinery::Signature::with_args(
        "probe",
        vec![
            Arg::new("key", "string", key.into()),
            Arg::new("tag", "int64", tag.into()),
            Arg::new("ms", "int64", ms.into()),
        ],
    )
}

/// The signature of `sleep_add(a, b, ms)`.
pub fn sleep_add_signature(a: i64, b: i64, ms: i64) -> machinery::Signature {
    machinery::Signature::with_args(
        "sleep_add",
        vec![
            Arg::new("a", "int64", a.into()),
            Arg::new("b", "int64", b.into()),
            Arg::new("ms", "int64", ms.into()),
        ],
    )
}

/// The signature of `collect(key)`, to which a chord appends its members' results.
pub fn collect_signature(key: &str) -> machinery::Signature {
    machinery::Signature::with_args("collect", vec![Arg::new("key", "string", key.into())])
}
