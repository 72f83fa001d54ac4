//! Issue 18 through the `machinery` binary against a real Redis: a message whose task name and id hold
//! terminal control sequences (ESC colour codes, an OSC title, BEL, CR, newlines) or 10 KB of text is shown
//! escaped and cut in the `pending` and `dead` tables, whole in `--json`, and never reaches the operator's
//! terminal raw.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::machinery;
use machinery::{task, Config, Server, TaskError, Worker};
use machinery_tests::{require, unique, Service};
use redis::AsyncCommands as _;

#[task(name = "hostile_add")]
async fn hostile_add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

const HOSTILE: &str = "evil\u{1b}[31mred\u{1b}]0;pwned\u{7}\u{7}bell\rback\nnext\u{9b}31mline";

fn message(uuid: &str, name: &str, queue: &str) -> String {
    let value = serde_json::json!({
        "UUID": uuid, "Name": name, "RoutingKey": queue, "ETA": null, "GroupUUID": "",
        "GroupTaskCount": 0, "Args": [{"Name": "", "Type": "int64", "Value": 1}], "Headers": {},
        "Priority": 0, "Immutable": false, "RetryCount": 0, "RetryTimeout": 0, "OnSuccess": null,
        "OnError": null, "ChordCallback": null, "BrokerMessageGroupId": "", "SQSReceiptHandle": "",
        "StopTaskDeletionOnError": false, "IgnoreWhenTaskNotRegistered": false,
    });
    value.to_string()
}

/// No control character but the line ends, no line wider than `max` characters, one line per row.
fn assert_safe(table: &str, rows: usize, max: usize) {
    for c in table.chars() {
        assert!(
            c == '\n' || !(c.is_control() || ('\u{202a}'..='\u{202e}').contains(&c)),
            "control character {c:?} in the table:\n{table:?}"
        );
    }
    assert_eq!(
        table.lines().count(),
        rows + 1,
        "one line per row:\n{table}"
    );
    for line in table.lines() {
        assert!(
            line.chars().count() <= max,
            "a line of {} characters:\n{table}",
            line.chars().count()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_are_escaped_and_long_cells_cut_in_tables() {
    if !require(Service::Redis, "cli_hostile") {
        return;
    }
    let id = unique("cli_hostile");
    let queue = format!("{id}_q");
    let parked = format!("{id}_parked");
    let url = Service::Redis.url();
    let env: HashMap<String, String> = [
        ("BROKER", url.as_str()),
        ("RESULT_BACKEND", url.as_str()),
        ("DEFAULT_QUEUE", queue.as_str()),
        ("REDIS_DELAYED_TASKS_KEY", &format!("{id}_delayed")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let long_name = "n".repeat(10 * 1024);
    let hostile_uuid = format!("task_{id}_\u{1b}[2J\u{1b}[Hwiped");
    let bodies = [
        message(&format!("task_{id}_1"), HOSTILE, &queue),
        message(&hostile_uuid, "plain", &queue),
        message(&format!("task_{id}_3"), &long_name, &queue),
    ];
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    // `pending`: the raw messages wait on a queue no worker serves.
    for body in &bodies {
        let _: () = conn.rpush(&parked, body).await.unwrap();
    }
    let run = machinery(&["pending", &parked], &env).await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert_safe(&run.stdout, 3, 200);
    assert!(
        run.stdout
            .contains(r"evil\u{1b}[31mred\u{1b}]0;pwned\u{7}\u{7}bell\rback\nnext\u{9b}31mline"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(r"\u{1b}[2J\u{1b}[Hwiped"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("nnnn…"), "{}", run.stdout);
    let json = machinery(&["pending", &parked, "--json"], &env)
        .await
        .json();
    assert_eq!(json[0]["name"], HOSTILE);
    assert_eq!(json[1]["uuid"], hostile_uuid.as_str());
    assert_eq!(json[2]["name"], long_name.as_str());

    // `dead`: a worker that knows none of these names dead-letters them; a normal task still runs.
    let mut config = Config::new(url.clone(), url.clone()).with_default_queue(&queue);
    config.redis.delayed_tasks_key = format!("{id}_delayed");
    config.unknown_task_requeues = 1;
    config.results_expire_in = 300;
    let server = Server::new(config).await.unwrap();
    let running = Worker::new(&server)
        .register(hostile_add::task())
        .start()
        .await
        .unwrap();
    for body in &bodies {
        let _: () = conn.rpush(&queue, body).await.unwrap();
    }
    let dead_key = format!("{queue}.dead");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while conn.llen::<_, usize>(&dead_key).await.unwrap() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "3 dead letters");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sum = hostile_add::send(&server, 40, 2).await.unwrap();
    assert_eq!(sum.get(Duration::from_secs(10)).await.unwrap(), 42);
    running.shutdown(Duration::from_secs(5)).await.unwrap();

    let run = machinery(&["dead", &queue], &env).await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert_safe(&run.stdout, 3, 250);
    assert!(run.stdout.contains(r"evil\u{1b}[31mred"), "{}", run.stdout);
    assert!(run.stdout.contains("unknown task name"), "{}", run.stdout);
    let json = machinery(&["dead", &queue, "--json"], &env).await.json();
    let rows = json.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert!(
        names.contains(&HOSTILE) && names.contains(&long_name.as_str()),
        "{names:?}"
    );
    let uuids: Vec<&str> = rows.iter().map(|r| r["uuid"].as_str().unwrap()).collect();
    assert!(uuids.contains(&hostile_uuid.as_str()), "{uuids:?}");

    let mut keys: Vec<String> = Vec::new();
    let mut iter: redis::AsyncIter<String> = conn.scan_match(format!("*{id}*")).await.unwrap();
    while let Some(key) = iter.next_item().await {
        keys.push(key.unwrap());
    }
    drop(iter);
    keys.push(sum.uuid().to_owned());
    let _: () = conn.del(keys).await.unwrap();
}
