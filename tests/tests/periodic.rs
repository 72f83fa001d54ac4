//! Periodic tasks across processes: three processes register the same periodic task on one Redis; every
//! tick is sent exactly once, and no tick is skipped while any of them runs.

use std::collections::BTreeMap;
use std::time::Duration;

use machinery::{Config, Server, Signature, PERIODIC_TICK_HEADER};
use machinery_tests::{require, unique, Service};

fn spawn_node(queue: &str, name: &str, spec: &str, run_for: Duration) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_periodic_node"))
        .env("BROKER", Service::Redis.url())
        .env("RESULT_BACKEND", Service::Redis.url())
        .env("RESULTS_EXPIRE_IN", "120")
        .env("DEFAULT_QUEUE", queue)
        .env("PERIODIC_SPEC", spec)
        .env("PERIODIC_NAME", name)
        .env("RUN_FOR_MS", run_for.as_millis().to_string())
        .kill_on_drop(true)
        .spawn()
        .expect("start a periodic node")
}

async fn ticks_in_queue(server: &Server, queue: &str) -> BTreeMap<i64, usize> {
    let mut ticks = BTreeMap::new();
    for body in server
        .broker()
        .inspect()
        .unwrap()
        .pending(queue, 10_000)
        .await
        .unwrap()
    {
        let sig = Signature::from_json(&body).unwrap();
        let tick = sig
            .header_value(PERIODIC_TICK_HEADER)
            .and_then(|v| v.as_i64())
            .expect("tick header");
        *ticks.entry(tick).or_default() += 1;
    }
    ticks
}

async fn each_tick_once_across_three_processes(spec: &str, step_ms: i64, run_for: Duration) {
    let queue = unique("periodic");
    let name = unique("report");
    let url = Service::Redis.url();
    let server = Server::new(Config::new(&url, &url).with_default_queue(&queue))
        .await
        .unwrap();
    // Staggered starts, overlapping lives: at every moment of the window at least one process runs.
    let mut nodes = Vec::new();
    for i in 0..3u32 {
        nodes.push(spawn_node(&queue, &name, spec, run_for));
        tokio::time::sleep(Duration::from_millis(300 * u64::from(i + 1))).await;
    }
    for node in &mut nodes {
        let status = tokio::time::timeout(run_for + Duration::from_secs(20), node.wait())
            .await
            .expect("the node exits")
            .unwrap();
        assert!(status.success(), "{status}");
    }
    let ticks = ticks_in_queue(&server, &queue).await;
    let _ = server.broker().inspect().unwrap().purge(&queue).await;
    let doubled: Vec<_> = ticks.iter().filter(|(_, &n)| n > 1).collect();
    assert!(doubled.is_empty(), "ticks sent more than once: {doubled:?}");
    let (first, last) = (*ticks.keys().next().unwrap(), *ticks.keys().last().unwrap());
    let expected = ((last - first) / step_ms + 1) as usize;
    assert_eq!(
        ticks.len(),
        expected,
        "a tick was skipped between {first} and {last}: {ticks:?}"
    );
    let least = (run_for.as_millis() as i64 / step_ms - 1) as usize;
    assert!(
        ticks.len() >= least,
        "only {} ticks in {run_for:?}",
        ticks.len()
    );
}

#[tokio::test]
async fn a_seconds_field_spec_fires_each_second_once_across_three_processes() {
    if !require(
        Service::Redis,
        "a_seconds_field_spec_fires_each_second_once_across_three_processes",
    ) {
        return;
    }
    each_tick_once_across_three_processes("* * * * * *", 1000, Duration::from_secs(8)).await;
}

#[tokio::test]
async fn an_every_spec_fires_each_tick_once_across_three_processes() {
    if !require(
        Service::Redis,
        "an_every_spec_fires_each_tick_once_across_three_processes",
    ) {
        return;
    }
    each_tick_once_across_three_processes("@every 2s", 2000, Duration::from_secs(10)).await;
}
