//! `machinery web` against a real Redis: the JSON API and the pages count what was queued, the actions do
//! what they say, workers report their counters, and the guards hold (no token: 401; no CSRF token: 403;
//! a foreign Host: 403; a non-loopback address without a token: refused).
//!
//! Each test has its own queues and delayed-task key (names containing a unique id) and deletes every key
//! with that id at the end.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::web::{request, WebServer};
use common::{find, machinery};
use machinery::broker::{ConsumeOptions, Consumer};
use machinery::{task, Config, Server, Signature, TaskError, Worker};
use machinery_tests::{eventually, require, unique, Service};
use redis::AsyncCommands as _;

const WAIT: Duration = Duration::from_secs(20);

/// Sums its arguments.
#[task(name = "web_add")]
async fn web_add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

/// Always fails.
#[task(name = "web_fail")]
async fn web_fail() -> Result<i64, TaskError> {
    Err(TaskError::new("boom: this task always fails"))
}

struct World {
    id: String,
    queue: String,
    env: HashMap<String, String>,
    server: Server,
}

impl World {
    async fn new(prefix: &str) -> World {
        let id = unique(prefix);
        let queue = format!("{id}_q");
        let delayed = format!("{id}_delayed");
        let url = Service::Redis.url();
        let env = [
            ("BROKER", url.as_str()),
            ("RESULT_BACKEND", url.as_str()),
            ("DEFAULT_QUEUE", queue.as_str()),
            ("REDIS_DELAYED_TASKS_KEY", delayed.as_str()),
            ("RESULTS_EXPIRE_IN", "300"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let mut config = Config::new(url.clone(), url).with_default_queue(&queue);
        config.redis.delayed_tasks_key = delayed;
        config.redis.heartbeat_timeout = 5000;
        config.results_expire_in = 300;
        let server = Server::new(config).await.unwrap();
        World {
            id,
            queue,
            env,
            server,
        }
    }

    async fn send(
        &self,
        queue: &str,
        n: usize,
        eta: Option<chrono::DateTime<chrono::Utc>>,
    ) -> String {
        let args = vec![
            machinery::Arg::new("", "int64", serde_json::json!(1)),
            machinery::Arg::new("", "int64", serde_json::json!(2)),
        ];
        let mut signature = Signature::with_args("web_add", args)
            .with_uuid(format!("task_{}_{n}", self.id))
            .routing_key(queue);
        if let Some(eta) = eta {
            signature = signature.eta(eta);
        }
        self.server.send(signature).await.unwrap().uuid().to_owned()
    }

    async fn consumer(&self, queue: &str) -> Box<dyn Consumer> {
        self.server
            .broker()
            .consume(ConsumeOptions {
                queue: queue.into(),
                consumer_tag: format!("{}_tag", self.id),
                concurrency: 10,
                prefetch: 10,
            })
            .await
            .unwrap()
    }

    async fn cleanup(&self) {
        let mut conn = redis::Client::open(Service::Redis.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let mut keys: Vec<String> = Vec::new();
        let mut iter: redis::AsyncIter<String> =
            conn.scan_match(format!("*{}*", self.id)).await.unwrap();
        while let Some(key) = iter.next_item().await {
            keys.push(key.unwrap());
        }
        drop(iter);
        if !keys.is_empty() {
            let _: () = conn.del(keys).await.unwrap();
        }
    }
}

fn queue_row(queues: &serde_json::Value, name: &str) -> serde_json::Value {
    find(queues, "name", name).clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_and_pages_count_what_was_queued_and_the_actions_do_what_they_say() {
    if !require(Service::Redis, "web redis") {
        return;
    }
    let w = World::new("web_api").await;
    let q = w.queue.clone();
    // Two messages dead-lettered by a consumer, then three pending and one delayed.
    let dead: Vec<String> = vec![w.send(&q, 0, None).await, w.send(&q, 1, None).await];
    let mut consumer = w.consumer(&q).await;
    let batch = tokio::time::timeout(WAIT, consumer.next_batch(2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(batch.len(), 2);
    for delivery in batch {
        delivery
            .dead_letter("unknown task name \"web_add\" (test)")
            .await
            .unwrap();
    }
    consumer.close().await.unwrap();
    let mut pending = Vec::new();
    for n in 2..5 {
        pending.push(w.send(&q, n, None).await);
    }
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let delayed = w.send(&q, 5, Some(later)).await;

    let web = WebServer::start(&w.env, &[]).await;
    let queues = web.get_json("/api/queues").await;
    let row = queue_row(&queues, &q);
    assert_eq!(
        (
            &row["pending"],
            &row["delayed"],
            &row["in_flight"],
            &row["dead"]
        ),
        (
            &serde_json::json!(3),
            &serde_json::json!(1),
            &serde_json::json!(0),
            &serde_json::json!(2)
        ),
        "{row:#}"
    );
    assert_eq!(row["queue"], q.as_str(), "the CLI's field name too");

    // The same counts on the overview page, and the lists on the queue page.
    let overview = web.get("/").await;
    assert_eq!(overview.status, 200);
    assert!(
        overview.body.contains(&format!("data-queue=\"{q}\"")),
        "{}",
        overview.body
    );
    assert!(overview.body.contains("id=\"depth-chart\""));
    let page = web.get(&format!("/queues/{q}")).await;
    assert_eq!(page.status, 200);
    for uuid in dead.iter().chain(&pending).chain([&delayed]) {
        assert!(page.body.contains(uuid.as_str()), "queue page lacks {uuid}");
    }
    assert!(page
        .body
        .contains("unknown task name &quot;web_add&quot; (test)"));

    let letters = web.get_json(&format!("/api/queues/{q}/dead")).await;
    assert_eq!(letters.as_array().unwrap().len(), 2);
    assert_eq!(letters[0]["uuid"], dead[0].as_str());
    assert_eq!(letters[0]["reason"], "unknown task name \"web_add\" (test)");
    let listed = web
        .get_json(&format!("/api/queues/{q}/pending?limit=2"))
        .await;
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert_eq!(listed[0]["uuid"], pending[0].as_str());

    // A task: its state and its message, found where it waits.
    let task = web.get_json(&format!("/api/tasks/{}", pending[0])).await;
    assert_eq!(task["state"]["State"], "PENDING");
    assert_eq!(task["found_in"], "pending");
    let task_page = web.get(&format!("/tasks/{}?queue={q}", delayed)).await;
    assert_eq!(task_page.status, 200);
    assert!(
        task_page.body.contains("delayed in queue"),
        "{}",
        task_page.body
    );
    assert_eq!(web.get("/api/tasks/task_nope_never").await.status, 404);

    // What a running task reported with `ctx.set_progress` shows in the API and on its page.
    let progressing = format!("task_{}_progress", w.id);
    let progress = serde_json::json!({"done": 3, "total": 7});
    w.server
        .backend()
        .set_state(&machinery::TaskState::progress(
            &progressing,
            "web_add",
            progress.clone(),
        ))
        .await
        .unwrap();
    let task = web.get_json(&format!("/api/tasks/{progressing}")).await;
    assert_eq!(task["state"]["State"], "STARTED");
    assert_eq!(task["state"]["Progress"], progress);
    let task_page = web.get(&format!("/tasks/{progressing}?queue={q}")).await;
    assert!(
        task_page.body.contains(
            r#"data-field="progress"><code>{&quot;done&quot;:3,&quot;total&quot;:7}</code>"#
        ),
        "{}",
        task_page.body
    );

    // Nothing changes on GET.
    assert_eq!(web.get(&format!("/api/queues/{q}/purge")).await.status, 405);
    // A POST without the CSRF token is refused, and changes nothing.
    let refused = request(
        &web.addr,
        "POST",
        &format!("/api/queues/{q}/dead/requeue"),
        &[],
        b"",
    )
    .await;
    assert_eq!(refused.status, 403, "{refused:?}");
    // A plain form without confirmation gets the confirmation page, and changes nothing either.
    let csrf = web.get_json("/api/session").await["csrf"]
        .as_str()
        .unwrap()
        .to_owned();
    let form = format!("csrf={csrf}");
    let confirm = request(
        &web.addr,
        "POST",
        &format!("/api/queues/{q}/dead/requeue"),
        &[
            ("Accept", "text/html"),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        form.as_bytes(),
    )
    .await;
    assert_eq!(confirm.status, 200);
    assert!(
        confirm.body.contains("Requeue every dead letter"),
        "{}",
        confirm.body
    );
    assert_eq!(queue_row(&web.get_json("/api/queues").await, &q)["dead"], 2);

    // Requeue one, delete one, revoke one, purge.
    let moved = web
        .act(
            &format!("/api/queues/{q}/dead/requeue"),
            &format!("uuid={}", dead[0]),
        )
        .await;
    assert_eq!(moved.status, 200, "{moved:?}");
    assert_eq!(moved.json()["requeued"], 1);
    let deleted = web
        .act(
            &format!("/api/queues/{q}/dead/delete"),
            &format!("uuid={}", dead[1]),
        )
        .await;
    assert_eq!(deleted.json()["deleted"], 1);
    let row = queue_row(&web.get_json("/api/queues").await, &q);
    assert_eq!(
        (&row["pending"], &row["dead"]),
        (&serde_json::json!(4), &serde_json::json!(0))
    );
    let again = web
        .act(
            &format!("/api/queues/{q}/dead/delete"),
            &format!("uuid={}", dead[1]),
        )
        .await;
    assert_eq!(again.status, 404);
    let revoked = web
        .act(&format!("/api/tasks/{}/revoke", pending[1]), "")
        .await;
    assert_eq!(revoked.json()["revoked"], true);
    let state = web.get_json(&format!("/api/tasks/{}", pending[1])).await;
    assert_eq!(state["state"]["State"], "FAILURE");
    assert!(state["state"]["Error"]
        .as_str()
        .unwrap()
        .contains("revoked"));
    let purged = web.act(&format!("/api/queues/{q}/purge"), "").await;
    assert_eq!(purged.json()["purged"], 4);
    let row = queue_row(&web.get_json("/api/queues").await, &q);
    assert_eq!(
        (&row["pending"], &row["delayed"]),
        (&serde_json::json!(0), &serde_json::json!(1))
    );

    web.stop().await;
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_report_host_pid_and_counters_and_the_rates_follow() {
    if !require(Service::Redis, "web workers") {
        return;
    }
    let w = World::new("web_workers").await;
    let q = w.queue.clone();
    let running = Worker::new(&w.server)
        .register(web_add::task())
        .register(web_fail::task())
        .concurrency(3)
        .start()
        .await
        .unwrap();
    let web = WebServer::start(&w.env, &[]).await;
    for n in 0..4 {
        w.send(&q, n, None).await;
    }
    w.server
        .send(Signature::new("web_fail").with_uuid(format!("task_{}_f", w.id)))
        .await
        .unwrap();
    let seen = std::sync::Mutex::new(serde_json::Value::Null);
    let counted = eventually(WAIT, || async {
        let workers = web.get_json("/api/workers").await;
        let hit =
            workers.as_array().unwrap().iter().any(|row| {
                row["queue"] == q.as_str() && row["processed"] == 5 && row["failed"] == 1
            });
        *seen.lock().unwrap() = workers;
        hit
    })
    .await;
    let seen = seen.into_inner().unwrap();
    assert!(
        counted,
        "the worker's card never counted 5 processed, 1 failed: {seen:#}"
    );
    let mine = find(&seen, "queue", &q);
    assert_eq!(mine["alive"], true);
    assert_eq!(mine["pid"], std::process::id());
    assert_eq!(mine["concurrency"], 3);
    assert!(!mine["host"].as_str().unwrap().is_empty());
    let page = web.get("/workers").await;
    assert!(
        page.body.contains(&format!("{}", std::process::id())),
        "{}",
        page.body
    );

    // The sampler saw the tasks finish: the rates are above zero for a minute.
    let rated = eventually(WAIT, || async {
        let row = queue_row(&web.get_json("/api/queues").await, &q);
        row["succeeded_per_min"].as_f64().is_some_and(|r| r > 0.0)
            && row["failed_per_min"].as_f64().is_some_and(|r| r > 0.0)
    })
    .await;
    assert!(rated, "{:#}", web.get_json("/api/queues").await);

    // A worker that stops says goodbye: it is no longer listed.
    running.shutdown(Duration::from_secs(10)).await.unwrap();
    let gone = eventually(WAIT, || async {
        !web.get_json("/api/workers")
            .await
            .as_array()
            .unwrap()
            .iter()
            .any(|row| row["queue"] == q.as_str())
    })
    .await;
    assert!(gone);

    // A worker that died (its heartbeat lapsed, its card still there) is shown as gone with its last
    // counters; a dead consumer with neither a card nor messages is dropped.
    let mut conn = redis::Client::open(Service::Redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let dead_tag = format!("{}_crashed", w.id);
    let beat = chrono::Utc::now().timestamp_millis() - 30_000;
    let card = serde_json::json!({"host": "box-7", "pid": 4242, "concurrency": 8, "running": 1,
        "succeeded": 40, "failed": 2, "started_ms": beat - 60_000, "beat_ms": beat});
    let _: () = conn
        .set_ex(
            format!("machinery:worker:{q}:{dead_tag}"),
            card.to_string(),
            60,
        )
        .await
        .unwrap();
    let forgotten = format!("{}_forgotten", w.id);
    let _: () = conn
        .sadd(format!("machinery:consumers:{q}"), &forgotten)
        .await
        .unwrap();
    let workers = web.get_json("/api/workers").await;
    let crashed = find(&workers, "consumer_tag", &dead_tag);
    assert_eq!(
        (
            &crashed["alive"],
            &crashed["host"],
            &crashed["pid"],
            &crashed["processed"],
            &crashed["failed"]
        ),
        (
            &serde_json::json!(false),
            &serde_json::json!("box-7"),
            &serde_json::json!(4242),
            &serde_json::json!(42),
            &serde_json::json!(2)
        ),
        "{workers:#}"
    );
    let age = crashed["heartbeat_age_ms"].as_u64().unwrap();
    assert!(
        (29_000..120_000).contains(&age),
        "the age of the card's last beat: {age}"
    );
    assert!(
        !workers
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["consumer_tag"] == forgotten.as_str()),
        "a dead consumer with no card and nothing in flight is dropped: {workers:#}"
    );
    let page = web.get("/workers").await;
    assert!(
        page.body
            .contains(&format!("<tr data-consumer=\"{dead_tag}\" class=\"gone\">")),
        "{}",
        page.body
    );
    web.stop().await;
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_every_page_and_call_and_other_addresses_need_one() {
    if !require(Service::Redis, "web security") {
        return;
    }
    let w = World::new("web_auth").await;
    // Anything but loopback without a token: refused, saying why.
    let refused = machinery(&["web", "--listen", "0.0.0.0:0"], &w.env).await;
    refused.fails(2, "refusing to serve on 0.0.0.0:0 without a token");
    assert!(
        refused.stderr.contains("MACHINERY_WEB_TOKEN"),
        "{refused:?}"
    );

    // Without a token, a request addressed to another host name (DNS rebinding) is refused.
    let open = WebServer::start(&w.env, &[]).await;
    let rebound = request(
        &open.addr,
        "GET",
        "/api/queues",
        &[("Host", "evil.example:5555")],
        b"",
    )
    .await;
    assert_eq!(rebound.status, 403);
    open.stop().await;

    let token = "web-test-token-0123456789";
    let mut env = w.env.clone();
    env.insert("MACHINERY_WEB_TOKEN".into(), token.into());
    let web = WebServer::start(&env, &[]).await;
    for path in [
        "/",
        "/workers",
        "/api/queues",
        "/api/workers",
        &format!("/queues/{}", w.queue),
    ] {
        let response = web.get(path).await;
        assert_eq!(response.status, 401, "GET {path} without the token");
    }
    assert!(
        web.get("/").await.body.contains("name=\"token\""),
        "pages show the login form"
    );
    let wrong = request(
        &web.addr,
        "GET",
        "/api/queues",
        &[("Authorization", "Bearer nope")],
        b"",
    )
    .await;
    assert_eq!(wrong.status, 401);
    let bearer = format!("Bearer {token}");
    let ok = request(
        &web.addr,
        "GET",
        "/api/queues",
        &[("Authorization", &bearer)],
        b"",
    )
    .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let purge = format!("/api/queues/{}/purge", w.queue);
    assert_eq!(
        request(&web.addr, "POST", &purge, &[], b"").await.status,
        401
    );

    // The login form sets a cookie; with it, pages answer, and POSTs still need the CSRF token.
    let bad = request(
        &web.addr,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        b"token=wrong",
    )
    .await;
    assert_eq!(bad.status, 401);
    let login = request(
        &web.addr,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        format!("token={token}").as_bytes(),
    )
    .await;
    assert_eq!(login.status, 303, "{login:?}");
    let cookie = login
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert!(login.header("set-cookie").unwrap().contains("HttpOnly"));
    let page = request(&web.addr, "GET", "/", &[("Cookie", &cookie)], b"").await;
    assert_eq!(page.status, 200);
    let no_csrf = request(&web.addr, "POST", &purge, &[("Cookie", &cookie)], b"").await;
    assert_eq!(no_csrf.status, 403);
    let session = request(
        &web.addr,
        "GET",
        "/api/session",
        &[("Cookie", &cookie)],
        b"",
    )
    .await
    .json();
    let csrf = session["csrf"].as_str().unwrap();
    let with_csrf = request(
        &web.addr,
        "POST",
        &purge,
        &[
            ("Cookie", &cookie),
            ("X-CSRF-Token", csrf),
            ("Accept", "application/json"),
        ],
        b"",
    )
    .await;
    assert_eq!(with_csrf.status, 200, "{with_csrf:?}");
    assert_eq!(with_csrf.json()["purged"], 0);
    web.stop().await;
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_broker_is_named_plainly() {
    let env: HashMap<String, String> = [("BROKER", "memory://"), ("RESULT_BACKEND", "memory://")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let web = WebServer::start(&env, &[]).await;
    let page = web.get("/").await;
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("in-process memory:// broker"),
        "{}",
        page.body
    );
    let api = web.get("/api/queues").await;
    assert_eq!(api.status, 503);
    assert!(api.json()["error"].as_str().unwrap().contains("in-process"));
    web.stop().await;
}
