//! `machinery web` against a real RabbitMQ (127.0.0.1:5672 unless `MACHINERY_TEST_AMQP_ADDR`): the counts
//! AMQP can give, a dash and a reason for those it cannot (delayed, in flight, workers), the actions, and
//! no password in any page or answer.
//!
//! The test has its own exchange and queues (`machinery_tests::amqp::config`) and deletes them at the end.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::find;
use common::web::WebServer;
use machinery::broker::ConsumeOptions;
use machinery::{Config, Server, Signature};
use machinery_tests::amqp::{self, queue_info, wait_for, Cleanup};
use machinery_tests::{require, Service};

const WAIT: Duration = Duration::from_secs(20);

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

async fn ready(queue: &str, ready: u64) {
    let seen = wait_for(WAIT, || (queue_info(queue)?.ready == ready).then_some(())).await;
    assert!(
        seen.is_some(),
        "queue {queue} never had {ready} ready messages: {:?}",
        queue_info(queue)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_counts_what_it_can_says_what_it_cannot_and_acts() {
    if !require(Service::RabbitMq, "web amqp") {
        return;
    }
    let config = amqp::config("web_amqp");
    let cleanup = Cleanup::for_config(&config);
    let q = config.default_queue.clone();
    let server = Server::new(config.clone()).await.unwrap();
    let mut uuids = Vec::new();
    for n in 0..3 {
        let sent = server
            .send(Signature::new("web_add").with_uuid(format!("task_{q}_{n}")))
            .await
            .unwrap();
        cleanup.queue(sent.uuid());
        uuids.push(sent.uuid().to_owned());
    }
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
        .dead_letter("unknown task name \"web_add\" (test)")
        .await
        .unwrap();
    consumer.close().await.unwrap();
    ready(&q, 2).await;

    let web = WebServer::start(&env(&config), &[]).await;
    let queues = web.get_json("/api/queues").await;
    let row = find(&queues, "name", &q);
    assert_eq!(
        (
            &row["pending"],
            &row["delayed"],
            &row["in_flight"],
            &row["dead"]
        ),
        (
            &serde_json::json!(2),
            &serde_json::Value::Null,
            &serde_json::Value::Null,
            &serde_json::json!(1)
        ),
        "{queues:#}"
    );
    let workers = web.get("/api/workers").await;
    assert_eq!(workers.status, 501, "{workers:?}");
    assert!(workers.json()["error"]
        .as_str()
        .unwrap()
        .contains("AMQP does not list the consumers"));
    let delayed = web.get("/api/delayed").await;
    assert_eq!(delayed.status, 501);

    let overview = web.get("/").await;
    assert_eq!(overview.status, 200);
    assert!(
        overview.body.contains("RabbitMQ cannot list its queues"),
        "{}",
        overview.body
    );
    assert!(overview.body.contains(&format!("data-queue=\"{q}\"")));
    let workers_page = web.get("/workers").await;
    assert!(workers_page
        .body
        .contains("AMQP does not list the consumers"));
    // Reading pending AMQP messages takes them: only on request.
    let page = web.get(&format!("/queues/{q}")).await;
    assert!(
        !page.body.contains(uuids[1].as_str()),
        "pending listed without asking"
    );
    assert!(
        page.body.contains(uuids[0].as_str()),
        "the dead letter is listed"
    );
    ready(&q, 2).await;
    let peeked = web.get(&format!("/queues/{q}?peek=1")).await;
    assert!(peeked.body.contains(uuids[1].as_str()) && peeked.body.contains(uuids[2].as_str()));

    // No password anywhere.
    let session = web.get_json("/api/session").await;
    assert_eq!(
        session["broker"].as_str().unwrap(),
        amqp::url().replace("guest:guest", "guest:***")
    );
    for response in [&overview, &workers_page, &page, &peeked] {
        assert!(
            !response.body.contains("guest:guest"),
            "a password in a page"
        );
    }

    // Requeue all, then purge.
    ready(&format!("{q}.dead"), 1).await;
    ready(&q, 2).await;
    let moved = web.act(&format!("/api/queues/{q}/dead/requeue"), "").await;
    assert_eq!(moved.status, 200, "{moved:?}");
    assert_eq!(moved.json()["requeued"], 1);
    ready(&q, 3).await;
    let row = find(&web.get_json("/api/queues").await, "name", &q).clone();
    assert_eq!(
        (&row["pending"], &row["dead"]),
        (&serde_json::json!(3), &serde_json::json!(0))
    );
    let purged = web.act(&format!("/api/queues/{q}/purge"), "").await;
    assert_eq!(purged.json()["purged"], 3);
    web.stop().await;
    drop(cleanup);
}
