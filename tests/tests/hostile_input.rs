//! Issue 18: hostile input never wedges a queue, loops for ever, or loses a message. Each test pushes a raw
//! message onto the Redis queue (`RPUSH` of the JSON, as any other client could write it) next to a running
//! worker, checks where it ends (run, FAILURE with a stored reason, or `<queue>.dead` with a reason), and
//! then checks that a normal task sent right after still completes.

mod redis_common;

use std::time::Duration;

use machinery::{task, Server, Signature, State, TaskError, TaskState, Worker};
use machinery_tests::{require, Service};
use redis::AsyncCommands as _;
use redis_common::{raw, Names};
use serde_json::Value;

#[task]
async fn add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

#[task]
async fn echo(text: String) -> Result<String, TaskError> {
    Ok(text)
}

#[task]
async fn scale(x: f64) -> Result<f64, TaskError> {
    Ok(x * 2.0)
}

#[task]
async fn total(values: Vec<i64>) -> Result<i64, TaskError> {
    Ok(values.iter().sum())
}

/// Returns a number JSON cannot hold.
#[task]
async fn not_finite(kind: String) -> Result<f64, TaskError> {
    Ok(match kind.as_str() {
        "nan" => f64::NAN,
        "-inf" => f64::NEG_INFINITY,
        _ => f64::INFINITY,
    })
}

/// Returns a number JSON cannot hold inside a Rust-only (`json`) type.
#[task]
async fn maybe_not_finite(kind: String) -> Result<Option<f64>, TaskError> {
    Ok((kind != "none").then_some(f64::NAN))
}

/// Takes any JSON value and tells how deep it is.
#[task]
async fn depth(value: Value) -> Result<i64, TaskError> {
    let mut depth = 0;
    let mut at = &value;
    while let Some(next) = at.as_array().and_then(|a| a.first()) {
        depth += 1;
        at = next;
    }
    Ok(depth)
}

/// One step of a long chain: the previous step's result plus one.
#[task]
async fn step(n: i64) -> Result<i64, TaskError> {
    Ok(n + 1)
}

/// A worker on this test's queue with every task of this file, and a server to send and read with.
async fn worker(names: &Names) -> (Server, machinery::RunningWorker) {
    let server = Server::new(names.config()).await.unwrap();
    let running = Worker::new(&server)
        .register(add::task())
        .register(echo::task())
        .register(scale::task())
        .register(total::task())
        .register(not_finite::task())
        .register(maybe_not_finite::task())
        .register(depth::task())
        .register(step::task())
        .concurrency(4)
        .start()
        .await
        .unwrap();
    (server, running)
}

/// A message as Go's `SendTask` writes it, with these arguments (JSON text of the `Args` array).
fn go_message(uuid: &str, name: &str, queue: &str, args: &str) -> String {
    format!(
        r#"{{"UUID":"{uuid}","Name":"{name}","RoutingKey":"{queue}","ETA":null,"GroupUUID":"","GroupTaskCount":0,"Args":{args},"Headers":{{}},"Priority":0,"Immutable":false,"RetryCount":0,"RetryTimeout":0,"OnSuccess":null,"OnError":null,"ChordCallback":null,"BrokerMessageGroupId":"","SQSReceiptHandle":"","StopTaskDeletionOnError":false,"IgnoreWhenTaskNotRegistered":false}}"#
    )
}

async fn push(queue: &str, body: &str) {
    let mut conn = raw().await;
    let _: () = conn.rpush(queue, body).await.unwrap();
}

/// Waits for the final state of `uuid`.
async fn final_state(server: &Server, uuid: &str) -> TaskState {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(state)) = server.backend().get_state(uuid).await {
            if state.is_completed() {
                return state;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no final state of {uuid}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A normal task sent after the hostile ones completes.
async fn a_normal_task_completes(server: &Server) {
    let sum = add::send(server, 20, 22).await.unwrap();
    assert_eq!(sum.get(Duration::from_secs(10)).await.unwrap(), 42);
}

fn assert_failure(state: &TaskState, needles: &[&str]) {
    assert_eq!(state.state, State::Failure, "{state:?}");
    for needle in needles {
        assert!(
            state.error.contains(needle),
            "{needle:?} not in the stored error {:?}",
            state.error
        );
    }
}

#[tokio::test]
async fn type_tags_are_checked_against_the_parameter() {
    if !require(
        Service::Redis,
        "type_tags_are_checked_against_the_parameter",
    ) {
        return;
    }
    let names = Names::new("hi_tags");
    let (server, running) = worker(&names).await;
    let q = &names.queue;
    let arg = |tag: &str, value: &str| format!(r#"{{"Name":"","Type":"{tag}","Value":{value}}}"#);
    let refused = [
        // (task, args, what the error names)
        (
            "add",
            format!("[{},{}]", arg("int128", "5"), arg("int64", "1")),
            vec!["task add", "argument 1", "expected int64", "int128 5"],
        ),
        (
            "add",
            format!("[{},{}]", arg("int64", "1"), arg("string", "5")),
            vec!["task add", "argument 2", "expected int64", "string 5"],
        ),
        (
            "echo",
            format!("[{}]", arg("bool", r#""str""#)),
            vec![
                "task echo",
                "argument 1",
                "expected string",
                r#"bool "str""#,
            ],
        ),
        (
            "scale",
            format!("[{}]", arg("string", "1.5")),
            vec!["task scale", "argument 1", "expected float64", "string 1.5"],
        ),
        (
            "total",
            format!("[{}]", arg("[]string", "[1,2]")),
            vec![
                "task total",
                "argument 1",
                "expected []int64",
                "[]string [1,2]",
            ],
        ),
        (
            "add",
            format!("[{},{}]", arg("main.Money", "1"), arg("int64", "1")),
            vec!["task add", "argument 1", "expected int64", "main.Money 1"],
        ),
    ];
    for (n, (task, args, _)) in refused.iter().enumerate() {
        push(q, &go_message(&names.task(n), task, q, args)).await;
    }
    // Compatible tags still pass: every Go integer kind within range, float32 for f64, []int32 for Vec<i64>.
    let accepted = [
        (
            "add",
            format!("[{},{}]", arg("int", "40"), arg("uint8", "2")),
            "42",
        ),
        (
            "add",
            format!("[{},{}]", arg("int32", "-1"), arg("uint64", "3")),
            "2",
        ),
        ("scale", format!("[{}]", arg("float32", "1.5")), "3"),
        ("total", format!("[{}]", arg("[]int32", "[1,2,3]")), "6"),
        ("echo", format!("[{}]", arg("string", r#""ok""#)), r#""ok""#),
    ];
    for (n, (task, args, _)) in accepted.iter().enumerate() {
        push(q, &go_message(&names.task(100 + n), task, q, args)).await;
    }
    for (n, (_, _, needles)) in refused.iter().enumerate() {
        let state = final_state(&server, &names.task(n)).await;
        assert_failure(&state, needles);
    }
    for (n, (_, _, result)) in accepted.iter().enumerate() {
        let state = final_state(&server, &names.task(100 + n)).await;
        assert_eq!(state.state, State::Success, "{state:?}");
        let results = state.results.unwrap();
        assert_eq!(results[0].value.to_string(), *result);
    }
    a_normal_task_completes(&server).await;
    running.shutdown(Duration::from_secs(5)).await.unwrap();
    names.cleanup().await;
}

#[tokio::test]
async fn non_finite_numbers_fail_the_task_instead_of_storing_null() {
    if !require(
        Service::Redis,
        "non_finite_numbers_fail_the_task_instead_of_storing_null",
    ) {
        return;
    }
    let names = Names::new("hi_float");
    let (server, running) = worker(&names).await;
    let q = &names.queue;
    for (n, kind) in ["inf", "nan", "-inf"].iter().enumerate() {
        let args = format!(r#"[{{"Name":"","Type":"string","Value":"{kind}"}}]"#);
        push(q, &go_message(&names.task(n), "not_finite", q, &args)).await;
    }
    for kind in ["nan", "none"] {
        let args = format!(r#"[{{"Name":"","Type":"string","Value":"{kind}"}}]"#);
        push(
            q,
            &go_message(&names.task(kind), "maybe_not_finite", q, &args),
        )
        .await;
    }
    // A number JSON cannot hold, as the raw text of an argument.
    let args = r#"[{"Name":"","Type":"int64","Value":1},{"Name":"","Type":"int64","Value":1e400}]"#;
    push(q, &go_message(&names.task("big"), "add", q, args)).await;
    for n in 0..3 {
        let state = final_state(&server, &names.task(n)).await;
        assert_failure(&state, &["result is not a finite number"]);
        assert!(state.results.is_none(), "{state:?}");
    }
    let state = final_state(&server, &names.task("nan")).await;
    assert_failure(&state, &["result is not a finite number"]);
    let state = final_state(&server, &names.task("none")).await;
    assert_eq!(state.state, State::Success, "{state:?}");
    assert_eq!(state.results.unwrap()[0].value, Value::Null);
    let state = final_state(&server, &names.task("big")).await;
    assert_failure(&state, &["task add", "argument 2", "1e400"]);
    let stats = server
        .broker()
        .inspect()
        .unwrap()
        .queue_stats(q)
        .await
        .unwrap();
    assert_eq!(stats.dead, Some(0), "nothing is dead-lettered");
    a_normal_task_completes(&server).await;
    running.shutdown(Duration::from_secs(5)).await.unwrap();
    names.cleanup().await;
}

/// A chain of `steps` `step` tasks as Go's `NewChain` + `SendChain` writes it: nested `OnSuccess`, the
/// first step with the argument 1, the others with no arguments (each receives the previous result).
fn go_chain(names: &Names, steps: usize) -> String {
    let mut text = String::with_capacity(steps * 400);
    for i in 1..=steps {
        let args = if i == 1 {
            r#"[{"Name":"","Type":"int64","Value":1}]"#
        } else {
            "null"
        };
        let routing = if i == 1 { names.queue.as_str() } else { "" };
        text.push_str(&format!(
            r#"{{"UUID":"{}","Name":"step","RoutingKey":"{routing}","ETA":null,"GroupUUID":"","GroupTaskCount":0,"Args":{args},"Headers":{{}},"Priority":0,"Immutable":false,"RetryCount":0,"RetryTimeout":0,"OnSuccess":"#,
            names.task(i)
        ));
        if i < steps {
            text.push('[');
        } else {
            text.push_str("null");
        }
    }
    let tail = r#","OnError":null,"ChordCallback":null,"BrokerMessageGroupId":"","SQSReceiptHandle":"","StopTaskDeletionOnError":false,"IgnoreWhenTaskNotRegistered":false}"#;
    for i in (1..=steps).rev() {
        text.push_str(tail);
        if i > 1 {
            text.push(']');
        }
    }
    text
}

/// How many signatures a chain message holds (`OnSuccess` nesting), counted without recursion.
fn chain_length(signature: &Signature) -> usize {
    let mut length = 1;
    let mut at = signature;
    while let Some(next) = at.on_success.first() {
        length += 1;
        at = next;
    }
    length
}

#[tokio::test]
async fn a_ten_thousand_step_chain_runs_and_travels_on() {
    if !require(
        Service::Redis,
        "a_ten_thousand_step_chain_runs_and_travels_on",
    ) {
        return;
    }
    const STEPS: usize = 10_000;
    let names = Names::new("hi_chain");
    let (server, running) = worker(&names).await;
    let q = &names.queue;
    push(q, &go_chain(&names, STEPS)).await;
    // Step i receives i (step 1 its argument, the others the previous result) and returns i + 1.
    for i in 1..=3 {
        let state = final_state(&server, &names.task(i)).await;
        assert_eq!(state.state, State::Success, "step {i}: {state:?}");
        assert_eq!(state.results.unwrap()[0].value, i as i64 + 1);
    }
    running.shutdown(Duration::from_secs(10)).await.unwrap();
    // The rest of the chain is back on the queue, whole: the next step carries every step after it.
    let stats = server
        .broker()
        .inspect()
        .unwrap()
        .queue_stats(q)
        .await
        .unwrap();
    assert_eq!(stats.dead, Some(0), "nothing is dead-lettered");
    let pending = server
        .broker()
        .inspect()
        .unwrap()
        .pending(q, 10)
        .await
        .unwrap();
    assert_eq!(pending.len(), 1, "the chain's next step waits on the queue");
    let next = Signature::from_json(&pending[0]).unwrap();
    let k: usize = next.uuid.rsplit('_').next().unwrap().parse().unwrap();
    assert!(k >= 4, "step {k} is next");
    eprintln!("the worker ran {} steps before it stopped", k - 1);
    assert_eq!(next.args.len(), 1);
    assert_eq!(
        next.args[0].value, k as i64,
        "step {k} got the previous result"
    );
    assert_eq!(
        chain_length(&next),
        STEPS - k + 1,
        "the chain after step {k} is whole"
    );
    let done = final_state(&server, &names.task(k - 1)).await;
    assert_eq!(done.results.unwrap()[0].value, k as i64);
    let (server, running) = worker(&names).await;
    a_normal_task_completes(&server).await;
    running.shutdown(Duration::from_secs(10)).await.unwrap();
    names.cleanup().await;
}

#[tokio::test]
async fn deep_nesting_inside_an_argument_is_refused_without_overflowing_the_stack() {
    if !require(
        Service::Redis,
        "deep_nesting_inside_an_argument_is_refused_without_overflowing_the_stack",
    ) {
        return;
    }
    let names = Names::new("hi_deep");
    let (server, running) = worker(&names).await;
    let q = &names.queue;
    let levels = 100_000;
    let value = format!("{}{}", "[".repeat(levels), "]".repeat(levels));
    let args = format!(r#"[{{"Name":"","Type":"json","Value":{value}}}]"#);
    push(q, &go_message(&names.task("deep"), "depth", q, &args)).await;
    // A value nested to a reasonable depth still runs.
    let value = format!("{}{}", "[".repeat(100), "]".repeat(100));
    let args = format!(r#"[{{"Name":"","Type":"json","Value":{value}}}]"#);
    push(q, &go_message(&names.task("fine"), "depth", q, &args)).await;
    let state = final_state(&server, &names.task("deep")).await;
    assert_failure(&state, &["task depth", "argument 1", "nested too deeply"]);
    let state = final_state(&server, &names.task("fine")).await;
    assert_eq!(state.state, State::Success, "{state:?}");
    assert_eq!(state.results.unwrap()[0].value, 99);
    a_normal_task_completes(&server).await;
    running.shutdown(Duration::from_secs(5)).await.unwrap();
    names.cleanup().await;
}

/// Waits for `count` dead letters on `queue` and returns their reasons.
async fn dead_reasons(server: &Server, queue: &str, count: usize) -> Vec<String> {
    let inspect = server.broker().inspect().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let dead = inspect.dead_letters(queue, 100).await.unwrap();
        if dead.len() >= count {
            return dead.into_iter().map(|d| d.reason).collect();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{count} dead letters on {queue}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn numbers_are_reported_as_sent_and_long_names_are_cut_in_reasons() {
    if !require(
        Service::Redis,
        "numbers_are_reported_as_sent_and_long_names_are_cut_in_reasons",
    ) {
        return;
    }
    let names = Names::new("hi_small");
    let mut config = names.config();
    config.unknown_task_requeues = 1;
    let server = Server::new(config).await.unwrap();
    let running = Worker::new(&server)
        .register(add::task())
        .start()
        .await
        .unwrap();
    let q = &names.queue;
    let int = |value: &str| format!(r#"{{"Name":"","Type":"int64","Value":{value}}}"#);
    // RetryCount far out of range: the message is dead-lettered, naming the number as sent.
    let body = go_message(&names.task("retry"), "add", q, "null")
        .replace(r#""RetryCount":0"#, r#""RetryCount":1e30"#);
    push(q, &body).await;
    // An integer below int64's range: the task fails, showing the number exactly.
    let args = format!("[{},{}]", int("1"), int("-9223372036854775809"));
    push(q, &go_message(&names.task("min"), "add", q, &args)).await;
    // Go reads -0 as an int64 0.
    let args = format!("[{},{}]", int("-0"), int("5"));
    push(q, &go_message(&names.task("zero"), "add", q, &args)).await;
    // A 10 KB name no worker knows: dead-lettered, with the name cut in the reason.
    let long_name = "n".repeat(10 * 1024);
    push(q, &go_message(&names.task("long"), &long_name, q, "null")).await;

    let state = final_state(&server, &names.task("min")).await;
    assert_failure(
        &state,
        &["task add", "argument 2", "int64 -9223372036854775809"],
    );
    let state = final_state(&server, &names.task("zero")).await;
    assert_eq!(state.state, State::Success, "{state:?}");
    assert_eq!(state.results.unwrap()[0].value, 5);
    let reasons = dead_reasons(&server, q, 2).await;
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    let retry = reasons
        .iter()
        .find(|r| r.contains("RetryCount"))
        .unwrap_or(&reasons[0]);
    assert!(retry.contains("1e30"), "{retry}");
    assert!(!retry.contains("9223372036854775807"), "{retry}");
    let long = reasons.iter().find(|r| r.contains("unknown task")).unwrap();
    assert!(long.len() < 1_000, "a reason of {} bytes", long.len());
    assert!(
        long.contains("nnnn…") && long.contains("10240 bytes"),
        "{long}"
    );
    a_normal_task_completes(&server).await;
    running.shutdown(Duration::from_secs(5)).await.unwrap();
    names.cleanup().await;
}
