//! A follow-up that cannot be published (issue 13): the next step of a chain, or a chord callback, whose
//! publish fails is not acknowledged away. The message goes back to the queue and, its SUCCESS being
//! stored, comes back to send the follow-up again without running the task again; the workflow completes
//! once the broker takes the follow-up, and each task ran once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use machinery::backend::memory::MemoryBackend;
use machinery::broker::memory::MemoryBroker;
use machinery::broker::{Broker, BrokerError, ConsumeOptions, Consumer, Inspect, Outgoing};
use machinery::{task, Chain, Chord, Config, Group, Server, TaskError, Worker};

const WAIT: Duration = Duration::from_secs(15);

/// A memory broker that refuses the first `failures` publishes of the task named `refused`.
#[derive(Debug)]
struct Refusing {
    inner: MemoryBroker,
    refused: &'static str,
    failures: AtomicUsize,
    /// Every message published, in order.
    published: std::sync::Mutex<Vec<Published>>,
}

/// A message as it was published.
#[derive(Debug, Clone)]
struct Published {
    uuid: String,
    name: String,
    routing_key: String,
    body: Vec<u8>,
}

#[async_trait]
impl Broker for Refusing {
    fn kind(&self) -> &'static str {
        "refusing"
    }
    fn route(&self, routing_key: &str) -> String {
        self.inner.route(routing_key)
    }
    async fn publish(&self, message: Outgoing<'_>) -> Result<(), BrokerError> {
        if message.name == self.refused
            && self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(BrokerError::operation(
                "publish",
                "connection reset (simulated)",
            ));
        }
        self.published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Published {
                uuid: message.uuid.to_owned(),
                name: message.name.to_owned(),
                routing_key: message.routing_key.to_owned(),
                body: message.body.clone(),
            });
        self.inner.publish(message).await
    }
    async fn consume(&self, options: ConsumeOptions) -> Result<Box<dyn Consumer>, BrokerError> {
        self.inner.consume(options).await
    }
    fn inspect(&self) -> Result<&dyn Inspect, BrokerError> {
        self.inner.inspect()
    }
}

fn server(refused: &'static str, failures: usize) -> (Server, Arc<Refusing>) {
    let broker = Arc::new(Refusing {
        inner: MemoryBroker::new("memory://", "machinery_tasks"),
        refused,
        failures: AtomicUsize::new(failures),
        published: Default::default(),
    });
    let server = Server::from_parts(
        Config::default(),
        broker.clone(),
        Arc::new(MemoryBackend::new("memory://", Duration::from_secs(600))),
    );
    (server, broker)
}

static STEP_ONE_RUNS: AtomicUsize = AtomicUsize::new(0);

#[task]
async fn fu_step_one(a: i64, b: i64) -> Result<i64, TaskError> {
    STEP_ONE_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(a + b)
}

#[task]
async fn fu_step_two(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a * b)
}

#[tokio::test]
async fn a_chain_step_that_cannot_be_published_is_sent_by_a_later_run() {
    const FAILURES: usize = 3;
    let (server, broker) = server("fu_step_two", FAILURES);
    let running = Worker::new(&server)
        .register(fu_step_one::task())
        .register(fu_step_two::task())
        .concurrency(2)
        .start()
        .await
        .unwrap();
    // (2 + 3) * 10
    let chain = Chain::new(fu_step_one::signature(2, 3)).then(fu_step_two::partial(10));
    let result = server.send_chain(chain).await.unwrap();
    assert_eq!(result.get(WAIT).await.unwrap(), 50, "the chain completes");
    assert_eq!(
        broker.failures.load(Ordering::SeqCst),
        0,
        "every simulated failure happened"
    );
    let runs = STEP_ONE_RUNS.load(Ordering::SeqCst);
    assert_eq!(
        runs, 1,
        "step one ran once; its message came back only to send the next step"
    );
    running.shutdown(Duration::from_secs(5)).await.unwrap();
}

static MEMBER_RUNS: AtomicUsize = AtomicUsize::new(0);

#[task]
async fn fu_member(x: i64) -> Result<i64, TaskError> {
    MEMBER_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(x)
}

#[task]
async fn fu_total(xs: Vec<i64>) -> Result<i64, TaskError> {
    Ok(xs.iter().sum())
}

#[tokio::test]
async fn a_chord_callback_that_cannot_be_published_is_sent_by_a_later_run() {
    const FAILURES: usize = 2;
    let (server, broker) = server("fu_total", FAILURES);
    let running = Worker::new(&server)
        .register(fu_member::task())
        .register(fu_total::task())
        .concurrency(4)
        .start()
        .await
        .unwrap();
    let group = Group::new([
        fu_member::signature(1),
        fu_member::signature(20),
        fu_member::signature(300),
    ]);
    let result = server
        .send_chord(Chord::new(group, fu_total::partial()))
        .await
        .unwrap();
    // The backend elects the last member only once: its next runs must still send the callback.
    assert_eq!(result.get(WAIT).await.unwrap(), 321, "the chord completes");
    assert_eq!(broker.failures.load(Ordering::SeqCst), 0);
    let runs = MEMBER_RUNS.load(Ordering::SeqCst);
    assert_eq!(
        runs, 3,
        "each member ran once; the electing member's message came back only to send the callback"
    );
    running.shutdown(Duration::from_secs(5)).await.unwrap();
}

static ONCE_MEMBER_RUNS: AtomicUsize = AtomicUsize::new(0);
static ONCE_TOTAL_RUNS: AtomicUsize = AtomicUsize::new(0);

#[task]
async fn fu_once_member(x: i64) -> Result<i64, TaskError> {
    ONCE_MEMBER_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(x)
}

#[task]
async fn fu_once_total(xs: Vec<i64>) -> Result<i64, TaskError> {
    ONCE_TOTAL_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(xs.iter().sum())
}

/// A chord member's message that comes back after its chord's callback has run (its worker was killed
/// after publishing the callback and before acknowledging the member, or the member was put back because a
/// later follow-up failed): the member is not run again, and it sends the callback again (it cannot know
/// whether the first copy arrived), but that copy, carrying the mark of a re-sent follow-up, finds the
/// callback's SUCCESS stored and does not run it a second time.
#[tokio::test]
async fn a_chord_callback_sent_again_after_it_ran_does_not_run_again() {
    let (server, broker) = server("nothing is refused", 0);
    let running = Worker::new(&server)
        .register(fu_once_member::task())
        .register(fu_once_total::task())
        .concurrency(4)
        .start()
        .await
        .unwrap();
    let group = Group::new([fu_once_member::signature(1), fu_once_member::signature(20)]);
    let result = server
        .send_chord(Chord::new(group, fu_once_total::partial()))
        .await
        .unwrap();
    assert_eq!(result.get(WAIT).await.unwrap(), 21, "the chord completes");
    assert_eq!(ONCE_TOTAL_RUNS.load(Ordering::SeqCst), 1);

    // Both members come again, as the worker puts a message back (the one that completed the chord is
    // told so again by the backend).
    let members: Vec<Published> = broker
        .published
        .lock()
        .unwrap()
        .iter()
        .filter(|m| m.name == "fu_once_member")
        .cloned()
        .collect();
    assert_eq!(members.len(), 2);
    for member in members {
        let again = machinery::Signature::from_json(&member.body)
            .unwrap()
            .header(machinery::signature::FOLLOW_UP_ATTEMPTS_HEADER, 1);
        let body = again.to_json().unwrap();
        broker
            .inner
            .publish(Outgoing {
                uuid: &member.uuid,
                name: &member.name,
                routing_key: &member.routing_key,
                body,
                eta: None,
                priority: 0,
                headers: Default::default(),
            })
            .await
            .unwrap();
    }
    let callbacks_published = || {
        broker
            .published
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.name == "fu_once_total")
            .count()
    };
    assert!(
        machinery_tests::eventually(WAIT, || async { callbacks_published() == 2 }).await,
        "the member that completed the chord sends the callback again"
    );
    let idle = || async {
        let stats = broker.inner.queue_stats("machinery_tasks").await.unwrap();
        stats.pending == 0 && stats.in_flight.unwrap_or(0) == 0
    };
    assert!(
        machinery_tests::eventually(WAIT, idle).await,
        "every message is settled"
    );
    assert_eq!(
        ONCE_MEMBER_RUNS.load(Ordering::SeqCst),
        2,
        "each member ran once"
    );
    assert_eq!(
        ONCE_TOTAL_RUNS.load(Ordering::SeqCst),
        1,
        "the callback ran once; its second copy found its SUCCESS stored"
    );
    running.shutdown(Duration::from_secs(5)).await.unwrap();
}
