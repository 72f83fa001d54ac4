//! Network faults between a worker and Redis, injected with `machinery_tests::fault_proxy`: a worker
//! whose every connection goes through the proxy keeps serving, and loses nothing, while its open
//! connections are frozen (a half-open link: a failover or a NAT drop), reset, or all stalled for a while,
//! again and again, under a steady load of single tasks, chains and chords sent on a direct connection.

mod redis_common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use machinery::{task, Chain, Chord, Group, Server, TaskError, Worker};
use machinery_tests::fault_proxy::FaultProxy;
use machinery_tests::unfinished;
use machinery_tests::{require, Service};
use redis::AsyncConnectionConfig;
use redis_common::Names;

#[task]
async fn fault_add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

#[task]
async fn fault_sum(xs: Vec<i64>) -> Result<i64, TaskError> {
    Ok(xs.iter().sum())
}

async fn ping(conn: &mut redis::aio::MultiplexedConnection) -> redis::RedisResult<String> {
    redis::cmd("PING").query_async(conn).await
}

#[tokio::test]
async fn the_fault_proxy_forwards_freezes_stalls_delays_resets_and_refuses() {
    if !require(
        Service::Redis,
        "the_fault_proxy_forwards_freezes_stalls_delays_resets_and_refuses",
    ) {
        return;
    }
    let proxy = FaultProxy::start(Service::Redis.addr()).await;
    let client = redis::Client::open(proxy.redis_url()).unwrap();
    let connect = || async {
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(Some(Duration::from_secs(2)));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    };
    let within = |ms| Duration::from_millis(ms);

    let mut old = connect().await.unwrap();
    assert_eq!(ping(&mut old).await.unwrap(), "PONG");
    assert_eq!(proxy.open_connections(), 1);

    // Frozen: the open connection hears nothing; a new one works.
    assert_eq!(proxy.freeze_open(), 1);
    assert!(
        tokio::time::timeout(within(500), ping(&mut old))
            .await
            .is_err(),
        "a frozen connection answered"
    );
    let mut new = connect().await.unwrap();
    let answered = tokio::time::timeout(within(500), ping(&mut new)).await;
    assert_eq!(answered.unwrap().unwrap(), "PONG");

    // Delayed: each chunk waits (the request and the reply: two chunks).
    proxy.delay(within(150));
    let started = Instant::now();
    assert_eq!(ping(&mut new).await.unwrap(), "PONG");
    assert!(started.elapsed() >= within(300), "{:?}", started.elapsed());
    proxy.delay(Duration::ZERO);

    // Stalled: nothing moves until healed, then the reply arrives.
    proxy.stall();
    let mut stalled = new.clone();
    let waiting = tokio::spawn(async move { ping(&mut stalled).await });
    tokio::time::sleep(within(400)).await;
    assert!(!waiting.is_finished(), "a stalled connection answered");
    proxy.heal();
    let answered = tokio::time::timeout(within(1000), waiting).await;
    assert_eq!(answered.unwrap().unwrap().unwrap(), "PONG");

    // Reset: the client sees a connection error at once, not a timeout.
    assert_eq!(proxy.reset_all(), 2);
    let failed = tokio::time::timeout(within(1000), ping(&mut new)).await;
    let error = failed.expect("an answer within a second").unwrap_err();
    assert!(
        error.is_io_error() || error.is_connection_dropped(),
        "{error:?}"
    );

    // Refused: connecting fails until allowed again.
    proxy.refuse_new(true);
    assert!(
        async { ping(&mut connect().await?).await }.await.is_err(),
        "a refused connection worked"
    );
    proxy.refuse_new(false);
    let mut again = connect().await.unwrap();
    assert_eq!(ping(&mut again).await.unwrap(), "PONG");
}

/// The shared connection of ordinary commands (states, heartbeats, acknowledgements) gives a silent link
/// up after `REDIS_READ_TIMEOUT`: the command caught by the silence fails, the next one works.
#[tokio::test]
async fn a_silent_shared_connection_is_replaced_after_the_read_timeout() {
    if !require(
        Service::Redis,
        "a_silent_shared_connection_is_replaced_after_the_read_timeout",
    ) {
        return;
    }
    let names = Names::new("fault_shared");
    let proxy = FaultProxy::start(Service::Redis.addr()).await;
    let mut config = names.config();
    config.broker = proxy.redis_url();
    config.result_backend = proxy.redis_url();
    config.redis.read_timeout = 1;
    let server = Server::new(config).await.unwrap();
    let backend = server.backend().clone();
    let id = names.task("absent");
    assert_eq!(backend.get_state(&id).await.unwrap(), None);
    // At least the connection that answered (the shared connection opens lazily, on first use).
    assert!(proxy.freeze_open() >= 1);

    let started = Instant::now();
    let caught = backend.get_state(&id).await;
    let caught_after = started.elapsed();
    let next = tokio::time::timeout(Duration::from_secs(3), backend.get_state(&id)).await;
    eprintln!(
        "caught by the silence: {caught:?} after {caught_after:?}; the next command: {next:?} \
         after {:?}",
        started.elapsed()
    );
    assert!(caught.is_err(), "a frozen link answered: {caught:?}");
    assert!(caught_after < Duration::from_secs(3), "{caught_after:?}");
    assert!(
        matches!(next, Ok(Ok(None))),
        "the command after the silence did not go over a new connection: {next:?}"
    );
}

/// A client waiting for results over a frozen link (its shared and its pub/sub connection) still gets
/// them within its timeout: the send goes over a new connection after `REDIS_READ_TIMEOUT`, and the wait
/// neither hangs on the silent pub/sub connection nor needs it.
#[tokio::test]
async fn a_client_waiting_for_results_over_a_frozen_link_gets_them() {
    if !require(
        Service::Redis,
        "a_client_waiting_for_results_over_a_frozen_link_gets_them",
    ) {
        return;
    }
    let names = Names::new("fault_client");
    let proxy = FaultProxy::start(Service::Redis.addr()).await;
    let mut config = names.config();
    config.broker = proxy.redis_url();
    config.result_backend = proxy.redis_url();
    config.redis.read_timeout = 1;
    let client = Server::new(config).await.unwrap();
    let worker_server = Server::new(names.config()).await.unwrap();
    let running = Worker::auto(&worker_server)
        .concurrency(2)
        .start()
        .await
        .unwrap();
    // The first result opens the pub/sub connection.
    let first = fault_add::send(&client, 1, 2).await.unwrap();
    assert_eq!(first.get(Duration::from_secs(5)).await.unwrap(), 3);
    assert!(proxy.freeze_open() >= 2);

    let started = Instant::now();
    let waited = tokio::time::timeout(Duration::from_secs(8), async {
        let sent = fault_add::send(&client, 40, 2).await?;
        Ok::<_, Box<dyn std::error::Error>>(sent.get(Duration::from_secs(5)).await?)
    })
    .await;
    eprintln!(
        "after the freeze: {:?} in {:?}",
        waited
            .as_ref()
            .map(|r| r.as_ref().map_err(|e| e.to_string())),
        started.elapsed()
    );
    assert!(
        matches!(waited, Ok(Ok(42))),
        "no result within 8 s over a frozen link"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    running.shutdown(Duration::from_secs(10)).await.unwrap();
    names.cleanup().await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Every open connection goes silent for ever; new ones work.
    Freeze,
    /// Every open connection is reset.
    Reset,
    /// No byte moves on any connection, old or new, for [`STALL`]; then everything flows again, the
    /// bytes held meanwhile first.
    Stall,
}

/// How long a [`Fault::Stall`] lasts.
const STALL: Duration = Duration::from_secs(3);

/// Everything the load sent, as the ids whose state must end SUCCESS.
#[derive(Debug, Default)]
struct Sent {
    ids: Vec<String>,
    singles: usize,
    chains: usize,
    chords: usize,
}

/// Sends a single task every tick, a chain of 3 every 5th tick and a chord of 5 every 10th, until
/// `stop` (at most 400 ticks).
async fn load(sender: Server, sent: Arc<Mutex<Sent>>, stop: Arc<AtomicBool>) {
    for tick in 0..400i64 {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let single = fault_add::send(&sender, tick, 1).await.unwrap();
        let mut ids = vec![single.uuid().to_owned()];
        let (mut chains, mut chords) = (0, 0);
        if tick % 5 == 0 {
            let chain = Chain::new(fault_add::signature(tick, 1))
                .then(fault_add::partial(1))
                .then(fault_add::partial(1));
            let result = sender.send_chain(chain).await.unwrap();
            ids.extend(result.steps().iter().map(|s| s.uuid().to_owned()));
            chains = 1;
        }
        if tick % 10 == 0 {
            let group = Group::new((0..5).map(|k| fault_add::signature(tick, k)));
            let result = sender
                .send_chord(Chord::new(group, fault_sum::partial()))
                .await
                .unwrap();
            ids.extend(result.group().members().iter().map(|m| m.uuid().to_owned()));
            ids.push(result.callback().uuid().to_owned());
            chords = 1;
        }
        {
            let mut sent = sent.lock().unwrap();
            sent.ids.extend(ids);
            sent.singles += 1;
            sent.chains += chains;
            sent.chords += chords;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// Sends one task and returns how long it took to reach SUCCESS, or `None` after `limit`.
async fn served_within(sender: &Server, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let probe = fault_add::send(sender, 20, 22).await.unwrap();
    let id = [probe.uuid().to_owned()];
    while started.elapsed() < limit {
        if unfinished(sender, &id).await.is_empty() {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}

/// Faults per test, time between them, how long a fresh task may take after one, and how long every
/// result may take after the last.
const ROUNDS: usize = 4;
const EVERY: Duration = Duration::from_secs(4);
const SERVED_AGAIN_WITHIN: Duration = Duration::from_secs(6);
const ALL_DONE_WITHIN: Duration = Duration::from_secs(15);

/// A worker on the proxy (broker and backend), a load on the direct connection, `ROUNDS` faults; then
/// every result must arrive, a fresh task must have been served soon after each fault, and nothing may be
/// left in flight.
async fn worker_survives(fault: Fault, test: &str) {
    if !require(Service::Redis, test) {
        return;
    }
    let names = Names::new(match fault {
        Fault::Freeze => "fault_freeze",
        Fault::Reset => "fault_reset",
        Fault::Stall => "fault_stall",
    });
    let proxy = FaultProxy::start(Service::Redis.addr()).await;
    let mut worker_config = names.config();
    worker_config.broker = proxy.redis_url();
    worker_config.result_backend = proxy.redis_url();
    let worker_server = Server::new(worker_config).await.unwrap();
    let running = Worker::auto(&worker_server)
        .concurrency(4)
        .start()
        .await
        .unwrap();
    let sender = Server::new(names.config()).await.unwrap();
    assert!(
        served_within(&sender, SERVED_AGAIN_WITHIN).await.is_some(),
        "the worker serves before any fault"
    );

    let sent = Arc::new(Mutex::new(Sent::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let loading = tokio::spawn(load(sender.clone(), sent.clone(), stop.clone()));
    let mut hit = Vec::new();
    let mut served_again = Vec::new();
    for _ in 0..ROUNDS {
        let round = Instant::now();
        hit.push(match fault {
            Fault::Freeze => proxy.freeze_open(),
            Fault::Reset => proxy.reset_all(),
            Fault::Stall => {
                proxy.stall();
                let open = proxy.open_connections();
                tokio::time::sleep(STALL).await;
                proxy.heal();
                open
            }
        });
        served_again.push(served_within(&sender, SERVED_AGAIN_WITHIN).await);
        tokio::time::sleep(EVERY.saturating_sub(round.elapsed())).await;
    }
    stop.store(true, Ordering::SeqCst);
    loading.await.unwrap();
    proxy.heal();

    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let started = Instant::now();
    let mut left = unfinished(&sender, &sent.ids).await;
    while !left.is_empty() && started.elapsed() < ALL_DONE_WITHIN {
        tokio::time::sleep(Duration::from_millis(200)).await;
        left = unfinished(&sender, &left).await;
    }
    let done = sent.ids.len() - left.len();
    eprintln!(
        "{fault:?}: {done} of {} results SUCCESS ({} single tasks, {} chains of 3, {} chords of 5) \
         {:?} after the last fault; connections hit per fault {hit:?}; a fresh task served after each \
         fault (after the heal, for a stall) in {served_again:?}",
        sent.ids.len(),
        sent.singles,
        sent.chains,
        sent.chords,
        started.elapsed(),
    );
    assert!(
        hit.iter().all(|&n| n >= 2),
        "each fault hit the worker's connections: {hit:?}"
    );
    assert!(sent.singles >= 20 && sent.chains >= 4 && sent.chords >= 2);
    assert_eq!(
        done,
        sent.ids.len(),
        "{fault:?}: results that never arrived: {:?}",
        &left[..left.len().min(5)]
    );
    assert!(
        served_again.iter().all(Option::is_some),
        "{fault:?}: after some fault no fresh task was served within {SERVED_AGAIN_WITHIN:?}: {served_again:?}"
    );

    running.shutdown(Duration::from_secs(10)).await.unwrap();
    let stats = sender
        .broker()
        .inspect()
        .unwrap()
        .queue_stats(&names.queue)
        .await
        .unwrap();
    assert_eq!(
        (stats.pending, stats.in_flight, stats.dead),
        (0, Some(0), Some(0)),
        "nothing left behind"
    );
    names.cleanup().await;
}

#[tokio::test]
async fn a_worker_whose_open_connections_freeze_serves_again_and_loses_nothing() {
    worker_survives(
        Fault::Freeze,
        "a_worker_whose_open_connections_freeze_serves_again_and_loses_nothing",
    )
    .await;
}

#[tokio::test]
async fn a_worker_whose_connections_are_reset_serves_again_and_loses_nothing() {
    worker_survives(
        Fault::Reset,
        "a_worker_whose_connections_are_reset_serves_again_and_loses_nothing",
    )
    .await;
}

#[tokio::test]
async fn a_worker_whose_connections_stall_serves_again_and_loses_nothing() {
    worker_survives(
        Fault::Stall,
        "a_worker_whose_connections_stall_serves_again_and_loses_nothing",
    )
    .await;
}

/// A fetch whose script ran on the server but whose answer never came (the link went silent with the
/// answer on its way, as when a master dies right after a write) moved the messages into the consumer's
/// in-flight list: the consumer's next call hands them out. Before, they stayed there unclaimed for as
/// long as the consumer lived (its heartbeat kept others from recovering them): a chord callback was
/// lost so in the Sentinel test's master kill.
#[tokio::test]
async fn messages_moved_by_a_fetch_whose_answer_was_lost_are_handed_out() {
    use machinery::broker::redis::RedisBroker;
    use machinery::broker::{Broker, ConsumeOptions};
    use redis::AsyncCommands as _;

    if !require(
        Service::Redis,
        "messages_moved_by_a_fetch_whose_answer_was_lost_are_handed_out",
    ) {
        return;
    }
    let names = Names::new("fr_lost_fetch");
    let proxy = FaultProxy::start(Service::Redis.addr()).await;
    let mut config = names.config();
    config.broker = proxy.redis_url();
    // A call without an answer fails after a second.
    config.redis.read_timeout = 1;
    let broker = RedisBroker::connect(&config).await.unwrap();
    let options = ConsumeOptions {
        queue: names.queue.clone(),
        consumer_tag: "lost-fetch".into(),
        concurrency: 4,
        prefetch: 4,
    };
    let mut consumer = broker.consume(options).await.unwrap();
    let mut direct = redis_common::raw().await;
    for n in 0..3 {
        let _: () = direct
            .rpush(&names.queue, format!("{{\"n\":{n}}}"))
            .await
            .unwrap();
    }
    // Each chunk waits 600 ms in the proxy: the fetch reaches Redis at 0.6 s and runs there, but the
    // link is frozen at 0.3 s, with the request already on its way, so its answer is swallowed.
    proxy.delay(Duration::from_millis(600));
    let fetch = tokio::spawn(async move {
        let result = consumer.next_batch(3).await;
        (consumer, result.map(|batch| batch.len()))
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.freeze_open();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let in_flight: Vec<String> = direct
        .keys(format!("machinery:inflight:{}:*", names.queue))
        .await
        .unwrap();
    let moved: usize = match in_flight.first() {
        Some(list) => direct.llen(list).await.unwrap(),
        None => 0,
    };
    assert_eq!(moved, 3, "the fetch ran on the server");
    proxy.heal();
    let (mut consumer, lost) = fetch.await.unwrap();
    assert!(lost.is_err(), "the fetch's answer never came: {lost:?}");
    // The queue is empty now: only the in-flight list holds the three.
    let again = tokio::time::timeout(Duration::from_secs(5), consumer.next_batch(3))
        .await
        .expect("the moved messages were handed out, not left in flight")
        .unwrap();
    assert_eq!(again.len(), 3);
    for delivery in again {
        delivery.ack().await.unwrap();
    }
    consumer.close().await.unwrap();
    names.cleanup().await;
}
