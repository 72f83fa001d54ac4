//! Acknowledgements on RabbitMQ (issue 15): tasks of one consumer that finish while an ack is on its
//! way are acknowledged together, as one `basic.ack` with `multiple` for a run that leaves nothing
//! unsettled below it; a task still running is never covered by the acks of those that finish after it.
//! What went on the wire is read from the bytes the worker sent, through the fault proxy.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use machinery::{task, Config, RunningWorker, Server, TaskError, Worker};
use machinery_tests::amqp::{self, basic_acks, queue_info, AckFrame, Cleanup};
use machinery_tests::fault_proxy::FaultProxy;
use machinery_tests::tasks::{probe, probe_record};
use machinery_tests::{eventually, require, unique, Service};

/// A sender on RabbitMQ directly, and a server for the worker whose broker link goes through `proxy`;
/// results on Redis.
async fn servers(prefix: &str, proxy: &FaultProxy) -> (Config, Server, Server, Cleanup) {
    let mut config: Config = amqp::config(prefix);
    config.result_backend = Service::Redis.url();
    let cleanup = Cleanup::for_config(&config);
    let sender = Server::new(config.clone()).await.unwrap();
    let mut through_proxy = config.clone();
    through_proxy.broker = format!("amqp://guest:guest@{}/", proxy.addr());
    let worker_server = Server::new(through_proxy).await.unwrap();
    (config, sender, worker_server, cleanup)
}

/// The keys the test has released `held` tasks of.
static RELEASED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Runs until the test releases `key` (1), or for a minute at most (0).
#[task]
async fn held(key: String) -> Result<i64, TaskError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if RELEASED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&key)
        {
            return Ok(1);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(0)
}

/// A worker of the probe and held tasks at `concurrency` on `server`.
async fn probe_worker(server: &Server, concurrency: usize) -> RunningWorker {
    Worker::new(server)
        .register(probe::task())
        .register(held::task())
        .concurrency(concurrency)
        .start()
        .await
        .unwrap()
}

/// Whether `queue` comes to `(ready, unacknowledged)` messages within `within`.
async fn queue_comes_to(queue: &str, counts: (u64, u64), within: Duration) -> bool {
    eventually(within, || async {
        queue_info(queue).is_some_and(|q| (q.ready, q.unacked) == counts)
    })
    .await
}

/// Replays the ack frames of one channel over deliveries `1..=delivered`: every frame must name a tag
/// still unacknowledged (a tag named twice closes the channel), and in the end every delivery is
/// acknowledged.
fn replay(acks: &[AckFrame], delivered: u64) {
    let mut unacked: BTreeSet<u64> = (1..=delivered).collect();
    for frame in acks {
        assert!(
            unacked.contains(&frame.tag),
            "{frame:?} names a tag already acknowledged or never delivered"
        );
        if frame.multiple {
            unacked.retain(|tag| *tag > frame.tag);
        } else {
            unacked.remove(&frame.tag);
        }
    }
    assert!(unacked.is_empty(), "never acknowledged: {unacked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_finishing_together_are_acknowledged_in_shared_frames() {
    if !require(Service::RabbitMq, "amqp shared acks")
        || !require(Service::Redis, "amqp shared acks")
    {
        return;
    }
    let proxy = FaultProxy::start(Service::RabbitMq.addr()).await;
    proxy.record_sent();
    let (config, sender, worker_server, _cleanup) = servers("acks", &proxy).await;
    let key = unique("acks");
    const TASKS: i64 = 100;
    let mut results = Vec::new();
    for n in 0..TASKS {
        // Ten at a time start together and sleep alike, so they finish together.
        results.push(probe::send(&sender, &key, n, 30).await.unwrap());
    }
    let worker = probe_worker(&worker_server, 10).await;
    for (n, result) in results.into_iter().enumerate() {
        assert_eq!(result.get(Duration::from_secs(30)).await.unwrap(), n as i64);
    }
    let acknowledged = queue_comes_to(&config.default_queue, (0, 0), Duration::from_secs(10)).await;
    assert!(
        acknowledged,
        "every message acknowledged: {:?}",
        queue_info(&config.default_queue)
    );
    worker.shutdown(Duration::from_secs(10)).await.unwrap();

    let record = probe_record(&key);
    assert_eq!(record.started, TASKS as usize, "each task ran once");
    let frames: Vec<AckFrame> = proxy
        .sent()
        .iter()
        .flat_map(|sent| basic_acks(sent))
        .collect();
    let channels: BTreeSet<u16> = frames.iter().map(|frame| frame.channel).collect();
    assert_eq!(
        channels.len(),
        1,
        "one consumer channel acknowledged: {frames:?}"
    );
    replay(&frames, TASKS as u64);
    let multiple = frames.iter().filter(|frame| frame.multiple).count();
    eprintln!(
        "{} ack frames for {TASKS} tasks, {multiple} with multiple",
        frames.len()
    );
    assert!(
        multiple > 0 && frames.len() < TASKS as usize,
        "tasks finishing together shared frames: {} frames for {TASKS} tasks, {multiple} with multiple",
        frames.len()
    );
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_task_is_not_acknowledged_with_those_that_finish_after_it() {
    if !require(Service::RabbitMq, "amqp ack below") || !require(Service::Redis, "amqp ack below") {
        return;
    }
    let proxy = FaultProxy::start(Service::RabbitMq.addr()).await;
    proxy.record_sent();
    let (config, sender, worker_server, _cleanup) = servers("ackbelow", &proxy).await;
    let key = unique("ackbelow");
    // The held one is delivered first (the lowest tag); the quick ones finish while it runs.
    let slow = held::send(&sender, &key).await.unwrap();
    let mut quick = Vec::new();
    for n in 0..20 {
        quick.push(probe::send(&sender, &key, n, 0).await.unwrap());
    }
    let worker = probe_worker(&worker_server, 4).await;
    for (n, result) in quick.into_iter().enumerate() {
        assert_eq!(result.get(Duration::from_secs(20)).await.unwrap(), n as i64);
    }
    let settled = queue_comes_to(&config.default_queue, (0, 1), Duration::from_secs(20)).await;
    assert!(
        settled,
        "the quick tasks' messages are acknowledged, the held one's is not: {:?}",
        queue_info(&config.default_queue)
    );
    RELEASED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(key.clone());
    assert_eq!(
        slow.get(Duration::from_secs(20)).await.unwrap(),
        1,
        "the held task ran until it was released"
    );
    let acknowledged = queue_comes_to(&config.default_queue, (0, 0), Duration::from_secs(10)).await;
    assert!(
        acknowledged,
        "the held task's message is acknowledged when it ends"
    );
    worker.shutdown(Duration::from_secs(10)).await.unwrap();
    let frames: Vec<AckFrame> = proxy
        .sent()
        .iter()
        .flat_map(|sent| basic_acks(sent))
        .collect();
    replay(&frames, 21);
    drop(proxy);
}
