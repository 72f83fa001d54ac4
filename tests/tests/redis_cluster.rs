//! Redis Cluster (issue 14), on the local cluster `scripts/services.sh up` starts (3 masters, 3 replicas
//! on 127.0.0.1:7000-7005): every key the code writes for a queue lands in the queue's slot (and a chord's
//! progress in its group record's slot), and a sender with two workers keeps going through a manual
//! `CLUSTER FAILOVER` and through a SIGKILL of the master that serves the queue, with the results counted.
//! (The workflow suite runs on the cluster too: `workflows.rs`, module `redis_cluster`.)
//!
//! The tests take turns (one lock): the failover tests move masters around under the others.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use machinery::broker::ConsumeOptions;
use machinery::{task, Chain, Chord, Config, Group, Server, Signature, State, TaskError, Worker};
use machinery_tests::{cluster, eventually, require, unfinished, unique, Service};

static TURNS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[task]
async fn cl_add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

#[task]
async fn cl_sum(xs: Vec<i64>) -> Result<i64, TaskError> {
    Ok(xs.iter().sum())
}

#[task]
async fn cl_slow(ms: i64) -> Result<i64, TaskError> {
    tokio::time::sleep(Duration::from_millis(ms.max(0) as u64)).await;
    Ok(ms)
}

fn config(queue: &str) -> Config {
    let url = Service::RedisCluster.url();
    let mut config = Config::new(url.clone(), url).with_default_queue(queue);
    config.redis.cluster_enabled = true;
    config.redis.delayed_tasks_poll_period = 50;
    config.results_expire_in = 300;
    config
}

/// What kind of our key `key` is, for a key of `queue`: the part after `{<queue>}:`, up to a `:`.
fn kind<'a>(queue: &str, key: &'a str) -> Option<&'a str> {
    let rest = key.strip_prefix(&format!("{{{queue}}}:"))?;
    Some(rest.split(':').next().unwrap_or(rest))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_of_a_queue_and_of_a_chord_lands_in_one_slot() {
    let test = "every_key_of_a_queue_and_of_a_chord_lands_in_one_slot";
    if !require(Service::RedisCluster, test) {
        return;
    }
    let _turn = TURNS.lock().await;
    assert!(cluster::wait_healthy(Duration::from_secs(60)).await);
    let queue = unique("slots");
    let server = Server::new(config(&queue)).await.unwrap();

    // A delivery taken and dropped unsettled goes back with a redelivery mark ({q}:redelivered).
    let given_back = cl_add::send(&server, 1, 1).await.unwrap();
    let mut consumer = server
        .broker()
        .consume(ConsumeOptions {
            queue: queue.clone(),
            consumer_tag: "taker".into(),
            concurrency: 1,
            prefetch: 1,
        })
        .await
        .unwrap();
    let taken = consumer.next_batch(1).await.unwrap();
    assert_eq!(taken.len(), 1);
    drop(taken);
    consumer.close().await.unwrap();
    // The mark lives until the message is handed out again: look before a worker takes it.
    let marked = cluster::keys_containing(&queue).await;
    assert!(
        marked.contains(&format!("{{{queue}}}:redelivered")),
        "the redelivery mark: {marked:?}"
    );

    let running = Worker::auto(&server).concurrency(2).start().await.unwrap();
    assert_eq!(given_back.get(Duration::from_secs(10)).await.unwrap(), 2);
    // In flight for a while ({q}:inflight:<tag>), an ETA an hour away ({q}:delayed), a task nobody
    // knows ({q}:dead), and the worker's registry, heartbeat, card and recovery lock.
    let slow = cl_slow::send(&server, 4000).await.unwrap();
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    server
        .send(cl_add::signature(2, 2).eta(later))
        .await
        .unwrap();
    let unknown = server
        .send(Signature::new("cl_nobody_knows"))
        .await
        .unwrap();
    assert!(unknown.get(Duration::from_secs(10)).await.is_err());

    let wanted: BTreeSet<&str> = [
        "inflight",
        "heartbeat",
        "consumers",
        "redelivered",
        "recovering",
        "dead",
        "delayed",
        "worker",
    ]
    .into();
    let seen = Arc::new(Mutex::new(marked.into_iter().collect::<BTreeSet<String>>()));
    let all_kinds = eventually(Duration::from_secs(10), || {
        let (seen, queue) = (seen.clone(), queue.clone());
        let wanted = wanted.clone();
        async move {
            let keys = cluster::keys_containing(&queue).await;
            let mut seen = seen.lock().unwrap();
            seen.extend(keys);
            let kinds: BTreeSet<&str> = seen.iter().filter_map(|k| kind(&queue, k)).collect();
            wanted.iter().all(|w| kinds.contains(w))
        }
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    assert!(all_kinds, "every kind of key was written: {seen:?}");
    let slot = cluster::keyslot(&queue).await;
    for key in &seen {
        assert_eq!(
            cluster::keyslot(key).await,
            slot,
            "{key} is in the slot of the queue {queue}"
        );
    }
    assert_eq!(slow.get(Duration::from_secs(10)).await.unwrap(), 4000);

    // Inspection reads the same keys: one delayed task, one dead letter, nothing else left.
    let inspect = server.broker().inspect().unwrap();
    let stats = inspect.queue_stats(&queue).await.unwrap();
    assert_eq!(
        (stats.pending, stats.delayed, stats.in_flight, stats.dead),
        (0, Some(1), Some(0), Some(1)),
        "{stats:?}"
    );
    let dead = inspect.dead_letters(&queue, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].reason.contains("cl_nobody_knows"),
        "{}",
        dead[0].reason
    );

    // A chord: the group record (Go's key, the group uuid) and our progress beside it share a slot.
    let group = Group::new((0..4).map(|k| cl_add::signature(k, 1)));
    let chord = server
        .send_chord(Chord::new(group, cl_sum::partial()))
        .await
        .unwrap();
    assert_eq!(chord.get(Duration::from_secs(10)).await.unwrap(), 10);
    let group_uuid = chord.group().group_uuid().to_owned();
    let keys = cluster::keys_containing(&group_uuid).await;
    assert!(keys.contains(&group_uuid), "the group record: {keys:?}");
    assert!(
        keys.iter()
            .any(|k| k.starts_with(&format!("{{{group_uuid}}}:chord"))),
        "the chord progress: {keys:?}"
    );
    let group_slot = cluster::keyslot(&group_uuid).await;
    for key in &keys {
        assert_eq!(cluster::keyslot(key).await, group_slot, "{key}");
    }
    eprintln!("keys of queue {queue}, all in slot {slot}: {seen:?}; of the chord: {keys:?}");
    running.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_senders_delayed_task_in_the_global_set_runs_on_our_worker() {
    let test = "a_go_senders_delayed_task_in_the_global_set_runs_on_our_worker";
    if !require(Service::RedisCluster, test) {
        return;
    }
    let _turn = TURNS.lock().await;
    assert!(cluster::wait_healthy(Duration::from_secs(60)).await);
    let queue = unique("go_eta");
    let server = Server::new(config(&queue)).await.unwrap();
    let running = Worker::auto(&server).concurrency(2).start().await.unwrap();
    // What a Go sender writes for a task with an ETA: the signature in Go's one global sorted set, the
    // ETA in Unix nanoseconds as its score (here due in half a second).
    let mut signature = cl_add::signature(2, 3).erase();
    signature.routing_key = queue.clone();
    let uuid = signature.uuid.clone();
    let eta = chrono::Utc::now() + chrono::Duration::milliseconds(500);
    let seeds: Vec<String> = cluster::PORTS
        .iter()
        .map(|port| format!("redis://127.0.0.1:{port}"))
        .collect();
    let mut conn = redis::cluster::ClusterClient::new(seeds)
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    let () = redis::cmd("ZADD")
        .arg("delayed_tasks")
        .arg(eta.timestamp_nanos_opt().unwrap())
        .arg(signature.to_json().unwrap())
        .query_async(&mut conn)
        .await
        .unwrap();
    let ran = eventually(Duration::from_secs(10), || async {
        matches!(
            server.backend().get_state(&uuid).await,
            Ok(Some(state)) if state.state == State::Success
        )
    })
    .await;
    assert!(ran, "the task Go delayed ran on our worker");
    running.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// Everything the load sent, by whether it was sent after the new master took over.
#[derive(Debug, Default)]
struct Sent {
    before: Vec<String>,
    after: Vec<String>,
    singles: usize,
    chains: usize,
    chords: usize,
    refused: usize,
}

/// A single task every tick, a chain of 3 every 5th and a chord of 5 every 10th, until `stop`. A send
/// that fails (during the failover) is counted as refused: it was never acknowledged.
async fn load(
    sender: Server,
    sent: Arc<Mutex<Sent>>,
    taken_over: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    let mut tick = 0i64;
    while !stop.load(Ordering::SeqCst) {
        tick += 1;
        let mut ids = Vec::new();
        let mut refused = 0;
        let (mut chains, mut chords) = (0, 0);
        match cl_add::send(&sender, tick, 1).await {
            Ok(r) => ids.push(r.uuid().to_owned()),
            Err(_) => refused += 1,
        }
        if tick % 5 == 0 {
            let chain = Chain::new(cl_add::signature(tick, 1))
                .then(cl_add::partial(1))
                .then(cl_add::partial(1));
            match sender.send_chain(chain).await {
                Ok(r) => {
                    ids.extend(r.steps().iter().map(|s| s.uuid().to_owned()));
                    chains = 1;
                }
                Err(_) => refused += 1,
            }
        }
        if tick % 10 == 0 {
            let group = Group::new((0..5).map(|k| cl_add::signature(tick, k)));
            match sender
                .send_chord(Chord::new(group, cl_sum::partial()))
                .await
            {
                Ok(r) => {
                    ids.extend(r.group().members().iter().map(|m| m.uuid().to_owned()));
                    ids.push(r.callback().uuid().to_owned());
                    chords = 1;
                }
                Err(_) => refused += 1,
            }
        }
        {
            let after = taken_over.load(Ordering::SeqCst);
            let mut sent = sent.lock().unwrap();
            if after {
                sent.after.extend(ids);
            } else {
                sent.before.extend(ids);
            }
            sent.singles += 1;
            sent.chains += chains;
            sent.chords += chords;
            sent.refused += refused;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends in the last moments before the fault: rounds of `BURST` single tasks at once, until the new
/// master took over. What the master acknowledged and had not yet passed to its replica is what a
/// SIGKILL can lose. Returns the acknowledged ids and how many sends failed.
const BURST: usize = 16;

async fn burst(sender: Server, taken_over: Arc<AtomicBool>) -> (Vec<String>, usize) {
    let (mut acknowledged, mut refused) = (Vec::new(), 0);
    let mut tick = 0i64;
    while !taken_over.load(Ordering::SeqCst) {
        let mut round = tokio::task::JoinSet::new();
        for _ in 0..BURST {
            tick += 1;
            let sender = sender.clone();
            round.spawn(async move {
                cl_add::send(&sender, tick, 1)
                    .await
                    .map(|r| r.uuid().to_owned())
            });
        }
        while let Some(sent) = round.join_next().await {
            match sent {
                Ok(Ok(id)) => acknowledged.push(id),
                _ => refused += 1,
            }
        }
    }
    (acknowledged, refused)
}

async fn wait_done(sender: &Server, ids: &[String], limit: Duration) -> Vec<String> {
    let started = Instant::now();
    let mut left = unfinished(sender, ids).await;
    while !left.is_empty() && started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(250)).await;
        left = unfinished(sender, &left).await;
    }
    left
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// `CLUSTER FAILOVER` on a replica of the queue's master.
    ManualFailover,
    /// SIGKILL of the queue's master; its replica takes over; the killed node restarts as a replica.
    KillMaster,
}

async fn survives(fault: Fault, test: &str) {
    if !require(Service::RedisCluster, test) {
        return;
    }
    let _turn = TURNS.lock().await;
    // CLUSTER_LOG=machinery=debug shows what the workers and the sender did through the fault.
    if let Ok(filter) = std::env::var("CLUSTER_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
    assert!(
        cluster::wait_healthy(Duration::from_secs(60)).await,
        "the cluster is healthy before the test"
    );
    let queue = unique("failover");
    let mut workers = Vec::new();
    for _ in 0..2 {
        let server = Server::new(config(&queue)).await.unwrap();
        workers.push(Worker::auto(&server).concurrency(4).start().await.unwrap());
    }
    let sender = Server::new(config(&queue)).await.unwrap();
    let first = cl_add::send(&sender, 1, 2).await.unwrap();
    assert_eq!(first.get(Duration::from_secs(10)).await.unwrap(), 3);

    let sent = Arc::new(Mutex::new(Sent::default()));
    let (taken_over, stop) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let loading = tokio::spawn(load(
        sender.clone(),
        sent.clone(),
        taken_over.clone(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;

    let master = cluster::master_of(&queue).await;
    let replica = cluster::replica_of(master).await;
    let bursting = tokio::spawn(burst(sender.clone(), taken_over.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hit = Instant::now();
    match fault {
        Fault::ManualFailover => cluster::failover(replica).await,
        Fault::KillMaster => cluster::kill(master),
    }
    let promoted = eventually(Duration::from_secs(30), || async {
        cluster::role(replica).await.as_deref() == Some("master")
    })
    .await;
    assert!(
        promoted,
        "{fault:?}: the replica :{replica} of :{master} took over"
    );
    let takeover = hit.elapsed();
    taken_over.store(true, Ordering::SeqCst);
    let (burst_sent, burst_refused) = bursting.await.unwrap();

    // A task sent now is served by the new master's queue.
    let fresh = Instant::now();
    let probe = cl_add::send(&sender, 20, 22).await.unwrap();
    let probe_result = probe.get(Duration::from_secs(30)).await;
    let served_again = fresh.elapsed();
    assert_eq!(
        probe_result.unwrap(),
        42,
        "{fault:?}: a task sent after the takeover is served"
    );

    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::SeqCst);
    loading.await.unwrap();
    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let left_after = wait_done(&sender, &sent.after, Duration::from_secs(30)).await;
    let left_before = wait_done(&sender, &sent.before, Duration::from_secs(10)).await;
    let burst_lost = wait_done(&sender, &burst_sent, Duration::from_secs(10)).await;

    if fault == Fault::KillMaster {
        cluster::restart(master);
    }
    let healthy = cluster::wait_healthy(Duration::from_secs(60)).await;
    eprintln!(
        "{fault:?} of :{master} (replica :{replica} master after {takeover:?}; a fresh task served in \
         {served_again:?}): sent {} results before the takeover, {} lost; {} after, {} lost; {} sends \
         refused during the failover ({} single tasks, {} chains of 3, {} chords of 5); a burst of \
         {BURST} sends at once up to the takeover: {} acknowledged, {} lost, {} refused",
        sent.before.len(),
        left_before.len(),
        sent.after.len(),
        left_after.len(),
        sent.refused,
        sent.singles,
        sent.chains,
        sent.chords,
        burst_sent.len(),
        burst_lost.len(),
        burst_refused,
    );
    assert!(
        sent.singles >= 30 && sent.chains >= 6 && sent.chords >= 3,
        "{sent:?}"
    );
    assert!(
        left_after.is_empty(),
        "{fault:?}: results sent after the takeover that never arrived: {:?}",
        &left_after[..left_after.len().min(5)]
    );
    assert!(
        healthy,
        "{fault:?}: the cluster is whole again (every node ok, three masters)"
    );
    if fault == Fault::KillMaster {
        assert_eq!(
            cluster::role(master).await.as_deref(),
            Some("slave"),
            "the killed master came back as a replica"
        );
    }
    for running in workers {
        running.shutdown(Duration::from_secs(10)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_cluster_failover_mid_run_is_counted_and_served_through() {
    survives(
        Fault::ManualFailover,
        "a_manual_cluster_failover_mid_run_is_counted_and_served_through",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_master_mid_run_is_counted_and_served_through() {
    survives(
        Fault::KillMaster,
        "a_sigkilled_master_mid_run_is_counted_and_served_through",
    )
    .await;
}
