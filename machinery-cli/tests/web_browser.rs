//! The dashboard in a real browser: headless Chromium driven over WebDriver (one session for the whole
//! file: a browser is slow to start). Against a real Redis: the overview shows a queue with its counts,
//! its dead letters open from there, "Requeue all" asks for confirmation and, once confirmed, the counts
//! change without a reload. A screenshot of each page goes to `target/web-screenshots/`.
//!
//! A missing browser fails the test (it never skips): `scripts/services.sh up` installs it.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use common::web::WebServer;
use common::webdriver::Browser;
use machinery::broker::ConsumeOptions;
use machinery::{task, Arg, Config, Server, Signature, TaskError, Worker};
use machinery_tests::{require, unique, Service};
use redis::AsyncCommands as _;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// Multiplies its arguments.
#[task(name = "web_mul")]
async fn web_mul(a: i64, b: i64) -> Result<i64, TaskError> {
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(a * b)
}

fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/web-screenshots")
}

fn mul(a: i64, b: i64) -> Vec<Arg> {
    vec![
        Arg::new("a", "int64", json!(a)),
        Arg::new("b", "int64", json!(b)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_browser_requeues_dead_letters_without_a_reload() {
    if !require(Service::Redis, "web browser") {
        return;
    }
    let browser = Browser::start().await;
    let id = unique("web_ui");
    let q = format!("{id}_orders");
    let busy = format!("{id}_emails");
    let delayed_key = format!("{id}_delayed");
    let url = Service::Redis.url();
    let mut config = Config::new(url.clone(), url.clone()).with_default_queue(&q);
    config.redis.delayed_tasks_key = delayed_key.clone();
    config.redis.heartbeat_timeout = 5000;
    config.results_expire_in = 300;
    let server = Server::new(config).await.unwrap();

    // Three dead letters and two pending tasks on `q`, one delayed; a worker busy on another queue.
    let send = |queue: &str, n: i64| {
        Signature::with_args("web_mul", mul(n, 7))
            .with_uuid(format!("task_{id}_{queue}_{n}"))
            .routing_key(queue)
    };
    for n in 0..3 {
        server.send(send(&q, n)).await.unwrap();
    }
    let mut consumer = server
        .broker()
        .consume(ConsumeOptions {
            queue: q.clone(),
            consumer_tag: format!("{id}_tag"),
            concurrency: 3,
            prefetch: 3,
        })
        .await
        .unwrap();
    let mut dead = Vec::new();
    while dead.len() < 3 {
        dead.extend(
            tokio::time::timeout(WAIT, consumer.next_batch(3))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    for delivery in dead {
        delivery
            .dead_letter("unknown task name \"web_mul\" (the worker of this queue was too old)")
            .await
            .unwrap();
    }
    consumer.close().await.unwrap();
    for n in 3..5 {
        server.send(send(&q, n)).await.unwrap();
    }
    let task_id = format!("task_{id}_{q}_3");
    server
        .send(send(&q, 9).eta(chrono::Utc::now() + chrono::Duration::minutes(10)))
        .await
        .unwrap();
    let worker = Worker::new(&server)
        .register(web_mul::task())
        .queue(&busy)
        .concurrency(4)
        .start()
        .await
        .unwrap();

    let env: HashMap<String, String> = [
        ("BROKER", url.as_str()),
        ("RESULT_BACKEND", url.as_str()),
        ("DEFAULT_QUEUE", q.as_str()),
        ("REDIS_DELAYED_TASKS_KEY", delayed_key.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let web = WebServer::start(&env, &[]).await;
    // Some work for the charts: tasks finish on `busy` while the sampler runs.
    for round in 0..4 {
        for n in 0..10 {
            server.send(send(&busy, round * 10 + n)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }

    // The overview: the queue with its counts.
    browser.goto(&web.url("/")).await;
    let row = format!("tr[data-queue=\"{q}\"]");
    browser
        .wait_for_text(&format!("{row} td[data-field=\"dead\"]"), "3", WAIT)
        .await;
    browser
        .wait_for_text(&format!("{row} td[data-field=\"pending\"]"), "2", WAIT)
        .await;
    browser
        .wait_for_text(&format!("{row} td[data-field=\"delayed\"]"), "1", WAIT)
        .await;
    browser
        .screenshot(&screenshots().join("overview.png"))
        .await;

    // Its dead letters, from the count.
    let link = browser
        .wait_for(&format!("{row} td[data-field=\"dead\"] a"), WAIT)
        .await;
    browser.click(&link).await;
    browser.wait_for("#dead-letters", WAIT).await;
    assert_eq!(browser.find_all("#dead-letters tbody tr").await.len(), 3);
    browser
        .wait_for_text("#counts dd[data-field=\"dead\"]", "3", WAIT)
        .await;
    browser.screenshot(&screenshots().join("queue.png")).await;

    // "Requeue all", confirmed in the dialog; the counts change in place.
    browser
        .execute("window.notReloaded = true;", json!([]))
        .await;
    let requeue = browser
        .wait_for("#dead form.action button.primary", WAIT)
        .await;
    assert_eq!(browser.text(&requeue).await, "Requeue all");
    browser.click(&requeue).await;
    browser.wait_for("dialog#confirm[open]", WAIT).await;
    let question = browser.wait_for("dialog#confirm .message", WAIT).await;
    assert!(browser
        .text(&question)
        .await
        .contains("Requeue every dead letter"));
    browser.screenshot(&screenshots().join("confirm.png")).await;
    let ok = browser.wait_for("#confirm-ok", WAIT).await;
    browser.click(&ok).await;
    browser
        .wait_for_text("#counts dd[data-field=\"dead\"]", "0", WAIT)
        .await;
    browser
        .wait_for_text("#counts dd[data-field=\"pending\"]", "5", WAIT)
        .await;
    browser.wait_for("#no-dead", WAIT).await;
    let flash = browser.wait_for("#flash", WAIT).await;
    assert_eq!(
        browser.text(&flash).await,
        format!("requeued 3 dead letters onto queue {q}")
    );
    assert_eq!(
        browser
            .execute("return window.notReloaded === true;", json!([]))
            .await,
        json!(true),
        "the page was reloaded"
    );
    browser
        .screenshot(&screenshots().join("queue-after-requeue.png"))
        .await;

    // The workers, and a task.
    browser.goto(&web.url("/workers")).await;
    browser
        .wait_for(
            &format!("tr[data-consumer] a[href=\"/queues/{busy}\"]"),
            WAIT,
        )
        .await;
    browser.screenshot(&screenshots().join("workers.png")).await;
    browser
        .goto(&web.url(&format!("/tasks/{task_id}?queue={q}")))
        .await;
    browser
        .wait_for_text("td[data-field=\"state\"]", "PENDING", WAIT)
        .await;
    browser.screenshot(&screenshots().join("task.png")).await;
    browser.goto(&web.url("/")).await;
    browser.wait_for("#throughput-chart polyline", WAIT).await;
    browser
        .screenshot(&screenshots().join("overview.png"))
        .await;
    browser.quit().await;

    worker.shutdown(Duration::from_secs(10)).await.unwrap();
    web.stop().await;
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut keys: Vec<String> = Vec::new();
    let mut iter: redis::AsyncIter<String> = conn.scan_match(format!("*{id}*")).await.unwrap();
    while let Some(key) = iter.next_item().await {
        keys.push(key.unwrap());
    }
    drop(iter);
    if !keys.is_empty() {
        let _: () = conn.del(keys).await.unwrap();
    }
}
