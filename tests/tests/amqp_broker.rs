//! The AMQP broker against a real RabbitMQ: Go's declarations and routing, message properties, publisher
//! confirms, delays, prefetch, priority, unknown and malformed messages, inspection, shutdown, and the
//! order of state write and ack. Each test uses its own exchange and queues and deletes them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use machinery::backend::memory::MemoryBackend;
use machinery::backend::Backend;
use machinery::broker::amqp::AmqpBroker;
use machinery::broker::{Broker, BrokerError, ConsumeOptions};
use machinery::{
    Config, Error, SendError, Server, Signature, State, TaskState, Worker, WorkerError,
    UNKNOWN_TASK_REQUEUES_HEADER,
};
use machinery_tests::amqp::{
    self, bindings_from, int32, int64, queue_info, queues_containing, string, table, wait_for,
    Cleanup, Rabbit,
};
use machinery_tests::tasks::{probe, probe_record};
use machinery_tests::{require, unique, Service};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

async fn broker(config: &Config) -> AmqpBroker {
    AmqpBroker::new(config).await.expect("AMQP broker connects")
}

/// A server on the AMQP broker with an in-process result backend, so these tests are about the broker.
async fn server(config: &Config) -> Server {
    let backend = MemoryBackend::connect("memory://", config);
    Server::from_parts(config.clone(), Arc::new(broker(config).await), backend)
}

fn options(queue: &str, prefetch: usize) -> ConsumeOptions {
    ConsumeOptions {
        queue: queue.to_owned(),
        consumer_tag: unique("tag"),
        concurrency: prefetch,
        prefetch,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_declarations_are_gos_so_either_side_may_declare_first() {
    if !require(Service::RabbitMq, "declarations") {
        return;
    }
    let rabbit = Rabbit::connect().await;

    // Ours first: the worker's exchange, queue and binding, then Go's declarations of the same objects
    // (with `x-max-priority` as a 32-bit integer where we sent 64 bits) are accepted.
    let mut config = amqp::config("decl");
    config.amqp.queue_declare_args = json!({"x-max-priority": 10}).as_object().unwrap().clone();
    let _cleanup = Cleanup::for_config(&config);
    let b = broker(&config).await;
    let consumer = b.consume(options(&config.default_queue, 1)).await.unwrap();
    let q = queue_info(&config.default_queue).expect("queue declared");
    assert!(q.durable && !q.auto_delete, "{q:?}");
    assert_eq!(q.arguments, json!({"x-max-priority": ["long", 10]}));
    assert_eq!(
        bindings_from(&config.amqp.exchange),
        vec![(
            config.default_queue.clone(),
            config.amqp.binding_key.clone()
        )]
    );
    let exchanges = amqp::rabbitmqctl_json(
        "list_exchanges",
        &["name", "type", "durable", "auto_delete"],
    );
    let ex = exchanges
        .iter()
        .find(|e| e["name"] == config.amqp.exchange.as_str())
        .expect("exchange declared");
    assert_eq!(
        (
            ex["type"].as_str(),
            ex["durable"].as_bool(),
            ex["auto_delete"].as_bool()
        ),
        (Some("direct"), Some(true), Some(false))
    );
    rabbit
        .declare_exchange_like_go(&config.amqp.exchange, "direct")
        .await
        .expect("Go's exchange declaration is accepted after ours");
    rabbit
        .declare_queue(
            &config.default_queue,
            true,
            false,
            table(&[("x-max-priority", int32(10))]),
            Some((&config.amqp.exchange, &config.amqp.binding_key)),
        )
        .await
        .expect("Go's queue declaration is accepted after ours");
    consumer.close().await.unwrap();

    // Go first: exchange and queue declared by "Go"; our worker and sender use them.
    let mut go_first = amqp::config("declgo");
    go_first.amqp.queue_declare_args = json!({"x-max-priority": 10}).as_object().unwrap().clone();
    let _cleanup2 = Cleanup::for_config(&go_first);
    rabbit
        .declare_exchange_like_go(&go_first.amqp.exchange, "direct")
        .await
        .unwrap();
    rabbit
        .declare_queue(
            &go_first.default_queue,
            true,
            false,
            table(&[("x-max-priority", int32(10))]),
            Some((&go_first.amqp.exchange, &go_first.amqp.binding_key)),
        )
        .await
        .unwrap();
    let b = broker(&go_first).await;
    let consumer = b
        .consume(options(&go_first.default_queue, 1))
        .await
        .expect("our declaration is accepted after Go's");
    let s = server(&go_first).await;
    s.send(Signature::new("add"))
        .await
        .expect("publishing after Go's declarations");
    consumer.close().await.unwrap();

    // A real mismatch is refused, and the error says so.
    let mismatch = amqp::config("declbad");
    let _cleanup3 = Cleanup::for_config(&mismatch);
    rabbit
        .declare_queue(
            &mismatch.default_queue,
            false,
            false,
            Default::default(),
            None,
        )
        .await
        .unwrap();
    let err = broker(&mismatch)
        .await
        .consume(options(&mismatch.default_queue, 1))
        .await
        .expect_err("a non-durable queue of the same name is refused");
    let text = err.to_string();
    assert!(
        text.contains("PRECONDITION_FAILED") || text.contains("inequivalent"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_persistent_json_with_priority_and_headers() {
    if !require(Service::RabbitMq, "properties") {
        return;
    }
    let config = amqp::config("props");
    let _cleanup = Cleanup::for_config(&config);
    let rabbit = Rabbit::connect().await;
    let s = server(&config).await;

    let sent = s
        .send(Signature::new("add").priority(5).header("tenant", "acme"))
        .await
        .unwrap();
    let d = rabbit
        .take(&config.default_queue)
        .await
        .expect("message queued");
    let p = &d.properties;
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(*p.priority(), Some(5));
    let headers = amqp::headers(p);
    assert_eq!(headers, json!({"tenant": "acme"}));
    assert_eq!(d.exchange.as_str(), config.amqp.exchange);
    assert_eq!(d.routing_key.as_str(), config.amqp.binding_key);
    let body = Signature::from_json(&d.data).unwrap();
    assert_eq!((body.uuid.as_str(), body.priority), (sent.uuid(), 5));
    assert_eq!(body.routing_key, config.amqp.binding_key);
    assert!(p.correlation_id().is_none() && p.message_id().is_none() && p.expiration().is_none());

    // As with Go's amqp091: no priority property for 0, no header table when there are no headers.
    s.send(Signature::new("add")).await.unwrap();
    let d = rabbit
        .take(&config.default_queue)
        .await
        .expect("message queued");
    assert_eq!(
        (*d.properties.priority(), d.properties.headers().is_none()),
        (None, true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_is_gos_without_the_duplicate_queue() {
    if !require(Service::RabbitMq, "routing") {
        return;
    }
    let rabbit = Rabbit::connect().await;
    // Go's default shape: the binding key differs from the default queue's name.
    let mut config = amqp::config("route");
    config.amqp.binding_key = unique("route_key");
    let custom = unique("route_custom");
    let cleanup = Cleanup::for_config(&config);
    cleanup.queue(&custom);
    let s = server(&config).await;
    assert_eq!(
        s.broker().route(""),
        config.amqp.binding_key,
        "direct: the binding key"
    );
    assert_eq!(s.broker().route("emails"), "emails");

    s.send(Signature::new("a")).await.unwrap();
    assert_eq!(queue_info(&config.default_queue).map(|q| q.ready), Some(1));
    assert!(
        !rabbit.queue_exists(&config.amqp.binding_key).await,
        "no never-consumed queue named after the binding key"
    );

    // A custom routing key: its own queue, bound with its name.
    s.send(Signature::new("a").routing_key(custom.clone()))
        .await
        .unwrap();
    assert_eq!(queue_info(&custom).map(|q| q.ready), Some(1));
    assert!(bindings_from(&config.amqp.exchange).contains(&(custom.clone(), custom.clone())));

    // The trap Go's sender sets: a queue named after the binding key, bound with it, gets a copy of
    // every default-routed task that nobody consumes.
    rabbit
        .declare_queue(
            &config.amqp.binding_key,
            true,
            false,
            Default::default(),
            Some((&config.amqp.exchange, &config.amqp.binding_key)),
        )
        .await
        .unwrap();
    s.send(Signature::new("a")).await.unwrap();
    assert_eq!(queue_info(&config.default_queue).map(|q| q.ready), Some(2));
    assert_eq!(
        queue_info(&config.amqp.binding_key).map(|q| q.ready),
        Some(1)
    );

    // Any other exchange type routes by the default queue's name.
    let mut topic = amqp::config("routetopic");
    topic.amqp.exchange_type = "topic".into();
    let _cleanup = Cleanup::for_config(&topic);
    let b = broker(&topic).await;
    assert_eq!(b.route(""), topic.default_queue);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirms_are_pipelined_and_a_nack_fails_the_send() {
    if !require(Service::RabbitMq, "confirms") {
        return;
    }
    let config = amqp::config("confirm");
    let _cleanup = Cleanup::for_config(&config);
    let s = server(&config).await;
    let n = 200;

    let started = Instant::now();
    for _ in 0..n {
        s.send(Signature::new("seq")).await.unwrap();
    }
    let one_by_one = started.elapsed();

    let started = Instant::now();
    let mut sends = tokio::task::JoinSet::new();
    for _ in 0..n {
        let s = s.clone();
        sends.spawn(async move { s.send(Signature::new("par")).await.map(|_| ()) });
    }
    while let Some(done) = sends.join_next().await {
        done.unwrap().unwrap();
    }
    let in_flight = started.elapsed();
    assert_eq!(
        queue_info(&config.default_queue).map(|q| q.ready),
        Some(2 * n as u64)
    );
    eprintln!("{n} confirmed sends: one by one {one_by_one:?}, concurrently {in_flight:?}");
    assert!(
        in_flight * 2 < one_by_one,
        "concurrent sends share confirms in flight: {in_flight:?} vs one by one {one_by_one:?}"
    );

    // A queue that refuses what does not fit: RabbitMQ nacks, and the sender gets an error.
    let mut full = amqp::config("nack");
    full.amqp.queue_declare_args = json!({"x-max-length": 1, "x-overflow": "reject-publish"})
        .as_object()
        .unwrap()
        .clone();
    let _cleanup = Cleanup::for_config(&full);
    let s = server(&full).await;
    s.send(Signature::new("first")).await.expect("fits");
    let err = s.send(Signature::new("second")).await.expect_err("nacked");
    assert!(
        matches!(
            &err,
            SendError::Broker {
                source: BrokerError::Rejected(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("nacked"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eta_goes_through_gos_delay_queue_and_keeps_the_priority() {
    if !require(Service::RabbitMq, "eta") {
        return;
    }
    let config = amqp::config("eta");
    let _cleanup = Cleanup::for_config(&config);
    let rabbit = Rabbit::connect().await;
    let s = server(&config).await;
    let sent_at = Instant::now();
    s.send(
        Signature::new("later")
            .priority(7)
            .countdown(Duration::from_millis(4000)),
    )
    .await
    .unwrap();
    assert_eq!(
        queue_info(&config.default_queue).map(|q| q.ready),
        Some(0),
        "not yet"
    );

    let delay = queues_containing(&config.amqp.exchange)
        .into_iter()
        .find(|q| q.name.starts_with("delay."))
        .expect("a delay queue");
    let prefix = "delay.";
    let suffix = format!(".{}.{}", config.amqp.exchange, config.amqp.binding_key);
    assert!(delay.name.ends_with(&suffix), "{}", delay.name);
    let ms: i64 = delay.name[prefix.len()..delay.name.len() - suffix.len()]
        .parse()
        .expect("delay.<ms>.<exchange>.<routing key>");
    assert!((3000..=4000).contains(&ms), "{ms}");
    assert!(delay.durable && !delay.auto_delete);
    assert_eq!(
        delay.arguments,
        json!({
            "x-dead-letter-exchange": ["longstr", config.amqp.exchange],
            "x-dead-letter-routing-key": ["longstr", config.amqp.binding_key],
            "x-message-ttl": ["long", ms],
            "x-expires": ["long", 2 * ms],
        }),
        "Go's delay queue arguments, 64-bit TTLs"
    );
    assert_eq!(delay.ready, 1);
    // Go declares these with 64-bit integers: accepted.
    rabbit
        .declare_queue(
            &delay.name,
            true,
            false,
            table(&[
                ("x-dead-letter-exchange", string(&config.amqp.exchange)),
                (
                    "x-dead-letter-routing-key",
                    string(&config.amqp.binding_key),
                ),
                ("x-message-ttl", int64(ms)),
                ("x-expires", int64(2 * ms)),
            ]),
            Some((&config.amqp.exchange, &delay.name)),
        )
        .await
        .expect("Go's delay queue declaration is accepted after ours");

    let arrived = wait_for(WAIT, || {
        (queue_info(&config.default_queue)?.ready == 1).then(Instant::now)
    })
    .await
    .expect("delivered after its delay");
    assert!(
        arrived - sent_at >= Duration::from_millis(3900),
        "{:?}",
        arrived - sent_at
    );
    let d = rabbit.take(&config.default_queue).await.unwrap();
    assert_eq!(
        *d.properties.priority(),
        Some(7),
        "the priority survives the delay (Go drops it)"
    );
    let headers = amqp::headers(&d.properties);
    assert_eq!(headers["x-first-death-reason"], "expired");
    assert_eq!(Signature::from_json(&d.data).unwrap().name, "later");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_single_delayed_queue_uses_per_message_expiration() {
    if !require(Service::RabbitMq, "delayed_queue") {
        return;
    }
    let mut config = amqp::config("dq");
    config.amqp.delayed_queue = format!("{}_delayed", config.amqp.exchange);
    let _cleanup = Cleanup::for_config(&config);
    let rabbit = Rabbit::connect().await;
    let s = server(&config).await;
    let sent_at = Instant::now();
    s.send(
        Signature::new("later")
            .priority(4)
            .countdown(Duration::from_millis(3000)),
    )
    .await
    .unwrap();
    let q = queue_info(&config.amqp.delayed_queue).expect("the delayed queue");
    assert_eq!(
        q.arguments,
        json!({
            "x-dead-letter-exchange": ["longstr", config.amqp.exchange],
            "x-dead-letter-routing-key": ["longstr", config.amqp.binding_key],
        })
    );
    assert_eq!(q.ready, 1);
    wait_for(WAIT, || {
        (queue_info(&config.default_queue)?.ready == 1).then_some(())
    })
    .await
    .expect("delivered after its delay");
    assert!(sent_at.elapsed() >= Duration::from_millis(2900));
    let d = rabbit.take(&config.default_queue).await.unwrap();
    assert_eq!(*d.properties.priority(), Some(4));
    // RabbitMQ drops the expiration when it dead-letters and keeps it in `x-death`.
    let death = &amqp::headers(&d.properties)["x-death"][0];
    assert_eq!(death["queue"], config.amqp.delayed_queue.as_str());
    let expiration: u64 = death["original-expiration"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((2000..=3000).contains(&expiration), "{expiration}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_3_never_runs_more_than_3_tasks_at_once() {
    if !require(Service::RabbitMq, "prefetch") {
        return;
    }
    let mut config = amqp::config("prefetch");
    config.amqp.prefetch_count = 3;
    let _cleanup = Cleanup::for_config(&config);
    let s = server(&config).await;
    let key = unique("prefetch");
    let worker = Worker::new(&s)
        .register(probe::task())
        .concurrency(10)
        .start()
        .await
        .unwrap();
    let mut results = Vec::new();
    for i in 0..9 {
        results.push(probe::send(&s, &key, i, 300).await.unwrap());
    }
    // While they run, RabbitMQ holds no more than 3 unacknowledged.
    let mut most_unacked = 0;
    let deadline = Instant::now() + WAIT;
    while probe_record(&key).finished < 9 && Instant::now() < deadline {
        if let Some(q) = queue_info(&config.default_queue) {
            most_unacked = most_unacked.max(q.unacked);
        }
    }
    for r in results {
        r.get(WAIT).await.unwrap();
    }
    let record = probe_record(&key);
    assert_eq!(record.finished, 9);
    assert_eq!(
        record.max_running, 3,
        "concurrency 10, prefetch 3: {record:?}"
    );
    assert!(most_unacked <= 3, "{most_unacked}");
    worker.shutdown(WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_x_max_priority_a_backlog_runs_highest_first() {
    if !require(Service::RabbitMq, "priority") {
        return;
    }
    let mut config = amqp::config("prio");
    config.amqp.prefetch_count = 1;
    config.amqp.queue_declare_args = json!({"x-max-priority": 10}).as_object().unwrap().clone();
    let _cleanup = Cleanup::for_config(&config);
    let s = server(&config).await;
    let key = unique("prio");
    // The worker is not running yet: a mixed backlog builds up.
    let mut results = Vec::new();
    for priority in [1u8, 5, 9, 3, 7] {
        let sig = probe::signature(&key, i64::from(priority), 20).priority(priority);
        results.push(s.send(sig).await.unwrap());
    }
    assert_eq!(queue_info(&config.default_queue).map(|q| q.ready), Some(5));
    let worker = Worker::new(&s)
        .register(probe::task())
        .concurrency(1)
        .start()
        .await
        .unwrap();
    for r in results {
        r.get(WAIT).await.unwrap();
    }
    assert_eq!(probe_record(&key).order, [9, 7, 5, 3, 1]);
    worker.shutdown(WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tasks_are_requeued_a_few_times_then_dead_lettered_with_the_reason() {
    if !require(Service::RabbitMq, "unknown") {
        return;
    }
    let mut config = amqp::config("unknown");
    config.unknown_task_requeues = 3;
    let _cleanup = Cleanup::for_config(&config);
    let rabbit = Rabbit::connect().await;
    let s = server(&config).await;
    let worker = Worker::new(&s)
        .register(probe::task())
        .concurrency(2)
        .start()
        .await
        .unwrap();
    let sent = s.send(Signature::new("mystery")).await.unwrap();

    let dead = wait_for(WAIT, || {
        futures_lite_block(
            s.broker()
                .inspect()
                .unwrap()
                .dead_letters(&config.default_queue, 10),
        )
        .ok()
        .filter(|d| !d.is_empty())
    })
    .await
    .expect("dead-lettered");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].queue, config.default_queue);
    assert!(
        dead[0].reason.contains("unknown task name \"mystery\""),
        "{}",
        dead[0].reason
    );
    let body = Signature::from_json(&dead[0].body).unwrap();
    assert_eq!(body.uuid, sent.uuid());
    assert_eq!(
        body.header_value(UNKNOWN_TASK_REQUEUES_HEADER)
            .and_then(|v| v.as_u64()),
        Some(3),
        "requeued exactly the configured number of times"
    );
    assert_eq!(
        queue_info(&config.default_queue).map(|q| (q.ready, q.unacked)),
        Some((0, 0))
    );
    let stats = s
        .broker()
        .inspect()
        .unwrap()
        .queue_stats(&config.default_queue)
        .await
        .unwrap();
    assert_eq!(stats.dead, Some(1));
    // The reason travels in an AMQP header too, for other tools.
    let d = rabbit
        .take(&format!("{}.dead", config.default_queue))
        .await
        .unwrap();
    let headers = amqp::headers(&d.properties);
    assert_eq!(
        headers["machinery_dead_letter_reason"],
        dead[0].reason.as_str()
    );
    worker.shutdown(WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_dead_lettered_at_once_and_the_worker_goes_on() {
    if !require(Service::RabbitMq, "malformed") {
        return;
    }
    let config = amqp::config("malformed");
    let _cleanup = Cleanup::for_config(&config);
    let rabbit = Rabbit::connect().await;
    let s = server(&config).await;
    let key = unique("malformed");
    let worker = Worker::new(&s)
        .register(probe::task())
        .concurrency(1)
        .start()
        .await
        .unwrap();
    rabbit
        .publish(
            "",
            &config.default_queue,
            b"{not json",
            lapin::BasicProperties::default(),
        )
        .await;
    let ok = s
        .send(probe::signature(&key, 1, 0))
        .await
        .unwrap()
        .retype::<i64>();
    assert_eq!(ok.get(WAIT).await.unwrap(), 1, "the worker keeps going");
    let dead = s
        .broker()
        .inspect()
        .unwrap()
        .dead_letters(&config.default_queue, 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body, b"{not json");
    assert!(
        dead[0].reason.starts_with("malformed message"),
        "{}",
        dead[0].reason
    );
    assert_eq!(
        queue_info(&config.default_queue).map(|q| (q.ready, q.unacked)),
        Some((0, 0))
    );
    worker.shutdown(WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_peeks_without_taking_and_purge_empties() {
    if !require(Service::RabbitMq, "inspect") {
        return;
    }
    let config = amqp::config("inspect");
    let _cleanup = Cleanup::for_config(&config);
    let s = server(&config).await;
    for name in ["t0", "t1", "t2"] {
        s.send(Signature::new(name)).await.unwrap();
    }
    let b = s.broker().inspect().unwrap();
    let stats = b.queue_stats(&config.default_queue).await.unwrap();
    assert_eq!(
        (stats.pending, stats.dead, stats.in_flight),
        (3, Some(0), None)
    );
    let pending = b.pending(&config.default_queue, 2).await.unwrap();
    let names: Vec<_> = pending
        .iter()
        .map(|body| Signature::from_json(body).unwrap().name.clone())
        .collect();
    assert_eq!(names, ["t0", "t1"]);
    let back = wait_for(WAIT, || {
        (queue_info(&config.default_queue)?.ready == 3).then_some(())
    })
    .await;
    assert!(back.is_some(), "peeked messages went back");
    assert_eq!(b.purge(&config.default_queue).await.unwrap(), 3);
    assert_eq!(
        b.queue_stats(&config.default_queue).await.unwrap().pending,
        0
    );
    assert_eq!(b.purge("machinery_no_such_queue_at_all").await.unwrap(), 0);
    assert!(b
        .pending("machinery_no_such_queue_at_all", 5)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_running_tasks_and_returns_the_rest() {
    if !require(Service::RabbitMq, "shutdown") {
        return;
    }
    let mut config = amqp::config("shutdown");
    // Two run, two more wait in this worker's prefetch.
    config.amqp.prefetch_count = 4;
    let _cleanup = Cleanup::for_config(&config);
    let s = server(&config).await;
    let key = unique("shutdown");
    let mut results = Vec::new();
    for i in 0..6 {
        // Long enough that the window between release and finish is seen even on a loaded machine,
        // where each rabbitmqctl query takes a second or more.
        results.push(probe::send(&s, &key, i, 6_000).await.unwrap());
    }
    let worker = Worker::new(&s)
        .register(probe::task())
        .concurrency(2)
        .start()
        .await
        .unwrap();
    wait_for(WAIT, || (probe_record(&key).started == 2).then_some(()))
        .await
        .expect("two tasks run");
    let q = wait_for(WAIT, || {
        queue_info(&config.default_queue).filter(|q| q.unacked == 4)
    })
    .await;
    assert!(q.is_some(), "two running, two prefetched");
    let shutdown = tokio::spawn(worker.shutdown(WAIT));
    // Consuming stops at once: the prefetched two go back while the running two finish.
    let released = wait_for(WAIT, || {
        queue_info(&config.default_queue).filter(|q| q.unacked == 2 && q.ready == 4)
    })
    .await;
    assert!(
        released.is_some(),
        "{:?}",
        queue_info(&config.default_queue)
    );
    assert_eq!(
        probe_record(&key).finished,
        0,
        "released before the running tasks ended"
    );
    shutdown
        .await
        .unwrap()
        .expect("finished within the deadline");
    let record = probe_record(&key);
    assert_eq!((record.started, record.finished), (2, 2), "{record:?}");
    for r in &results[..2] {
        assert_eq!(
            r.state().await.unwrap().map(|s| s.state),
            Some(State::Success)
        );
    }
    let q = wait_for(WAIT, || {
        queue_info(&config.default_queue).filter(|q| q.unacked == 0 && q.consumers == 0)
    })
    .await
    .expect("the consumer is gone");
    assert_eq!(q.ready, 4, "the tasks not started are back in the queue");

    // A deadline shorter than the task: it is cut off and its message returns.
    let key = unique("cutoff");
    // Purged first, so the new worker does not prefetch the first part's leftovers.
    s.broker()
        .inspect()
        .unwrap()
        .purge(&config.default_queue)
        .await
        .unwrap();
    let worker = Worker::new(&s)
        .register(probe::task())
        .concurrency(1)
        .start()
        .await
        .unwrap();
    probe::send(&s, &key, 9, 10_000).await.unwrap();
    wait_for(WAIT, || (probe_record(&key).started == 1).then_some(()))
        .await
        .expect("the long task runs");
    let err = worker
        .shutdown(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(err, WorkerError::ShutdownDeadline { aborted: 1, .. }),
        "{err}"
    );
    let q = wait_for(WAIT, || {
        queue_info(&config.default_queue).filter(|q| q.ready == 1)
    })
    .await;
    assert!(q.is_some(), "the cut-off task is back in the queue");
}

/// A backend that holds every final (SUCCESS/FAILURE) write until the test lets it through.
#[derive(Debug)]
struct GatedBackend {
    inner: Arc<dyn Backend>,
    entered: tokio::sync::Notify,
    release: tokio::sync::Semaphore,
}

#[async_trait::async_trait]
impl Backend for GatedBackend {
    fn kind(&self) -> &'static str {
        "gated"
    }
    async fn set_state(&self, state: &TaskState) -> Result<(), machinery::backend::BackendError> {
        if state.is_completed() {
            self.entered.notify_one();
            self.release.acquire().await.unwrap().forget();
        }
        self.inner.set_state(state).await
    }
    async fn get_state(
        &self,
        uuid: &str,
    ) -> Result<Option<TaskState>, machinery::backend::BackendError> {
        self.inner.get_state(uuid).await
    }
    async fn init_group(
        &self,
        meta: &machinery::GroupMeta,
    ) -> Result<(), machinery::backend::BackendError> {
        self.inner.init_group(meta).await
    }
    async fn get_group(
        &self,
        g: &str,
    ) -> Result<Option<machinery::GroupMeta>, machinery::backend::BackendError> {
        self.inner.get_group(g).await
    }
    async fn complete_group_member(
        &self,
        g: &str,
        t: &str,
        n: u32,
    ) -> Result<bool, machinery::backend::BackendError> {
        self.inner.complete_group_member(g, t, n).await
    }
    async fn purge_state(&self, uuid: &str) -> Result<(), machinery::backend::BackendError> {
        self.inner.purge_state(uuid).await
    }
    async fn purge_group(&self, g: &str) -> Result<(), machinery::backend::BackendError> {
        self.inner.purge_group(g).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_message_is_acked_only_after_the_final_state_is_stored() {
    if !require(Service::RabbitMq, "ack_after_state") {
        return;
    }
    let config = amqp::config("ackorder");
    let _cleanup = Cleanup::for_config(&config);
    let gate = Arc::new(GatedBackend {
        inner: MemoryBackend::connect("memory://", &config),
        entered: tokio::sync::Notify::new(),
        release: tokio::sync::Semaphore::new(0),
    });
    let s = Server::from_parts(
        config.clone(),
        Arc::new(broker(&config).await),
        gate.clone(),
    );
    let worker = Worker::new(&s)
        .register(probe::task())
        .concurrency(1)
        .start()
        .await
        .unwrap();
    let key = unique("ackorder");
    let r = s
        .send(probe::signature(&key, 4, 0))
        .await
        .unwrap()
        .retype::<i64>();
    tokio::time::timeout(WAIT, gate.entered.notified())
        .await
        .expect("the worker stores the final state");
    // The task has finished; its SUCCESS is being written: the message is still unacknowledged.
    assert_eq!(probe_record(&key).finished, 1);
    let q = queue_info(&config.default_queue).unwrap();
    assert_eq!(
        (q.ready, q.unacked),
        (0, 1),
        "not acked before the state is stored"
    );
    gate.release.add_permits(1);
    assert_eq!(r.get(WAIT).await.unwrap(), 4);
    let acked = wait_for(WAIT, || {
        queue_info(&config.default_queue).filter(|q| q.unacked == 0 && q.ready == 0)
    })
    .await;
    assert!(acked.is_some(), "acked once the state is stored");
    worker.shutdown(WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_urls_fail_over_in_order_and_errors_hide_passwords() {
    if !require(Service::RabbitMq, "failover") {
        return;
    }
    assert!(machinery::broker::supported_schemes().contains(&"amqp://"));
    assert!(machinery::backend::supported_schemes().contains(&"amqps://"));

    let mut config = amqp::config("failover");
    let _cleanup = Cleanup::for_config(&config);
    config.multiple_broker_separator = "|".into();
    config.broker = format!("amqp://guest:hunter2secret@127.0.0.1:1/|{}", amqp::url());
    let s = Server::new(config.clone())
        .await
        .expect("the second URL answers");
    s.send(Signature::new("a")).await.unwrap();
    assert_eq!(queue_info(&config.default_queue).map(|q| q.ready), Some(1));

    config.broker = "amqp://guest:hunter2secret@127.0.0.1:1/".into();
    config.multiple_broker_separator.clear();
    let err = Server::new(config.clone()).await.unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(!text.contains("hunter2secret"), "{text}");
    assert!(text.contains("guest:***@127.0.0.1:1"), "{text}");

    // amqps:// speaks TLS: against the plain AMQP port the handshake fails, promptly and clearly.
    config.broker = amqp::url().replace("amqp://", "amqps://");
    let started = Instant::now();
    let err = Server::new(config.clone()).await.unwrap_err();
    assert!(
        matches!(err, Error::Broker(BrokerError::Connect { .. })),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );

    config.broker = amqp::url().replace("guest:guest", "guest:wrongpassword");
    let err = Server::new(config).await.unwrap_err();
    assert!(
        matches!(err, Error::Broker(BrokerError::Connect { .. })),
        "{err:?}"
    );
    let text = format!("{err} {err:?}");
    assert!(!text.contains("wrongpassword"), "{text}");
}

/// Runs a future to completion from synchronous code inside the test's multi-threaded runtime.
fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}
