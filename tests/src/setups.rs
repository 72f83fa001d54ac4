//! The broker/backend combinations the capability tests run on.

use std::time::Duration;

use machinery::{Config, Server};

use crate::{require, unique, Service};

/// One broker/backend combination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    /// In-memory broker and backend.
    Memory,
    /// Redis broker and Redis result backend (`MACHINERY_TEST_REDIS_ADDR`, default 127.0.0.1:6379).
    Redis,
    /// In-memory broker, memcached result backend (`MACHINERY_TEST_MEMCACHE_ADDR`).
    MemoryMemcache,
    /// AMQP broker and AMQP result backend on RabbitMQ (`MACHINERY_TEST_AMQP_ADDR`): one shared test
    /// exchange, a queue of its own that expires 10 minutes after its last use.
    Amqp,
}

impl Setup {
    /// A server on this setup with a queue of its own, or `None` (after printing `SKIPPED`) when its
    /// services are unreachable and not required.
    pub async fn server(self, test: &str) -> Option<Server> {
        let queue = unique("wf");
        let config = match self {
            Setup::Memory => Config::default().with_default_queue(queue),
            Setup::Redis => {
                if !require(Service::Redis, test) {
                    return None;
                }
                let url = Service::Redis.url();
                let mut config = Config::new(&url, &url).with_default_queue(&queue);
                // A delayed-task set of its own, polled often, so ETAs and retries are prompt; results
                // expire soon, since these tests do not delete their keys.
                config.redis.delayed_tasks_key = format!("{queue}_delayed");
                config.redis.delayed_tasks_poll_period = 50;
                config.results_expire_in = 60;
                config
            }
            Setup::MemoryMemcache => {
                if !require(Service::Memcached, test) {
                    return None;
                }
                Config::new("memory://", Service::Memcached.url()).with_default_queue(queue)
            }
            Setup::Amqp => {
                if !require(Service::RabbitMq, test) {
                    return None;
                }
                let mut config = Config::new(Service::RabbitMq.url(), Service::RabbitMq.url())
                    .with_default_queue(queue.clone());
                config.amqp.exchange = "machinery_tests_workflows".into();
                config.amqp.binding_key = queue;
                config.results_expire_in = 600;
                config
                    .amqp
                    .queue_declare_args
                    .insert("x-expires".into(), 600_000.into());
                config
            }
        };
        Some(Server::new(config).await.expect("server"))
    }

    /// How long results may take on this setup.
    pub fn timeout(self) -> Duration {
        Duration::from_secs(20)
    }
}
