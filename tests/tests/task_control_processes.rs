//! Task control across worker processes (`test_worker`): rate limits shared by two workers, and a
//! running task cancelled from this process.
//! Redis and RabbitMQ (with the Redis backend, which holds the shared schedule); the memory broker, which
//! cannot span processes, runs two workers in this process.

use std::time::{Duration, Instant};

use machinery::rate_limit::RateLimit;
use machinery::{
    Arg, Config, HandlerFuture, Server, Signature, TaskContext, TaskDef, TaskOptions, TaskResult,
    Worker,
};
use machinery_tests::{require, unique, Service};

const WAIT: Duration = Duration::from_secs(60);

/// The cancel grace of the workers here.
const GRACE: Duration = Duration::from_millis(1500);

#[derive(Debug, Clone, Copy)]
enum Broker {
    Memory,
    Redis,
    RabbitMq,
}

/// A server on `broker` with the Redis result backend (memory for the memory broker), on a queue of
/// its own; `None` if the services are unreachable and not required.
async fn server(broker: Broker, queue: &str) -> Option<Server> {
    let mut config = match broker {
        Broker::Memory => Config::default(),
        Broker::Redis => {
            if !require(Service::Redis, "task_control_processes") {
                return None;
            }
            Config::new(Service::Redis.url(), Service::Redis.url())
        }
        Broker::RabbitMq => {
            if !require(Service::RabbitMq, "task_control_processes")
                || !require(Service::Redis, "task_control_processes")
            {
                return None;
            }
            Config::new(Service::RabbitMq.url(), Service::Redis.url())
        }
    }
    .with_default_queue(queue);
    config.results_expire_in = 120;
    config.redis.delayed_tasks_key = format!("{queue}_delayed");
    config.redis.delayed_tasks_poll_period = 20;
    config.amqp.exchange = "machinery_tests_control".into();
    config.amqp.binding_key = queue.to_owned();
    config
        .amqp
        .queue_declare_args
        .insert("x-expires".into(), 600_000.into());
    Some(Server::new(config).await.expect("server"))
}

/// A `test_worker` process on the same broker, backend and queue as [`server`].
fn spawn_worker(broker: Broker, queue: &str) -> tokio::process::Child {
    let broker_url = match broker {
        Broker::RabbitMq => Service::RabbitMq.url(),
        _ => Service::Redis.url(),
    };
    tokio::process::Command::new(env!("CARGO_BIN_EXE_test_worker"))
        .env("BROKER", broker_url)
        .env("RESULT_BACKEND", Service::Redis.url())
        .env("DEFAULT_QUEUE", queue)
        .env("REDIS_DELAYED_TASKS_KEY", format!("{queue}_delayed"))
        .env("REDIS_DELAYED_TASKS_POLL_PERIOD", "20")
        .env("RESULTS_EXPIRE_IN", "120")
        .env("AMQP_EXCHANGE", "machinery_tests_control")
        .env("AMQP_BINDING_KEY", queue)
        .env("AMQP_QUEUE_DECLARE_ARGS", "x-expires:600000")
        .env("WORKER_CONCURRENCY", "4")
        .env("WORKER_CANCEL_GRACE_MS", GRACE.as_millis().to_string())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("start the test worker")
}

fn sleep_ms_handler(_: TaskContext, args: Vec<Arg>) -> HandlerFuture {
    Box::pin(async move {
        let ms = args.first().and_then(|a| a.value.as_i64()).unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms.max(0) as u64)).await;
        Ok(vec![TaskResult::new("int64", ms.into())])
    })
}

const OPTIONS: TaskOptions = TaskOptions {
    queue: None,
    retries: 0,
    retry_timeout: 0,
    timeout: None,
    backoff: None,
    unique_for: None,
    rate_limit: None,
};

fn sleep_until_cancelled_handler(ctx: TaskContext, args: Vec<Arg>) -> HandlerFuture {
    Box::pin(async move {
        let ms = args.first().and_then(|a| a.value.as_i64()).unwrap_or(0);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms.max(0) as u64)) => {}
            _ = ctx.cancelled() => {
                return Err(machinery::TaskFailure::new(
                    machinery::FailureKind::Error,
                    "stopped: the task saw its cancellation",
                ));
            }
        }
        Ok(vec![TaskResult::new("int64", ms.into())])
    })
}

static SLEEP_UNTIL_CANCELLED: TaskDef = TaskDef {
    name: "sleep_until_cancelled",
    rust_path: "task_control_processes::sleep_until_cancelled",
    handler: sleep_until_cancelled_handler,
    options: OPTIONS,
};

/// The in-process twins of `test_worker`'s tasks, for the memory broker.
static LIMITED_SLEEP_MS: TaskDef = TaskDef {
    name: "limited_sleep_ms",
    rust_path: "task_control_processes::limited_sleep_ms",
    handler: sleep_ms_handler,
    options: TaskOptions {
        rate_limit: Some(RateLimit::new(50, Duration::from_secs(1))),
        ..OPTIONS
    },
};

static SLEEP_MS: TaskDef = TaskDef {
    name: "sleep_ms",
    rust_path: "task_control_processes::sleep_ms",
    handler: sleep_ms_handler,
    options: OPTIONS,
};

fn sleep_ms(name: &str, ms: i64) -> Signature {
    Signature::with_args(name, vec![Arg::new("ms", "int64", ms.into())])
}

/// Two workers: `test_worker` processes, or for the memory broker two workers in this process.
enum Workers {
    Processes(Vec<tokio::process::Child>),
    InProcess(Vec<machinery::RunningWorker>),
}

async fn two_workers(broker: Broker, server: &Server, queue: &str) -> Workers {
    match broker {
        Broker::Memory => {
            let mut workers = Vec::new();
            for _ in 0..2 {
                let worker = Worker::new(server)
                    .register(&LIMITED_SLEEP_MS)
                    .register(&SLEEP_MS)
                    .register(&SLEEP_UNTIL_CANCELLED)
                    .concurrency(4)
                    .cancel_grace(GRACE)
                    .start()
                    .await
                    .unwrap();
                workers.push(worker);
            }
            Workers::InProcess(workers)
        }
        _ => Workers::Processes(vec![
            spawn_worker(broker, queue),
            spawn_worker(broker, queue),
        ]),
    }
}

async fn stop(workers: Workers) {
    match workers {
        Workers::Processes(children) => {
            for mut child in children {
                let _ = child.kill().await;
            }
        }
        Workers::InProcess(workers) => {
            for worker in workers {
                worker.shutdown(WAIT).await.unwrap();
            }
        }
    }
}

/// 200 tasks limited to 50 starts a second take at least 4 s over two workers, while a task without a
/// limit, sent after them, completes at once.
async fn rate_limit_holds_across_two_workers(broker: Broker) {
    let queue = unique("rate");
    let Some(server) = server(broker, &queue).await else {
        return;
    };
    let workers = two_workers(broker, &server, &queue).await;
    // Both workers are up (a task each has run) before the clock starts.
    for _ in 0..4 {
        let warm = server
            .send(sleep_ms("sleep_ms", 0).retype::<i64>())
            .await
            .unwrap();
        warm.get(WAIT).await.unwrap();
    }
    let started = Instant::now();
    let mut limited = Vec::new();
    for _ in 0..200 {
        let sig = sleep_ms("limited_sleep_ms", 30).retype::<i64>();
        limited.push(server.send(sig).await.unwrap());
    }
    let unlimited = server
        .send(sleep_ms("sleep_ms", 0).retype::<i64>())
        .await
        .unwrap();
    unlimited.get(WAIT).await.unwrap();
    let unlimited_took = started.elapsed();
    for result in &limited {
        assert_eq!(result.get(WAIT).await.unwrap(), 30, "{broker:?}");
    }
    let took = started.elapsed();
    stop(workers).await;
    assert!(
        took >= Duration::from_secs(4),
        "{broker:?}: 200 starts at 50/s took {took:?}"
    );
    // It does not wait for the limited ones ahead of it in the queue: done long before they are.
    assert!(
        unlimited_took + Duration::from_secs(1) < took,
        "{broker:?}: the unlimited task waited behind the limited ones: {unlimited_took:?} (all took {took:?})"
    );
    eprintln!("{broker:?}: limited took {took:?}, the unlimited task {unlimited_took:?}");
}

/// One test for the three brokers, one after the other: the shared schedule is per task name, so two
/// of them at once would share it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_holds_across_two_workers_and_other_tasks_keep_flowing() {
    for broker in [Broker::Memory, Broker::Redis, Broker::RabbitMq] {
        rate_limit_holds_across_two_workers(broker).await;
    }
}

async fn wait_started(server: &Server, uuid: &str) {
    let started = machinery_tests::eventually(WAIT, || async {
        let state = server.backend().get_state(uuid).await.unwrap();
        state.is_some_and(|s| s.state == machinery::State::Started)
    })
    .await;
    assert!(started, "the task never started");
}

/// A running task cancelled from this process: one that watches `ctx.cancelled()` stops at once, one
/// that does not is dropped after the grace; both end FAILURE "cancelled: ..." and their error
/// callbacks run. A pending task cancelled never runs.
async fn cancel_running_tasks(broker: Broker) {
    let queue = unique("cancel");
    let Some(server) = server(broker, &queue).await else {
        return;
    };
    let workers = two_workers(broker, &server, &queue).await;
    // An error callback that records the error: the sum of nothing, with the error prepended.
    let polite = server
        .send(sleep_ms("sleep_until_cancelled", 30_000).retype::<i64>())
        .await
        .unwrap();
    let stubborn = server
        .send(
            sleep_ms("sleep_ms", 30_000)
                .on_error(Signature::new("sleep_ms"))
                .retype::<i64>(),
        )
        .await
        .unwrap();
    wait_started(&server, polite.uuid()).await;
    wait_started(&server, stubborn.uuid()).await;

    let cancelled_at = Instant::now();
    polite.cancel().await.unwrap();
    let error = polite.get(WAIT).await.unwrap_err().to_string();
    let polite_took = cancelled_at.elapsed();
    assert!(
        error.contains("cancelled: the task was cancelled while it ran"),
        "{broker:?}: {error}"
    );
    assert!(
        polite_took < GRACE,
        "{broker:?}: the polite task took {polite_took:?}"
    );

    let cancelled_at = Instant::now();
    server.cancel(stubborn.uuid()).await.unwrap();
    let state = stubborn.wait(WAIT).await.unwrap();
    let stubborn_took = cancelled_at.elapsed();
    assert!(state.is_cancelled(), "{broker:?}: {state:?}");
    assert!(
        state.error.contains("dropped after the grace"),
        "{broker:?}: {}",
        state.error
    );
    assert!(
        stubborn_took >= GRACE && stubborn_took < GRACE + Duration::from_secs(10),
        "{broker:?}: the stubborn task was dropped after {stubborn_took:?}"
    );
    stop(workers).await;
    eprintln!("{broker:?}: polite stopped in {polite_took:?}, stubborn in {stubborn_took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_task_is_cancelled_from_another_process() {
    for broker in [Broker::Memory, Broker::Redis, Broker::RabbitMq] {
        cancel_running_tasks(broker).await;
    }
}
