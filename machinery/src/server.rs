//! The [`Server`]: configuration, broker and result backend, and sending.

use std::fmt;
use std::sync::Arc;

use crate::backend::Backend;
use crate::broker::{Broker, Outgoing};
use tracing::Instrument;

use crate::config::Config;
use crate::error::SendError;
use crate::lock::Lock;
use crate::result::AsyncResult;
use crate::wire::signature::{new_task_uuid, Headers, Signature, SENT_AGAIN_HEADER};
use crate::wire::state::TaskState;

/// A handle to the broker and result backend named by a [`Config`]. Cheap to clone; share one per
/// process.
///
/// ```
/// # async fn demo() -> Result<(), machinery::Error> {
/// use machinery::{Config, Server, Signature};
///
/// let server = Server::new(Config::default()).await?; // in-memory broker and backend
/// let result = server.send(Signature::new("add")).await?;
/// assert!(result.uuid().starts_with("task_"));
/// # Ok(()) }
/// # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
/// ```
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    broker: Arc<dyn Broker>,
    backend: Arc<dyn Backend>,
    lock: Arc<dyn Lock>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("broker", &self.inner.broker)
            .field("backend", &self.inner.backend)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Connects to the broker and result backend that `config` names.
    pub async fn new(config: Config) -> Result<Server, crate::Error> {
        config.warn_if_in_process_by_default("server");
        let (broker, backend, lock) = crate::connect::all(&config).await?;
        Ok(Server {
            inner: Arc::new(Inner {
                config,
                broker,
                backend,
                lock,
            }),
        })
    }

    /// A server over a broker and backend built by hand (custom implementations, tests), with the
    /// in-process lock for periodic tasks.
    pub fn from_parts(
        config: Config,
        broker: Arc<dyn Broker>,
        backend: Arc<dyn Backend>,
    ) -> Server {
        let lock = crate::connect::process_lock();
        Server {
            inner: Arc::new(Inner {
                config,
                broker,
                backend,
                lock,
            }),
        }
    }

    /// The same server with another lock for periodic tasks.
    pub fn with_lock(&self, lock: Arc<dyn Lock>) -> Server {
        let inner = &self.inner;
        Server {
            inner: Arc::new(Inner {
                config: inner.config.clone(),
                broker: inner.broker.clone(),
                backend: inner.backend.clone(),
                lock,
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The broker.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.inner.broker
    }

    /// The result backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }

    /// The lock that de-duplicates periodic tasks.
    pub fn lock(&self) -> &Arc<dyn Lock> {
        &self.inner.lock
    }

    /// Sends a task: stores its PENDING state, then publishes it. The returned handle reads its result.
    ///
    /// A signature made [unique](Signature::unique_for) whose task is already pending or running is not
    /// sent again: the handle returned is the earlier task's.
    pub async fn send<T>(&self, signature: Signature<T>) -> Result<AsyncResult<T>, SendError> {
        let mut signature = signature.erase();
        if let Some(earlier) = crate::unique::claim(self, &mut signature).await? {
            return Ok(AsyncResult::new(
                self.clone(),
                earlier,
                std::mem::take(&mut signature.name),
            ));
        }
        if let Err(error) = self.publish(&mut signature).await {
            crate::unique::release(self.backend().as_ref(), &signature).await;
            return Err(error);
        }
        Ok(AsyncResult::new(
            self.clone(),
            std::mem::take(&mut signature.uuid),
            std::mem::take(&mut signature.name),
        ))
    }

    /// Revokes a task that no worker has started yet: its state becomes FAILURE with the error
    /// [`REVOKED_ERROR`](crate::wire::state::REVOKED_ERROR), and a worker that receives it later acknowledges it
    /// without running it. A task already running is not interrupted (its outcome then replaces the
    /// revocation). The mark lives as long as results do (`results_expire_in`). Go workers do not check
    /// it and would still run the task; Go clients see a FAILURE.
    pub async fn revoke(&self, task_uuid: &str) -> Result<(), crate::backend::BackendError> {
        let mut state = crate::wire::state::TaskState::revoked(task_uuid);
        if let Some(previous) = self.inner.backend.get_state(task_uuid).await? {
            state.merge_from_previous(&previous);
        }
        self.inner.backend.set_state(&state).await
    }

    /// A handle to the result of a task sent earlier (by us, or by any client), by its id.
    pub fn result<T>(&self, task_uuid: impl Into<String>) -> AsyncResult<T> {
        AsyncResult::new(self.clone(), task_uuid.into(), String::new())
    }

    /// Fills in what Go's `SendTask` fills in (id, routing key, headers); then [`Server::encode`] makes
    /// the message.
    pub(crate) fn prepare(&self, signature: &mut Signature) -> Result<(), SendError> {
        if let Some(error) = &signature.encode_error {
            return Err(SendError::Encode(error.clone()));
        }
        if signature.uuid.is_empty() {
            signature.uuid = new_task_uuid();
        }
        signature.routing_key = self.inner.broker.route(&signature.routing_key);
        if signature.uuid == signature.routing_key {
            // Where the result backend keeps states by id (Redis), the state would replace the queue.
            return Err(SendError::Backend {
                task: signature.name.clone(),
                source: crate::backend::BackendError::ReservedKey {
                    key: signature.uuid.clone(),
                    reason: "the id names the queue the task is sent to".to_owned(),
                },
            });
        }
        let headers = signature.headers.get_or_insert_with(Headers::new);
        crate::telemetry::trace::inject(headers);
        Ok(())
    }

    /// The message of a [prepared](Server::prepare) signature, borrowing its id, name and routing key.
    pub(crate) fn encode<'a>(&self, signature: &'a Signature) -> Result<Outgoing<'a>, SendError> {
        let body = signature.to_json().map_err(|source| SendError::Json {
            task: signature.name.clone(),
            source,
        })?;
        Ok(Outgoing {
            uuid: &signature.uuid,
            name: &signature.name,
            routing_key: &signature.routing_key,
            body,
            eta: signature.eta,
            priority: signature.priority,
            headers: signature.headers.clone().unwrap_or_default(),
        })
    }

    /// Stores PENDING and publishes, in a `send` span; used for sends, callbacks and retries alike.
    pub(crate) async fn publish(&self, signature: &mut Signature) -> Result<(), SendError> {
        let span = tracing::info_span!("send", task.name = %signature.name, task.uuid = tracing::field::Empty);
        self.publish_one(signature).instrument(span).await
    }

    async fn publish_one(&self, signature: &mut Signature) -> Result<(), SendError> {
        self.prepare(signature)?;
        let signature = &*signature;
        let outgoing = self.encode(signature)?;
        tracing::Span::current().record("task.uuid", signature.uuid.as_str());
        let pending = TaskState::pending(&signature.uuid, &signature.name);
        let broker_error = |source| SendError::Broker {
            task: signature.name.clone(),
            source,
        };
        if signature.header_value(SENT_AGAIN_HEADER).is_some() {
            // A follow-up sent again: its state was stored when it was first sent, and may be further
            // along by now (SUCCESS, which tells the worker not to run it again); PENDING would hide it.
            return self
                .inner
                .broker
                .publish(outgoing)
                .await
                .map_err(broker_error);
        }
        // A broker holding the backend's half stores PENDING with the publish; any other gives the
        // message back, and the state is stored first, then the message published, as Go does.
        let broker = &self.inner.broker;
        let unsent = if broker.holds_states() {
            broker
                .publish_with_state(&pending, outgoing)
                .await
                .map_err(broker_error)?
        } else {
            Some(outgoing)
        };
        if let Some(outgoing) = unsent {
            self.inner
                .backend
                .set_state(&pending)
                .await
                .map_err(|source| SendError::Backend {
                    task: signature.name.clone(),
                    source,
                })?;
            self.inner
                .broker
                .publish(outgoing)
                .await
                .map_err(broker_error)?;
        }
        tracing::debug!(task.name = %signature.name, task.uuid = %signature.uuid, queue = %signature.routing_key, "sent task");
        Ok(())
    }
}
