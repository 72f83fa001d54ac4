//! RabbitMQ node failover mid-run on the 3-node cluster of `scripts/services.sh` (:5673-:5675, nodes
//! `machinery-c1..3@localhost`), with quorum queues: a sender and two workers busy with single tasks,
//! chains and chords while the node the sender and one worker are connected to stops
//! (`rabbitmqctl stop_app`); they reconnect to the next node of their URL list, and no acknowledged send
//! is lost. The node is started again afterwards.
//!
//! Results go to Redis (Go's example setup): the AMQP result backend keeps its result queues on one node
//! (`docs/deploy.md`).

use std::process::Command;
use std::time::{Duration, Instant};

use machinery::{Config, Server, Worker};
use machinery_tests::ha::Load;
use machinery_tests::{require, unique, Service};

/// `rabbitmqctl` on cluster node `node` (1..3), through `scripts/services.sh` (it knows the cluster's
/// cookie and node names).
fn rabbitmqctl(node: u8, args: &[&str]) -> bool {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services.sh");
    let status = Command::new(script)
        .arg("rabbitmqctl")
        .arg(node.to_string())
        .args(args)
        .output()
        .expect("run scripts/services.sh rabbitmqctl");
    if !status.status.success() {
        eprintln!(
            "rabbitmqctl {node} {args:?}: {}",
            String::from_utf8_lossy(&status.stderr)
        );
    }
    status.status.success()
}

/// How many of our broker connections the cluster lists on the node listening on `port`.
fn broker_connections_on(port: u16) -> usize {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services.sh");
    let output = Command::new(script)
        .args([
            "rabbitmqctl",
            "2",
            "list_connections",
            "--no-table-headers",
            "client_properties",
            "port",
        ])
        .output()
        .expect("run scripts/services.sh rabbitmqctl");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| {
            // The connection name we give, among the client properties.
            line.contains("machinery broker")
                && line.split_whitespace().last() == Some(&port.to_string())
        })
        .count()
}

/// The cluster's node URLs, starting at node `first` (1..3).
fn urls_from(first: usize) -> String {
    let urls: Vec<String> = Service::RabbitMqCluster
        .url()
        .split(',')
        .map(str::to_owned)
        .collect();
    let n = urls.len();
    (0..n)
        .map(|i| urls[(first - 1 + i) % n].clone())
        .collect::<Vec<_>>()
        .join(",")
}

fn config(queue: &str, broker: String) -> Config {
    let mut config = Config::new(broker, Service::Redis.url()).with_default_queue(queue);
    config.amqp.queue_type = "quorum".into();
    config.amqp.exchange = "machinery_tests_ha".into();
    config.amqp.binding_key = queue.to_owned();
    config.results_expire_in = 600;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopping_the_node_a_worker_uses_loses_no_acknowledged_send_on_quorum_queues() {
    if !require(Service::RabbitMqCluster, "rabbitmq node failover")
        || !require(Service::Redis, "rabbitmq node failover")
    {
        return;
    }
    // A node left stopped by an interrupted run comes back first.
    assert!(rabbitmqctl(1, &["start_app"]), "node c1 does not start");

    let queue = unique("ha_amqp");
    // The sender and worker A start at node c1, worker B at c2.
    let sender = Server::new(config(&queue, urls_from(1)))
        .await
        .expect("sender");
    let mut workers = Vec::new();
    for first in [1, 2] {
        let server = Server::new(config(&queue, urls_from(first)))
            .await
            .expect("worker server");
        let running = Worker::auto(&server)
            .concurrency(4)
            .start()
            .await
            .expect("worker starts");
        workers.push((server, running));
    }
    // The sender and worker A on c1 (:5673), worker B on c2 (:5674).
    assert!(
        broker_connections_on(5673) >= 2,
        "the sender and worker A are not on c1"
    );
    let load = Load::start(sender, Duration::from_millis(100));
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let stopped_at = Instant::now();
    assert!(rabbitmqctl(1, &["stop_app"]), "node c1 does not stop");
    let stop_time = stopped_at.elapsed();
    // They move to the next node of their list, c2, beside worker B.
    let moved = machinery_tests::eventually(Duration::from_secs(20), || async {
        tokio::task::spawn_blocking(|| broker_connections_on(5674) >= 3)
            .await
            .unwrap_or(false)
    })
    .await;
    assert!(moved, "the sender and worker A did not reconnect to c2");
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let tally = load.finish(Duration::from_secs(60)).await;
    assert!(
        rabbitmqctl(1, &["start_app"]),
        "node c1 does not start again"
    );
    for (_, running) in workers {
        running
            .shutdown(Duration::from_secs(20))
            .await
            .expect("worker shuts down");
    }
    eprintln!(
        "RabbitMQ cluster, quorum queues, node c1 stopped mid-run (stop_app took {stop_time:.1?}): {tally}"
    );
    assert!(
        tally.sent() > 30,
        "too little load to say anything: {tally}"
    );
    assert!(tally.chains.sent > 0 && tally.chords.sent > 0, "{tally}");
    assert_eq!(
        tally.lost(),
        0,
        "acknowledged sends lost: {tally}; first: {:?}",
        &tally.failures[..tally.failures.len().min(5)]
    );
}

/// The type of each queue on the cluster whose name contains `part`.
fn queue_types(part: &str) -> Vec<(String, String)> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services.sh");
    let output = Command::new(script)
        .args([
            "rabbitmqctl",
            "1",
            "list_queues",
            "--no-table-headers",
            "name",
            "type",
        ])
        .output()
        .expect("run scripts/services.sh rabbitmqctl");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(name, _)| name.contains(part))
        .map(|(name, kind)| (name.to_owned(), kind.trim().to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_and_dead_letters_work_on_quorum_queues() {
    if !require(Service::RabbitMqCluster, "quorum queues")
        || !require(Service::Redis, "quorum queues")
    {
        return;
    }
    // On node c3 (the other test stops c1).
    let queue = unique("quorum");
    let mut config = config(&queue, urls_from(3));
    config.unknown_task_requeues = 0;
    let server = Server::new(config).await.expect("server");
    let running = Worker::auto(&server)
        .concurrency(2)
        .start()
        .await
        .expect("worker starts");
    // A delay parks the message in a dead-letter TTL queue, quorum too, until its ETA.
    let sent_at = Instant::now();
    let delayed =
        machinery_tests::ha::ha_step::signature(0, 41).countdown(Duration::from_millis(1_500));
    let result = server.send(delayed).await.expect("send delayed");
    // (Checked at once: the delay queue expires twice its delay after its declaration.)
    let types = queue_types(&queue);
    assert!(
        types
            .iter()
            .any(|(name, kind)| name.starts_with("delay.") && kind == "quorum"),
        "no quorum delay queue: {types:?}"
    );
    assert_eq!(result.get(Duration::from_secs(20)).await.unwrap(), 42);
    assert!(
        sent_at.elapsed() >= Duration::from_millis(1_400),
        "ran early"
    );
    // A task no worker knows goes to `<queue>.dead`.
    let unknown = server
        .send(machinery::Signature::new("nobody_knows_this_task"))
        .await
        .expect("send unknown");
    let dead = machinery_tests::eventually(Duration::from_secs(20), || async {
        server
            .broker()
            .inspect()
            .expect("inspection")
            .dead_letters(&queue, 10)
            .await
            .is_ok_and(|d| {
                d.iter()
                    .any(|d| String::from_utf8_lossy(&d.body).contains(unknown.uuid()))
            })
    })
    .await;
    assert!(dead, "the unknown task was not dead-lettered");
    let types = queue_types(&queue);
    for name in [queue.clone(), format!("{queue}.dead")] {
        assert!(
            types.contains(&(name.clone(), "quorum".to_owned())),
            "{name} is not a quorum queue: {types:?}"
        );
    }
    running
        .shutdown(Duration::from_secs(20))
        .await
        .expect("worker shuts down");
}
