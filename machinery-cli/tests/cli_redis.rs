//! The `machinery` binary against a real Redis (127.0.0.1:6379 unless `MACHINERY_TEST_REDIS_ADDR`): every
//! command, its table and its `--json` output, its exit codes and error messages.
//!
//! Each test has its own queues and delayed-task key (names containing a unique id) and deletes every key
//! with that id at the end; task states written by `send` are deleted by id.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{find, machinery, row, Run};
use machinery::broker::{Broker, ConsumeOptions, Consumer, Delivery, Outgoing};
use machinery::{task, Config, Server, TaskError, TaskResult, TaskState, Worker};
use machinery_tests::{require, unique, Service};
use redis::AsyncCommands as _;

/// Sums its arguments.
#[task(name = "cli_add")]
async fn cli_add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

/// Always fails.
#[task(name = "cli_fail")]
async fn cli_fail() -> Result<i64, TaskError> {
    Err(TaskError::new("boom: this task always fails"))
}

/// One test's world: its names, the environment the binary runs with, and a server for setting up.
struct World {
    id: String,
    queue: String,
    env: HashMap<String, String>,
    server: Server,
    tasks: std::sync::Mutex<Vec<String>>,
}

impl World {
    async fn new(prefix: &str) -> World {
        let id = unique(prefix);
        let queue = format!("{id}_q");
        let delayed = format!("{id}_delayed");
        let url = Service::Redis.url();
        let env: HashMap<String, String> = [
            ("BROKER", url.as_str()),
            ("RESULT_BACKEND", url.as_str()),
            ("DEFAULT_QUEUE", queue.as_str()),
            ("REDIS_DELAYED_TASKS_KEY", delayed.as_str()),
            ("RESULTS_EXPIRE_IN", "300"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let server = Server::new(config(&queue, &delayed)).await.unwrap();
        World {
            id,
            queue,
            env,
            server,
            tasks: Default::default(),
        }
    }

    /// Runs `machinery <args>` with this world's environment (and nothing else of ours).
    async fn run(&self, args: &[&str]) -> Run {
        self.run_with(args, &[]).await
    }

    async fn run_with(&self, args: &[&str], extra_env: &[(&str, &str)]) -> Run {
        let mut env = self.env.clone();
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        machinery(args, &env).await
    }

    fn broker(&self) -> &dyn Broker {
        self.server.broker().as_ref()
    }

    /// Publishes a task message `name(args)` with this id onto `queue`.
    async fn publish(&self, queue: &str, uuid: &str, name: &str) {
        let body = format!(
            r#"{{"UUID":"{uuid}","Name":"{name}","RoutingKey":"{queue}","Args":[{{"Name":"","Type":"int64","Value":7}}]}}"#
        );
        self.broker()
            .publish(Outgoing {
                uuid,
                name,
                routing_key: queue,
                body: body.into_bytes(),
                eta: None,
                priority: 0,
                headers: Default::default(),
            })
            .await
            .unwrap();
    }

    fn task(&self, n: usize) -> String {
        format!("task_{}_{n}", self.id)
    }

    /// Remembers a task id whose state must be deleted at the end.
    fn owns(&self, uuid: &str) {
        self.tasks.lock().unwrap().push(uuid.to_owned());
    }

    async fn consumer(&self, queue: &str, tag: &str) -> Box<dyn Consumer> {
        self.broker()
            .consume(ConsumeOptions {
                queue: queue.into(),
                consumer_tag: tag.into(),
                concurrency: 10,
                prefetch: 10,
            })
            .await
            .unwrap()
    }

    async fn cleanup(&self) {
        let mut conn = raw().await;
        let mut keys: Vec<String> = Vec::new();
        let mut iter: redis::AsyncIter<String> =
            conn.scan_match(format!("*{}*", self.id)).await.unwrap();
        while let Some(key) = iter.next_item().await {
            keys.push(key.unwrap());
        }
        drop(iter);
        keys.extend(self.tasks.lock().unwrap().iter().cloned());
        if !keys.is_empty() {
            let _: () = conn.del(keys).await.unwrap();
        }
    }
}

fn config(queue: &str, delayed: &str) -> Config {
    let mut config =
        Config::new(Service::Redis.url(), Service::Redis.url()).with_default_queue(queue);
    config.redis.delayed_tasks_key = delayed.to_owned();
    config.redis.delayed_tasks_poll_period = 50;
    config.redis.heartbeat_timeout = 5000;
    config.results_expire_in = 300;
    config
}

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(Service::Redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn next(consumer: &mut Box<dyn Consumer>, max: usize) -> Vec<Delivery> {
    tokio::time::timeout(Duration::from_secs(5), consumer.next_batch(max))
        .await
        .expect("next_batch timed out")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_counts_pending_delayed_in_flight_and_dead_letters_and_finds_queues() {
    if !require(Service::Redis, "queues") {
        return;
    }
    let w = World::new("cli_queues").await;
    let q = &w.queue;
    for n in 0..4 {
        w.publish(q, &w.task(n), "cli_add").await;
    }
    // One dead letter and one message held in flight.
    let mut consumer = w.consumer(q, &format!("{}_tag", w.id)).await;
    let mut batch = next(&mut consumer, 2).await;
    batch.pop().unwrap().dead_letter("poison").await.unwrap();
    let held = batch.pop().unwrap();
    // One delayed message for this queue.
    let run = w
        .run(&["send", "cli_add", "--countdown", "3600", "--queue", q])
        .await;
    w.owns(run.ok().split_whitespace().nth(2).unwrap());
    // A queue only Go would know (a list holding a task, nobody consuming), a queue with only dead
    // letters, and a queue only a delayed task names.
    let go_queue = format!("{}_go", w.id);
    let dead_only = format!("{}_deadonly", w.id);
    let delayed_only = format!("{}_later", w.id);
    w.publish(&go_queue, &w.task(10), "go_task").await;
    let mut conn = raw().await;
    let _: () = conn
        .rpush(format!("{dead_only}.dead"), "not an envelope")
        .await
        .unwrap();
    let run = w
        .run(&["send", "x", "--countdown", "3600", "--queue", &delayed_only])
        .await;
    w.owns(run.ok().split_whitespace().nth(2).unwrap());

    let table = w.run(&["queues"]).await;
    let table = table.ok();
    assert!(table.starts_with("QUEUE"), "{table}");
    assert_eq!(row(table, q), [q.as_str(), "2", "1", "1", "1"]);
    assert_eq!(row(table, &go_queue)[1], "1");
    assert_eq!(row(table, &dead_only)[4], "1");
    assert_eq!(row(table, &delayed_only)[2], "1");

    let json = w.run(&["queues", "--json"]).await.json();
    let mine = find(&json, "queue", q);
    assert_eq!(mine["pending"], 2);
    assert_eq!(mine["delayed"], 1);
    assert_eq!(mine["in_flight"], 1);
    assert_eq!(mine["dead"], 1);

    // --queue shows exactly the named queues, once each, in the order given.
    let json = w
        .run(&[
            "queues", "--json", "--queue", &go_queue, "--queue", q, "--queue", &go_queue,
        ])
        .await
        .json();
    let names: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["queue"].as_str().unwrap())
        .collect();
    assert_eq!(names, [go_queue.as_str(), q.as_str()]);

    held.ack().await.unwrap();
    consumer.close().await.unwrap();
    for uuid in [w.task(0), w.task(1), w.task(2), w.task(3)] {
        w.owns(&uuid);
    }
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_shows_the_state_with_decoded_results_and_reports_unknown_ids() {
    if !require(Service::Redis, "task") {
        return;
    }
    let w = World::new("cli_task").await;
    let ok = w.task(1);
    let failed = w.task(2);
    let backend = w.server.backend();
    backend
        .set_state(&TaskState::pending(&ok, "cli_add"))
        .await
        .unwrap();
    let results = vec![
        TaskResult::new("int64", 3.into()),
        TaskResult::new("[]uint8", "aGk=".into()),
        TaskResult::new("string", "x".into()),
    ];
    backend
        .set_state(&TaskState::success(&ok, "", results))
        .await
        .unwrap();
    backend
        .set_state(&TaskState::failure(&failed, "cli_fail", "boom"))
        .await
        .unwrap();

    let text = w.run(&["task", &ok]).await;
    let text = text.ok();
    assert!(text.contains(&format!("Task:    {ok}")), "{text}");
    assert!(text.contains("Name:    cli_add"), "{text}");
    assert!(text.contains("State:   SUCCESS"), "{text}");
    assert!(text.contains("Results: 3 (int64)"), "{text}");
    assert!(text.contains(r#"b"hi" ([]uint8)"#), "{text}");
    assert!(text.contains(r#""x" (string)"#), "{text}");
    assert!(text.contains("Created: 20"), "{text}");

    let json = w.run(&["task", &ok, "--json"]).await.json();
    assert_eq!(json["TaskUUID"], ok.as_str());
    assert_eq!(json["State"], "SUCCESS");
    assert_eq!(json["Results"][0]["Value"], 3);

    let text = w.run(&["task", &failed]).await;
    assert!(text.ok().contains("State:   FAILURE"));
    assert!(text.ok().contains("Error:   boom"));

    let running = w.task(4);
    backend
        .set_state(&TaskState::progress(
            &running,
            "cli_import",
            serde_json::json!({"done": 3, "total": 10}),
        ))
        .await
        .unwrap();
    let text = w.run(&["task", &running]).await;
    let text = text.ok();
    assert!(text.contains("STARTED"), "{text}");
    assert!(
        text.contains(r#"Progress: {"done":3,"total":10}"#),
        "{text}"
    );
    let json = w.run(&["task", &running, "--json"]).await.json();
    assert_eq!(json["Progress"]["done"], 3);
    w.owns(&running);

    w.run(&["task", &w.task(3)]).await.fails(
        1,
        &format!("task {}: no state in the redis result backend", w.task(3)),
    );
    w.run(&["task"]).await.fails(2, "<UUID>");
    w.owns(&ok);
    w.owns(&failed);
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_lists_waiting_messages_oldest_first_up_to_the_limit() {
    if !require(Service::Redis, "pending") {
        return;
    }
    let w = World::new("cli_pending").await;
    let q = &w.queue;
    for n in 0..3 {
        w.publish(q, &w.task(n), "cli_add").await;
    }
    let mut conn = raw().await;
    let _: () = conn.rpush(q, "{broken").await.unwrap();

    let table = w.run(&["pending", q, "--limit", "2"]).await;
    let table = table.ok();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert_eq!(row(table, "1"), ["1", &w.task(0), "cli_add", "7"]);
    assert_eq!(row(table, "2")[1], w.task(1));

    let json = w.run(&["pending", q, "--json"]).await.json();
    let rows = json.as_array().unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0]["uuid"], w.task(0).as_str());
    assert_eq!(rows[0]["name"], "cli_add");
    assert_eq!(rows[0]["args"][0]["Value"], 7);
    assert_eq!(rows[0]["message"]["RoutingKey"], q.as_str());
    assert_eq!(rows[3]["raw"], "{broken");
    assert!(rows[3]["uuid"].is_null());

    let table = w.run(&["pending", q]).await;
    assert_eq!(row(table.ok(), "4")[1..3], ["-", "(not"]);
    let empty = w.run(&["pending", &format!("{}_empty", w.id)]).await;
    assert_eq!(empty.ok().lines().count(), 1, "only the header");
    w.run(&["pending", q, "--limit", "many"])
        .await
        .fails(2, "--limit");
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_lists_messages_earliest_first_with_their_queue() {
    if !require(Service::Redis, "delayed") {
        return;
    }
    let w = World::new("cli_delayed").await;
    let other = format!("{}_other", w.id);
    let late = w
        .run(&["send", "cli_add", "--eta", "2099-01-01T00:00:00Z", "--json"])
        .await
        .json();
    let soon = w
        .run(&[
            "send",
            "cli_add",
            "--countdown",
            "600",
            "--queue",
            &other,
            "--args",
            r#"[{"Type":"int64","Value":1},{"Type":"int64","Value":2}]"#,
            "--json",
        ])
        .await
        .json();
    let (late, soon) = (
        late["uuid"].as_str().unwrap(),
        soon["uuid"].as_str().unwrap(),
    );
    w.owns(late);
    w.owns(soon);

    let table = w.run(&["delayed"]).await;
    let table = table.ok();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[1].contains(soon) && lines[1].contains(&other),
        "{table}"
    );
    assert!(lines[1].contains("(in 10m)"), "{table}");
    assert!(lines[1].trim_end().ends_with("1, 2"), "{table}");
    assert!(
        lines[2].contains(late) && lines[2].contains(&w.queue),
        "{table}"
    );
    assert!(lines[2].starts_with("2099-01-01T00:00:00Z"), "{table}");

    let json = w.run(&["delayed", "--json", "--limit", "1"]).await.json();
    let rows = json.as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["uuid"], soon);
    assert_eq!(rows[0]["routing_key"], other.as_str());
    let due = chrono::DateTime::parse_from_rfc3339(rows[0]["due"].as_str().unwrap()).unwrap();
    let from_now = due.with_timezone(&chrono::Utc) - chrono::Utc::now();
    assert!(
        from_now > chrono::Duration::seconds(500) && from_now <= chrono::Duration::seconds(600),
        "{from_now}"
    );
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lists_reasons_and_requeue_moves_one_or_all_back() {
    if !require(Service::Redis, "dead") {
        return;
    }
    let w = World::new("cli_dead").await;
    let q = &w.queue;
    for n in 0..3 {
        w.publish(q, &w.task(n), "cli_add").await;
    }
    let mut consumer = w.consumer(q, &format!("{}_tag", w.id)).await;
    for (n, delivery) in next(&mut consumer, 3).await.into_iter().enumerate() {
        delivery
            .dead_letter(format!("unknown task cli_add (reason {n})"))
            .await
            .unwrap();
    }
    consumer.close().await.unwrap();

    let table = w.run(&["dead", q]).await;
    let table = table.ok();
    assert!(table.starts_with("AT"), "{table}");
    let line = table.lines().nth(1).unwrap();
    assert!(line.contains(&w.task(0)), "{table}");
    assert!(
        line.contains("cli_add") && line.ends_with("unknown task cli_add (reason 0)"),
        "{table}"
    );

    let json = w.run(&["dead", q, "--json", "--limit", "2"]).await.json();
    let rows = json.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["uuid"], w.task(1).as_str());
    assert_eq!(rows[1]["reason"], "unknown task cli_add (reason 1)");
    assert_eq!(rows[1]["queue"], q.as_str());
    let at = chrono::DateTime::parse_from_rfc3339(rows[1]["at"].as_str().unwrap()).unwrap();
    assert!(chrono::Utc::now() - at.with_timezone(&chrono::Utc) < chrono::Duration::minutes(1));

    // One by id: it goes to the tail of the queue, the others stay.
    let moved = w.run(&["requeue", q, &w.task(1), "--json"]).await.json();
    assert_eq!(moved, serde_json::json!({"queue": q, "requeued": 1}));
    let pending = w.run(&["pending", q, "--json"]).await.json();
    assert_eq!(pending[0]["uuid"], w.task(1).as_str());
    assert_eq!(
        w.run(&["dead", q, "--json"])
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        2
    );

    w.run(&["requeue", q, &w.task(1)])
        .await
        .fails(1, &format!("has no dead letter of task {}", w.task(1)));
    w.run(&["requeue", q]).await.fails(2, "--all");
    w.run(&["requeue", q, "--all", &w.task(0)])
        .await
        .fails(2, "cannot be used with");

    let text = w.run(&["requeue", q, "--all"]).await;
    assert_eq!(
        text.ok(),
        format!("requeued 2 dead letters onto queue {q}\n")
    );
    assert!(w
        .run(&["dead", q, "--json"])
        .await
        .json()
        .as_array()
        .unwrap()
        .is_empty());
    let pending = w.run(&["pending", q, "--json"]).await.json();
    let uuids: Vec<&str> = pending
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["uuid"].as_str().unwrap())
        .collect();
    assert_eq!(uuids, [w.task(1), w.task(0), w.task(2)]);
    let empty = w.run(&["requeue", q, "--all"]).await;
    assert_eq!(
        empty.ok(),
        format!("requeued 0 dead letters onto queue {q}\n")
    );
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_requeues_at_once_move_every_dead_letter_exactly_once() {
    if !require(Service::Redis, "requeue race") {
        return;
    }
    let w = World::new("cli_requeue_race").await;
    let q = &w.queue;
    let count = 300;
    let mut conn = raw().await;
    for n in 0..count {
        let body = format!(r#"{{"UUID":"{}","Name":"cli_add"}}"#, w.task(n));
        let envelope = serde_json::json!({"queue": q, "reason": "test", "at": "2024-01-01T00:00:00Z", "body": body});
        let _: () = conn
            .rpush(format!("{q}.dead"), envelope.to_string())
            .await
            .unwrap();
    }
    let args = ["requeue", q.as_str(), "--all", "--json"];
    let (a, b) = tokio::join!(w.run(&args), w.run(&args));
    let total = a.json()["requeued"].as_u64().unwrap() + b.json()["requeued"].as_u64().unwrap();
    assert_eq!(total, count as u64);
    let queued: Vec<String> = conn.lrange(q, 0, -1).await.unwrap();
    assert_eq!(queued.len(), count);
    let distinct: std::collections::HashSet<&String> = queued.iter().collect();
    assert_eq!(distinct.len(), count, "a message was doubled");
    let dead: usize = conn.llen(format!("{q}.dead")).await.unwrap();
    assert_eq!(dead, 0);
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_needs_yes_off_a_terminal_and_deletes_only_waiting_messages() {
    if !require(Service::Redis, "purge") {
        return;
    }
    let w = World::new("cli_purge").await;
    let q = &w.queue;
    for n in 0..3 {
        w.publish(q, &w.task(n), "cli_add").await;
    }
    let mut consumer = w.consumer(q, &format!("{}_tag", w.id)).await;
    next(&mut consumer, 1)
        .await
        .pop()
        .unwrap()
        .dead_letter("kept")
        .await
        .unwrap();
    consumer.close().await.unwrap();
    let delayed = w
        .run(&["send", "cli_add", "--countdown", "600", "--json"])
        .await
        .json();
    w.owns(delayed["uuid"].as_str().unwrap());

    w.run(&["purge", q]).await.fails(2, "pass --yes to confirm");
    assert_eq!(
        w.run(&["pending", q, "--json"])
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        2
    );

    let text = w.run(&["purge", q, "--yes"]).await;
    assert_eq!(text.ok(), format!("purged 2 messages from queue {q}\n"));
    let stats = w.run(&["queues", "--json", "--queue", q]).await.json();
    assert_eq!(stats[0]["pending"], 0);
    assert_eq!(stats[0]["delayed"], 1, "delayed messages stay");
    assert_eq!(stats[0]["dead"], 1, "dead letters stay");
    let json = w.run(&["purge", q, "-y", "--json"]).await.json();
    assert_eq!(json, serde_json::json!({"queue": q, "purged": 0}));
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_by_name_waits_for_the_result_and_fails_when_the_task_does() {
    if !require(Service::Redis, "send") {
        return;
    }
    let w = World::new("cli_send").await;
    let worker = Worker::auto(&w.server)
        .concurrency(2)
        .start()
        .await
        .unwrap();

    let text = w
        .run(&[
            "send",
            "cli_add",
            "--args",
            r#"[{"Type":"int64","Value":1},{"Type":"int64","Value":2}]"#,
            "--wait",
            "20",
        ])
        .await;
    let out = text.ok();
    let uuid = out.split_whitespace().nth(2).unwrap().to_owned();
    w.owns(&uuid);
    assert!(
        out.starts_with(&format!("sent cli_add {uuid} to queue {}\n", w.queue)),
        "{out}"
    );
    assert!(out.contains("State:   SUCCESS"), "{out}");
    assert!(out.contains("Results: 3 (int64)"), "{out}");

    let json = w
        .run(&[
            "send",
            "cli_add",
            "--json",
            "--wait",
            "20",
            "--args",
            r#"[{"Name":"a","Type":"int64","Value":20},{"Name":"b","Type":"int64","Value":22}]"#,
        ])
        .await
        .json();
    w.owns(json["uuid"].as_str().unwrap());
    assert_eq!(json["name"], "cli_add");
    assert_eq!(json["queue"], w.queue.as_str());
    assert!(json["eta"].is_null());
    assert_eq!(json["state"]["State"], "SUCCESS");
    assert_eq!(json["state"]["Results"][0]["Value"], 42);

    let failed = w.run(&["send", "cli_fail", "--wait", "20"]).await;
    failed.fails(1, "failed: boom: this task always fails");
    assert!(failed.stdout.contains("State:   FAILURE"), "{failed:#?}");
    w.owns(failed.stdout.split_whitespace().nth(2).unwrap());
    worker.shutdown(Duration::from_secs(10)).await.unwrap();

    // Nobody consumes this queue: the wait runs out.
    let other = format!("{}_nobody", w.id);
    let slow = w
        .run(&["send", "cli_add", "--queue", &other, "--wait", "0.3"])
        .await;
    slow.fails(1, "did not finish within 0.3 s (last state: PENDING)");
    w.owns(slow.stdout.split_whitespace().nth(2).unwrap());

    // Usage errors: exit 2, nothing sent.
    w.run(&[
        "send",
        "cli_add",
        "--args",
        r#"[{"Type":"integer","Value":1}]"#,
    ])
    .await
    .fails(2, "argument 1: unknown type \"integer\"");
    w.run(&["send", "cli_add", "--args", "[1"])
        .await
        .fails(2, "JSON array");
    w.run(&["send", "cli_add", "--eta", "tomorrow"])
        .await
        .fails(2, "RFC 3339");
    w.run(&[
        "send",
        "cli_add",
        "--eta",
        "2099-01-01T00:00:00Z",
        "--countdown",
        "5",
    ])
    .await
    .fails(2, "cannot be used with");
    let stats = w
        .run(&["queues", "--json", "--queue", &w.queue])
        .await
        .json();
    assert_eq!(stats[0]["pending"], 0);
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_lists_live_and_dead_consumers_with_heartbeat_and_in_flight() {
    if !require(Service::Redis, "workers") {
        return;
    }
    let w = World::new("cli_workers").await;
    let q = &w.queue;
    let tag = format!("{}_live", w.id);
    w.publish(q, &w.task(0), "cli_add").await;
    w.publish(q, &w.task(1), "cli_add").await;
    let mut consumer = w.consumer(q, &tag).await;
    let held = next(&mut consumer, 2).await;
    assert_eq!(held.len(), 2);
    // A dead consumer on another queue (no live consumer there recovers it): registered, one message in
    // flight, no heartbeat.
    let dead_queue = format!("{}_deadq", w.id);
    let dead_tag = format!("{}_gone", w.id);
    let mut conn = raw().await;
    let _: () = conn
        .sadd(format!("machinery:consumers:{dead_queue}"), &dead_tag)
        .await
        .unwrap();
    let _: () = conn
        .rpush(format!("machinery:inflight:{dead_queue}:{dead_tag}"), "{}")
        .await
        .unwrap();

    let table = w.run(&["workers"]).await;
    let table = table.ok();
    assert!(table.starts_with("QUEUE"), "{table}");
    let live = row(table, q);
    assert_eq!(
        live[..4],
        [q.as_str(), tag.as_str(), "alive", "2"],
        "{table}"
    );
    assert!(live[4].ends_with('s') && live[5] == "ago", "{table}");
    assert_eq!(
        row(table, &dead_queue)[1..],
        [dead_tag.as_str(), "dead", "1", "-"]
    );

    let json = w.run(&["workers", "--json"]).await.json();
    let mine = find(&json, "consumer_tag", &tag);
    assert_eq!(mine["queue"], q.as_str());
    assert_eq!(mine["alive"], true);
    assert_eq!(mine["in_flight"], 2);
    let age = mine["heartbeat_age_ms"].as_u64().unwrap();
    assert!(age < 5000, "heartbeat renewed every second: {age} ms");
    let gone = find(&json, "consumer_tag", &dead_tag);
    assert_eq!(
        (gone["alive"].as_bool(), gone["in_flight"].as_u64()),
        (Some(false), Some(1))
    );
    assert!(gone["heartbeat_age_ms"].is_null());

    // A queue with only a registered consumer (no messages) is found by `queues`.
    let queues = w.run(&["queues", "--json"]).await.json();
    assert_eq!(find(&queues, "queue", &dead_queue)["pending"], 0);

    for delivery in held {
        delivery.ack().await.unwrap();
    }
    consumer.close().await.unwrap();
    let json = w.run(&["workers", "--json"]).await.json();
    assert!(
        !json
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["consumer_tag"] == tag.as_str()),
        "a closed consumer unregisters: {json:#}"
    );
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_comes_from_env_file_and_flags_and_errors_name_the_cause() {
    if !require(Service::Redis, "configuration") {
        return;
    }
    let w = World::new("cli_config").await;
    let url = Service::Redis.url();
    w.publish(&w.queue, &w.task(0), "cli_add").await;

    // A file: its default queue is the one `queues` always shows.
    let dir = std::env::temp_dir().join(&w.id);
    std::fs::create_dir_all(&dir).unwrap();
    let yaml = dir.join("config.yaml");
    std::fs::write(
        &yaml,
        format!(
            "broker: {url}\nresult_backend: {url}\ndefault_queue: {}\n",
            w.queue
        ),
    )
    .unwrap();
    let json = w
        .run_with(
            &["-c", yaml.to_str().unwrap(), "queues", "--json"],
            &[("BROKER", "redis://127.0.0.1:1")],
        )
        .await
        .json();
    assert_eq!(find(&json, "queue", &w.queue)["pending"], 1);

    // Flags override the environment.
    let unreachable = "redis://127.0.0.1:1";
    let json = w
        .run_with(
            &["--broker", &url, "queues", "--json", "--queue", &w.queue],
            &[("BROKER", unreachable)],
        )
        .await
        .json();
    assert_eq!(json[0]["pending"], 1);

    w.run(&["--broker", unreachable, "queues"])
        .await
        .fails(1, "cannot connect to broker redis://127.0.0.1:1");
    w.run(&["--backend", unreachable, "task", "task_x"])
        .await
        .fails(1, "cannot connect to result backend redis://127.0.0.1:1");
    w.run(&["--broker", "nats://x", "queues"])
        .await
        .fails(1, "unsupported scheme");
    w.run(&["-c", dir.join("missing.yaml").to_str().unwrap(), "queues"])
        .await
        .fails(1, "cannot read configuration file");
    w.run_with(&["queues"], &[("RESULTS_EXPIRE_IN", "soon")])
        .await
        .fails(1, "RESULTS_EXPIRE_IN");
    w.run(&["frobnicate"])
        .await
        .fails(2, "unrecognized subcommand");
    w.run(&[]).await.fails(2, "Usage");
    let help = w.run(&["queues", "--help"]).await;
    assert!(
        help.ok().contains("machinery:consumers:<queue>"),
        "{help:#?}"
    );

    std::fs::remove_dir_all(&dir).unwrap();
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_refuses_the_in_process_broker() {
    // No server needed: the tool's own in-process broker cannot see any other process's queues, so it
    // refuses to answer from it, naming the cause, instead of showing empty queues or losing a send.
    let queue = unique("cli_memory");
    let unset: HashMap<String, String> = [("DEFAULT_QUEUE", queue.as_str())]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let mut named = unset.clone();
    named.insert("BROKER".into(), "memory://".into());
    let commands: [&[&str]; 9] = [
        &["queues"],
        &["queues", "--json"],
        &["workers"],
        &["delayed"],
        &["pending", "q"],
        &["dead", "q"],
        &["purge", "q", "--yes"],
        &["send", "cli_add"],
        &["task", "task_x"],
    ];
    for args in commands {
        let run = machinery(args, &unset).await;
        run.fails(1, "the in-process broker");
        run.fails(1, "BROKER is not set");
        assert!(run.stdout.is_empty(), "nothing on stdout: {run:#?}");
        machinery(args, &named)
            .await
            .fails(1, "the in-process broker");
    }
    let mut flag = vec!["--broker", "memory://", "queues"];
    machinery(&flag, &unset)
        .await
        .fails(1, "Name the broker your workers use");
    // The same command against a real broker is not refused on its account.
    if require(
        Service::Redis,
        "every_command_refuses_the_in_process_broker",
    ) {
        let url = Service::Redis.url();
        flag[1] = &url;
        let run = machinery(&flag, &unset).await;
        assert!(!run.stderr.contains("in-process"), "{run:#?}");
        run.ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colour_only_on_a_terminal_and_never_with_no_color() {
    // `script` (util-linux) gives the tool a pseudo-terminal as stdout.
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED colour test: `script` (util-linux) is not installed");
        return;
    }
    if !require(
        Service::Redis,
        "colour_only_on_a_terminal_and_never_with_no_color",
    ) {
        return;
    }
    let bin = env!("CARGO_BIN_EXE_machinery");
    let url = Service::Redis.url();
    let on_terminal = |no_color: bool| {
        let mut cmd = tokio::process::Command::new("script");
        cmd.args([
            "-qec",
            &format!("{bin} --broker {url} queues --queue cli_colour_q"),
            "/dev/null",
        ])
        .env_clear();
        if no_color {
            cmd.env("NO_COLOR", "1");
        }
        async move {
            let out = cmd.output().await.expect("run script");
            assert!(out.status.success(), "{out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let coloured = on_terminal(false).await;
    assert!(coloured.contains("\x1b[1mQUEUE\x1b[0m"), "{coloured:?}");
    let plain = on_terminal(true).await;
    assert!(plain.starts_with("QUEUE"), "{plain:?}");
    assert!(!plain.contains('\x1b'), "{plain:?}");
}
