//! Tasks for worker-level tests, with a probe that records how they ran.
//!
//! - `probe(key, tag, ms) -> tag`: records its start and end under `key` (runs in progress, the most in
//!   progress at once, the order tags started in), sleeps `ms`.
//! - `collect(key, values) -> sum`: records a run under `key` with the values in the order received (a
//!   chord callback: the members' results fill `values`).
//! - `sleep_add(a, b, ms) -> a + b`: sleeps `ms` first.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use machinery::{task, TaskError};

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
    /// The `tag` of each run in the order they started (`collect`: the values it received).
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

/// Records a run under `key`, sleeps `ms`, returns `tag`.
#[task]
pub async fn probe(key: String, tag: i64, ms: i64) -> Result<i64, TaskError> {
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
    Ok(tag)
}

/// Records a run under `key` with `values`, returns their sum.
#[task]
pub async fn collect(key: String, values: Vec<i64>) -> Result<i64, TaskError> {
    update(&key, |r| {
        r.started += 1;
        r.finished += 1;
        r.order.extend(values.iter().copied());
    });
    Ok(values.iter().sum())
}

/// Sleeps `ms`, returns `a + b`.
#[task]
pub async fn sleep_add(a: i64, b: i64, ms: i64) -> Result<i64, TaskError> {
    tokio::time::sleep(Duration::from_millis(ms.max(0) as u64)).await;
    Ok(a + b)
}
