//! The AMQP result backend (`amqp://`, `amqps://`): Go machinery's "one queue per task" layout
//! (reference §4.4), so Go clients read the states we write and we read theirs.
//!
//! ## Layout
//! - Each task has a queue named by its id (`task_<uuid>`), declared as Go declares it: not durable,
//!   auto-deleted, `x-message-ttl` and `x-expires` = `results_expire_in` in milliseconds as 32-bit
//!   integers, bound to the exchange with the task id as key. Every state change is one persistent
//!   `application/json` message of Go's `TaskState` JSON, published to the exchange with the task id as
//!   routing key and confirmed.
//! - Reading is where we part from Go. Go's `GetState` takes one message and acknowledges it, so each
//!   state can be read once, by one reader. We read without consuming: every message of the queue is
//!   fetched with `basic.get` and put back with `basic.nack(requeue)`, and the newest state (the newest
//!   SUCCESS or FAILURE if there is one) is returned. **Limits** (see `docs/amqp.md`): a Go client that
//!   reads a task consumes its states, so our readers see them no more; while one reader holds the
//!   messages (a few milliseconds) another sees fewer of them, so concurrent readers may briefly see an
//!   older state or none. Waiting for a result ([`Backend::wait_for_completion`]) does not depend on
//!   reading: the process binds one private, exclusive queue to the exchange with the ids it waits for,
//!   and RabbitMQ routes each new state there too, so a result arrives without polling.

mod groups;
mod notifier;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicGetOptions, BasicNackOptions, QueueDeleteOptions};
use lapin::protocol::AMQPSoftError;
use lapin::types::{AMQPValue, FieldTable};
use lapin::Channel;
use tokio::time::Instant;

use self::notifier::Notifier;
use super::session::{
    self, bind, declare_exchange, declare_queue, json_properties, short, AmqpError, ChannelSlot,
    Live, Mode, QueueSpec, Session,
};
use super::url::ConnectError;
use crate::backend::{Backend, BackendError};
use crate::config::Config;
use crate::wire::state::{GroupMeta, TaskState};

pub use self::groups::{group_record_queue, group_states_queue};

/// How long a write keeps retrying through a lost connection.
const WRITE_DEADLINE: Duration = Duration::from_secs(30);

/// The AMQP result backend. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct AmqpBackend {
    inner: Arc<Inner>,
}

impl fmt::Debug for AmqpBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpBackend")
            .field("url", &self.inner.session.display())
            .field("exchange", &self.inner.exchange)
            .finish_non_exhaustive()
    }
}

/// What clones of an [`AmqpBackend`] share: one connection and its channels, each kept for one kind of
/// work so that a failure on one (a 404 on a read) does not close the others.
struct Inner {
    session: Session,
    exchange: String,
    exchange_type: String,
    /// `results_expire_in` in milliseconds, as Go sends it: a 32-bit integer.
    expire_ms: i32,
    /// State writes, confirmed, many in flight.
    publish: ChannelSlot,
    /// Declarations of per-task queues (recycled: lapin remembers each one per channel).
    topology: ChannelSlot,
    /// `basic.get` reads and their nacks.
    read: ChannelSlot,
    /// The transaction channel for group records; a transaction spans the whole channel, so one at a
    /// time per process.
    group: tokio::sync::Mutex<Option<(u64, Channel)>>,
    /// Result notifications.
    notifier: tokio::sync::Mutex<Option<Arc<Notifier>>>,
}

/// An AMQP failure of a backend call: a [refusal](BackendError::Refused) when the request itself cannot
/// succeed (a queue name over 255 bytes, a record that is not JSON), else that operation's error.
fn op_error(operation: &'static str) -> impl Fn(AmqpError) -> BackendError {
    move |error| match error {
        AmqpError::NameTooLong { .. } | AmqpError::Json { .. } => {
            BackendError::refused(operation, error)
        }
        error => BackendError::operation(operation, error),
    }
}

impl AmqpBackend {
    /// Connects to the result backend named by `config.result_backend`: a URL that does not parse is
    /// [`ConnectError::Url`], a server that does not answer [`ConnectError::Server`].
    pub async fn new(config: &Config) -> Result<AmqpBackend, ConnectError<BackendError>> {
        let endpoints = super::url::endpoints(
            "result backend",
            &config.result_backend,
            &config.multiple_broker_separator,
        )
        .map_err(ConnectError::Url)?;
        let tls = crate::amqp::tls::prepare(
            "result backend",
            &endpoints,
            &config.tls.for_result_backend(),
        )
        .map_err(|e| {
            ConnectError::Server(BackendError::Connect {
                url: crate::amqp::url::display(&endpoints),
                source: Box::new(e),
            })
        })?;
        let expire_ms = i32::try_from(config.results_expire_in_secs().saturating_mul(1000))
            .unwrap_or_else(|_| {
                tracing::warn!(
                    results_expire_in = config.results_expire_in,
                    "results_expire_in is longer than AMQP's 32-bit millisecond limit (24.8 days); using the limit"
                );
                i32::MAX
            });
        let backend = AmqpBackend {
            inner: Arc::new(Inner {
                session: Session::new("result backend", endpoints, tls),
                exchange: config.amqp.exchange.clone(),
                exchange_type: config.amqp.exchange_type.clone(),
                expire_ms,
                publish: ChannelSlot::new(Mode::Confirm),
                topology: ChannelSlot::recycled(Mode::Plain, 5_000),
                read: ChannelSlot::new(Mode::Plain),
                group: tokio::sync::Mutex::new(None),
                notifier: tokio::sync::Mutex::new(None),
            }),
        };
        backend.inner.session.live().await.map_err(|e| {
            ConnectError::Server(BackendError::Connect {
                url: backend.inner.session.display(),
                source: Box::new(e),
            })
        })?;
        Ok(backend)
    }

    /// Closes the connection.
    pub async fn close(&self) {
        *self.inner.notifier.lock().await = None;
        self.inner.session.close().await;
    }
}

impl Inner {
    fn expire(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.expire_ms).unwrap_or(0))
    }

    /// Go's declaration of a per-task queue: not durable, auto-deleted, TTL and expiry as int32.
    fn task_queue_spec(&self) -> QueueSpec {
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongInt(self.expire_ms));
        args.insert("x-expires".into(), AMQPValue::LongInt(self.expire_ms));
        QueueSpec {
            durable: false,
            auto_delete: true,
            exclusive: false,
            args,
        }
    }

    async fn ensure_exchange(&self, live: &Live, channel: &Channel) -> Result<(), AmqpError> {
        if self.exchange.is_empty() || live.declared("exchange", None) {
            return Ok(());
        }
        declare_exchange(channel, &self.exchange, &self.exchange_type).await?;
        live.mark_declared("exchange".into());
        Ok(())
    }

    /// Declares and binds a task's queue, at most once per half expiry period per connection: the queue
    /// expires `x-expires` after its last declaration or read, and publishing does not count.
    async fn ensure_task_queue(&self, uuid: &str) -> Result<(), AmqpError> {
        let memo = format!("task\0{uuid}");
        let live = self.session.live().await?;
        if live.declared(&memo, Some(self.expire() / 2)) {
            return Ok(());
        }
        let (live, channel) = self.topology.get(&self.session).await?;
        self.ensure_exchange(&live, &channel).await?;
        declare_queue(&channel, uuid, &self.task_queue_spec()).await?;
        if !self.exchange.is_empty() {
            bind(&channel, uuid, &self.exchange, uuid, &FieldTable::default()).await?;
        }
        live.mark_declared(memo);
        Ok(())
    }

    async fn send_state(&self, state: &TaskState) -> Result<session::Sent, AmqpError> {
        let body = state.to_json().map_err(|source| AmqpError::Json {
            what: format!("encoding the state of {}", state.task_uuid),
            source,
        })?;
        self.ensure_task_queue(&state.task_uuid).await?;
        let (_, channel) = self.publish.get(&self.session).await?;
        session::send(
            &channel,
            &self.exchange,
            &state.task_uuid,
            &body,
            json_properties(),
        )
        .await
    }

    /// Every message of `queue` through `basic.get` on the read channel, each put back with a nack.
    async fn peek_all(&self, queue: &str) -> Result<Vec<Vec<u8>>, AmqpError> {
        let (_, channel) = self.read.get(&self.session).await?;
        let name = short("queue name", queue)?;
        let mut bodies = Vec::new();
        let mut ackers = Vec::new();
        let result = async {
            loop {
                let got = channel
                    .basic_get(name.clone(), BasicGetOptions { no_ack: false })
                    .await
                    .map_err(|e| AmqpError::lapin(format!("reading queue {queue:?}"), e))?;
                let Some(message) = got else { break };
                let more = message.message_count > 0;
                let delivery = message.delivery;
                bodies.push(delivery.data);
                ackers.push(delivery.acker);
                if !more {
                    break;
                }
            }
            Ok::<_, AmqpError>(())
        }
        .await;
        let requeue = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        for acker in ackers {
            // If the channel is gone, RabbitMQ has put the messages back already.
            let _ = acker.nack(requeue).await;
        }
        result.map(|()| bodies)
    }

    async fn read_state(&self, uuid: &str) -> Result<Option<TaskState>, BackendError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let bodies = session::retry_transient("reading a task state", deadline, || async {
            // Declared first, as Go's GetState does: a get on a missing queue would close the channel.
            self.ensure_task_queue(uuid).await?;
            self.peek_all(uuid).await
        })
        .await
        .map_err(op_error("get state"))?;
        let mut states = Vec::with_capacity(bodies.len());
        for body in bodies {
            states.push(
                TaskState::from_json(&body).map_err(|source| BackendError::Decode {
                    key: uuid.to_owned(),
                    source,
                })?,
            );
        }
        Ok(latest(states))
    }

    async fn delete_queue(&self, queue: &str) -> Result<(), AmqpError> {
        let channel = self.session.scratch_channel().await?;
        let result = channel
            .queue_delete(short("queue name", queue)?, QueueDeleteOptions::default())
            .await
            .map_err(|e| AmqpError::lapin(format!("deleting queue {queue:?}"), e));
        let _ = channel.close(200, "OK".into()).await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.soft_error() == Some(AMQPSoftError::NOTFOUND) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The state a reader should see among a task's messages (oldest first): the newest SUCCESS or FAILURE,
/// as a redelivered task may write RECEIVED again after its first run finished, else the newest.
fn latest(states: Vec<TaskState>) -> Option<TaskState> {
    let completed = states.iter().rposition(TaskState::is_completed);
    match completed {
        Some(i) => states.into_iter().nth(i),
        None => states.into_iter().last(),
    }
}

#[async_trait]
impl Backend for AmqpBackend {
    fn kind(&self) -> &'static str {
        "amqp"
    }

    async fn set_state(&self, state: &TaskState) -> Result<(), BackendError> {
        let inner = &self.inner;
        session::retry_transient(
            "storing a task state",
            Instant::now() + WRITE_DEADLINE,
            || async { inner.send_state(state).await?.confirmed().await },
        )
        .await
        .map_err(op_error("set state"))
    }

    /// Sends every state before waiting for the confirms.
    async fn set_states(&self, states: &[TaskState]) -> Result<(), BackendError> {
        let inner = &self.inner;
        session::retry_transient(
            "storing task states",
            Instant::now() + WRITE_DEADLINE,
            || async {
                let mut sent = Vec::with_capacity(states.len());
                for state in states {
                    sent.push(inner.send_state(state).await?);
                }
                for s in sent {
                    s.confirmed().await?;
                }
                Ok(())
            },
        )
        .await
        .map_err(op_error("set state"))
    }

    async fn get_state(&self, task_uuid: &str) -> Result<Option<TaskState>, BackendError> {
        self.inner.read_state(task_uuid).await
    }

    /// One read for the check (revocation, SUCCESS), then both states sent before either confirm is
    /// awaited.
    async fn set_received_and_started(
        &self,
        received: &TaskState,
        started: &TaskState,
    ) -> Result<bool, BackendError> {
        if self
            .get_state(&received.task_uuid)
            .await?
            .is_some_and(|s| s.stops_a_start())
        {
            return Ok(false);
        }
        self.set_states(&[received.clone(), started.clone()])
            .await?;
        Ok(true)
    }

    /// Subscribes to the task's states through the process's notification queue, reads the stored state
    /// once, then waits for a notification, reading again now and then in case notifications stopped
    /// (a lost connection).
    async fn wait_for_completion(
        &self,
        task_uuid: &str,
        timeout: Duration,
    ) -> Result<Option<TaskState>, BackendError> {
        self.inner.wait_for_completion(task_uuid, timeout).await
    }

    /// Creates the group record in `<group>_meta` and binds `<group>_states` with every member id. Does
    /// nothing if the record exists already.
    async fn init_group(&self, meta: &GroupMeta) -> Result<(), BackendError> {
        self.inner.init_group(meta).await
    }

    async fn get_group(&self, group_uuid: &str) -> Result<Option<GroupMeta>, BackendError> {
        self.inner.get_group(group_uuid).await
    }

    /// The members' states from `<group>_states` (the newest SUCCESS or FAILURE of each), in group order;
    /// a member with no copy there is read from its own queue.
    async fn group_states(&self, group_uuid: &str) -> Result<Vec<TaskState>, BackendError> {
        let meta = crate::backend::existing_group(self, group_uuid).await?;
        self.inner.group_states(&meta).await
    }

    /// See the module docs of `groups`: a transactional take-update-put of the group record.
    async fn complete_group_member(
        &self,
        group_uuid: &str,
        task_uuid: &str,
        group_task_count: u32,
    ) -> Result<bool, BackendError> {
        self.inner
            .complete_group_member(group_uuid, task_uuid, group_task_count)
            .await
    }

    async fn purge_state(&self, task_uuid: &str) -> Result<(), BackendError> {
        let inner = &self.inner;
        session::retry_transient(
            "deleting a task state",
            Instant::now() + WRITE_DEADLINE,
            || async {
                inner.delete_queue(task_uuid).await?;
                if let Ok(live) = inner.session.live().await {
                    live.forget(&format!("task\0{task_uuid}"));
                }
                Ok(())
            },
        )
        .await
        .map_err(op_error("purge state"))
    }

    async fn purge_group(&self, group_uuid: &str) -> Result<(), BackendError> {
        self.inner.purge_group(group_uuid).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_completed_state_wins_over_later_progress() {
        let states = vec![
            TaskState::pending("t", "add"),
            TaskState::success("t", "", vec![]),
            TaskState::received("t", ""),
        ];
        assert_eq!(latest(states).unwrap().state, crate::State::Success);
        let states = vec![TaskState::pending("t", "add"), TaskState::started("t", "")];
        assert_eq!(latest(states).unwrap().state, crate::State::Started);
        assert!(latest(Vec::new()).is_none());
    }
}
