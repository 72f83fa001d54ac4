//! What the AMQP broker and the AMQP result backend share: one connection per role that reconnects with
//! back-off, channels that are reused and reopened when a failure closed them, checked declarations, and
//! publishing with publisher confirms.
//!
//! Each [`Session`] owns one connection, which it replaces when it is lost; channels are opened on it on
//! demand and kept ([`ChannelSlot`]). Declarations are remembered per connection so that the hot paths do
//! not repeat them ([`Live::declared`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::time::Instant;

pub(crate) use super::error::AmqpError;
pub(crate) use super::table::short;
pub(crate) use super::url::Endpoint;

use crate::retry::Backoff;

/// How long a publish waits for RabbitMQ's confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one connection attempt may take when the URL does not say (`?connection_timeout=ms`).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Locks a std mutex, taking over a poisoned one: the maps behind these locks stay consistent at every
/// point a panic could happen.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One live connection and what has been declared on it.
pub(crate) struct Live {
    pub(crate) connection: Connection,
    /// Counts connections of this session; channels remember which one they belong to.
    pub(crate) generation: u64,
    declared: Mutex<HashMap<String, Instant>>,
}

impl Live {
    /// Whether `key` was declared on this connection, no longer than `max_age` ago if given.
    pub(crate) fn declared(&self, key: &str, max_age: Option<Duration>) -> bool {
        lock(&self.declared)
            .get(key)
            .is_some_and(|at| max_age.is_none_or(|age| at.elapsed() < age))
    }

    /// Remembers that `key` is declared. The memory is dropped wholesale past 50,000 entries (re-declaring
    /// is only a round trip), so that per-task result queues do not grow it forever.
    pub(crate) fn mark_declared(&self, key: String) {
        let mut declared = lock(&self.declared);
        if declared.len() >= 50_000 {
            declared.clear();
        }
        declared.insert(key, Instant::now());
    }

    /// Forgets a declaration (the queue was deleted).
    pub(crate) fn forget(&self, key: &str) {
        lock(&self.declared).remove(key);
    }
}

#[derive(Default)]
struct Reconnect {
    failures: u32,
    not_before: Option<Instant>,
}

/// One connection to RabbitMQ for one role of the process (broker or result backend), replaced with
/// back-off when it is lost. Go opens a connection per target queue, per delayed publish and per backend
/// write; we keep one and multiplex channels on it.
pub(crate) struct Session {
    role: &'static str,
    endpoints: Vec<Endpoint>,
    tls: Option<Arc<super::tls::AmqpTls>>,
    properties: ConnectionProperties,
    current: Mutex<Option<Arc<Live>>>,
    reconnect: tokio::sync::Mutex<Reconnect>,
    generations: std::sync::atomic::AtomicU64,
    /// The index of the last connection's URL (`usize::MAX` before the first).
    last_endpoint: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.role)
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// The largest frame this session offers (the smallest of its URLs'): a message's headers must fit
    /// in one.
    pub(crate) fn frame_max(&self) -> u32 {
        self.endpoints
            .iter()
            .filter_map(|endpoint| endpoint.uri.query.frame_max)
            .min()
            .unwrap_or(u32::MAX)
    }

    /// A session for `role` (`broker`, `result backend`) over these URLs, with `tls` for the `amqps://`
    /// ones ([`super::tls::prepare`]); nothing is connected yet.
    pub(crate) fn new(
        role: &'static str,
        endpoints: Vec<Endpoint>,
        tls: Option<Arc<super::tls::AmqpTls>>,
    ) -> Self {
        // The name shows in `rabbitmqctl list_connections client_properties` and the management UI; the
        // pid tells the connections of different processes apart.
        let name = format!("machinery {role} pid {}", std::process::id());
        Session {
            role,
            endpoints,
            tls,
            properties: ConnectionProperties::default().with_connection_name(name.into()),
            current: Mutex::new(None),
            reconnect: tokio::sync::Mutex::new(Reconnect::default()),
            generations: std::sync::atomic::AtomicU64::new(0),
            last_endpoint: std::sync::atomic::AtomicUsize::new(usize::MAX),
        }
    }

    /// A fresh plain channel for an operation that may close it (a passive declaration of a missing queue
    /// is answered with 404, which closes the channel).
    pub(crate) async fn scratch_channel(&self) -> Result<Channel, AmqpError> {
        let live = self.live().await?;
        open_channel(&live, Mode::Plain).await
    }

    /// The ready messages of `queue`, or `None` if it does not exist.
    pub(crate) async fn ready_count(&self, queue: &str) -> Result<Option<u32>, AmqpError> {
        let channel = self.scratch_channel().await?;
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let result = channel
            .queue_declare(short("queue name", queue)?, options, FieldTable::default())
            .await;
        let _ = channel.close(200, "OK".into()).await;
        match result {
            Ok(q) => Ok(Some(q.message_count())),
            Err(e) => {
                let error = AmqpError::lapin(format!("inspecting queue {queue:?}"), e);
                if error.soft_error() == Some(lapin::protocol::AMQPSoftError::NOTFOUND) {
                    Ok(None)
                } else {
                    Err(error)
                }
            }
        }
    }

    /// The URLs, passwords redacted, for messages.
    pub(crate) fn display(&self) -> String {
        super::url::display(&self.endpoints)
    }

    fn connected(&self) -> Option<Arc<Live>> {
        lock(&self.current)
            .as_ref()
            .filter(|live| live.connection.status().connected())
            .cloned()
    }

    /// The live connection, connecting or reconnecting first if needed. Failed attempts back off (100 ms
    /// doubling to 5 s) for every caller of the session together, so a broker outage is not hammered.
    pub(crate) async fn live(&self) -> Result<Arc<Live>, AmqpError> {
        if let Some(live) = self.connected() {
            return Ok(live);
        }
        let mut reconnect = self.reconnect.lock().await;
        if let Some(live) = self.connected() {
            return Ok(live);
        }
        if let Some(at) = reconnect.not_before {
            tokio::time::sleep_until(at).await;
        }
        match self.open().await {
            Ok(live) => {
                if reconnect.failures > 0 || live.generation > 1 {
                    tracing::info!(
                        role = self.role,
                        generation = live.generation,
                        "reconnected to RabbitMQ"
                    );
                }
                *reconnect = Reconnect::default();
                *lock(&self.current) = Some(live.clone());
                Ok(live)
            }
            Err(error) => {
                reconnect.failures += 1;
                let doublings = reconnect.failures.saturating_sub(1).min(6);
                let delay =
                    (Duration::from_millis(100) * 2u32.pow(doublings)).min(Duration::from_secs(5));
                reconnect.not_before = Some(Instant::now() + delay);
                tracing::warn!(role = self.role, %error, retry_in = ?delay, "cannot connect to RabbitMQ");
                Err(error)
            }
        }
    }

    /// Tries each URL in order, like Go with `multiple_broker_separator`; the first that connects wins.
    /// After a lost connection the turn starts at the URL after the one that was lost (a RabbitMQ node
    /// that went away is tried last, not first).
    async fn open(&self) -> Result<Arc<Live>, AmqpError> {
        use std::sync::atomic::Ordering;
        let mut last = None;
        let lost = self.last_endpoint.load(Ordering::Relaxed);
        for (index, endpoint) in super::url::turn(&self.endpoints, lost) {
            let timeout = endpoint
                .uri
                .query
                .connection_timeout
                .map_or(DEFAULT_CONNECT_TIMEOUT, Duration::from_millis);
            let attempt = super::tls::connect(endpoint, self.properties.clone(), self.tls.clone());
            match tokio::time::timeout(timeout, attempt).await {
                Ok(Ok(connection)) => {
                    let generation = self
                        .generations
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                        + 1;
                    self.last_endpoint.store(index, Ordering::Relaxed);
                    tracing::info!(role = self.role, url = %endpoint.display, generation, "connected to RabbitMQ");
                    return Ok(Arc::new(Live {
                        connection,
                        generation,
                        declared: Mutex::new(HashMap::new()),
                    }));
                }
                Ok(Err(error)) => {
                    tracing::debug!(role = self.role, url = %endpoint.display, %error, "connection attempt failed");
                    last = Some(error);
                }
                Err(_) => {
                    last = Some(AmqpError::ConnectTimeout {
                        url: endpoint.display.clone(),
                        timeout,
                    })
                }
            }
        }
        Err(last.unwrap_or_else(|| AmqpError::Timeout {
            what: format!("connecting the {}: no URL", self.role),
            timeout: Duration::ZERO,
        }))
    }

    /// Closes the connection (unacknowledged deliveries go back to their queues).
    pub(crate) async fn close(&self) {
        let live = lock(&self.current).take();
        if let Some(live) = live {
            if live.connection.status().connected() {
                if let Err(error) = live.connection.close(200, "machinery closing".into()).await {
                    tracing::debug!(role = self.role, %error, "closing the connection failed");
                }
            }
        }
    }
}

/// What a channel is put in when it is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Nothing: declarations, gets, acks.
    Plain,
    /// Publisher confirms (`confirm.select`).
    Confirm,
    /// Transactions (`tx.select`).
    Tx,
}

struct Held {
    generation: u64,
    channel: Channel,
    uses: u64,
}

/// A channel kept for reuse, reopened on the current connection when it was closed (by a channel error
/// such as a 406, or with its connection). lapin remembers every queue and binding declared on a channel
/// (for its own recovery, which we do not use), so a channel used for per-task declarations is replaced
/// after `recycle_after` uses to keep that memory bounded; the old one closes when its last user drops it.
pub(crate) struct ChannelSlot {
    mode: Mode,
    recycle_after: Option<u64>,
    held: Mutex<Option<Held>>,
    opening: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for ChannelSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelSlot")
            .field("mode", &self.mode)
            .finish()
    }
}

impl ChannelSlot {
    /// A slot whose channels are opened in `mode`.
    pub(crate) fn new(mode: Mode) -> Self {
        ChannelSlot {
            mode,
            recycle_after: None,
            held: Mutex::new(None),
            opening: tokio::sync::Mutex::new(()),
        }
    }

    /// A slot whose channel is replaced after this many uses.
    pub(crate) fn recycled(mode: Mode, uses: u64) -> Self {
        ChannelSlot {
            recycle_after: Some(uses),
            ..ChannelSlot::new(mode)
        }
    }

    fn usable(&self, live: &Live) -> Option<Channel> {
        let mut held = lock(&self.held);
        let h = held.as_mut()?;
        if h.generation != live.generation || !h.channel.status().connected() {
            return None;
        }
        if self.recycle_after.is_some_and(|max| h.uses >= max) {
            *held = None;
            return None;
        }
        h.uses += 1;
        Some(h.channel.clone())
    }

    /// The channel with the live connection it belongs to, opened (and the connection reconnected)
    /// if needed.
    pub(crate) async fn get(&self, session: &Session) -> Result<(Arc<Live>, Channel), AmqpError> {
        let live = session.live().await?;
        if let Some(channel) = self.usable(&live) {
            return Ok((live, channel));
        }
        let _opening = self.opening.lock().await;
        if let Some(channel) = self.usable(&live) {
            return Ok((live, channel));
        }
        let channel = open_channel(&live, self.mode).await?;
        *lock(&self.held) = Some(Held {
            generation: live.generation,
            channel: channel.clone(),
            uses: 1,
        });
        Ok((live, channel))
    }
}

/// Opens a channel in `mode` on `live`.
pub(crate) async fn open_channel(live: &Live, mode: Mode) -> Result<Channel, AmqpError> {
    let channel = live
        .connection
        .create_channel()
        .await
        .map_err(|e| AmqpError::lapin("opening a channel", e))?;
    match mode {
        Mode::Plain => {}
        Mode::Confirm => channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| AmqpError::lapin("enabling publisher confirms", e))?,
        Mode::Tx => channel
            .tx_select()
            .await
            .map_err(|e| AmqpError::lapin("enabling transactions", e))?,
    }
    Ok(channel)
}

/// The lapin exchange kind for Go's `exchange_type` string.
pub(crate) fn exchange_kind(kind: &str) -> ExchangeKind {
    match kind {
        "direct" => ExchangeKind::Direct,
        "fanout" => ExchangeKind::Fanout,
        "topic" => ExchangeKind::Topic,
        "headers" => ExchangeKind::Headers,
        other => ExchangeKind::Custom(other.to_owned()),
    }
}

/// Declares an exchange as Go does: durable, not auto-deleted, not internal, no arguments.
pub(crate) async fn declare_exchange(
    channel: &Channel,
    name: &str,
    kind: &str,
) -> Result<(), AmqpError> {
    let options = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            short("exchange name", name)?,
            exchange_kind(kind),
            options,
            FieldTable::default(),
        )
        .await
        .map_err(|e| AmqpError::lapin(format!("declaring exchange {name:?} ({kind}, durable)"), e))
}

/// How a queue is declared.
#[derive(Debug, Clone, Default)]
pub(crate) struct QueueSpec {
    pub(crate) durable: bool,
    pub(crate) auto_delete: bool,
    pub(crate) exclusive: bool,
    pub(crate) args: FieldTable,
}

/// Declares a queue; returns the number of ready messages it holds.
pub(crate) async fn declare_queue(
    channel: &Channel,
    name: &str,
    spec: &QueueSpec,
) -> Result<u32, AmqpError> {
    let options = QueueDeclareOptions {
        durable: spec.durable,
        auto_delete: spec.auto_delete,
        exclusive: spec.exclusive,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(short("queue name", name)?, options, spec.args.clone())
        .await
        .map(|queue| queue.message_count())
        .map_err(|e| {
            AmqpError::lapin(
                format!(
                    "declaring queue {name:?} (durable {}, auto-delete {}, arguments {:?})",
                    spec.durable,
                    spec.auto_delete,
                    super::table::amqp_table(&spec.args)
                ),
                e,
            )
        })
}

/// Binds `queue` to `exchange` with `key`.
pub(crate) async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    key: &str,
    args: &FieldTable,
) -> Result<(), AmqpError> {
    channel
        .queue_bind(
            short("queue name", queue)?,
            short("exchange name", exchange)?,
            short("binding key", key)?,
            QueueBindOptions::default(),
            args.clone(),
        )
        .await
        .map_err(|e| {
            AmqpError::lapin(
                format!("binding queue {queue:?} to exchange {exchange:?} with key {key:?}"),
                e,
            )
        })
}

/// Persistent `application/json` properties, as Go publishes.
pub(crate) fn json_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
}

/// A publish sent on a confirm channel, not yet confirmed.
pub(crate) struct Sent {
    confirm: lapin::PublisherConfirm,
    exchange: String,
    routing_key: String,
}

/// Sends one persistent message with `mandatory` set (an unroutable message comes back as an error rather
/// than vanishing). The confirm is awaited separately ([`Sent::confirmed`]), so many publishes can be in
/// flight on one channel.
pub(crate) async fn send(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<Sent, AmqpError> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let confirm = channel
        .basic_publish(
            short("exchange name", exchange)?,
            short("routing key", routing_key)?,
            options,
            body,
            properties,
        )
        .await
        .map_err(|e| {
            AmqpError::lapin(
                format!("publishing to exchange {exchange:?} with routing key {routing_key:?}"),
                e,
            )
        })?;
    Ok(Sent {
        confirm,
        exchange: exchange.to_owned(),
        routing_key: routing_key.to_owned(),
    })
}

impl Sent {
    /// Waits for the broker's confirm: a nack or a returned (unroutable) message is an error.
    pub(crate) async fn confirmed(self) -> Result<(), AmqpError> {
        let Sent {
            confirm,
            exchange,
            routing_key,
        } = self;
        // A broker that stops confirming (a memory or disk alarm blocks publishers) must not hang the
        // sender forever; this is not retried, as the message may still be stored.
        let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
            .await
            .map_err(|_| AmqpError::Unconfirmed {
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
                timeout: CONFIRM_TIMEOUT,
            })?;
        match confirmation {
            Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => Ok(()),
            Ok(Confirmation::Ack(Some(returned))) | Ok(Confirmation::Nack(Some(returned))) => {
                Err(AmqpError::Unroutable {
                    exchange,
                    routing_key,
                    reply: format!("{} {}", returned.reply_code, returned.reply_text),
                })
            }
            Ok(Confirmation::Nack(None)) => Err(AmqpError::Nacked {
                exchange,
                routing_key,
            }),
            Err(e) => Err(AmqpError::lapin(
                format!("waiting for the confirm of a publish to exchange {exchange:?} with routing key {routing_key:?}"),
                e,
            )),
        }
    }
}

/// Runs `op` until it succeeds, fails for a reason a new connection cannot fix, or `deadline` passes;
/// transient failures (lost connection, closed channel) back off 50 ms doubling to 2 s between tries.
pub(crate) async fn retry_transient<T, F, Fut>(
    what: &str,
    deadline: Instant,
    mut op: F,
) -> Result<T, AmqpError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, AmqpError>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    loop {
        match op().await {
            Ok(value) => return Ok(value),
            Err(error) if error.is_transient() && Instant::now() < deadline => {
                let delay = backoff
                    .next_delay()
                    .min(deadline.saturating_duration_since(Instant::now()));
                tracing::debug!(%error, retry_in = ?delay, "{what} failed; retrying");
                tokio::time::sleep(delay).await;
            }
            Err(error) => return Err(error),
        }
    }
}
