//! The `machinery` binary against a real RabbitMQ (127.0.0.1:5672 unless `MACHINERY_TEST_AMQP_ADDR`), with
//! the AMQP broker and the AMQP result backend: what AMQP can answer (counts of ready messages and dead
//! letters, pending, dead, requeue, purge, send, task) and the clear errors for what it cannot (delayed
//! messages, workers, listing queues).
//!
//! Each test has its own exchange and queues (`machinery_tests::amqp::config`) and deletes them, and the
//! per-task result queues, at the end.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{machinery, row, Run};
use machinery::broker::ConsumeOptions;
use machinery::{task, Config, Server, Signature, TaskError, Worker};
use machinery_tests::amqp::{self, queue_info, wait_for, Cleanup};
use machinery_tests::{require, Service};

const WAIT: Duration = Duration::from_secs(20);

/// Sums its arguments.
#[task(name = "cli_add")]
async fn cli_add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

/// The environment that gives the binary `config`.
fn env(config: &Config) -> HashMap<String, String> {
    [
        ("BROKER", config.broker.clone()),
        ("RESULT_BACKEND", config.result_backend.clone()),
        ("DEFAULT_QUEUE", config.default_queue.clone()),
        ("AMQP_EXCHANGE", config.amqp.exchange.clone()),
        ("AMQP_BINDING_KEY", config.amqp.binding_key.clone()),
        ("RESULTS_EXPIRE_IN", config.results_expire_in.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

async fn run(config: &Config, args: &[&str]) -> Run {
    machinery(args, &env(config)).await
}

/// Waits until RabbitMQ reports `ready` ready messages in `queue` (peeked messages go back on close).
async fn ready(queue: &str, ready: u64) {
    let seen = wait_for(WAIT, || (queue_info(queue)?.ready == ready).then_some(())).await;
    assert!(
        seen.is_some(),
        "queue {queue} never had {ready} ready messages: {:?}",
        queue_info(queue)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_counts_lists_requeues_and_purges_and_says_what_it_cannot_answer() {
    if !require(Service::RabbitMq, "cli amqp inspection") {
        return;
    }
    let config = amqp::config("cli_inspect");
    let cleanup = Cleanup::for_config(&config);
    let q = config.default_queue.clone();
    let server = Server::new(config.clone()).await.unwrap();
    let mut uuids = Vec::new();
    for n in 0..3 {
        let sent = server
            .send(Signature::new("cli_add").with_uuid(format!("task_{q}_{n}")))
            .await
            .unwrap();
        uuids.push(sent.uuid().to_owned());
        cleanup.queue(sent.uuid());
    }
    // The first message is dead-lettered by a consumer, which then closes (returning anything prefetched).
    let mut consumer = server
        .broker()
        .consume(ConsumeOptions {
            queue: q.clone(),
            consumer_tag: format!("{q}_tag"),
            concurrency: 1,
            prefetch: 1,
        })
        .await
        .unwrap();
    let mut batch = tokio::time::timeout(WAIT, consumer.next_batch(1))
        .await
        .unwrap()
        .unwrap();
    batch
        .pop()
        .unwrap()
        .dead_letter("unknown task name \"cli_add\" (test)")
        .await
        .unwrap();
    consumer.close().await.unwrap();
    ready(&q, 2).await;

    // queues: AMQP cannot list queues, so the default one is shown with a note; delayed and in-flight
    // counts are unknown.
    let table = run(&config, &["queues"]).await;
    assert!(
        table.stderr.contains("the amqp broker cannot list queues"),
        "{table:#?}"
    );
    assert_eq!(row(table.ok(), &q), [q.as_str(), "2", "-", "-", "1"]);
    let json = run(&config, &["queues", "--json", "--queue", &q])
        .await
        .json();
    assert_eq!(
        json,
        serde_json::json!([{"queue": q, "name": q, "pending": 2, "delayed": null, "in_flight": null, "dead": 1}])
    );

    // pending and dead peek, and the messages go back.
    let pending = run(&config, &["pending", &q, "--json"]).await.json();
    let listed: Vec<&str> = pending
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["uuid"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [uuids[1].as_str(), uuids[2].as_str()]);
    ready(&q, 2).await;
    let table = run(&config, &["pending", &q, "--limit", "1"]).await;
    assert_eq!(row(table.ok(), "1"), ["1", uuids[1].as_str(), "cli_add"]);
    ready(&q, 2).await;

    let dead = run(&config, &["dead", &q, "--json"]).await.json();
    assert_eq!(dead[0]["uuid"], uuids[0].as_str());
    assert_eq!(dead[0]["reason"], "unknown task name \"cli_add\" (test)");
    assert_eq!(dead[0]["queue"], q.as_str());
    let table = run(&config, &["dead", &q]).await;
    assert!(table
        .ok()
        .lines()
        .nth(1)
        .unwrap()
        .ends_with("unknown task name \"cli_add\" (test)"));
    ready(&format!("{q}.dead"), 1).await;

    // requeue: by id, then nothing left to move.
    run(&config, &["requeue", &q, "task_nobody"])
        .await
        .fails(1, "has no dead letter of task task_nobody");
    ready(&format!("{q}.dead"), 1).await;
    let moved = run(&config, &["requeue", &q, &uuids[0], "--json"])
        .await
        .json();
    assert_eq!(moved, serde_json::json!({"queue": q, "requeued": 1}));
    ready(&q, 3).await;
    let requeued = run(&config, &["pending", &q, "--json"]).await.json();
    assert_eq!(requeued[2]["uuid"], uuids[0].as_str(), "at the tail");
    assert!(
        requeued[2]["message"]["Headers"]
            .get("machinery_dead_letter_reason")
            .is_none(),
        "{requeued:#}"
    );
    ready(&q, 3).await;
    let none = run(&config, &["requeue", &q, "--all"]).await;
    assert_eq!(
        none.ok(),
        format!("requeued 0 dead letters onto queue {q}\n")
    );

    // purge
    run(&config, &["purge", &q]).await.fails(2, "--yes");
    let purged = run(&config, &["purge", &q, "--yes"]).await;
    assert_eq!(purged.ok(), format!("purged 3 messages from queue {q}\n"));

    // What AMQP cannot answer, and why.
    run(&config, &["delayed"]).await.fails(
        1,
        "listing delayed messages: the amqp broker cannot answer this: RabbitMQ parks delayed messages in per-delay queues",
    );
    run(&config, &["workers"]).await.fails(
        1,
        "listing workers: the amqp broker cannot answer this: AMQP does not list the consumers of a queue",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_requeue_all_moves_every_dead_letter() {
    if !require(Service::RabbitMq, "cli amqp requeue all") {
        return;
    }
    let config = amqp::config("cli_requeue");
    let cleanup = Cleanup::for_config(&config);
    let q = config.default_queue.clone();
    let server = Server::new(config.clone()).await.unwrap();
    for n in 0..5 {
        let sent = server
            .send(Signature::new("nobody_knows_me").with_uuid(format!("task_{q}_{n}")))
            .await
            .unwrap();
        cleanup.queue(sent.uuid());
    }
    let mut consumer = server
        .broker()
        .consume(ConsumeOptions {
            queue: q.clone(),
            consumer_tag: format!("{q}_tag"),
            concurrency: 5,
            prefetch: 5,
        })
        .await
        .unwrap();
    let mut taken = Vec::new();
    while taken.len() < 5 {
        taken.extend(
            tokio::time::timeout(WAIT, consumer.next_batch(5 - taken.len()))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    for delivery in taken {
        delivery.dead_letter("test").await.unwrap();
    }
    consumer.close().await.unwrap();
    ready(&format!("{q}.dead"), 5).await;

    let text = run(&config, &["requeue", &q, "--all"]).await;
    assert_eq!(
        text.ok(),
        format!("requeued 5 dead letters onto queue {q}\n")
    );
    ready(&q, 5).await;
    ready(&format!("{q}.dead"), 0).await;
    let pending = run(&config, &["pending", &q, "--json"]).await.json();
    let uuids: Vec<String> = pending
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["uuid"].as_str().unwrap().to_owned())
        .collect();
    let expected: Vec<String> = (0..5).map(|n| format!("task_{q}_{n}")).collect();
    assert_eq!(uuids, expected, "in their original order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_send_waits_for_the_result_and_task_reads_it_from_the_amqp_backend() {
    if !require(Service::RabbitMq, "cli amqp send") {
        return;
    }
    let config = amqp::config("cli_send");
    let cleanup = Cleanup::for_config(&config);
    let server = Server::new(config.clone()).await.unwrap();
    let worker = Worker::auto(&server).concurrency(2).start().await.unwrap();

    let json = run(
        &config,
        &[
            "send",
            "cli_add",
            "--json",
            "--wait",
            "20",
            "--args",
            r#"[{"Type":"int64","Value":40},{"Type":"int64","Value":2}]"#,
        ],
    )
    .await
    .json();
    let uuid = json["uuid"].as_str().unwrap().to_owned();
    cleanup.queue(&uuid);
    assert_eq!(json["queue"], config.amqp.binding_key.as_str());
    assert_eq!(json["state"]["State"], "SUCCESS");
    assert_eq!(json["state"]["Results"][0]["Value"], 42);

    let text = run(&config, &["task", &uuid]).await;
    assert!(text.ok().contains("State:   SUCCESS"), "{text:#?}");
    assert!(text.ok().contains("Results: 42 (int64)"), "{text:#?}");

    // A delayed send goes out (RabbitMQ's delay queue), even though `delayed` cannot list it.
    let later = run(
        &config,
        &["send", "cli_add", "--countdown", "600", "--json"],
    )
    .await
    .json();
    cleanup.queue(later["uuid"].as_str().unwrap());
    assert!(later["eta"].is_string());
    worker.shutdown(WAIT).await.unwrap();
}
