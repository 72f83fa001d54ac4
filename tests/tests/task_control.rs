//! Task control on the memory, Redis and RabbitMQ setups, in one process: progress a sender sees while
//! the task runs, expiry, unique tasks. (Rate limits and cancelling across worker processes are in
//! `task_control_processes.rs`.)

use std::sync::Mutex;
use std::time::Duration;

use machinery::args::encode_arg;
use machinery::{task, Server, Signature, State, TaskContext, TaskError, Worker};
use machinery_tests::eventually;
use machinery_tests::setups::Setup;

/// The setups every feature is checked on: one per broker.
const SETUPS: [Setup; 3] = [Setup::Memory, Setup::Redis, Setup::Amqp];

/// Keys the test has released: a task waiting on its key returns once it is here.
static RELEASED: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn release(key: &str) {
    RELEASED.lock().unwrap().push(key.to_owned());
}

async fn wait_for_release(key: &str) {
    let released = eventually(Duration::from_secs(30), || async {
        RELEASED.lock().unwrap().iter().any(|k| k == key)
    })
    .await;
    assert!(released, "the test never released {key}");
}

#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
struct Done {
    done: u32,
    total: u32,
}

/// Reports 1 of 2, waits for the test to release `key`, reports 2 of 2, returns.
#[task]
async fn two_steps(ctx: &TaskContext, key: String) -> Result<u32, TaskError> {
    ctx.set_progress(&Done { done: 1, total: 2 }).await?;
    wait_for_release(&key).await;
    ctx.set_progress(&Done { done: 2, total: 2 }).await?;
    Ok(2)
}

/// Runs recorded under `key`.
static RUNS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn runs_of(key: &str) -> usize {
    RUNS.lock().unwrap().iter().filter(|k| *k == key).count()
}

/// Records a run under `key`, sleeps `ms`, returns `key`.
#[task]
async fn counted(key: String, ms: u64) -> Result<String, TaskError> {
    RUNS.lock().unwrap().push(key.clone());
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(key)
}

/// Waits until cancelled, then returns `Ok` (the outcome of a cancelled run is FAILURE all the same).
#[task]
async fn until_cancelled(ctx: &TaskContext) -> Result<String, TaskError> {
    tokio::select! {
        () = ctx.cancelled() => Ok("saw the cancellation".to_owned()),
        () = tokio::time::sleep(Duration::from_secs(60)) => Err(TaskError::new("never cancelled")),
    }
}

/// An error callback: records `marker: error` as a run.
#[task]
async fn record_error(error: String, marker: String) -> Result<(), TaskError> {
    RUNS.lock().unwrap().push(format!("{marker}: {error}"));
    Ok(())
}

async fn worker_on(server: &Server) -> machinery::RunningWorker {
    Worker::new(server)
        .register(two_steps::task())
        .register(counted::task())
        .register(until_cancelled::task())
        .register(record_error::task())
        .concurrency(4)
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_sees_progress_while_the_task_runs() {
    for setup in SETUPS {
        let Some(server) = setup.server("progress").await else {
            continue;
        };
        let worker = worker_on(&server).await;
        let key = machinery_tests::unique("progress");
        let result = two_steps::send(&server, key.clone()).await.unwrap();
        let reported = eventually(setup.timeout(), || async {
            result.progress::<Done>().await.unwrap().is_some()
        })
        .await;
        assert!(reported, "{setup:?}: no progress seen");
        assert_eq!(
            result.progress::<Done>().await.unwrap(),
            Some(Done { done: 1, total: 2 }),
            "{setup:?}"
        );
        let state = result.state().await.unwrap().unwrap();
        assert_eq!(state.state, State::Started, "{setup:?}: still running");
        release(&key);
        assert_eq!(result.get(setup.timeout()).await.unwrap(), 2, "{setup:?}");
        assert_eq!(
            result.progress::<Done>().await.unwrap(),
            None,
            "{setup:?}: a finished task reports no progress"
        );
        worker.shutdown(setup.timeout()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_task_never_runs_and_get_says_it_expired() {
    for setup in SETUPS {
        let Some(server) = setup.server("expiry").await else {
            continue;
        };
        let (expired, fresh) = (
            machinery_tests::unique("expired"),
            machinery_tests::unique("fresh"),
        );
        // Sent with no worker running: one expires before a worker starts, the other does not.
        let late = server
            .send(counted::signature(expired.clone(), 0).expires_in(Duration::from_millis(200)))
            .await
            .unwrap();
        let on_time = server
            .send(counted::signature(fresh.clone(), 0).expires_in(Duration::from_secs(600)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let worker = worker_on(&server).await;
        let error = late.get(setup.timeout()).await.unwrap_err();
        assert!(error.is_expired(), "{setup:?}: {error}");
        assert!(
            error
                .to_string()
                .contains("expired: the task was not started before"),
            "{setup:?}: {error}"
        );
        let state = late.state().await.unwrap().unwrap();
        assert!(state.is_expired(), "{setup:?}: {state:?}");
        assert_eq!(
            on_time.get(setup.timeout()).await.unwrap(),
            fresh,
            "{setup:?}"
        );
        assert_eq!(runs_of(&expired), 0, "{setup:?}: the expired task ran");
        assert_eq!(runs_of(&fresh), 1, "{setup:?}");
        worker.shutdown(setup.timeout()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unique_task_sent_ten_times_at_once_runs_once_and_every_handle_gets_its_result() {
    // The RabbitMQ broker with the Redis backend: the RabbitMQ backend has no atomic claim.
    for setup in [
        Setup::Memory,
        Setup::Redis,
        Setup::AmqpRedis,
        Setup::RedisMemcache,
    ] {
        let Some(server) = setup.server("unique").await else {
            continue;
        };
        let worker = worker_on(&server).await;
        let key = machinery_tests::unique("unique");
        let mut sends = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let (server, key) = (server.clone(), key.clone());
            sends.spawn(async move {
                let sig = counted::signature(key, 300).unique_for(Duration::from_secs(60));
                server.send(sig).await.unwrap()
            });
        }
        let handles = sends.join_all().await;
        let first = handles[0].uuid().to_owned();
        assert!(
            handles.iter().all(|h| h.uuid() == first),
            "{setup:?}: every send returns the first task's handle"
        );
        for handle in &handles {
            assert_eq!(handle.get(setup.timeout()).await.unwrap(), key, "{setup:?}");
        }
        assert_eq!(runs_of(&key), 1, "{setup:?}: the task ran once");

        // Its final state released the key: the same task sent again runs again.
        let again = server
            .send(counted::signature(key.clone(), 300).unique_for(Duration::from_secs(60)))
            .await
            .unwrap();
        assert_ne!(again.uuid(), first, "{setup:?}");
        assert_eq!(again.get(setup.timeout()).await.unwrap(), key, "{setup:?}");
        assert_eq!(runs_of(&key), 2, "{setup:?}");
        // Other arguments are another task.
        let other = server
            .send(counted::signature(format!("{key}_other"), 0).unique_for(Duration::from_secs(60)))
            .await
            .unwrap();
        assert_ne!(other.uuid(), again.uuid(), "{setup:?}");
        other.get(setup.timeout()).await.unwrap();
        worker.shutdown(setup.timeout()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_without_an_atomic_claim_refuses_unique_tasks_saying_why() {
    let Some(server) = Setup::Amqp.server("unique_refused").await else {
        return;
    };
    let sig = counted::signature("x", 0).unique_for(Duration::from_secs(60));
    let error = server.send(sig).await.unwrap_err().to_string();
    assert!(error.contains("unique-task keys"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_stops_a_pending_task_and_a_running_one_whose_error_callbacks_run() {
    for setup in SETUPS {
        let Some(server) = setup.server("cancel").await else {
            continue;
        };
        // Pending: cancelled before any worker runs; it never runs.
        let key = machinery_tests::unique("cancel_pending");
        let pending = counted::send(&server, key.clone(), 0).await.unwrap();
        pending.cancel().await.unwrap();
        let worker = worker_on(&server).await;
        let after = counted::send(&server, format!("{key}_after"), 0)
            .await
            .unwrap();
        after.get(setup.timeout()).await.unwrap();
        let error = pending.get(setup.timeout()).await.unwrap_err().to_string();
        assert!(
            error.contains("cancelled: the task was cancelled before a worker ran it"),
            "{setup:?}: {error}"
        );
        assert_eq!(runs_of(&key), 0, "{setup:?}: the cancelled task ran");

        // Running: ctx.cancelled() resolves, the final state is FAILURE and the error callback runs.
        let marker = machinery_tests::unique("cancel_running");
        let callback =
            Signature::with_args("record_error", vec![encode_arg("marker", &marker).unwrap()]);
        let running = server
            .send(until_cancelled::signature().on_error(callback))
            .await
            .unwrap();
        let started = eventually(setup.timeout(), || async {
            running
                .state()
                .await
                .unwrap()
                .is_some_and(|s| s.state == State::Started)
        })
        .await;
        assert!(started, "{setup:?}");
        running.cancel().await.unwrap();
        let state = running.wait(setup.timeout()).await.unwrap();
        assert!(state.is_cancelled(), "{setup:?}: {state:?}");
        let recorded = eventually(setup.timeout(), || async {
            RUNS.lock()
                .unwrap()
                .iter()
                .any(|r| r.starts_with(&format!("{marker}: cancelled: ")))
        })
        .await;
        assert!(recorded, "{setup:?}: the error callback did not run");
        // Cancelling a finished task changes nothing.
        running.cancel().await.unwrap();
        assert!(
            running.state().await.unwrap().unwrap().is_cancelled(),
            "{setup:?}"
        );
        worker.shutdown(setup.timeout()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unique_claim_lapses_after_its_period() {
    for setup in [Setup::Memory, Setup::Redis] {
        let Some(server) = setup.server("unique_lapse").await else {
            continue;
        };
        let worker = worker_on(&server).await;
        let key = machinery_tests::unique("unique_lapse");
        let unique =
            || counted::signature(key.clone(), 1500).unique_for(Duration::from_millis(300));
        let first = server.send(unique()).await.unwrap();
        let again = server.send(unique()).await.unwrap();
        assert_eq!(again.uuid(), first.uuid(), "{setup:?}: within the period");
        tokio::time::sleep(Duration::from_millis(600)).await;
        // The first still runs, but its claim has lapsed: a second task is queued.
        let later = server.send(unique()).await.unwrap();
        assert_ne!(later.uuid(), first.uuid(), "{setup:?}: after the period");
        first.get(setup.timeout()).await.unwrap();
        later.get(setup.timeout()).await.unwrap();
        assert_eq!(runs_of(&key), 2, "{setup:?}");
        worker.shutdown(setup.timeout()).await.unwrap();
    }
}
