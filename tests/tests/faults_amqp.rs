//! A worker whose RabbitMQ connection goes silent (issue 13): the fault proxy freezes the open connection
//! (half-open: the socket stays open, nothing arrives) while new connections work. With AMQP heartbeats
//! at Go's 10 s the worker notices within about 20 s, reconnects, and serves again; every task sent before
//! and during the freeze completes. RabbitMQ's own proposal (60 s) would leave it deaf for two minutes.
//! Resets and stalls of the worker's connection, repeated while tasks are sent, lose nothing either.

use std::time::{Duration, Instant};

use machinery::{Config, RunningWorker, Server, Worker};
use machinery_tests::amqp::{self, Cleanup};
use machinery_tests::fault_proxy::FaultProxy;
use machinery_tests::tasks::probe;
use machinery_tests::{require, unique, Service};

/// How long after a freeze the worker must serve again: two heartbeat intervals, a reconnection, and a
/// margin for a loaded machine.
const SERVES_AGAIN_WITHIN: Duration = Duration::from_secs(45);

/// A sender on RabbitMQ directly and a running worker (probe tasks, concurrency 4) whose broker link goes
/// through a fault proxy; results on Redis, which stays reachable.
async fn worker_behind_proxy(prefix: &str) -> (FaultProxy, Server, RunningWorker, Cleanup) {
    let proxy = FaultProxy::start(Service::RabbitMq.addr()).await;
    let mut config: Config = amqp::config(prefix);
    config.result_backend = Service::Redis.url();
    let cleanup = Cleanup::for_config(&config);
    let sender = Server::new(config.clone()).await.unwrap();
    let mut through_proxy = config;
    through_proxy.broker = format!("amqp://guest:guest@{}/", proxy.addr());
    let worker_server = Server::new(through_proxy).await.unwrap();
    let worker = Worker::new(&worker_server)
        .register(probe::task())
        .concurrency(4)
        .start()
        .await
        .unwrap();
    (proxy, sender, worker, cleanup)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_rabbitmq_link_goes_silent_reconnects_and_loses_nothing() {
    if !require(Service::RabbitMq, "amqp half-open") || !require(Service::Redis, "amqp half-open") {
        return;
    }
    let (proxy, sender, worker, _cleanup) = worker_behind_proxy("halfopen").await;
    let key = unique("halfopen");
    let first = probe::send(&sender, &key, 1, 0).await.unwrap();
    assert_eq!(first.get(Duration::from_secs(20)).await.unwrap(), 1);

    let frozen = proxy.freeze_open();
    assert!(frozen >= 1, "the worker's connection was open");
    let froze_at = Instant::now();
    let mut during = Vec::new();
    for n in 0..20 {
        during.push((n, probe::send(&sender, &key, n, 0).await.unwrap()));
    }
    let fresh = probe::send(&sender, &key, 100, 0).await.unwrap();
    let served = fresh.get(SERVES_AGAIN_WITHIN).await;
    assert_eq!(
        served.ok(),
        Some(100),
        "the worker serves again within {SERVES_AGAIN_WITHIN:?} of the freeze"
    );
    let took = froze_at.elapsed();
    for (n, result) in during {
        assert_eq!(
            result.get(Duration::from_secs(20)).await.unwrap(),
            n,
            "task {n} sent during the freeze completes"
        );
    }
    eprintln!("served again {took:?} after the freeze");
    worker.shutdown(Duration::from_secs(20)).await.unwrap();
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_rabbitmq_link_is_reset_or_stalled_loses_nothing() {
    if !require(Service::RabbitMq, "amqp reset") || !require(Service::Redis, "amqp reset") {
        return;
    }
    let (proxy, sender, worker, _cleanup) = worker_behind_proxy("resetstall").await;
    let key = unique("resetstall");
    let mut sent = Vec::new();
    for round in 0..6i64 {
        for n in 0..10 {
            let tag = round * 100 + n;
            sent.push((tag, probe::send(&sender, &key, tag, 20).await.unwrap()));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        if round % 2 == 0 {
            proxy.reset_all();
        } else {
            proxy.stall();
            tokio::time::sleep(Duration::from_secs(2)).await;
            proxy.heal();
        }
    }
    let mut missing = Vec::new();
    for (tag, result) in &sent {
        match result.get(Duration::from_secs(30)).await {
            Ok(value) => assert_eq!(value, *tag),
            Err(error) => missing.push(format!("{tag}: {error}")),
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} never completed: {missing:?}",
        missing.len(),
        sent.len()
    );
    worker.shutdown(Duration::from_secs(20)).await.unwrap();
    drop(proxy);
}
