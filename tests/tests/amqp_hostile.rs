//! Messages with large headers on RabbitMQ (issue 18, cases 1 and 2): a message published by another
//! client with headers larger than a small frame, and our own re-publish of a signature with large
//! `Headers`, both reach the worker and run; a retry whose headers can never fit in a frame fails the task
//! with the reason instead of looping; the queue keeps moving.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use lapin::types::FieldTable;
use machinery::{task, Signature, TaskContext, TaskError, Worker};
use machinery_tests::amqp::{self, queue_info, string, Cleanup, Rabbit};
use machinery_tests::tasks::probe;
use machinery_tests::{require, unique, Service};

const WAIT: Duration = Duration::from_secs(20);

/// Fails its first run (asking for a retry), succeeds on the second: the retry is a re-publish of the
/// whole signature, headers included.
#[task(name = "amqp_hostile_fails_once", retries = 1)]
async fn fails_once(ctx: &TaskContext, key: String) -> Result<String, TaskError> {
    static RUNS: AtomicU32 = AtomicU32::new(0);
    if RUNS.fetch_add(1, Ordering::SeqCst) == 0 {
        return Err(ctx.retry_after(Duration::from_millis(10)));
    }
    Ok(key)
}

/// Always fails, asking for its retries.
#[task(name = "amqp_hostile_always_fails", retries = 1)]
async fn always_fails(key: String) -> Result<String, TaskError> {
    Err(TaskError::new(format!("{key} fails")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_with_headers_over_16_kib_is_delivered_and_run() {
    if !require(Service::RabbitMq, "big headers") {
        return;
    }
    let config = amqp::config("bigheaders");
    let _cleanup = Cleanup::for_config(&config);
    let server = machinery::Server::new(config.clone()).await.unwrap();
    let worker = Worker::new(&server)
        .register(probe::task())
        .concurrency(2)
        .start()
        .await
        .unwrap();
    // Published as another client (Go's, at RabbitMQ's 128 KiB frames) would: a valid task, with an
    // AMQP header of 16,400 bytes.
    let key = unique("bigheaders");
    let mut signature = probe::signature(&key, 7, 0).erase();
    signature.uuid = unique("task_bigheaders");
    let body = signature.to_json().unwrap();
    let mut headers = FieldTable::default();
    headers.insert("big".into(), string(&"h".repeat(16_400)));
    let rabbit = Rabbit::connect().await;
    rabbit
        .publish(
            &config.amqp.exchange,
            &config.default_queue,
            &body,
            lapin::BasicProperties::default().with_headers(headers),
        )
        .await;
    let state = server
        .result::<i64>(signature.uuid.clone())
        .get(WAIT)
        .await
        .expect("the message with large headers runs");
    assert_eq!(state, 7);
    // The queue keeps moving, and nothing is left behind.
    let next = probe::send(&server, &key, 8, 0).await.unwrap();
    assert_eq!(next.get(WAIT).await.unwrap(), 8);
    assert_eq!(
        queue_info(&config.default_queue).map(|q| (q.ready, q.unacked)),
        Some((0, 0))
    );
    worker.shutdown(WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_signature_with_20_kb_headers_is_republished_and_succeeds() {
    if !require(Service::RabbitMq, "big signature headers") {
        return;
    }
    let config = amqp::config("bigsigheaders");
    let _cleanup = Cleanup::for_config(&config);
    let server = machinery::Server::new(config.clone()).await.unwrap();
    let worker = Worker::new(&server)
        .register(fails_once::task())
        .register(probe::task())
        .concurrency(2)
        .start()
        .await
        .unwrap();
    // Pushed raw, as another sender would: the body's `Headers` hold 20 KB; the worker's retry copies
    // them into the AMQP headers of its re-publish.
    let key = unique("bigsig");
    let mut signature: Signature = fails_once::signature(key.clone())
        .header("big", "h".repeat(20_000))
        .erase();
    signature.uuid = unique("task_bigsig");
    Rabbit::connect()
        .await
        .publish(
            &config.amqp.exchange,
            &config.default_queue,
            &signature.to_json().unwrap(),
            lapin::BasicProperties::default(),
        )
        .await;
    let result = server.result::<String>(signature.uuid.clone());
    assert_eq!(
        result.get(WAIT).await.expect("the retry is re-published"),
        key
    );
    let next = probe::send(&server, &key, 9, 0).await.unwrap();
    assert_eq!(next.get(WAIT).await.unwrap(), 9);
    worker.shutdown(WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_whose_headers_can_never_fit_a_frame_fails_the_task_with_the_reason() {
    if !require(Service::RabbitMq, "headers over a frame") {
        return;
    }
    let config = amqp::config("hugeheaders");
    let _cleanup = Cleanup::for_config(&config);
    let server = machinery::Server::new(config.clone()).await.unwrap();
    let worker = Worker::new(&server)
        .register(always_fails::task())
        .register(probe::task())
        .concurrency(2)
        .start()
        .await
        .unwrap();
    // The body carries `Headers` of 200 KB (a body may be any size); a re-publish copies them into the
    // AMQP headers, which must fit in one 128 KiB frame.
    let key = unique("hugeheaders");
    let mut signature = always_fails::signature(key.clone())
        .header("big", "h".repeat(200_000))
        .erase();
    signature.uuid = unique("task_hugeheaders");
    let body = signature.to_json().unwrap();
    Rabbit::connect()
        .await
        .publish(
            &config.amqp.exchange,
            &config.default_queue,
            &body,
            lapin::BasicProperties::default(),
        )
        .await;
    let error = server
        .result::<String>(signature.uuid.clone())
        .get(WAIT)
        .await
        .expect_err("the task fails");
    let text = error.to_string();
    assert!(text.contains(&format!("{key} fails")), "{text}");
    assert!(text.contains("do not fit in one AMQP frame"), "{text}");
    let next = probe::send(&server, &key, 11, 0).await.unwrap();
    assert_eq!(next.get(WAIT).await.unwrap(), 11);
    assert_eq!(
        queue_info(&config.default_queue).map(|q| (q.ready, q.unacked)),
        Some((0, 0)),
        "nothing loops"
    );
    worker.shutdown(WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_that_is_not_json_is_not_labelled_json() {
    if !require(Service::RabbitMq, "dead letter content type") {
        return;
    }
    let config = amqp::config("deadtype");
    let _cleanup = Cleanup::for_config(&config);
    let server = machinery::Server::new(config.clone()).await.unwrap();
    let worker = Worker::new(&server)
        .register(probe::task())
        .start()
        .await
        .unwrap();
    let rabbit = Rabbit::connect().await;
    rabbit
        .publish(
            "",
            &config.default_queue,
            b"\xff not json",
            lapin::BasicProperties::default().with_content_type("application/json".into()),
        )
        .await;
    let key = unique("deadtype");
    let next = probe::send(&server, &key, 3, 0).await.unwrap();
    assert_eq!(next.get(WAIT).await.unwrap(), 3);
    worker.shutdown(WAIT).await.unwrap();
    let dead_queue = format!("{}.dead", config.default_queue);
    let letter = rabbit.take(&dead_queue).await.expect("a dead letter");
    assert_eq!(letter.data, b"\xff not json");
    assert_eq!(
        letter
            .properties
            .content_type()
            .as_ref()
            .map(|t| t.as_str().to_owned()),
        Some("application/octet-stream".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_id_no_queue_can_be_named_after_is_dead_lettered_and_does_not_loop() {
    if !require(Service::RabbitMq, "long task id") {
        return;
    }
    // The AMQP result backend keeps each state in a queue named by the task id; RabbitMQ names are at
    // most 255 bytes.
    let config = amqp::config("longid");
    let _cleanup = Cleanup::for_config(&config);
    let server = machinery::Server::new(config.clone()).await.unwrap();
    let worker = Worker::new(&server)
        .register(probe::task())
        .start()
        .await
        .unwrap();
    let key = unique("longid");
    let mut signature = probe::signature(&key, 4, 0).erase();
    signature.uuid = format!("task_{}", "x".repeat(300));
    Rabbit::connect()
        .await
        .publish(
            &config.amqp.exchange,
            &config.default_queue,
            &signature.to_json().unwrap(),
            lapin::BasicProperties::default(),
        )
        .await;
    let inspect = server.broker().inspect().unwrap();
    machinery_tests::eventually(WAIT, || async {
        !inspect
            .dead_letters(&config.default_queue, 10)
            .await
            .unwrap()
            .is_empty()
    })
    .await;
    let dead = inspect
        .dead_letters(&config.default_queue, 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1, "dead-lettered within {WAIT:?}");
    assert!(
        dead[0].reason.contains("cannot be stored"),
        "{}",
        dead[0].reason
    );
    let next = probe::send(&server, &key, 5, 0).await.unwrap();
    assert_eq!(next.get(WAIT).await.unwrap(), 5);
    assert_eq!(
        queue_info(&config.default_queue).map(|q| (q.ready, q.unacked)),
        Some((0, 0)),
        "nothing loops"
    );
    worker.shutdown(WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_delays_wait_in_a_queue_that_outlives_them() {
    if !require(Service::RabbitMq, "short delays") {
        return;
    }
    // Go's delay queue expires twice its delay after it is declared: for 10 ms, a loaded broker could
    // delete it, message and all, before the message was dead-lettered (a retry of 10 ms was once lost
    // here). Delays under a second wait in a queue of our own that lives 10 s.
    let config = amqp::config("shortdelay");
    let _cleanup = Cleanup::for_config(&config);
    let server = machinery::Server::new(config.clone()).await.unwrap();
    let key = unique("shortdelay");
    let mut results = Vec::new();
    for n in 0..30 {
        let signature = probe::signature(&key, n, 0).countdown(Duration::from_millis(200));
        results.push((n, server.send(signature).await.unwrap()));
    }
    let delay = machinery_tests::amqp::queues_containing(&config.amqp.exchange)
        .into_iter()
        .find(|q| q.name.starts_with("machinery.delay."))
        .expect("a short-delay queue");
    assert_eq!(
        delay.arguments["x-expires"],
        serde_json::json!(["long", 10_000]),
        "{:?}",
        delay.arguments
    );
    let worker = Worker::new(&server)
        .register(probe::task())
        .concurrency(4)
        .start()
        .await
        .unwrap();
    for (n, result) in results {
        assert_eq!(result.get(WAIT).await.unwrap(), n);
    }
    worker.shutdown(WAIT).await.unwrap();
}
