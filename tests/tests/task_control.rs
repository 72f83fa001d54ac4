//! Task control on the memory, Redis and RabbitMQ setups, in one process: progress a sender sees while
//! the task runs, expiry, unique tasks. (Rate limits and cancelling across worker processes are in
//! `task_control_processes.rs`.)

use std::sync::Mutex;
use std::time::Duration;

use machinery::{task, Server, State, TaskContext, TaskError, Worker};
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

async fn worker_on(server: &Server) -> machinery::RunningWorker {
    Worker::new(server)
        .register(two_steps::task())
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
