//! RabbitMQ helpers for the AMQP tests: unique configurations, a raw lapin client that plays Go's part
//! (declarations with Go's exact options and integer widths, peeking at messages), `rabbitmqctl` queries,
//! and a guard that deletes what a test declared even when it fails.

use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use machinery::Config;
use serde_json::{json, Value};

use crate::{unique, Service};

/// The URL of the test RabbitMQ.
pub fn url() -> String {
    Service::RabbitMq.url()
}

/// The URL with the default virtual host spelt out for lapin (which reads a bare `/` as the empty vhost).
fn vhost_url() -> String {
    let url = url();
    if url.ends_with('/') {
        format!("{url}%2f")
    } else {
        url
    }
}

/// A configuration on the test RabbitMQ with a unique exchange and queue. The binding key is the queue
/// name (the set-up `docs/amqp.md` recommends); results expire after 10 minutes.
pub fn config(prefix: &str) -> Config {
    let mut config = Config::new(url(), url());
    let queue = unique(&format!("{prefix}_q"));
    config.default_queue = queue.clone();
    config.amqp.exchange = unique(&format!("{prefix}_ex"));
    config.amqp.binding_key = queue;
    config.results_expire_in = 600;
    config
}

/// A plain lapin connection for looking at and preparing RabbitMQ from the outside.
#[derive(Debug)]
pub struct Rabbit {
    /// The connection.
    pub connection: Connection,
    /// A channel on it; reopened by [`Rabbit::channel`] after a channel error.
    channel: Mutex<Channel>,
}

impl Rabbit {
    /// Connects to the test RabbitMQ.
    pub async fn connect() -> Rabbit {
        let connection = Connection::connect(
            &vhost_url(),
            ConnectionProperties::default().with_connection_name("machinery tests".into()),
        )
        .await
        .expect("test RabbitMQ connection");
        let channel = connection.create_channel().await.expect("channel");
        Rabbit {
            connection,
            channel: Mutex::new(channel),
        }
    }

    /// A working channel (a fresh one if an error closed the last).
    pub async fn channel(&self) -> Channel {
        let current = self.channel.lock().unwrap().clone();
        if current.status().connected() {
            return current;
        }
        let fresh = self.connection.create_channel().await.expect("channel");
        *self.channel.lock().unwrap() = fresh.clone();
        fresh
    }

    /// Takes one message from `queue` and acknowledges it (Go's `GetState` does exactly this).
    pub async fn take(&self, queue: &str) -> Option<lapin::message::Delivery> {
        let channel = self.channel().await;
        let message = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .expect("basic.get")?;
        message
            .delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        Some(message.delivery)
    }

    /// Takes one message from `queue` on a channel of its own and does not acknowledge it; the message
    /// stays held until the returned channel is closed or dropped.
    pub async fn hold(&self, queue: &str) -> (Channel, Option<lapin::message::Delivery>) {
        let channel = self.connection.create_channel().await.expect("channel");
        let message = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .expect("basic.get");
        (channel, message.map(|m| m.delivery))
    }

    /// Declares an exchange as Go does (durable, not auto-deleted, not internal, no arguments).
    pub async fn declare_exchange_like_go(&self, name: &str, kind: &str) -> lapin::Result<()> {
        let kind = match kind {
            "direct" => ExchangeKind::Direct,
            "topic" => ExchangeKind::Topic,
            "fanout" => ExchangeKind::Fanout,
            other => ExchangeKind::Custom(other.into()),
        };
        self.channel()
            .await
            .exchange_declare(
                name.into(),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
    }

    /// Declares a queue with these flags and arguments, as some other client would, and binds it.
    pub async fn declare_queue(
        &self,
        name: &str,
        durable: bool,
        auto_delete: bool,
        args: FieldTable,
        bind: Option<(&str, &str)>,
    ) -> lapin::Result<u32> {
        let channel = self.channel().await;
        let queue = channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable,
                    auto_delete,
                    ..Default::default()
                },
                args,
            )
            .await?;
        if let Some((exchange, key)) = bind {
            channel
                .queue_bind(
                    name.into(),
                    exchange.into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(queue.message_count())
    }

    /// Publishes raw bytes.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) {
        let channel = self.channel().await;
        channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("publish confirm");
    }

    /// Whether a queue exists (a passive declaration, on a channel of its own).
    pub async fn queue_exists(&self, name: &str) -> bool {
        let channel = self.connection.create_channel().await.expect("channel");
        let result = channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        result.is_ok()
    }
}

/// The headers of a message as JSON (strings, numbers, nested tables), `null` when there are none.
pub fn headers(properties: &BasicProperties) -> Value {
    match properties.headers() {
        Some(table) => Value::Object(
            table
                .inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), value(v)))
                .collect(),
        ),
        None => Value::Null,
    }
}

fn value(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(i) => (*i).into(),
        AMQPValue::ShortShortUInt(i) => (*i).into(),
        AMQPValue::ShortInt(i) => (*i).into(),
        AMQPValue::ShortUInt(i) => (*i).into(),
        AMQPValue::LongInt(i) => (*i).into(),
        AMQPValue::LongUInt(i) => (*i).into(),
        AMQPValue::LongLongInt(i) => (*i).into(),
        AMQPValue::Float(f) => (*f).into(),
        AMQPValue::Double(f) => (*f).into(),
        AMQPValue::ShortString(s) => s.as_str().into(),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into(),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value).collect()),
        AMQPValue::Timestamp(t) => (*t).into(),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), value(v)))
                .collect(),
        ),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into(),
        AMQPValue::DecimalValue(_) | AMQPValue::Void => Value::Null,
    }
}

/// A 32-bit AMQP integer, as Go's amqp091 writes `int32` (and the backend's TTLs).
pub fn int32(v: i32) -> AMQPValue {
    AMQPValue::LongInt(v)
}

/// A 64-bit AMQP integer, as Go's amqp091 writes `int64` (the delay queues' TTLs).
pub fn int64(v: i64) -> AMQPValue {
    AMQPValue::LongLongInt(v)
}

/// An AMQP long string.
pub fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes()))
}

/// A field table from pairs.
pub fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

/// Runs `rabbitmqctl` with these arguments and returns its standard output.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `rabbitmqctl <command> <columns> --formatter json` as JSON objects.
pub fn rabbitmqctl_json(command: &str, columns: &[&str]) -> Vec<Value> {
    let mut args = vec![command];
    args.extend_from_slice(columns);
    args.extend(["--formatter", "json", "-q"]);
    let out = rabbitmqctl(&args);
    if out.trim().is_empty() {
        return Vec::new();
    }
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("rabbitmqctl {args:?}: {e}: {out}"))
}

/// One `basic.ack` frame a client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckFrame {
    /// The channel it was sent on.
    pub channel: u16,
    /// The delivery tag.
    pub tag: u64,
    /// Whether it acknowledges every unacknowledged delivery up to `tag`.
    pub multiple: bool,
}

/// The `basic.ack` frames in what a client sent on one connection (the protocol header, then frames:
/// type, channel, size, payload, `0xCE`). Stops at a frame cut short.
pub fn basic_acks(sent: &[u8]) -> Vec<AckFrame> {
    const METHOD_FRAME: u8 = 1;
    const BASIC: u16 = 60;
    const ACK: u16 = 80;
    let mut rest = sent.strip_prefix(b"AMQP\x00\x00\x09\x01").unwrap_or(sent);
    let mut acks = Vec::new();
    while rest.len() >= 7 {
        let kind = rest[0];
        let channel = u16::from_be_bytes([rest[1], rest[2]]);
        let size = u32::from_be_bytes([rest[3], rest[4], rest[5], rest[6]]) as usize;
        let Some(payload) = rest.get(7..7 + size) else {
            break;
        };
        let method = |at: usize| u16::from_be_bytes([payload[at], payload[at + 1]]);
        if kind == METHOD_FRAME && size >= 13 && method(0) == BASIC && method(2) == ACK {
            let mut tag = [0u8; 8];
            tag.copy_from_slice(&payload[4..12]);
            acks.push(AckFrame {
                channel,
                tag: u64::from_be_bytes(tag),
                multiple: payload[12] & 1 == 1,
            });
        }
        rest = rest.get(7 + size + 1..).unwrap_or_default();
    }
    acks
}

/// A queue as `rabbitmqctl list_queues` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueInfo {
    /// The name.
    pub name: String,
    /// Ready messages.
    pub ready: u64,
    /// Delivered and not acknowledged.
    pub unacked: u64,
    /// Consumers.
    pub consumers: u64,
    /// Durable flag.
    pub durable: bool,
    /// Auto-delete flag.
    pub auto_delete: bool,
    /// Declaration arguments as `{name: [AMQP type, value]}`: the type shows the integer width
    /// (`signedint` is 32 bits, `long` 64).
    pub arguments: Value,
}

/// Every queue whose name contains `part`.
pub fn queues_containing(part: &str) -> Vec<QueueInfo> {
    rabbitmqctl_json(
        "list_queues",
        &[
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
            "durable",
            "auto_delete",
            "arguments",
        ],
    )
    .into_iter()
    .filter(|q| q["name"].as_str().is_some_and(|n| n.contains(part)))
    .map(|q| QueueInfo {
        name: q["name"].as_str().unwrap_or_default().to_owned(),
        ready: q["messages_ready"].as_u64().unwrap_or(0),
        unacked: q["messages_unacknowledged"].as_u64().unwrap_or(0),
        consumers: q["consumers"].as_u64().unwrap_or(0),
        durable: q["durable"].as_bool().unwrap_or(false),
        auto_delete: q["auto_delete"].as_bool().unwrap_or(false),
        arguments: Value::Object(
            q["arguments"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| {
                    let a = a.as_array()?;
                    Some((
                        a.first()?.as_str()?.to_owned(),
                        json!([a.get(1)?, a.get(2)?]),
                    ))
                })
                .collect(),
        ),
    })
    .collect()
}

/// One queue by exact name.
pub fn queue_info(name: &str) -> Option<QueueInfo> {
    queues_containing(name).into_iter().find(|q| q.name == name)
}

/// The bindings from `exchange` as (destination queue, routing key).
pub fn bindings_from(exchange: &str) -> Vec<(String, String)> {
    rabbitmqctl_json(
        "list_bindings",
        &["source_name", "destination_name", "routing_key"],
    )
    .into_iter()
    .filter(|b| b["source_name"] == exchange)
    .map(|b| {
        (
            b["destination_name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            b["routing_key"].as_str().unwrap_or_default().to_owned(),
        )
    })
    .collect()
}

/// The connections opened by this process (machinery names them `machinery <role> pid <pid>`), as
/// (connection pid as `rabbitmqctl close_connection` takes it, name).
pub fn connections_of_this_process() -> Vec<(String, String)> {
    let me = format!("pid {}", std::process::id());
    // The JSON listing shows client properties but prints pids in a form `close_connection` refuses; the
    // plain listing prints them usably. Both show the connection's unique name (its addresses).
    let ours: Vec<(String, String)> =
        rabbitmqctl_json("list_connections", &["name", "client_properties"])
            .into_iter()
            .filter_map(|c| {
                let label = connection_name(&c["client_properties"])?;
                (label.starts_with("machinery ") && label.ends_with(&me))
                    .then(|| (c["name"].as_str().unwrap_or_default().to_owned(), label))
            })
            .collect();
    let plain = rabbitmqctl(&[
        "list_connections",
        "name",
        "pid",
        "-q",
        "--no-table-headers",
    ]);
    ours.into_iter()
        .filter_map(|(name, label)| {
            let pid = plain.lines().find_map(|line| {
                line.strip_prefix(name.as_str())?
                    .split_whitespace()
                    .last()
                    .map(str::to_owned)
            })?;
            Some((pid, label))
        })
        .collect()
}

fn connection_name(properties: &Value) -> Option<String> {
    // rabbitmqctl prints client properties as [name, type, value] triples.
    properties.as_array()?.iter().find_map(|p| {
        let p = p.as_array()?;
        (p.first()? == "connection_name").then(|| p.get(2)?.as_str().map(str::to_owned))?
    })
}

/// Closes (as an administrator would) every connection machinery opened in this process, and no other:
/// other test processes share the server.
pub fn close_connections_of_this_process() -> usize {
    let connections = connections_of_this_process();
    for (pid, _) in &connections {
        rabbitmqctl(&["close_connection", pid, "test: connection loss"]);
    }
    connections.len()
}

/// Deletes the queues and exchanges a test used when it ends, passing or failing.
#[derive(Debug, Default)]
pub struct Cleanup {
    queues: Mutex<Vec<String>>,
    exchanges: Mutex<Vec<String>>,
    containing: Mutex<Vec<String>>,
}

impl Cleanup {
    /// Cleans up after the exchange, default queue and its dead-letter queue of `config`, and every queue
    /// whose name contains the exchange's name (the delay queues).
    pub fn for_config(config: &Config) -> Cleanup {
        let cleanup = Cleanup::default();
        cleanup.queue(&config.default_queue);
        cleanup.queue(&format!("{}.dead", config.default_queue));
        cleanup.queue(&config.amqp.binding_key);
        cleanup.exchange(&config.amqp.exchange);
        cleanup.containing(&config.amqp.exchange);
        cleanup
    }

    /// Deletes this queue too.
    pub fn queue(&self, name: &str) {
        self.queues.lock().unwrap().push(name.to_owned());
    }

    /// Deletes this exchange too.
    pub fn exchange(&self, name: &str) {
        self.exchanges.lock().unwrap().push(name.to_owned());
    }

    /// Deletes every queue whose name contains this.
    pub fn containing(&self, part: &str) {
        self.containing.lock().unwrap().push(part.to_owned());
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut queues =
            std::mem::take(&mut *self.queues.lock().unwrap_or_else(|p| p.into_inner()));
        let exchanges =
            std::mem::take(&mut *self.exchanges.lock().unwrap_or_else(|p| p.into_inner()));
        let parts = std::mem::take(&mut *self.containing.lock().unwrap_or_else(|p| p.into_inner()));
        for part in parts {
            queues.extend(queues_containing(&part).into_iter().map(|q| q.name));
        }
        // A runtime of its own on a thread of its own: Drop may run inside the test's runtime.
        let done = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(async move {
                let Ok(connection) =
                    Connection::connect(&vhost_url(), ConnectionProperties::default()).await
                else {
                    return;
                };
                for queue in queues {
                    if let Ok(channel) = connection.create_channel().await {
                        let _ = channel
                            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                }
                for exchange in exchanges {
                    if let Ok(channel) = connection.create_channel().await {
                        let _ = channel
                            .exchange_delete(
                                exchange.as_str().into(),
                                ExchangeDeleteOptions::default(),
                            )
                            .await;
                    }
                }
                let _ = connection.close(200, "OK".into()).await;
            });
        });
        let _ = done.join();
    }
}

/// Waits until `check` returns `Some` or `timeout` passes, checking every 50 ms. `check` may block (it
/// usually runs `rabbitmqctl`): it runs with [`tokio::task::block_in_place`], so the test's
/// multi-threaded runtime keeps serving the connections meanwhile.
pub async fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = tokio::task::block_in_place(&mut check) {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
