//! `Worker::launch` in a real process: the first SIGTERM stops fetching and waits for running tasks; a
//! second one stops at once, and the cut-off task's message goes back to the queue.

use std::time::Duration;

use machinery::{Arg, Config, Server, Signature, State};
use machinery_tests::{eventually, require, unique, Service};

const WAIT: Duration = Duration::from_secs(20);

fn config(queue: &str) -> Config {
    let url = Service::Redis.url();
    let mut config = Config::new(&url, &url).with_default_queue(queue);
    config.redis.delayed_tasks_key = format!("{queue}_delayed");
    config.results_expire_in = 120;
    config
}

fn spawn_worker(queue: &str) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_test_worker"))
        .env("BROKER", Service::Redis.url())
        .env("RESULT_BACKEND", Service::Redis.url())
        .env("DEFAULT_QUEUE", queue)
        .env("REDIS_DELAYED_TASKS_KEY", format!("{queue}_delayed"))
        .env("RESULTS_EXPIRE_IN", "120")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("start the test worker")
}

fn signal(child: &tokio::process::Child, name: &str) {
    let pid = child.id().expect("the worker is running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-s", name, &pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill -s {name} {pid} failed");
}

fn sleep_ms(ms: i64) -> Signature {
    Signature::with_args("sleep_ms", vec![Arg::new("ms", "int64", ms.into())])
}

async fn wait_started(server: &Server, uuid: &str) {
    let started = eventually(WAIT, || async {
        let state = server.backend().get_state(uuid).await.unwrap();
        state.is_some_and(|s| s.state == State::Started)
    })
    .await;
    assert!(started, "the task never started");
}

#[tokio::test]
async fn the_first_sigterm_waits_for_running_tasks_then_exits_cleanly() {
    if !require(
        Service::Redis,
        "the_first_sigterm_waits_for_running_tasks_then_exits_cleanly",
    ) {
        return;
    }
    let queue = unique("sig_graceful");
    let server = Server::new(config(&queue)).await.unwrap();
    let mut worker = spawn_worker(&queue);
    let result = server.send(sleep_ms(1500)).await.unwrap();
    wait_started(&server, result.uuid()).await;
    signal(&worker, "TERM");
    let status = tokio::time::timeout(WAIT, worker.wait())
        .await
        .expect("the worker exits")
        .unwrap();
    assert!(
        status.success(),
        "graceful shutdown should exit 0, got {status}"
    );
    let state = result.state().await.unwrap().unwrap();
    assert_eq!(
        state.state,
        State::Success,
        "the running task finished before the worker exited"
    );
    let stats = server
        .broker()
        .inspect()
        .unwrap()
        .queue_stats(&queue)
        .await
        .unwrap();
    assert_eq!((stats.pending, stats.in_flight), (0, Some(0)));
}

#[tokio::test]
async fn a_second_sigterm_quits_at_once_and_returns_the_task_to_the_queue() {
    if !require(
        Service::Redis,
        "a_second_sigterm_quits_at_once_and_returns_the_task_to_the_queue",
    ) {
        return;
    }
    let queue = unique("sig_abrupt");
    let server = Server::new(config(&queue)).await.unwrap();
    let mut worker = spawn_worker(&queue);
    let result = server.send(sleep_ms(30_000)).await.unwrap();
    wait_started(&server, result.uuid()).await;
    signal(&worker, "TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    signal(&worker, "INT");
    let started = std::time::Instant::now();
    let status = tokio::time::timeout(WAIT, worker.wait())
        .await
        .expect("the worker exits")
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the second signal should stop the worker at once"
    );
    assert!(
        !status.success(),
        "an abrupt stop is reported as an error exit"
    );
    let stats = server
        .broker()
        .inspect()
        .unwrap()
        .queue_stats(&queue)
        .await
        .unwrap();
    assert_eq!(
        (stats.pending, stats.in_flight),
        (1, Some(0)),
        "the cut-off task is back in the queue"
    );
    let _ = server.broker().inspect().unwrap().purge(&queue).await;
}
