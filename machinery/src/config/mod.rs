//! Configuration: Go machinery's field set (reference §1), loaded from code, the environment (Go's variable
//! names) or a YAML/TOML file.
//!
//! ```
//! use machinery::Config;
//!
//! let config = Config::default();
//! assert_eq!(config.broker, "memory://");
//! assert_eq!(config.default_queue, "machinery_tasks");
//! assert_eq!(config.results_expire_in, 3600);
//! ```

mod env;
mod file;
mod redact;
mod tls;

pub use redact::redact_url;
pub use tls::{TlsConfig, TlsSection};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Why a configuration could not be loaded or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// An environment variable has a value of the wrong kind.
    #[error("environment variable {var}={value:?}: expected {expected}")]
    Env {
        /// The variable.
        var: String,
        /// Its value.
        value: String,
        /// What it should look like.
        expected: &'static str,
    },
    /// A configuration file could not be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A configuration file could not be parsed.
    #[error("cannot parse configuration file {path}: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message.
        reason: String,
    },
    /// A configuration file has an extension we do not read.
    #[error("configuration file {path}: unknown format; expected a .yaml, .yml or .toml file")]
    Format {
        /// The file.
        path: String,
    },
    /// A broker or backend URL with a scheme this build does not support.
    #[error("{role} URL {url:?}: unsupported scheme; this build supports {supported}")]
    UnknownScheme {
        /// `broker` or `result backend`.
        role: &'static str,
        /// The URL.
        url: String,
        /// The schemes this build supports, e.g. `memory://, redis://`.
        supported: String,
    },
    /// A setting with a value we do not know.
    #[error("{setting} = {value:?}: expected {expected}")]
    Invalid {
        /// The setting (its environment variable's name).
        setting: &'static str,
        /// Its value.
        value: String,
        /// What it may be.
        expected: &'static str,
    },
    /// A URL that does not parse.
    #[error("{role} URL {url:?}: {reason}")]
    InvalidUrl {
        /// `broker` or `result backend`.
        role: &'static str,
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The whole configuration of a [`Server`](crate::Server).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Config {
    /// Broker URL: `memory://` (in-process, the default), `redis://…`, `amqp://…`, … (env `BROKER`).
    /// When [`Config::from_env`] finds `BROKER` unset, the server and the worker warn that the default
    /// in-process broker is not reachable from other processes
    /// ([`Config::broker_is_in_process_by_default`]). Several RabbitMQ nodes: `amqp://…,amqp://…`, or a
    /// list in YAML/TOML (joined with commas), tried in order.
    #[serde(deserialize_with = "one_or_many")]
    pub broker: String,
    /// Lock URL for periodic tasks (env `LOCK`); empty means the broker's Redis if there is one.
    pub lock: String,
    /// Splits `broker` into several AMQP URLs tried in order (env `MULTIPLE_BROKER_SEPARATOR`, or Go's
    /// misspelt `MULTIPLE_BROKEN_SEPARATOR`).
    pub multiple_broker_separator: String,
    /// The queue of signatures without a routing key, and of workers without a custom queue (env
    /// `DEFAULT_QUEUE`).
    pub default_queue: String,
    /// Result backend URL: `memory://` (the default), `redis://…`, `amqp://…`, `memcache://…`, `null`
    /// (env `RESULT_BACKEND`). A list in YAML/TOML is joined with commas, as for `broker`.
    #[serde(deserialize_with = "one_or_many")]
    pub result_backend: String,
    /// Seconds results are kept (env `RESULTS_EXPIRE_IN`; 0 means 3600, as in Go).
    pub results_expire_in: u64,
    /// AMQP settings.
    pub amqp: AmqpConfig,
    /// Redis settings.
    pub redis: RedisConfig,
    /// TLS settings of `rediss://` and `amqps://` connections: CA, client certificate, server name
    /// (env `TLS_*`, per role `BROKER_TLS_*`, `RESULT_BACKEND_TLS_*`, `LOCK_TLS_*`; see [`TlsSection`]).
    pub tls: TlsSection,
    /// Do not handle SIGINT/SIGTERM in [`Worker::launch`](crate::Worker::launch) (env `NO_UNIX_SIGNALS`).
    pub no_unix_signals: bool,
    /// How many times a worker puts back a message whose task it does not know before it dead-letters it
    /// (env `UNKNOWN_TASK_REQUEUES`). Go requeues forever.
    pub unknown_task_requeues: u32,
    /// Whether `broker` is the in-process default because [`Config::from_env`] found `BROKER` unset.
    #[serde(skip)]
    pub(crate) broker_defaulted: BrokerDefaulted,
}

/// A URL, or a list of URLs joined with commas (several RabbitMQ nodes, or Redis sentinels).
fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(url) => url,
        OneOrMany::Many(urls) => urls.join(","),
    })
}

/// Set when the broker URL is the in-process default only because the environment named none, so that
/// the server and the worker can warn that other processes cannot reach their queues. Not part of the
/// configuration's value: ignored by comparison and never serialised.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BrokerDefaulted(pub(crate) bool);

impl PartialEq for BrokerDefaulted {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            broker: "memory://".into(),
            lock: String::new(),
            multiple_broker_separator: String::new(),
            default_queue: "machinery_tasks".into(),
            result_backend: "memory://".into(),
            results_expire_in: 3600,
            amqp: AmqpConfig::default(),
            redis: RedisConfig::default(),
            tls: TlsSection::default(),
            no_unix_signals: false,
            unknown_task_requeues: 10,
            broker_defaulted: BrokerDefaulted(false),
        }
    }
}

impl Config {
    /// The default configuration with these broker and result backend URLs.
    pub fn new(broker: impl Into<String>, result_backend: impl Into<String>) -> Self {
        Config {
            broker: broker.into(),
            result_backend: result_backend.into(),
            ..Config::default()
        }
    }

    /// Whether the broker is the in-process `memory://` one only because [`Config::from_env`] found
    /// `BROKER` unset: tasks sent through it reach only workers in this process. The server and worker
    /// log a warning then (a `memory://` broker chosen on purpose, in code, a file or `BROKER`, is quiet).
    pub fn broker_is_in_process_by_default(&self) -> bool {
        self.broker_defaulted.0 && self.broker.trim_start().starts_with("memory:")
    }

    /// Logs, at WARN, that the broker is in-process by default (see
    /// [`Config::broker_is_in_process_by_default`]); `who` names the component that starts.
    pub(crate) fn warn_if_in_process_by_default(&self, who: &str) {
        if self.broker_is_in_process_by_default() {
            tracing::warn!(
                broker = %self.broker,
                "{who}: BROKER is not set, so the broker is the in-process memory:// one: only this process \
                 can send to and consume its queues; other processes (workers, senders, the machinery CLI) \
                 cannot reach them. Set BROKER (for example redis://localhost:6379) to share queues"
            );
        }
    }

    /// Sets the default queue.
    pub fn with_default_queue(mut self, queue: impl Into<String>) -> Self {
        self.default_queue = queue.into();
        self
    }

    /// Results expire after this many seconds (0 means Go's default, 3600).
    pub fn results_expire_in_secs(&self) -> u64 {
        if self.results_expire_in == 0 {
            3600
        } else {
            self.results_expire_in
        }
    }
}

/// AMQP (RabbitMQ) settings, Go's `AMQPConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct AmqpConfig {
    /// Exchange name, declared durable (env `AMQP_EXCHANGE`).
    pub exchange: String,
    /// Exchange type; `direct` changes the routing (env `AMQP_EXCHANGE_TYPE`).
    pub exchange_type: String,
    /// Arguments of task queue declarations, e.g. `x-max-priority` (env `AMQP_QUEUE_DECLARE_ARGS`,
    /// `k:v,k2:v2`).
    pub queue_declare_args: Map<String, Value>,
    /// Arguments of queue bindings (env `AMQP_QUEUE_BINDING_ARGS`, `k:v,k2:v2`).
    pub queue_binding_args: Map<String, Value>,
    /// The binding key of the worker's queue, and the default routing key on a direct exchange (env
    /// `AMQP_BINDING_KEY`).
    pub binding_key: String,
    /// `basic.qos` prefetch per consumer; 0 means the worker's concurrency (env `AMQP_PREFETCH_COUNT`).
    pub prefetch_count: u16,
    /// Auto-delete the per-delay queues (env `AMQP_AUTO_DELETE`).
    pub auto_delete: bool,
    /// One fixed delay queue instead of one per delay (env `AMQP_DELAYED_QUEUE`).
    pub delayed_queue: String,
    /// The type of the queues the broker declares (env `AMQP_QUEUE_TYPE`; not in Go): `classic` (the
    /// default, Go's declaration) or `quorum` (replicated on a RabbitMQ cluster: task, delay and
    /// dead-letter queues; quorum queues ignore message priorities, see `docs/deploy.md`).
    pub queue_type: String,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            exchange: "machinery_exchange".into(),
            exchange_type: "direct".into(),
            queue_declare_args: Map::new(),
            queue_binding_args: Map::new(),
            binding_key: "machinery_task".into(),
            prefetch_count: 0,
            auto_delete: false,
            delayed_queue: String::new(),
            queue_type: "classic".into(),
        }
    }
}

/// Redis settings, Go's `RedisConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RedisConfig {
    /// Idle connections kept (env `REDIS_MAX_IDLE`).
    pub max_idle: u32,
    /// Connection limit, 0 = unlimited (env `REDIS_MAX_ACTIVE`).
    pub max_active: u32,
    /// Seconds before an idle connection is closed (YAML `max_idle_timeout`, env `REDIS_IDLE_TIMEOUT`).
    #[serde(rename = "max_idle_timeout")]
    pub idle_timeout: u64,
    /// Wait for a free connection when at `max_active` (env `REDIS_WAIT`).
    pub wait: bool,
    /// Read timeout in seconds (env `REDIS_READ_TIMEOUT`).
    pub read_timeout: u64,
    /// Write timeout in seconds (env `REDIS_WRITE_TIMEOUT`).
    pub write_timeout: u64,
    /// Connect timeout in seconds (env `REDIS_CONNECT_TIMEOUT`).
    pub connect_timeout: u64,
    /// Milliseconds a worker blocks waiting for a task (env `REDIS_NORMAL_TASKS_POLL_PERIOD`).
    pub normal_tasks_poll_period: u64,
    /// Milliseconds between polls of the delayed-task set (env `REDIS_DELAYED_TASKS_POLL_PERIOD`).
    pub delayed_tasks_poll_period: u64,
    /// The sorted set of delayed tasks (env `REDIS_DELAYED_TASKS_KEY`).
    pub delayed_tasks_key: String,
    /// `CLIENT SETNAME` of our connections (env `REDIS_CLIENT_NAME`).
    pub client_name: String,
    /// Sentinel master name (env `REDIS_MASTER_NAME`): the broker and backend URLs then name the
    /// sentinels, `redis://[pass@]h1:p1,h2:p2,h3:p3[/db]`, and the master is looked up through them.
    pub master_name: String,
    /// Password of the sentinels themselves (env `REDIS_SENTINEL_PASSWORD`, Go v2); the URL's password is
    /// the master's.
    pub sentinel_password: String,
    /// Replicas that must hold a send and a final state before it counts as done (env
    /// `REDIS_WAIT_REPLICAS`; not in Go): each is followed by `WAIT <n>`, so that an acknowledged send
    /// survives a failover. 0 (the default) does not wait; Redis replication is then asynchronous and a
    /// failover can lose the last writes.
    pub wait_replicas: u32,
    /// Use Redis Cluster (env `REDIS_CLUSTER_ENABLED`, or v1's `REDIS_CLUSTER_MODE`): the broker and
    /// result backend URLs name seed nodes (`redis://h1:p1,h2:p2`), and each queue's keys share its slot
    /// (`docs/redis.md`, "Redis Cluster").
    #[serde(alias = "cluster_mode")]
    pub cluster_enabled: bool,
    /// Milliseconds after which a Redis worker that stopped renewing its heartbeat counts as dead, and
    /// the live workers put its unacknowledged messages back on the queue (env `REDIS_HEARTBEAT_TIMEOUT`;
    /// not in Go, which has no in-flight list). The heartbeat is renewed five times per period.
    pub heartbeat_timeout: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            max_idle: 3,
            max_active: 0,
            idle_timeout: 240,
            wait: true,
            read_timeout: 15,
            write_timeout: 15,
            connect_timeout: 15,
            normal_tasks_poll_period: 1000,
            delayed_tasks_poll_period: 500,
            delayed_tasks_key: "delayed_tasks".into(),
            client_name: String::new(),
            master_name: String::new(),
            sentinel_password: String::new(),
            wait_replicas: 0,
            cluster_enabled: false,
            heartbeat_timeout: 15_000,
        }
    }
}
