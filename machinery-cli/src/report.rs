//! The answers both faces of the tool give, as JSON: the command line's `--json` and the dashboard's API
//! (`machinery web`) build their records here, so a field has one name everywhere.

use machinery::broker::{DeadLetter, DelayedMessage, QueueStats, WorkerInfo};
use machinery::wire::gotime;
use machinery::TaskState;
use serde_json::{json, Value};

use crate::message::Message;

/// One queue's counts. `queue` and `name` are the same (`name` for the dashboard's API); a count the
/// broker cannot know is `null`.
pub(crate) fn queue_json(stats: &QueueStats) -> Value {
    json!({
        "queue": stats.queue,
        "name": stats.queue,
        "pending": stats.pending,
        "delayed": stats.delayed,
        "in_flight": stats.in_flight,
        "dead": stats.dead,
    })
}

/// One consumer, with what its worker card says (`null` where there is no card).
pub(crate) fn worker_json(worker: &WorkerInfo) -> Value {
    let card = worker.card.as_ref();
    json!({
        "queue": worker.queue,
        "consumer_tag": worker.consumer_tag,
        "alive": worker.alive,
        "in_flight": worker.in_flight,
        "heartbeat_age_ms": worker.heartbeat_age.map(|age| age.as_millis() as u64),
        "host": card.map(|c| c.host.clone()),
        "pid": card.map(|c| c.pid),
        "concurrency": card.map(|c| c.concurrency),
        "running": card.map(|c| c.running),
        "processed": card.map(|c| c.succeeded + c.failed),
        "succeeded": card.map(|c| c.succeeded),
        "failed": card.map(|c| c.failed),
    })
}

/// A dead letter: the message's fields, where it came from, why and when.
pub(crate) fn dead_letter_json(letter: &DeadLetter) -> Value {
    let mut row = Message::decode(&letter.body).to_json();
    row["queue"] = Value::String(letter.queue.clone());
    row["reason"] = Value::String(letter.reason.clone());
    row["at"] = Value::String(gotime::format(&letter.at));
    row
}

/// A message waiting for its ETA, with `due` from the broker's own record.
pub(crate) fn delayed_json(delayed: &DelayedMessage) -> Value {
    let mut row = Message::decode(&delayed.body).to_json();
    row["due"] = Value::String(gotime::format(&delayed.eta));
    row
}

/// A state as Go's JSON record.
pub(crate) fn state_json(state: &TaskState) -> Value {
    serde_json::to_value(state).unwrap_or(Value::Null)
}

/// Why a broker cannot answer an inspection, for messages and pages.
pub(crate) fn why_unsupported(broker: &str, operation: &str) -> String {
    match (broker, operation) {
        ("amqp", "listing queues") => "AMQP has no command that lists queues; rabbitmqctl \
            list_queues and RabbitMQ's management HTTP API do"
            .to_owned(),
        ("amqp", "listing delayed messages") => "RabbitMQ parks delayed messages in per-delay queues \
            (delay.<ms>.<exchange>.<routing key>) whose names AMQP cannot list, and reading a message \
            there means taking it"
            .to_owned(),
        ("amqp", "listing workers") => "AMQP does not list the consumers of a queue (rabbitmqctl \
            list_consumers and the management HTTP API do), and RabbitMQ needs no heartbeat keys, so \
            there are none to read"
            .to_owned(),
        _ => format!("it does not support {operation}"),
    }
}
