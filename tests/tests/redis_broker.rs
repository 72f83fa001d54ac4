//! The Redis broker against a real Redis (127.0.0.1:6379 unless `MACHINERY_TEST_REDIS_ADDR`): Go's wire
//! format both ways, at-least-once delivery (in-flight lists, heartbeats, recovery, a `kill -9`ed worker
//! process), atomic delayed tasks, dead letters, connection loss and fast shutdown.
//!
//! Every test uses its own queue and key names (see `redis_common::Names`) and deletes its keys.

mod redis_common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use machinery::broker::redis::RedisBroker;
use machinery::broker::{Broker, ConsumeOptions, Consumer, Inspect, Outgoing};
use machinery::{Server, Signature, State, Worker};
use machinery_tests::{require, Service};
use redis::AsyncCommands as _;
use redis_common::{int, raw, wait_until, Names, ADD, SLEEP_MS};
use serde_json::Value;

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/go")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A Go fixture with its queue name (`wire_q`/`ref_q`) replaced by ours; every other byte as Go wrote it.
fn go_message(name: &str, queue: &str) -> Vec<u8> {
    let text = String::from_utf8(fixture(name)).unwrap();
    let text = text.trim_end_matches('\n');
    text.replace(
        "\"RoutingKey\":\"wire_q\"",
        &format!("\"RoutingKey\":\"{queue}\""),
    )
    .replace(
        "\"RoutingKey\":\"ref_q\"",
        &format!("\"RoutingKey\":\"{queue}\""),
    )
    .into_bytes()
}

fn options(queue: &str, tag: &str) -> ConsumeOptions {
    ConsumeOptions {
        queue: queue.into(),
        consumer_tag: tag.into(),
        concurrency: 4,
        prefetch: 4,
    }
}

fn outgoing<'a>(queue: &'a str, body: &str) -> Outgoing<'a> {
    Outgoing {
        uuid: "",
        name: "",
        routing_key: queue,
        body: body.as_bytes().to_vec(),
        eta: None,
        priority: 0,
        headers: Default::default(),
    }
}

async fn broker(names: &Names) -> RedisBroker {
    RedisBroker::connect(&names.config()).await.unwrap()
}

async fn next(consumer: &mut Box<dyn Consumer>, max: usize) -> Vec<machinery::broker::Delivery> {
    tokio::time::timeout(Duration::from_secs(5), consumer.next_batch(max))
        .await
        .expect("next_batch timed out")
        .expect("next_batch failed")
}

const GO_SIGNATURE_KEYS: [&str; 19] = [
    "UUID",
    "Name",
    "RoutingKey",
    "ETA",
    "GroupUUID",
    "GroupTaskCount",
    "Args",
    "Headers",
    "Priority",
    "Immutable",
    "RetryCount",
    "RetryTimeout",
    "OnSuccess",
    "OnError",
    "ChordCallback",
    "BrokerMessageGroupId",
    "SQSReceiptHandle",
    "StopTaskDeletionOnError",
    "IgnoreWhenTaskNotRegistered",
];

#[tokio::test]
async fn sends_are_rpush_and_zadd_exactly_as_go_writes_them() {
    if !require(
        Service::Redis,
        "sends_are_rpush_and_zadd_exactly_as_go_writes_them",
    ) {
        return;
    }
    let names = Names::new("rb_wire");
    let server = Server::new(names.config()).await.unwrap();
    let mut conn = raw().await;

    let sig: Signature =
        Signature::with_args("add", vec![int(40), int(2)]).with_uuid(names.task("now"));
    server.send(sig).await.unwrap();
    let queued: Vec<Vec<u8>> = conn.lrange(&names.queue, 0, -1).await.unwrap();
    assert_eq!(queued.len(), 1, "one RPUSH onto the default queue");
    let text = std::str::from_utf8(&queued[0]).unwrap();
    // Integer literals, exactly as Go's encoder writes int64 values.
    assert!(
        text.contains(
            r#""Args":[{"Name":"","Type":"int64","Value":40},{"Name":"","Type":"int64","Value":2}]"#
        ),
        "{text}"
    );
    let value: Value = serde_json::from_slice(&queued[0]).unwrap();
    let object = value.as_object().unwrap();
    for key in GO_SIGNATURE_KEYS {
        assert!(object.contains_key(key), "missing {key} in {text}");
    }
    assert_eq!(object.len(), GO_SIGNATURE_KEYS.len(), "{text}");
    assert_eq!(value["RoutingKey"], names.queue.as_str());
    assert_eq!(value["Headers"], serde_json::json!({}));
    // The PENDING state was written before the message, at the task's id.
    let pending: Vec<u8> = conn.get(names.task("now")).await.unwrap();
    let pending: Value = serde_json::from_slice(&pending).unwrap();
    assert_eq!(
        (pending["State"].as_str(), pending["TaskName"].as_str()),
        (Some("PENDING"), Some("add"))
    );

    let eta = chrono::Utc::now() + chrono::Duration::seconds(3600);
    let sig: Signature = Signature::with_args("add", vec![int(1)])
        .with_uuid(names.task("later"))
        .eta(eta);
    server.send(sig).await.unwrap();
    let delayed: Vec<(Vec<u8>, f64)> = conn.zrange_withscores(&names.delayed, 0, -1).await.unwrap();
    assert_eq!(delayed.len(), 1, "one ZADD onto the delayed-task set");
    let expected_score = eta.timestamp_nanos_opt().unwrap() as f64;
    assert!(
        (delayed[0].1 - expected_score).abs() < 1e3,
        "score is the ETA in Unix nanoseconds: {} vs {expected_score}",
        delayed[0].1
    );
    let value: Value = serde_json::from_slice(&delayed[0].0).unwrap();
    let written_eta = machinery::gotime::parse(value["ETA"].as_str().unwrap()).unwrap();
    assert_eq!(written_eta, eta, "ETA as RFC 3339 with nanoseconds");
    assert_eq!(conn.llen::<_, u64>(&names.queue).await.unwrap(), 1);
    names.cleanup().await;
}

#[tokio::test]
async fn messages_written_by_go_are_delivered_byte_for_byte() {
    if !require(
        Service::Redis,
        "messages_written_by_go_are_delivered_byte_for_byte",
    ) {
        return;
    }
    let names = Names::new("rb_gomsg");
    let broker = broker(&names).await;
    let mut conn = raw().await;
    let fixtures = [
        "signature_add.json",
        "signature_chord_member.json",
        "signature_chain.json",
        "signature_with_on_error.json",
    ];
    let bodies: Vec<Vec<u8>> = fixtures
        .iter()
        .map(|f| go_message(f, &names.queue))
        .collect();
    for body in &bodies {
        let _: () = conn.rpush(&names.queue, body).await.unwrap();
    }
    // A delayed task as Go's sender writes it: ZADD with the ETA's nanoseconds (here: already due).
    let delayed = go_message("signature_delayed_eta.json", &names.queue);
    let _: () = conn
        .zadd(&names.delayed, &delayed, 1_735_787_045_678_901_234i64)
        .await
        .unwrap();
    assert_eq!(broker.promote_delayed().await.unwrap(), 1);

    let mut consumer = broker.consume(options(&names.queue, "c1")).await.unwrap();
    let batch = next(&mut consumer, 10).await;
    let got: Vec<Vec<u8>> = batch.iter().map(|d| d.body.clone()).collect();
    let mut expected = bodies.clone();
    expected.push(delayed);
    assert_eq!(
        got, expected,
        "FIFO, unchanged bytes, the promoted one last"
    );
    for delivery in batch {
        let sig = Signature::from_json(&delivery.body).unwrap();
        assert!(sig.uuid.starts_with("task_"), "{}", sig.uuid);
        delivery.ack().await.unwrap();
    }
    consumer.close().await.unwrap();
    let stats = broker.queue_stats(&names.queue).await.unwrap();
    assert_eq!((stats.pending, stats.in_flight), (0, Some(0)));
    names.cleanup().await;
}

#[tokio::test]
async fn batches_are_capped_and_unacknowledged_messages_return_on_close() {
    if !require(
        Service::Redis,
        "batches_are_capped_and_unacknowledged_messages_return_on_close",
    ) {
        return;
    }
    let names = Names::new("rb_batch");
    let broker = broker(&names).await;
    for i in 0..5 {
        broker
            .publish(outgoing(&names.queue, &i.to_string()))
            .await
            .unwrap();
    }
    let mut consumer = broker.consume(options(&names.queue, "c1")).await.unwrap();
    let mut batch = next(&mut consumer, 3).await;
    let bodies: Vec<&[u8]> = batch.iter().map(|d| d.body.as_slice()).collect();
    assert_eq!(bodies, [b"0", b"1", b"2"], "at most max, oldest first");
    let stats = broker.queue_stats(&names.queue).await.unwrap();
    assert_eq!((stats.pending, stats.in_flight), (2, Some(3)));

    batch.remove(0).ack().await.unwrap();
    let stats = broker.queue_stats(&names.queue).await.unwrap();
    assert_eq!(
        stats.in_flight,
        Some(2),
        "an ack removes exactly one message"
    );
    consumer.close().await.unwrap();

    let stats = broker.queue_stats(&names.queue).await.unwrap();
    assert_eq!((stats.pending, stats.in_flight), (4, Some(0)));
    let pending = broker.pending(&names.queue, 10).await.unwrap();
    assert_eq!(
        pending,
        [b"1".to_vec(), b"2".to_vec(), b"3".to_vec(), b"4".to_vec()],
        "returned at the head, in order"
    );
    let mut again = broker.consume(options(&names.queue, "c2")).await.unwrap();
    let batch = next(&mut again, 10).await;
    let flags: Vec<bool> = batch.iter().map(|d| d.redelivered).collect();
    assert_eq!(
        flags,
        [true, true, false, false],
        "returned messages are flagged as redelivered"
    );
    again.close().await.unwrap();
    names.cleanup().await;
}

#[tokio::test]
async fn a_dropped_next_batch_loses_nothing() {
    if !require(Service::Redis, "a_dropped_next_batch_loses_nothing") {
        return;
    }
    let names = Names::new("rb_cancel");
    let broker = broker(&names).await;
    let mut consumer = broker.consume(options(&names.queue, "c1")).await.unwrap();
    // The queue is empty: next_batch blocks in BLMOVE, and we drop it.
    let dropped = tokio::time::timeout(Duration::from_millis(200), consumer.next_batch(5)).await;
    assert!(dropped.is_err(), "nothing to take yet");
    // A message arriving now may be taken by the abandoned BLMOVE on the server...
    broker.publish(outgoing(&names.queue, "m")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // ...and close() must hand it back.
    consumer.close().await.unwrap();
    let stats = broker.queue_stats(&names.queue).await.unwrap();
    assert_eq!(
        (stats.pending, stats.in_flight),
        (1, Some(0)),
        "the message is back in the queue"
    );
    // And a later message does not land in the closed consumer's list.
    broker.publish(outgoing(&names.queue, "n")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(broker.queue_stats(&names.queue).await.unwrap().pending, 2);
    names.cleanup().await;
}

#[tokio::test]
async fn a_message_taken_by_a_dropped_call_is_handed_out_by_the_next_call() {
    if !require(
        Service::Redis,
        "a_message_taken_by_a_dropped_call_is_handed_out_by_the_next_call",
    ) {
        return;
    }
    let names = Names::new("rb_orphan");
    let broker = broker(&names).await;
    let mut consumer = broker.consume(options(&names.queue, "c1")).await.unwrap();
    let dropped = tokio::time::timeout(Duration::from_millis(200), consumer.next_batch(5)).await;
    assert!(dropped.is_err(), "nothing to take yet");
    broker.publish(outgoing(&names.queue, "m")).await.unwrap();
    let conn = raw().await;
    let inflight = format!("machinery:inflight:{}:c1", names.queue);
    // The abandoned BLMOVE is still waiting on the server and takes the message into our in-flight list.
    wait_until(
        "the abandoned BLMOVE to take the message",
        Duration::from_secs(5),
        || {
            let mut conn = conn.clone();
            let inflight = inflight.clone();
            async move { conn.llen::<_, u64>(&inflight).await.unwrap() == 1 }
        },
    )
    .await;
    let batch = next(&mut consumer, 5).await;
    assert_eq!(batch.len(), 1);
    assert_eq!(
        batch[0].body, b"m",
        "handed out, not left stranded in flight"
    );
    for d in batch {
        d.ack().await.unwrap();
    }
    let stats = broker.queue_stats(&names.queue).await.unwrap();
    assert_eq!((stats.pending, stats.in_flight), (0, Some(0)));
    // Nothing else is handed out twice: the next call waits.
    broker.publish(outgoing(&names.queue, "n")).await.unwrap();
    let batch = next(&mut consumer, 5).await;
    let bodies: Vec<&[u8]> = batch.iter().map(|d| d.body.as_slice()).collect();
    assert_eq!(bodies, [b"n"]);
    drop(batch);
    consumer.close().await.unwrap();
    names.cleanup().await;
}

#[tokio::test]
async fn live_consumers_recover_the_messages_of_a_dead_one() {
    if !require(
        Service::Redis,
        "live_consumers_recover_the_messages_of_a_dead_one",
    ) {
        return;
    }
    let names = Names::new("rb_recover");
    let mut config = names.config();
    config.redis.heartbeat_timeout = 1000;
    let broker = RedisBroker::connect(&config).await.unwrap();
    for body in ["a", "b", "c"] {
        broker.publish(outgoing(&names.queue, body)).await.unwrap();
    }
    let mut dying = broker
        .consume(options(&names.queue, "dying"))
        .await
        .unwrap();
    let taken = next(&mut dying, 2).await;
    assert_eq!(taken.len(), 2);
    let heartbeat = format!("machinery:heartbeat:{}:dying", names.queue);
    let mut conn = raw().await;
    let pttl: i64 = conn.pttl(&heartbeat).await.unwrap();
    assert!(
        (1..=1000).contains(&pttl),
        "a live consumer's heartbeat key has a TTL: {pttl}"
    );
    // The consumer dies without closing: its heartbeat stops and expires after 1 s. A dead process runs
    // no destructors (a dropped delivery would give its message back at once), hence `forget`.
    std::mem::forget(taken);
    drop(dying);
    let mut live = broker.consume(options(&names.queue, "live")).await.unwrap();
    let first = next(&mut live, 10).await;
    assert_eq!(first.len(), 1, "only c was in the queue");
    assert_eq!(first[0].body, b"c");
    let started = Instant::now();
    let recovered = next(&mut live, 10).await;
    let bodies: Vec<&[u8]> = recovered.iter().map(|d| d.body.as_slice()).collect();
    assert_eq!(
        bodies,
        [b"a", b"b"],
        "the dead consumer's messages, in order"
    );
    assert!(recovered.iter().all(|d| d.redelivered));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "recovered within a few heartbeat periods: {:?}",
        started.elapsed()
    );
    let consumers: Vec<String> = conn
        .smembers(format!("machinery:consumers:{}", names.queue))
        .await
        .unwrap();
    assert_eq!(consumers, ["live"], "the dead consumer is unregistered");
    for d in first.into_iter().chain(recovered) {
        d.ack().await.unwrap();
    }
    live.close().await.unwrap();
    let live_heartbeat: bool = conn
        .exists(format!("machinery:heartbeat:{}:live", names.queue))
        .await
        .unwrap();
    assert!(!live_heartbeat, "close() deletes the heartbeat");
    names.cleanup().await;
}

/// Issue 13: a consumer recovered as dead by another (its in-flight list returned, its registration
/// removed) that fetches again is registered again by that same fetch (the script, and the script that
/// follows a `BLMOVE`), so what it takes is never in a list recovery cannot see.
#[tokio::test]
async fn a_consumer_recovered_as_dead_is_registered_again_by_its_next_fetch() {
    if !require(
        Service::Redis,
        "a_consumer_recovered_as_dead_is_registered_again_by_its_next_fetch",
    ) {
        return;
    }
    let names = Names::new("rb_refetch");
    let mut config = names.config();
    // Beats every 12 s: nothing but the fetch can register it again during the test.
    config.redis.heartbeat_timeout = 60_000;
    let broker = RedisBroker::connect(&config).await.unwrap();
    for body in ["a", "b"] {
        broker.publish(outgoing(&names.queue, body)).await.unwrap();
    }
    let mut consumer = broker
        .consume(options(&names.queue, "paused"))
        .await
        .unwrap();
    let registry = format!("machinery:consumers:{}", names.queue);
    let heartbeat = format!("machinery:heartbeat:{}:paused", names.queue);
    let inflight = format!("machinery:inflight:{}:paused", names.queue);
    let mut conn = raw().await;
    let taken = next(&mut consumer, 1).await;
    assert_eq!(taken[0].body, b"a");
    std::mem::forget(taken);

    // The consumer stalls past its heartbeat; another one recovers it as dead.
    let _: () = conn.del(&heartbeat).await.unwrap();
    assert_eq!(
        broker.recover_dead_consumers(&names.queue).await.unwrap(),
        1
    );
    let registered: bool = conn.sismember(&registry, "paused").await.unwrap();
    assert!(!registered, "recovery unregistered it");

    // It resumes and fetches: registered again (with a heartbeat) by the fetch itself.
    let again = next(&mut consumer, 1).await;
    assert_eq!(again[0].body, b"a", "the returned message, at the head");
    let registered: bool = conn.sismember(&registry, "paused").await.unwrap();
    assert!(registered, "the fetch registered the consumer again");
    let pttl: i64 = conn.pttl(&heartbeat).await.unwrap();
    assert!((1..=60_000).contains(&pttl), "with a heartbeat: {pttl}");
    assert_eq!(
        broker.recover_dead_consumers(&names.queue).await.unwrap(),
        0,
        "a registered consumer with a heartbeat is not recovered"
    );
    let held: Vec<Vec<u8>> = conn.lrange(&inflight, 0, -1).await.unwrap();
    assert_eq!(held, [b"a".to_vec()]);

    // The same through BLMOVE: while the consumer waits on an empty queue, it is recovered as dead;
    // a message then arrives and the script that follows BLMOVE registers it again.
    let b = next(&mut consumer, 1).await;
    assert_eq!(b[0].body, b"b");
    let waited = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _: () = conn.del(&heartbeat).await.unwrap();
        let _: () = conn.srem(&registry, "paused").await.unwrap();
        let registered: bool = conn.sismember(&registry, "paused").await.unwrap();
        assert!(!registered);
        broker.publish(outgoing(&names.queue, "c")).await.unwrap();
    };
    let (c, ()) = tokio::join!(next(&mut consumer, 1), waited);
    assert_eq!(c[0].body, b"c");
    let registered: bool = conn.sismember(&registry, "paused").await.unwrap();
    assert!(
        registered,
        "the script after BLMOVE registered the consumer again"
    );
    let held: Vec<Vec<u8>> = conn.lrange(&inflight, 0, -1).await.unwrap();
    assert_eq!(held, [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
    for d in again.into_iter().chain(b).chain(c) {
        d.ack().await.unwrap();
    }
    consumer.close().await.unwrap();
    names.cleanup().await;
}

/// Counts, from Redis's `MONITOR` stream, the commands `SMEMBERS <registry>` (the read that starts a
/// recovery scan) run by scripts; the key is this test's own, so no other client can add to the count.
async fn count_scans(registry: &str) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(Service::Redis.addr())
        .await
        .expect("connect for MONITOR");
    stream.write_all(b"MONITOR\r\n").await.unwrap();
    let mut lines = tokio::io::BufReader::new(stream).lines();
    let ok = lines.next_line().await.unwrap();
    assert_eq!(ok.as_deref(), Some("+OK"));
    let count = Arc::new(AtomicUsize::new(0));
    let needle = format!("lua] \"SMEMBERS\" \"{registry}\"");
    let counter = count.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(&needle) {
                counter.fetch_add(1, AtomicOrdering::SeqCst);
            }
        }
    });
    (count, reader)
}

/// Issue 13: recovery of dead consumers is run by one consumer per queue per period (a lock,
/// `machinery:recovering:<queue>`), not by every consumer (quadratic in workers); a dead consumer's
/// messages are still returned within a period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_consumer_per_queue_scans_for_dead_consumers_per_period() {
    if !require(
        Service::Redis,
        "one_consumer_per_queue_scans_for_dead_consumers_per_period",
    ) {
        return;
    }
    let names = Names::new("rb_recoverlock");
    let mut config = names.config();
    // A round every 2 s per consumer; the lock lasts 1.8 s.
    config.redis.heartbeat_timeout = 10_000;
    let broker = RedisBroker::connect(&config).await.unwrap();
    let registry = format!("machinery:consumers:{}", names.queue);
    let (scans, monitor) = count_scans(&registry).await;
    let started = Instant::now();
    let mut consumers = Vec::new();
    for i in 0..5 {
        consumers.push(
            broker
                .consume(options(&names.queue, &format!("w{i}")))
                .await
                .unwrap(),
        );
    }
    let mut conn = raw().await;
    // Every consumer runs its first round when it starts.
    assert!(
        machinery_tests::eventually(Duration::from_secs(2), || {
            let mut conn = conn.clone();
            let registry = registry.clone();
            async move { conn.scard::<_, usize>(&registry).await.unwrap() == 5 }
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        started.elapsed() < Duration::from_millis(1800),
        "the test itself was too slow to measure one period: {:?}",
        started.elapsed()
    );
    assert_eq!(
        scans.load(AtomicOrdering::SeqCst),
        1,
        "five consumers started within one period: one scanned"
    );

    // A dead consumer (registered, with a message in flight, no heartbeat) is recovered by the next
    // round after the lock expires, by one consumer.
    let ghost_inflight = format!("machinery:inflight:{}:ghost", names.queue);
    let _: () = conn.rpush(&ghost_inflight, "g").await.unwrap();
    let _: () = conn.sadd(&registry, "ghost").await.unwrap();
    assert!(
        machinery_tests::eventually(Duration::from_secs(5), || {
            let mut conn = conn.clone();
            let ghost_inflight = ghost_inflight.clone();
            async move { conn.llen::<_, usize>(&ghost_inflight).await.unwrap() == 0 }
        })
        .await,
        "the dead consumer's message was returned"
    );
    let at = started.elapsed();
    assert!(at < Duration::from_millis(3600), "within a period: {at:?}");
    // MONITOR's copy of the scan can arrive after the scan's effect is visible.
    machinery_tests::eventually(Duration::from_millis(500), || async {
        scans.load(AtomicOrdering::SeqCst) >= 2
    })
    .await;
    assert_eq!(
        scans.load(AtomicOrdering::SeqCst),
        2,
        "one more scan in the second period ({at:?})"
    );
    let ghost: bool = conn.sismember(&registry, "ghost").await.unwrap();
    assert!(!ghost, "the dead consumer is unregistered");
    let got = next(&mut consumers[0], 10).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, b"g");
    assert!(got[0].redelivered);
    for d in got {
        d.ack().await.unwrap();
    }
    monitor.abort();
    for consumer in consumers {
        consumer.close().await.unwrap();
    }
    names.cleanup().await;
}

#[tokio::test]
async fn three_consumers_promote_a_thousand_delayed_tasks_exactly_once() {
    if !require(
        Service::Redis,
        "three_consumers_promote_a_thousand_delayed_tasks_exactly_once",
    ) {
        return;
    }
    let names = Names::new("rb_delayed");
    let sender = broker(&names).await;
    let now = chrono::Utc::now();
    let messages: Vec<Outgoing> = (0..1000)
        .map(|i| {
            let mut m = outgoing(
                &names.queue,
                &format!("{{\"UUID\":\"d{i}\",\"RoutingKey\":\"{}\"}}", names.queue),
            );
            m.eta = Some(now + chrono::Duration::milliseconds(300 + i64::from(i) % 700));
            m
        })
        .collect();
    sender.publish_many(messages).await.unwrap();
    assert_eq!(
        sender.queue_stats(&names.queue).await.unwrap().delayed,
        Some(1000)
    );

    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..3 {
        let names = names.clone();
        tasks.spawn(async move {
            // Each worker has its own broker, connections and promotion loop.
            let broker = broker(&names).await;
            let mut consumer = broker
                .consume(options(&names.queue, &format!("w{w}")))
                .await
                .unwrap();
            let mut seen = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let stats = broker.queue_stats(&names.queue).await.unwrap();
                if stats.pending == 0 && stats.delayed == Some(0) && stats.in_flight == Some(0) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "delayed tasks not drained in time: {stats:?}"
                );
                if let Ok(Ok(batch)) =
                    tokio::time::timeout(Duration::from_millis(300), consumer.next_batch(50)).await
                {
                    for d in batch {
                        seen.push(String::from_utf8(d.body.clone()).unwrap());
                        d.ack().await.unwrap();
                    }
                }
            }
            consumer.close().await.unwrap();
            seen
        });
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut per_worker = Vec::new();
    while let Some(seen) = tasks.join_next().await {
        let seen = seen.unwrap();
        per_worker.push(seen.len());
        for body in seen {
            *counts.entry(body).or_default() += 1;
        }
    }
    assert_eq!(counts.len(), 1000, "no delayed task lost");
    assert!(
        counts.values().all(|&n| n == 1),
        "no delayed task delivered twice"
    );
    assert_eq!(per_worker.iter().sum::<usize>(), 1000, "{per_worker:?}");
    names.cleanup().await;
}

#[tokio::test]
async fn dead_letters_keep_the_reason_and_requeue_goes_to_the_tail() {
    if !require(
        Service::Redis,
        "dead_letters_keep_the_reason_and_requeue_goes_to_the_tail",
    ) {
        return;
    }
    let names = Names::new("rb_dead");
    let broker = broker(&names).await;
    for body in ["bad", "retry", "other"] {
        broker.publish(outgoing(&names.queue, body)).await.unwrap();
    }
    let mut consumer = broker.consume(options(&names.queue, "c1")).await.unwrap();
    let mut batch = next(&mut consumer, 2).await;
    let retry = batch.pop().unwrap();
    batch
        .pop()
        .unwrap()
        .dead_letter("malformed: not JSON")
        .await
        .unwrap();
    retry.requeue(b"retry2".to_vec()).await.unwrap();
    assert_eq!(
        broker.pending(&names.queue, 10).await.unwrap(),
        [b"other".to_vec(), b"retry2".to_vec()]
    );
    let dead = broker.dead_letters(&names.queue, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (
            dead[0].reason.as_str(),
            dead[0].body.as_slice(),
            dead[0].queue.as_str()
        ),
        (
            "malformed: not JSON",
            b"bad".as_slice(),
            names.queue.as_str()
        )
    );
    let mut conn = raw().await;
    let raw_dead: Vec<Vec<u8>> = conn
        .lrange(format!("{}.dead", names.queue), 0, -1)
        .await
        .unwrap();
    let envelope: Value = serde_json::from_slice(&raw_dead[0]).unwrap();
    assert_eq!(envelope["reason"], "malformed: not JSON");
    let stats = broker.queue_stats(&names.queue).await.unwrap();
    assert_eq!(
        (stats.pending, stats.in_flight, stats.dead),
        (2, Some(0), Some(1))
    );
    assert_eq!(broker.purge(&names.queue).await.unwrap(), 2);
    assert_eq!(broker.queue_stats(&names.queue).await.unwrap().pending, 0);
    consumer.close().await.unwrap();
    names.cleanup().await;
}

#[tokio::test]
async fn unknown_names_and_malformed_json_are_dead_lettered_while_the_worker_keeps_serving() {
    if !require(
        Service::Redis,
        "unknown_names_and_malformed_json_are_dead_lettered_while_the_worker_keeps_serving",
    ) {
        return;
    }
    let names = Names::new("rb_poison");
    let mut config = names.config();
    config.unknown_task_requeues = 3;
    let server = Server::new(config).await.unwrap();
    let running = Worker::new(&server)
        .register(&ADD)
        .concurrency(2)
        .start()
        .await
        .unwrap();
    let mut conn = raw().await;
    let _: () = conn
        .rpush(&names.queue, b"{not json".as_slice())
        .await
        .unwrap();
    server
        .send(Signature::new("no_such_task").with_uuid(names.task("unknown")))
        .await
        .unwrap();
    let mut results = Vec::new();
    for i in 0..10 {
        let sig: Signature =
            Signature::with_args("add", vec![int(i), int(1)]).with_uuid(names.task(i));
        results.push(server.send(sig.retype::<i64>()).await.unwrap());
    }
    for (i, result) in results.into_iter().enumerate() {
        assert_eq!(
            result.get(Duration::from_secs(10)).await.unwrap(),
            i as i64 + 1
        );
    }
    let broker = server.broker().clone();
    let queue = names.queue.clone();
    wait_until("two dead letters", Duration::from_secs(10), || {
        let broker = broker.clone();
        let queue = queue.clone();
        async move {
            broker
                .inspect()
                .unwrap()
                .queue_stats(&queue)
                .await
                .unwrap()
                .dead
                == Some(2)
        }
    })
    .await;
    let dead = server
        .broker()
        .inspect()
        .unwrap()
        .dead_letters(&names.queue, 10)
        .await
        .unwrap();
    let malformed = dead
        .iter()
        .find(|d| d.body == b"{not json")
        .expect("malformed message dead-lettered");
    assert!(
        malformed.reason.starts_with("malformed message"),
        "{}",
        malformed.reason
    );
    let unknown = dead.iter().find(|d| d.body != b"{not json").unwrap();
    assert!(
        unknown
            .reason
            .contains("unknown task name \"no_such_task\""),
        "{}",
        unknown.reason
    );
    assert!(
        unknown.reason.contains("requeued 3 times"),
        "{}",
        unknown.reason
    );
    let sig = Signature::from_json(&unknown.body).unwrap();
    assert_eq!(
        sig.header_value(machinery::UNKNOWN_TASK_REQUEUES_HEADER),
        Some(&Value::from(3))
    );
    running.shutdown(Duration::from_secs(5)).await.unwrap();
    let stats = server
        .broker()
        .inspect()
        .unwrap()
        .queue_stats(&names.queue)
        .await
        .unwrap();
    assert_eq!((stats.pending, stats.in_flight), (0, Some(0)));
    names.cleanup().await;
}

#[tokio::test]
async fn an_idle_worker_shuts_down_within_a_second() {
    if !require(Service::Redis, "an_idle_worker_shuts_down_within_a_second") {
        return;
    }
    let names = Names::new("rb_idle");
    let mut config = names.config();
    // Go blocks in BLPOP for this long before it can notice a shutdown.
    config.redis.normal_tasks_poll_period = 5000;
    let server = Server::new(config).await.unwrap();
    let running = Worker::new(&server).register(&ADD).start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    running.shutdown(Duration::from_secs(10)).await.unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "graceful shutdown of an idle worker took {took:?}"
    );
    let mut conn = raw().await;
    let consumers: Vec<String> = conn
        .smembers(format!("machinery:consumers:{}", names.queue))
        .await
        .unwrap();
    assert!(
        consumers.is_empty(),
        "the worker unregistered: {consumers:?}"
    );
    names.cleanup().await;
}

/// Creates an ACL user for one test, so that `CLIENT KILL USER` cuts exactly that worker's connections.
async fn acl_user(names: &Names) -> (String, String) {
    let user = format!("{}_user", names.id);
    let password = "test-password";
    let mut conn = raw().await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(format!(">{password}"))
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .query_async(&mut conn)
        .await
        .unwrap();
    let addr = Service::Redis.addr();
    (user.clone(), format!("redis://{user}:{password}@{addr}"))
}

async fn drop_acl_user(user: &str) {
    let mut conn = raw().await;
    let _: () = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(user)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_worker_whose_connections_are_killed_reconnects_and_loses_nothing() {
    if !require(
        Service::Redis,
        "a_worker_whose_connections_are_killed_reconnects_and_loses_nothing",
    ) {
        return;
    }
    let names = Names::new("rb_kill_conn");
    let (user, url) = acl_user(&names).await;
    let mut worker_config = names.config();
    worker_config.broker = url.clone();
    worker_config.result_backend = url;
    let worker_server = Server::new(worker_config).await.unwrap();
    let running = Worker::new(&worker_server)
        .register(&SLEEP_MS)
        .concurrency(5)
        .start()
        .await
        .unwrap();

    let sender = Server::new(names.config()).await.unwrap();
    let count = 150;
    for i in 0..count {
        let sig: Signature =
            Signature::with_args("sleep_ms", vec![int(20)]).with_uuid(names.task(i));
        sender.send(sig).await.unwrap();
    }
    let mut conn = raw().await;
    let mut kills = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("USER")
            .arg(&user)
            .query_async(&mut conn)
            .await
            .unwrap();
        kills.push(killed);
    }
    // Each kill cuts every connection the worker has; finding some again at the next kill shows that it
    // reconnected in between.
    assert!(
        kills.iter().all(|&k| k >= 1),
        "connections killed per round: {kills:?}"
    );
    let backend = sender.backend().clone();
    let ids: Vec<String> = (0..count).map(|i| names.task(i)).collect();
    wait_until(
        "every task SUCCESS after the connection losses",
        Duration::from_secs(30),
        || {
            let backend = backend.clone();
            let ids = ids.clone();
            async move {
                for id in &ids {
                    match backend.get_state(id).await {
                        Ok(Some(state)) if state.state == State::Success => {}
                        _ => return false,
                    }
                }
                true
            }
        },
    )
    .await;
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
        "nothing left behind or lost"
    );
    drop_acl_user(&user).await;
    names.cleanup().await;
}

/// Starts `tests/src/bin/test_worker.rs` as its own process.
fn spawn_worker(names: &Names, concurrency: usize) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_test_worker"))
        .env("BROKER", Service::Redis.url())
        .env("RESULT_BACKEND", Service::Redis.url())
        .env("DEFAULT_QUEUE", &names.queue)
        .env("REDIS_DELAYED_TASKS_KEY", &names.delayed)
        .env("REDIS_HEARTBEAT_TIMEOUT", "1500")
        .env("RESULTS_EXPIRE_IN", "300")
        .env("WORKER_CONCURRENCY", concurrency.to_string())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("start the test worker")
}

#[tokio::test]
async fn a_worker_killed_with_sigkill_mid_task_loses_no_task() {
    if !require(
        Service::Redis,
        "a_worker_killed_with_sigkill_mid_task_loses_no_task",
    ) {
        return;
    }
    let names = Names::new("rb_kill9");
    let sender = Server::new(names.config()).await.unwrap();
    let count = 16;
    for i in 0..count {
        let sig: Signature =
            Signature::with_args("sleep_ms", vec![int(400)]).with_uuid(names.task(i));
        sender.send(sig).await.unwrap();
    }
    let backend = sender.backend().clone();
    let ids: Vec<String> = (0..count).map(|i| names.task(i)).collect();
    let states = |backend: Arc<dyn machinery::backend::Backend>, ids: Vec<String>| async move {
        let mut states = Vec::new();
        for id in &ids {
            states.push(backend.get_state(id).await.unwrap().map(|s| s.state));
        }
        states
    };

    let mut first = spawn_worker(&names, 4);
    // Kill it while tasks run: some STARTED, not all done.
    wait_until(
        "the first worker to start tasks",
        Duration::from_secs(20),
        || {
            let (backend, ids) = (backend.clone(), ids.clone());
            async move { states(backend, ids).await.contains(&Some(State::Started)) }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = states(backend.clone(), ids.clone()).await;
    let cut_off: Vec<usize> = (0..count)
        .filter(|&i| before[i] == Some(State::Started))
        .collect();
    first.kill().await.expect("SIGKILL the first worker");
    let stats = sender
        .broker()
        .inspect()
        .unwrap()
        .queue_stats(&names.queue)
        .await
        .unwrap();
    assert!(
        stats.in_flight.unwrap_or(0) > 0,
        "the killed worker held messages in flight: {stats:?}"
    );
    assert!(!cut_off.is_empty());

    let mut second = spawn_worker(&names, 4);
    wait_until(
        "every task SUCCESS after the kill",
        Duration::from_secs(40),
        || {
            let (backend, ids) = (backend.clone(), ids.clone());
            async move {
                states(backend, ids)
                    .await
                    .iter()
                    .all(|s| *s == Some(State::Success))
            }
        },
    )
    .await;
    for i in cut_off {
        let state = backend.get_state(&ids[i]).await.unwrap().unwrap();
        assert_eq!(
            state.state,
            State::Success,
            "task {i} was cut off mid-run and ran again"
        );
    }
    // Stop the second worker gracefully (SIGTERM) and check that nothing is left anywhere.
    if let Some(pid) = second.id() {
        let status = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }
    let exit = tokio::time::timeout(Duration::from_secs(15), second.wait())
        .await
        .expect("worker exits after SIGTERM")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    let stats = sender
        .broker()
        .inspect()
        .unwrap()
        .queue_stats(&names.queue)
        .await
        .unwrap();
    assert_eq!(
        (stats.pending, stats.in_flight, stats.dead),
        (0, Some(0), Some(0))
    );
    names.cleanup().await;
}

#[tokio::test]
async fn the_samplers_depth_counts_with_llen_and_zcard_and_the_cli_scans() {
    if !require(Service::Redis, "queue depth") {
        return;
    }
    let names = Names::new("depth");
    let broker = broker(&names).await;
    let mut conn = raw().await;
    let _: () = conn.rpush(&names.queue, &["a", "b", "c"]).await.unwrap();
    // One delayed task of this queue, two of another queue, and an entry that is not JSON at all: the
    // sampler's count takes the set's size as it is (`ZCARD`), never reading an entry.
    let mine = format!(r#"{{"UUID":"task_1","RoutingKey":"{}"}}"#, names.queue);
    let far = chrono::Utc::now().timestamp_nanos_opt().unwrap() + 3_600_000_000_000;
    for (n, entry) in [
        mine.clone(),
        r#"{"UUID":"task_2","RoutingKey":"elsewhere"}"#.to_owned(),
        r#"{"UUID":"task_3","RoutingKey":"elsewhere"}"#.to_owned(),
        "not json".to_owned(),
    ]
    .into_iter()
    .enumerate()
    {
        let _: () = conn
            .zadd(&names.delayed, entry, far + n as i64)
            .await
            .unwrap();
    }
    let depth = broker.queue_depth(&names.queue).await.unwrap();
    assert_eq!(
        (depth.pending, depth.delayed, depth.in_flight, depth.dead),
        (3, Some(4), None, None)
    );
    // The CLI's statistics read every entry to count this queue's own (the entry that is not JSON would
    // be promoted to the default queue, which this is).
    let stats = broker.queue_stats(&names.queue).await.unwrap();
    assert_eq!((stats.pending, stats.delayed), (3, Some(2)));
    names.cleanup().await;
}
