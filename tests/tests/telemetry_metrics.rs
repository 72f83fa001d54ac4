//! The metrics move as they should: received, succeeded, failed, retried and dead-lettered counters per
//! task or queue, the duration histogram, the in-flight gauge, the sampled queue depth, and broker
//! reconnects, recorded through the `metrics` facade into a debugging recorder.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use machinery::backend::memory::MemoryBackend;
use machinery::broker::memory::MemoryBroker;
use machinery::broker::{
    Broker, BrokerError, ConsumeOptions, Consumer, Delivery, Inspect, Outgoing,
};
use machinery::{task, Config, Server, Signature, TaskError, Worker};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::MetricKind;

const WAIT: Duration = Duration::from_secs(10);

#[task]
async fn metric_ok(x: i64) -> Result<i64, TaskError> {
    Ok(x)
}

#[task]
async fn metric_fail() -> Result<(), TaskError> {
    Err(TaskError::new("no"))
}

static FLAKY: AtomicUsize = AtomicUsize::new(0);

#[task(backoff = machinery::retry::Fixed(Duration::from_millis(10)))]
async fn metric_flaky() -> Result<(), TaskError> {
    if FLAKY.fetch_add(1, Ordering::SeqCst) == 0 {
        return Err(TaskError::new("first time"));
    }
    Ok(())
}

/// A broker whose consumers fail their first two fetches, as if the connection had dropped.
#[derive(Debug)]
struct Flaky {
    inner: MemoryBroker,
}

#[derive(Debug)]
struct FlakyConsumer {
    inner: Box<dyn Consumer>,
    failures_left: usize,
}

#[async_trait]
impl Consumer for FlakyConsumer {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        if self.failures_left > 0 {
            self.failures_left -= 1;
            return Err(BrokerError::operation(
                "fetch",
                "connection reset (simulated)",
            ));
        }
        self.inner.next_batch(max).await
    }
    async fn close(self: Box<Self>) -> Result<(), BrokerError> {
        self.inner.close().await
    }
}

#[async_trait]
impl Broker for Flaky {
    fn kind(&self) -> &'static str {
        "flaky"
    }
    fn route(&self, routing_key: &str) -> String {
        self.inner.route(routing_key)
    }
    async fn publish(&self, message: Outgoing<'_>) -> Result<(), BrokerError> {
        self.inner.publish(message).await
    }
    async fn consume(&self, options: ConsumeOptions) -> Result<Box<dyn Consumer>, BrokerError> {
        Ok(Box::new(FlakyConsumer {
            inner: self.inner.consume(options).await?,
            failures_left: 2,
        }))
    }
    fn inspect(&self) -> Result<&dyn Inspect, BrokerError> {
        // The queue-size sampling reads the wrapped broker's counts.
        self.inner.inspect()
    }
}

/// One snapshot of every metric (taking a snapshot drains counters and histograms, so take it once).
type Metrics = Vec<(
    metrics_util::CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
)>;

fn find<'a>(
    snapshot: &'a Metrics,
    kind: MetricKind,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<&'a DebugValue> {
    snapshot.iter().find_map(|(key, _, _, value)| {
        let (metric_kind, key) = key.clone().into_parts();
        let matches = metric_kind == kind
            && key.name() == name
            && labels
                .iter()
                .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v));
        matches.then_some(value)
    })
}

fn counter(snapshotter: &Metrics, name: &str, labels: &[(&str, &str)]) -> u64 {
    match find(snapshotter, MetricKind::Counter, name, labels) {
        Some(DebugValue::Counter(n)) => *n,
        _ => 0,
    }
}

fn gauge(snapshotter: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    match find(snapshotter, MetricKind::Gauge, name, labels) {
        Some(DebugValue::Gauge(g)) => Some(g.into_inner()),
        _ => None,
    }
}

#[tokio::test]
async fn counters_histogram_and_gauges_move_as_tasks_run() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");

    let mut config = Config::default().with_default_queue("metrics_q");
    config.unknown_task_requeues = 0;
    let server = Server::from_parts(
        config,
        Arc::new(Flaky {
            inner: MemoryBroker::new("memory://", "metrics_q"),
        }),
        Arc::new(MemoryBackend::new("memory://", Duration::from_secs(60))),
    );
    let mut results = Vec::new();
    for x in 0..3 {
        results.push(metric_ok::send(&server, x).await.unwrap());
    }
    let fail = metric_fail::send(&server).await.unwrap();
    let flaky = server
        .send(metric_flaky::signature().retries(2))
        .await
        .unwrap();
    server.send(Signature::new("metric_unknown")).await.unwrap();
    server
        .broker()
        .publish(Outgoing {
            uuid: "",
            name: "",
            routing_key: "metrics_q",
            body: b"not json".to_vec(),
            eta: None,
            priority: 0,
            headers: Default::default(),
        })
        .await
        .unwrap();

    let running = Worker::auto(&server).concurrency(4).start().await.unwrap();
    for r in &results {
        r.get(WAIT).await.unwrap();
    }
    assert!(fail.get(WAIT).await.is_err());
    flaky.get(WAIT).await.unwrap();
    let dead = machinery_tests::eventually(WAIT, || async {
        server
            .broker()
            .inspect()
            .unwrap()
            .dead_letters("metrics_q", 10)
            .await
            .unwrap()
            .len()
            == 2
    })
    .await;
    assert!(dead);
    running.shutdown(WAIT).await.unwrap();

    let snapshot: Metrics = snapshotter.snapshot().into_vec();
    let s = &snapshot;
    assert_eq!(
        counter(
            s,
            "machinery_tasks_received_total",
            &[("task", "metric_ok")]
        ),
        3
    );
    assert_eq!(
        counter(
            s,
            "machinery_tasks_succeeded_total",
            &[("task", "metric_ok")]
        ),
        3
    );
    assert_eq!(
        counter(
            s,
            "machinery_tasks_failed_total",
            &[("task", "metric_fail")]
        ),
        1
    );
    assert_eq!(
        counter(
            s,
            "machinery_tasks_received_total",
            &[("task", "metric_flaky")]
        ),
        2
    );
    assert_eq!(
        counter(
            s,
            "machinery_tasks_retried_total",
            &[("task", "metric_flaky")]
        ),
        1
    );
    assert_eq!(
        counter(
            s,
            "machinery_tasks_succeeded_total",
            &[("task", "metric_flaky")]
        ),
        1
    );
    assert_eq!(
        counter(
            s,
            "machinery_tasks_dead_lettered_total",
            &[("queue", "metrics_q"), ("reason", "malformed")]
        ),
        1
    );
    assert_eq!(
        counter(
            s,
            "machinery_tasks_dead_lettered_total",
            &[("queue", "metrics_q"), ("reason", "unknown_task")]
        ),
        1
    );
    assert_eq!(
        counter(
            s,
            "machinery_broker_reconnects_total",
            &[("broker", "flaky")]
        ),
        1
    );
    match find(
        s,
        MetricKind::Histogram,
        "machinery_task_duration_seconds",
        &[("task", "metric_ok")],
    ) {
        Some(DebugValue::Histogram(samples)) => assert_eq!(samples.len(), 3),
        other => panic!("no duration histogram: {other:?}"),
    }
    assert_eq!(
        gauge(s, "machinery_tasks_in_flight", &[("queue", "metrics_q")]),
        Some(0.0)
    );
    // The worker samples its queue when it starts (8 messages waiting then).
    let depth = gauge(s, "machinery_queue_depth", &[("queue", "metrics_q")]);
    assert!(depth.is_some_and(|d| d <= 8.0), "{depth:?}");
}
