//! Redis Sentinel failover mid-run (`scripts/services.sh`: master :6380, replica :6381, sentinels
//! :26379-26381, master `mymaster`): a sender and two workers busy with single tasks, chains and chords
//! while `SENTINEL FAILOVER mymaster` promotes the replica. With `REDIS_WAIT_REPLICAS=1` no acknowledged
//! send is lost and every chain and chord completes; without it, the number lost is reported
//! (`docs/deploy.md`). Then the master is killed (`kill -9`) under the same load, with the option on: no
//! acknowledged send is lost either. The topology is put back (master :6380) before and after, so the
//! test can rerun.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use machinery::{Config, Server, Worker};
use machinery_tests::ha::{Load, Tally};
use machinery_tests::{require, unique, Service, SENTINEL_DATA_ADDRS, SENTINEL_MASTER};
use redis::AsyncCommands as _;

const SENTINELS: [&str; 3] = ["127.0.0.1:26379", "127.0.0.1:26380", "127.0.0.1:26381"];

async fn connect(addr: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://{addr}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// The master's address as the sentinel on :26379 names it.
async fn master_addr() -> Option<String> {
    let mut sentinel = connect(SENTINELS[0]).await;
    let reply: Option<(String, u16)> = redis::cmd("SENTINEL")
        .arg("GET-MASTER-ADDR-BY-NAME")
        .arg(SENTINEL_MASTER)
        .query_async(&mut sentinel)
        .await
        .ok()?;
    reply.map(|(host, port)| format!("{host}:{port}"))
}

/// Whether every sentinel names `master`, it says it is a master with one replica online, and that
/// replica says its link is up: the topology is settled, and a failover may start.
async fn settled_on(master: &str) -> bool {
    for sentinel in SENTINELS {
        let mut conn = connect(sentinel).await;
        let named: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(SENTINEL_MASTER)
            .query_async(&mut conn)
            .await
            .unwrap_or(None);
        if named.map(|(h, p)| format!("{h}:{p}")).as_deref() != Some(master) {
            return false;
        }
        // Each sentinel must also have seen the replica report itself a replica (it samples INFO every
        // 10 s): one that last saw it a master would turn the next promoted replica back at once
        // (+convert-to-slave), and that failover would time out.
        let replicas: Vec<HashMap<String, String>> = redis::cmd("SENTINEL")
            .arg("REPLICAS")
            .arg(SENTINEL_MASTER)
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        let seen = |replica: &HashMap<String, String>, field: &str, value: &str| {
            replica.get(field).map(String::as_str) == Some(value)
        };
        if !replicas.iter().any(|r| {
            seen(r, "flags", "slave")
                && seen(r, "role-reported", "slave")
                && seen(r, "master-link-status", "ok")
        }) {
            return false;
        }
    }
    let replica = SENTINEL_DATA_ADDRS
        .into_iter()
        .find(|addr| *addr != master)
        .unwrap();
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut connect(master).await)
        .await
        .unwrap_or_default();
    let replica_info: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut connect(replica).await)
        .await
        .unwrap_or_default();
    info.contains("role:master")
        && info.contains("connected_slaves:1")
        && info.contains("state=online")
        && replica_info.contains("master_link_status:up")
}

/// Asks the sentinels to fail over to the replica and waits until the topology settles on it.
async fn fail_over() -> (String, Duration) {
    let before = master_addr().await.expect("the sentinels name a master");
    let target = SENTINEL_DATA_ADDRS
        .into_iter()
        .find(|addr| *addr != before)
        .unwrap()
        .to_owned();
    let started = Instant::now();
    // Refused while the sentinels are still busy with a previous failover (INPROG): ask again.
    let accepted = machinery_tests::eventually(Duration::from_secs(30), || async {
        let mut sentinel = connect(SENTINELS[0]).await;
        redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg(SENTINEL_MASTER)
            .query_async::<()>(&mut sentinel)
            .await
            .is_ok()
    })
    .await;
    assert!(accepted, "SENTINEL FAILOVER was refused for 30 s");
    let switched = machinery_tests::eventually(Duration::from_secs(30), || async {
        master_addr().await.as_deref() == Some(target.as_str())
    })
    .await;
    assert!(
        switched,
        "the sentinels did not switch to {target} within 30 s"
    );
    let switch_time = started.elapsed();
    let settled =
        machinery_tests::eventually(Duration::from_secs(60), || settled_on(&target)).await;
    assert!(
        settled,
        "the topology did not settle on {target} within 60 s"
    );
    (target, switch_time)
}

/// Kills the master with SIGKILL, waits until the sentinels promote the replica, then starts the killed
/// server again (empty: the sentinels make it the new master's replica) and waits until that settles.
async fn kill_master() -> (String, Duration) {
    let before = master_addr().await.expect("the sentinels name a master");
    let target = SENTINEL_DATA_ADDRS
        .into_iter()
        .find(|addr| *addr != before)
        .unwrap()
        .to_owned();
    let port = before.rsplit(':').next().unwrap().to_owned();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let pid = std::fs::read_to_string(format!("{root}/target/services/sentinel/redis-{port}.pid"))
        .expect("the master's pid file (scripts/services.sh up)");
    let started = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .expect("kill");
    assert!(killed.success(), "kill -9 {pid}");
    let switched = machinery_tests::eventually(Duration::from_secs(60), || async {
        master_addr().await.as_deref() == Some(target.as_str())
    })
    .await;
    assert!(
        switched,
        "the sentinels did not promote {target} within 60 s"
    );
    let switch_time = started.elapsed();
    // Only now: a master that came back before the failover would come back empty, and stay master.
    let restarted = std::process::Command::new(format!("{root}/scripts/services.sh"))
        .args(["sentinel-redis", &port])
        .status()
        .expect("scripts/services.sh sentinel-redis");
    assert!(restarted.success(), "redis :{port} does not start again");
    let settled =
        machinery_tests::eventually(Duration::from_secs(60), || settled_on(&target)).await;
    assert!(
        settled,
        "the topology did not settle on {target} within 60 s"
    );
    (target, switch_time)
}

/// Puts the topology back as `scripts/services.sh` made it: master :6380, its replica online.
async fn restore() {
    if master_addr().await.as_deref() != Some(SENTINEL_DATA_ADDRS[0]) {
        fail_over().await;
    }
    let settled = machinery_tests::eventually(Duration::from_secs(60), || {
        settled_on(SENTINEL_DATA_ADDRS[0])
    })
    .await;
    assert!(settled, "the Sentinel set did not settle on :6380");
}

/// One run: two workers and a sender through the sentinels, a failover after 1.5 s of load, 1.5 s more
/// load on the new master, then every acknowledged send counted.
async fn run(wait_replicas: u32, kill: bool) -> (Tally, Duration) {
    let queue = unique("ha_sentinel");
    let mut config = Config::new(Service::RedisSentinel.url(), Service::RedisSentinel.url())
        .with_default_queue(&queue);
    config.redis.master_name = SENTINEL_MASTER.into();
    config.redis.wait_replicas = wait_replicas;
    config.redis.delayed_tasks_key = format!("{queue}_delayed");
    config.redis.heartbeat_timeout = 3_000;
    config.results_expire_in = 600;
    let sender = Server::new(config.clone()).await.expect("sender");
    let mut workers = Vec::new();
    for _ in 0..2 {
        let server = Server::new(config.clone()).await.expect("worker server");
        let running = Worker::auto(&server)
            .concurrency(4)
            .start()
            .await
            .expect("worker starts");
        workers.push((server, running));
    }
    let load = Load::start(sender, Duration::from_millis(100));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (_, switch_time) = if kill {
        kill_master().await
    } else {
        fail_over().await
    };
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let tally = load.finish(Duration::from_secs(45)).await;
    for (_, running) in workers {
        running
            .shutdown(Duration::from_secs(20))
            .await
            .expect("worker shuts down");
    }
    (tally, switch_time)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sentinel_failover_mid_run_loses_no_acknowledged_send_with_wait_replicas() {
    if !require(Service::RedisSentinel, "sentinel failover") {
        return;
    }
    // Both runs in one test: two failovers at once would trip over each other.
    restore().await;
    the_lock_resolves_the_master_through_the_sentinels().await;
    a_send_that_not_enough_replicas_acknowledge_fails().await;

    let (durable, switch_time) = run(1, false).await;
    eprintln!(
        "Sentinel failover with REDIS_WAIT_REPLICAS=1 (master switched in {switch_time:.1?}): {durable}"
    );
    restore().await;
    assert!(
        durable.sent() > 30,
        "too little load to say anything: {durable}"
    );
    assert!(
        durable.chains.sent > 0 && durable.chords.sent > 0,
        "{durable}"
    );
    assert_eq!(
        durable.lost(),
        0,
        "acknowledged sends lost with REDIS_WAIT_REPLICAS=1: {durable}; first: {:?}",
        &durable.failures[..durable.failures.len().min(5)]
    );

    let (plain, switch_time) = run(0, false).await;
    eprintln!(
        "Sentinel failover without REDIS_WAIT_REPLICAS (master switched in {switch_time:.1?}): {plain}; first lost: {:?}",
        &plain.failures[..plain.failures.len().min(5)]
    );
    restore().await;
    assert!(
        plain.sent() > 30,
        "too little load to say anything: {plain}"
    );
    // Asynchronous replication loses at most what was written in the failover's window; the work sent
    // after it, on the new master, completes.
    assert!(
        plain.lost() < plain.sent() / 2,
        "most sends lost without REDIS_WAIT_REPLICAS: {plain}"
    );

    // SIGKILL of the master the workers use: the sentinels see it down after 2 s and promote the replica.
    let (killed, switch_time) = run(1, true).await;
    eprintln!(
        "Master killed with REDIS_WAIT_REPLICAS=1 (replica promoted {switch_time:.1?} after the kill): {killed}"
    );
    restore().await;
    assert!(
        killed.sent() > 10,
        "too little load to say anything: {killed}"
    );
    assert_eq!(
        killed.lost(),
        0,
        "acknowledged sends lost when the master was killed: {killed}; first: {:?}",
        &killed.failures[..killed.failures.len().min(5)]
    );
}

/// With more replicas asked for than there are, a send is not acknowledged: it fails, saying why.
async fn a_send_that_not_enough_replicas_acknowledge_fails() {
    let queue = unique("ha_wait");
    let mut config = Config::new(Service::RedisSentinel.url(), Service::RedisSentinel.url())
        .with_default_queue(&queue);
    config.redis.master_name = SENTINEL_MASTER.into();
    config.redis.wait_replicas = 2;
    let server = Server::new(config).await.expect("server");
    let started = Instant::now();
    let error = server
        .send(machinery_tests::ha::ha_step::signature(0, 1))
        .await
        .expect_err("a send with one replica of two acknowledged");
    assert!(
        format!("{error:?}").contains("REDIS_WAIT_REPLICAS"),
        "{error:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// The periodic-task lock finds the master through the sentinels too.
async fn the_lock_resolves_the_master_through_the_sentinels() {
    let mut config = Config::new(Service::RedisSentinel.url(), "memory://");
    config.redis.master_name = SENTINEL_MASTER.into();
    let lock = machinery::connect::lock(&config).await.expect("lock");
    let key = unique("ha_lock");
    assert!(lock
        .try_acquire(&key, Duration::from_secs(30))
        .await
        .unwrap());
    assert!(!lock
        .try_acquire(&key, Duration::from_secs(30))
        .await
        .unwrap());
    // The key is on whichever server the sentinels name master.
    let master = master_addr().await.expect("a master");
    let held: Option<String> = connect(&master).await.get(&key).await.unwrap();
    assert!(held.is_some(), "the lock key is not on the master {master}");
}
