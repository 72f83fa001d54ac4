//! Per-task log lines and the run's context: one INFO line per task received and per task finished
//! (name, id, outcome, duration) on the `machinery::task` target, which a filter turns down on its own;
//! `TaskContext::attempt`, `redelivered` and `deadline`.
//!
//! Each test runs on a current-thread runtime with its own subscriber (`set_default`), so the worker's
//! events, emitted on that thread, reach it and no other test's. The lines are the engine's, the same on
//! every broker; they are checked on the memory, Redis and RabbitMQ setups.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use machinery::{task, Config, Server, TaskContext, TaskError, Worker, TASK_LOG_TARGET};
use machinery_tests::setups::Setup;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;

const WAIT: Duration = Duration::from_secs(10);

/// Log output collected in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn subscriber(captured: &Captured, filter: Targets) -> impl tracing::Subscriber + Send + Sync {
    let writer = captured.clone();
    tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .with_filter(filter),
    )
}

use tracing_subscriber::Layer as _;

/// `(attempt, redelivered, has a deadline)`; fails on its first run so that the second is a retry.
#[task(timeout = "30s", retries = 1)]
async fn describe_run(ctx: &TaskContext) -> Result<(u32, bool, bool), TaskError> {
    if ctx.attempt() == 1 {
        return Err(ctx.retry_after(Duration::from_millis(10)));
    }
    let deadline = ctx.deadline().expect("the task has a time limit");
    assert!(deadline > std::time::Instant::now());
    Ok((ctx.attempt(), ctx.redelivered(), true))
}

#[task]
async fn failing_logged() -> Result<(), TaskError> {
    Err(TaskError::new("nope"))
}

#[tokio::test]
async fn a_task_logs_one_line_when_received_and_one_when_finished() {
    for setup in [Setup::Memory, Setup::Redis, Setup::Amqp] {
        let Some(server) = setup.server("task_logs").await else {
            continue;
        };
        logs_on(setup, &server).await;
    }
}

async fn logs_on(setup: Setup, server: &Server) {
    let captured = Captured::default();
    let _guard = tracing::subscriber::set_default(subscriber(
        &captured,
        Targets::new().with_target(TASK_LOG_TARGET, LevelFilter::INFO),
    ));
    let worker = Worker::new(server)
        .register(describe_run::task())
        .register(failing_logged::task())
        .start()
        .await
        .unwrap();
    let run = describe_run::send(server).await.unwrap();
    let (attempt, redelivered, has_deadline) = run.get(setup.timeout()).await.unwrap();
    assert_eq!(attempt, 2, "{setup:?}: the retry is the second attempt");
    assert!(!redelivered, "{setup:?}: nothing was delivered twice");
    assert!(has_deadline);
    let failed = failing_logged::send(server).await.unwrap();
    assert!(failed.get(setup.timeout()).await.is_err());
    worker.shutdown(setup.timeout()).await.unwrap();

    let text = captured.text();
    let lines_of = |uuid: &str, what: &str| {
        text.lines()
            .filter(|l| l.contains(uuid) && l.contains(what))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let received = lines_of(run.uuid(), "task received");
    assert_eq!(
        received.len(),
        2,
        "{setup:?}: one line per delivery (run and retry):\n{text}"
    );
    assert!(received
        .iter()
        .all(|l| l.contains("INFO") && l.contains("describe_run")));
    let finished = lines_of(run.uuid(), "task finished");
    assert_eq!(finished.len(), 2, "{setup:?}: one line per run:\n{text}");
    assert!(finished[0].contains("RETRY"), "{setup:?}: {text}");
    assert!(
        finished[1].contains("SUCCESS") && finished[1].contains("took_ms="),
        "{setup:?}: {text}"
    );
    let failed_line = lines_of(failed.uuid(), "task finished");
    assert_eq!(failed_line.len(), 1, "{setup:?}: {text}");
    assert!(
        failed_line[0].contains("FAILURE") && failed_line[0].contains("nope"),
        "{setup:?}: {text}"
    );
}

#[tokio::test]
async fn a_filter_on_the_task_target_turns_the_lines_down() {
    let captured = Captured::default();
    // Everything at INFO, except the per-task lines.
    let filter = Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target(TASK_LOG_TARGET, LevelFilter::WARN);
    let _guard = tracing::subscriber::set_default(subscriber(&captured, filter));
    let server = Server::new(Config::default()).await.unwrap();
    let worker = Worker::new(&server)
        .register(failing_logged::task())
        .start()
        .await
        .unwrap();
    let failed = failing_logged::send(&server).await.unwrap();
    assert!(failed.get(WAIT).await.is_err());
    worker.shutdown(WAIT).await.unwrap();
    let text = captured.text();
    // Other INFO lines still show. (Which ones is not asserted: tracing caches each log site's interest
    // across the subscribers of tests running at the same time, so a given site can be missed.)
    assert!(
        text.lines()
            .any(|line| line.contains(" INFO ") && line.contains("machinery::worker")),
        "other INFO lines still show:\n{text}"
    );
    assert!(
        !text.contains("task received") && !text.contains("task finished"),
        "{text}"
    );
}

/// Sleeps long on its first delivery (to be cut off by a shutdown); returns whether it was delivered
/// before.
#[task]
async fn cut_off_once(ctx: &TaskContext) -> Result<bool, TaskError> {
    if !ctx.redelivered() {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    Ok(ctx.redelivered())
}

#[tokio::test]
async fn a_message_delivered_again_says_so_to_its_task() {
    let server = Server::new(Config::default()).await.unwrap();
    let first = Worker::new(&server)
        .register(cut_off_once::task())
        .start()
        .await
        .unwrap();
    let result = cut_off_once::send(&server).await.unwrap();
    let started = machinery_tests::eventually(WAIT, || async {
        result
            .state()
            .await
            .unwrap()
            .is_some_and(|s| s.state == machinery::State::Started)
    })
    .await;
    assert!(started);
    // Cut off: the message goes back to the queue, marked as delivered before.
    assert!(first.shutdown(Duration::from_millis(50)).await.is_err());
    let second = Worker::new(&server)
        .register(cut_off_once::task())
        .start()
        .await
        .unwrap();
    assert!(
        result.get(WAIT).await.unwrap(),
        "the second run is told it was redelivered"
    );
    second.shutdown(WAIT).await.unwrap();
}
