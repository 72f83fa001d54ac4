//! A result backend that goes away while the broker stays up (issue 13): a worker whose broker is the
//! real Redis or RabbitMQ and whose result backend sits behind `machinery_tests::fault_proxy`: memcached,
//! or the same Redis (different URLs, so the broker does not pair with the backend). The backend is made unreachable
//! for [`OUTAGE`] while tasks wait and more are sent; every task must then finish soon after the heal,
//! and no task may run more than twice over the whole outage (once before it, once after), where a worker
//! that kept running tasks whose outcome it could not store ran each again every few seconds.
//!
//! `OUTAGE_LOG=machinery::worker=info` (a tracing filter) prints the worker's log.

mod redis_common;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use machinery::{task, Server, TaskContext, TaskError, Worker};
use machinery_tests::amqp::{self, Cleanup};
use machinery_tests::fault_proxy::FaultProxy;
use machinery_tests::unfinished;
use machinery_tests::{require, Service};
use redis_common::Names;

/// The execution ledger: how many times each task id ran (tests run in parallel in one process; ids are
/// unique).
static RUNS: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);

fn runs_of(id: &str) -> usize {
    RUNS.lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .and_then(|runs| runs.get(id).copied())
        .unwrap_or(0)
}

/// Records its run in the ledger (its side effect), takes `ms`, returns `n`.
#[task]
async fn outage_work(ctx: &TaskContext, n: i64, ms: i64) -> Result<i64, TaskError> {
    *RUNS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .entry(ctx.uuid().to_owned())
        .or_default() += 1;
    tokio::time::sleep(Duration::from_millis(ms.max(0) as u64)).await;
    Ok(n)
}

/// The broker, which stays up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queue {
    Redis,
    RabbitMq,
}

/// Which backend goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    /// The test Redis (the broker's server, at another URL).
    Redis,
    /// memcached.
    Memcached,
}

/// How the backend goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outage {
    /// The server is down: open connections are reset and new ones refused.
    Refused,
    /// The network path is cut: no byte moves on any connection, old or new (each command times out).
    Stalled,
}

/// The worker's concurrency: at most this many tasks are running when the backend goes away.
const CONCURRENCY: usize = 4;
/// How long the backend is unreachable.
const OUTAGE: Duration = Duration::from_secs(30);
/// Tasks waiting when the outage starts, and tasks sent during it (one every [`SEND_EVERY`]).
const BATCH: i64 = 12;
const DURING: i64 = 4;
const SEND_EVERY: Duration = Duration::from_secs(4);
/// How long every task may take to reach SUCCESS after the heal.
const ALL_DONE_WITHIN: Duration = Duration::from_secs(15);

async fn outage(queue: Queue, store: Store, kind: Outage, test: &str) {
    if !require(Service::Redis, test) {
        return;
    }
    if queue == Queue::RabbitMq && !require(Service::RabbitMq, test) {
        return;
    }
    if store == Store::Memcached && !require(Service::Memcached, test) {
        return;
    }
    if let Ok(filter) = std::env::var("OUTAGE_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
    let names = Names::new(match (store, kind) {
        (Store::Redis, Outage::Refused) => "outage_redis_refused",
        (Store::Redis, Outage::Stalled) => "outage_redis_stalled",
        (Store::Memcached, _) => "outage_memcached",
    });
    let (base, cleanup) = match queue {
        Queue::Redis => (names.config(), None),
        Queue::RabbitMq => {
            let config = amqp::config("outage_amqp");
            let cleanup = Cleanup::for_config(&config);
            (config, Some(cleanup))
        }
    };
    let (upstream, direct) = match store {
        Store::Redis => (Service::Redis.addr(), Service::Redis.url()),
        Store::Memcached => (Service::Memcached.addr(), Service::Memcached.url()),
    };
    let proxy = FaultProxy::start(upstream).await;
    let mut worker_config = base.clone();
    worker_config.result_backend = match store {
        Store::Redis => proxy.redis_url(),
        Store::Memcached => format!("memcache://{}", proxy.addr()),
    };
    // A stalled command fails after a second instead of the default 15.
    worker_config.redis.read_timeout = 1;
    worker_config.redis.connect_timeout = 1;
    let worker_server = Server::new(worker_config).await.unwrap();
    let running = Worker::new(&worker_server)
        .register(outage_work::task())
        .concurrency(CONCURRENCY)
        .start()
        .await
        .unwrap();
    let mut sender_config = base;
    sender_config.result_backend = direct;
    let sender = Server::new(sender_config).await.unwrap();
    let first = outage_work::send(&sender, -1, 0).await.unwrap();
    assert_eq!(first.get(Duration::from_secs(10)).await.unwrap(), -1);

    // A batch the worker is busy with (4 at a time, 300 ms each) when the backend goes away.
    let mut ids = Vec::new();
    for n in 0..BATCH {
        ids.push(
            outage_work::send(&sender, n, 300)
                .await
                .unwrap()
                .uuid()
                .to_owned(),
        );
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let down = Instant::now();
    match kind {
        Outage::Refused => {
            proxy.refuse_new(true);
            proxy.reset_all();
        }
        Outage::Stalled => proxy.stall(),
    }
    let mut sent_during = 0;
    while down.elapsed() < OUTAGE {
        tokio::time::sleep(SEND_EVERY.min(OUTAGE.saturating_sub(down.elapsed()))).await;
        if sent_during < DURING {
            let n = BATCH + sent_during;
            ids.push(
                outage_work::send(&sender, n, 300)
                    .await
                    .unwrap()
                    .uuid()
                    .to_owned(),
            );
            sent_during += 1;
        }
    }
    let runs_during: usize = ids.iter().map(|id| runs_of(id)).sum();
    proxy.heal();

    let healed = Instant::now();
    let mut left = unfinished(&sender, &ids).await;
    while !left.is_empty() && healed.elapsed() < ALL_DONE_WITHIN {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = unfinished(&sender, &left).await;
    }
    let all_done_after = healed.elapsed();
    let runs: Vec<usize> = ids.iter().map(|id| runs_of(id)).collect();
    let worst = runs.iter().copied().max().unwrap_or(0);
    let twice = runs.iter().filter(|&&r| r == 2).count();
    let total: usize = runs.iter().sum();
    eprintln!(
        "{queue:?} broker, {store:?} {kind:?} for {OUTAGE:?}: {} tasks ({BATCH} before, {sent_during} during); {} SUCCESS \
         {all_done_after:?} after the heal; runs: {total} in all, {runs_during} before the heal, \
         {twice} tasks ran twice, the worst task {worst} times",
        ids.len(),
        ids.len() - left.len(),
    );
    assert_eq!(sent_during, DURING);
    assert!(
        left.is_empty(),
        "{store:?} {kind:?}: {} of {} tasks not SUCCESS {ALL_DONE_WITHIN:?} after the heal",
        left.len(),
        ids.len()
    );
    assert!(
        runs.iter().all(|&r| r >= 1),
        "a task that reached SUCCESS never ran"
    );
    assert!(
        worst <= 2,
        "{store:?} {kind:?}: a task ran {worst} times over the outage (runs per task {runs:?})"
    );
    assert!(
        twice <= CONCURRENCY,
        "{store:?} {kind:?}: {twice} tasks ran twice; only the {CONCURRENCY} running when the backend \
         went away may (runs per task {runs:?})"
    );

    running.shutdown(Duration::from_secs(10)).await.unwrap();
    let stats = sender
        .broker()
        .inspect()
        .unwrap()
        .queue_stats(&sender.config().default_queue)
        .await
        .unwrap();
    assert_eq!(
        (
            stats.pending,
            stats.in_flight.unwrap_or(0),
            stats.dead.unwrap_or(0)
        ),
        (0, 0, 0),
        "nothing left behind: {stats:?}"
    );
    names.cleanup().await;
    drop(cleanup);
}

/// memcached behind Redis and behind RabbitMQ at once (two workers, two proxies), in one outage's time.
#[tokio::test]
async fn a_worker_whose_memcached_backend_is_down_does_not_rerun_tasks_it_cannot_store() {
    let test = "a_worker_whose_memcached_backend_is_down_does_not_rerun_tasks_it_cannot_store";
    tokio::join!(
        outage(Queue::Redis, Store::Memcached, Outage::Refused, test),
        outage(Queue::RabbitMq, Store::Memcached, Outage::Refused, test),
    );
}

/// Both Redis outages at once (two workers, two proxies), so that the file takes one outage's time on
/// a machine that runs two tests at a time.
#[tokio::test]
async fn a_worker_whose_redis_backend_is_down_or_stalls_does_not_rerun_tasks_it_cannot_store() {
    let test =
        "a_worker_whose_redis_backend_is_down_or_stalls_does_not_rerun_tasks_it_cannot_store";
    tokio::join!(
        outage(Queue::Redis, Store::Redis, Outage::Refused, test),
        outage(Queue::Redis, Store::Redis, Outage::Stalled, test),
    );
}
