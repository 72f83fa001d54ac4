//! Process death and connection loss against a real RabbitMQ, and the connections a process keeps.
//!
//! These tests look at and close the RabbitMQ connections of this test process (found by the names
//! machinery gives them), so they live in a file, and so a process, of their own; a lock keeps them from
//! running at the same time.

use std::collections::HashSet;
use std::time::Duration;

use machinery::{Arg, Config, Server, Signature, State, Worker};
use machinery_tests::amqp::{
    self, close_connections_of_this_process, connections_of_this_process, queue_info, wait_for,
    Cleanup, Rabbit,
};
use machinery_tests::tasks::{probe, probe_record};
use machinery_tests::{require, unique, Service};
use tokio::process::{Child, Command};

const WAIT: Duration = Duration::from_secs(30);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts the shared test worker process (`tests/src/bin/test_worker.rs`) on `config`, one task at a time,
/// and waits until it consumes the queue.
async fn start_worker(config: &Config) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_test_worker"))
        .env("BROKER", &config.broker)
        .env("RESULT_BACKEND", &config.result_backend)
        .env("DEFAULT_QUEUE", &config.default_queue)
        .env("AMQP_EXCHANGE", &config.amqp.exchange)
        .env("AMQP_BINDING_KEY", &config.amqp.binding_key)
        .env("RESULTS_EXPIRE_IN", config.results_expire_in.to_string())
        .env("WORKER_CONCURRENCY", "1")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("the test worker starts");
    let consuming = wait_for(WAIT, || {
        queue_info(&config.default_queue).filter(|q| q.consumers == 1)
    })
    .await;
    assert!(consuming.is_some(), "the test worker consumes the queue");
    child
}

/// The states a Go reader finds in a task's result queue, in order (it takes them).
async fn states_in_order(rabbit: &Rabbit, uuid: &str) -> Vec<String> {
    let mut states = Vec::new();
    while let Some(d) = rabbit.take(uuid).await {
        let state: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        states.push(state["State"].as_str().unwrap_or_default().to_owned());
    }
    states
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_task_loses_nothing_and_the_task_completes_elsewhere() {
    if !require(Service::RabbitMq, "kill -9") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let config = amqp::config("kill");
    let cleanup = Cleanup::for_config(&config);
    let mut first = start_worker(&config).await;
    let sender = Server::new(config.clone()).await.unwrap();
    let sig: Signature<i64> =
        Signature::with_args("sleep_ms", vec![Arg::new("ms", "int64", 3_000.into())]).retype();
    let result = sender.send(sig).await.unwrap();
    cleanup.queue(result.uuid());
    let started = wait_for(WAIT, || {
        let state = futures_block(result.state()).ok().flatten()?;
        (state.state == State::Started).then_some(())
    })
    .await;
    assert!(started.is_some(), "the first worker started the task");

    first.kill().await.expect("SIGKILL");
    let state = result.state().await.unwrap().expect("a state");
    assert!(
        !state.is_completed(),
        "killed before it finished: {state:?}"
    );
    let back = wait_for(WAIT, || {
        queue_info(&config.default_queue).filter(|q| q.ready == 1 && q.unacked == 0)
    })
    .await;
    assert!(
        back.is_some(),
        "the unacknowledged message went back to the queue"
    );

    let mut second = start_worker(&config).await;
    assert_eq!(result.get(WAIT).await.unwrap(), 3_000, "the task completes");
    let done = wait_for(WAIT, || {
        queue_info(&config.default_queue).filter(|q| q.ready == 0 && q.unacked == 0)
    })
    .await;
    assert!(done.is_some(), "acknowledged, nothing left");
    let rabbit = Rabbit::connect().await;
    assert_eq!(
        states_in_order(&rabbit, result.uuid()).await,
        ["PENDING", "RECEIVED", "STARTED", "RECEIVED", "STARTED", "SUCCESS"],
        "started by the killed worker, run again and finished by the second"
    );

    // SIGTERM: the second worker shuts down gracefully.
    let pid = second.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(WAIT, second.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

/// Runs a future to completion from a blocking check.
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Handle::current().block_on(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_closed_under_load_and_nothing_is_lost_or_run_twice() {
    if !require(Service::RabbitMq, "connection loss") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut config = amqp::config("reconnect");
    config.amqp.prefetch_count = 4;
    let cleanup = Cleanup::for_config(&config);
    // The worker's process role and the sender's, each with a broker and a result backend connection.
    let worker_side = Server::new(config.clone()).await.unwrap();
    let sender = Server::new(config.clone()).await.unwrap();
    let running = Worker::new(&worker_side)
        .register(probe::task())
        .concurrency(4)
        .start()
        .await
        .unwrap();
    let key = unique("reconnect");
    // Closes this process's connections twice while tasks run, queue and are sent; the second time once
    // all four are back.
    let closer = tokio::spawn(async {
        let mut closed = Vec::new();
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            wait_for(WAIT, || {
                (connections_of_this_process().len() == 4).then_some(())
            })
            .await;
            closed.push(
                tokio::task::spawn_blocking(close_connections_of_this_process)
                    .await
                    .unwrap(),
            );
        }
        closed
    });
    let mut results = Vec::new();
    // 200 ms tasks arriving every 40 ms at concurrency 4: there is a backlog and 4 tasks always run.
    // Sending goes on until both closings are done, and a little after.
    let mut i = 0;
    let mut after = 0;
    while after < 10 {
        let r = probe::send(&sender, &key, i, 200)
            .await
            .expect("sends go through the outage");
        cleanup.queue(r.uuid());
        results.push(r);
        i += 1;
        if closer.is_finished() {
            after += 1;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let n = results.len();
    let closed = closer.await.unwrap();
    assert!(
        closed.iter().all(|&c| c >= 4),
        "closed each time the 4 connections: {closed:?}"
    );
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.get(WAIT).await.unwrap(), i as i64, "task {i}");
    }
    let record = probe_record(&key);
    // Copies RabbitMQ redelivered after the loss are settled by the consumer's ledger, not run again. A
    // publish whose confirm was lost with its connection is retried, and RabbitMQ may have stored the first
    // attempt too (at-least-once on publish, docs/amqp.md): sends here are sequential, so each closing can
    // duplicate at most the one publish in flight.
    assert!(record.finished >= n, "a task was lost: {record:?}");
    assert!(
        record.started <= n + closed.len(),
        "more tasks ran twice than publishes were in flight at the losses: {record:?}"
    );
    assert_eq!(record.started, record.finished, "{record:?}");
    let settled = wait_for(WAIT, || {
        queue_info(&config.default_queue).filter(|q| q.ready == 0 && q.unacked == 0)
    })
    .await;
    assert!(settled.is_some(), "{:?}", queue_info(&config.default_queue));
    let stats = sender
        .broker()
        .inspect()
        .unwrap()
        .queue_stats(&config.default_queue)
        .await
        .unwrap();
    assert_eq!(stats.dead, Some(0));
    let reconnected = wait_for(WAIT, || {
        (connections_of_this_process().len() == 4).then_some(())
    })
    .await;
    assert!(
        reconnected.is_some(),
        "reconnected, one connection per role: {:?}",
        connections_of_this_process()
    );
    running.shutdown(WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_per_role_whatever_the_load() {
    if !require(Service::RabbitMq, "connection reuse") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let config = amqp::config("reuse");
    let cleanup = Cleanup::for_config(&config);
    let before: HashSet<_> = connections_of_this_process().into_iter().collect();
    let worker_side = Server::new(config.clone()).await.unwrap();
    let sender = Server::new(config.clone()).await.unwrap();
    let running = Worker::new(&worker_side)
        .register(probe::task())
        .concurrency(8)
        .start()
        .await
        .unwrap();
    let key = unique("reuse");
    let mut results = Vec::new();
    for i in 0..100 {
        let mut sig = probe::signature(&key, i, 0);
        if i % 10 == 0 {
            sig = sig.countdown(Duration::from_millis(300));
        }
        let r = sender.send(sig).await.unwrap();
        cleanup.queue(r.uuid());
        results.push(r);
    }
    for r in &results {
        r.get(WAIT).await.unwrap();
    }
    let new: Vec<_> = connections_of_this_process()
        .into_iter()
        .filter(|c| !before.contains(c))
        .collect();
    let mut names: Vec<_> = new
        .iter()
        .map(|c| c.1.split(" pid ").next().unwrap_or("").to_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "machinery broker",
            "machinery broker",
            "machinery result backend",
            "machinery result backend"
        ],
        "100 sends (10 delayed), 100 tasks with their states: one connection per server and role"
    );
    // Channels are reused too: a handful per connection, not one per publish or per state write.
    let pids: HashSet<_> = new.iter().map(|c| c.0.clone()).collect();
    let channels = amqp::rabbitmqctl_json("list_channels", &["connection"])
        .into_iter()
        .filter(|c| c["connection"].as_str().is_some_and(|p| pids.contains(p)))
        .count();
    assert!(channels <= 4 * 5, "{channels} channels on 4 connections");
    running.shutdown(WAIT).await.unwrap();
}
