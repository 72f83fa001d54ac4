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
    /// Redis broker, memcached result backend.
    RedisMemcache,
    /// AMQP broker and AMQP result backend on RabbitMQ (`MACHINERY_TEST_AMQP_ADDR`): one shared test
    /// exchange, a queue of its own that expires 10 minutes after its last use.
    Amqp,
    /// AMQP broker, Redis result backend (Go's example setup).
    AmqpRedis,
    /// AMQP broker, memcached result backend.
    AmqpMemcache,
    /// Redis broker and result backend over mutual TLS (`rediss://127.0.0.1:6390`, the private CA and
    /// a client certificate of [`crate::tls`]).
    RedisTls,
    /// AMQP broker and result backend over mutual TLS (`amqps://…@127.0.0.1:5676/`, a RabbitMQ node of
    /// its own).
    AmqpTls,
    /// Redis broker and Redis result backend on the local Redis Cluster (`REDIS_CLUSTER_MODE`).
    RedisCluster,
    /// Redis broker and result backend through Sentinel ([`Service::RedisSentinel`]).
    RedisSentinel,
    /// AMQP broker and result backend on the 3-node RabbitMQ cluster ([`Service::RabbitMqCluster`]),
    /// every node's URL given, with quorum queues.
    AmqpCluster,
}

#[derive(Clone, Copy)]
enum Part {
    Memory,
    Redis,
    RedisCluster,
    Amqp,
    Memcached,
    RedisTls,
    AmqpTls,
    Sentinel,
    AmqpCluster,
}

impl Setup {
    fn parts(self) -> (Part, Part) {
        match self {
            Setup::Memory => (Part::Memory, Part::Memory),
            Setup::Redis => (Part::Redis, Part::Redis),
            Setup::MemoryMemcache => (Part::Memory, Part::Memcached),
            Setup::RedisMemcache => (Part::Redis, Part::Memcached),
            Setup::Amqp => (Part::Amqp, Part::Amqp),
            Setup::AmqpRedis => (Part::Amqp, Part::Redis),
            Setup::AmqpMemcache => (Part::Amqp, Part::Memcached),
            Setup::RedisTls => (Part::RedisTls, Part::RedisTls),
            Setup::AmqpTls => (Part::AmqpTls, Part::AmqpTls),
            Setup::RedisCluster => (Part::RedisCluster, Part::RedisCluster),
            Setup::RedisSentinel => (Part::Sentinel, Part::Sentinel),
            Setup::AmqpCluster => (Part::AmqpCluster, Part::AmqpCluster),
        }
    }

    /// A server on this setup with a queue of its own, or `None` (after printing `SKIPPED`) when its
    /// services are unreachable and not required.
    pub async fn server(self, test: &str) -> Option<Server> {
        let queue = unique("wf");
        let (broker, backend) = self.parts();
        let url = |part: Part| match part {
            Part::Memory => Some("memory://".to_owned()),
            Part::Redis => require(Service::Redis, test).then(|| Service::Redis.url()),
            Part::RedisCluster => {
                require(Service::RedisCluster, test).then(|| Service::RedisCluster.url())
            }
            Part::Amqp => require(Service::RabbitMq, test).then(|| Service::RabbitMq.url()),
            Part::Memcached => require(Service::Memcached, test).then(|| Service::Memcached.url()),
            Part::RedisTls => require(Service::RedisTls, test).then(|| Service::RedisTls.url()),
            Part::AmqpTls => {
                require(Service::RabbitMqTls, test).then(|| Service::RabbitMqTls.url())
            }
            Part::Sentinel => {
                require(Service::RedisSentinel, test).then(|| Service::RedisSentinel.url())
            }
            Part::AmqpCluster => {
                require(Service::RabbitMqCluster, test).then(|| Service::RabbitMqCluster.url())
            }
        };
        let mut config = Config::new(url(broker)?, url(backend)?).with_default_queue(&queue);
        if matches!(broker, Part::RedisTls | Part::AmqpTls) {
            config = config.tls(crate::tls::certs().tls());
        }
        // Results expire soon: these tests do not delete their keys and queues.
        config.results_expire_in = 60;
        if let Part::RedisCluster = broker {
            config.redis.cluster_enabled = true;
            config.redis.delayed_tasks_poll_period = 50;
        }
        if let Part::Sentinel = broker {
            config.redis.master_name = crate::SENTINEL_MASTER.into();
        }
        if let Part::AmqpCluster = broker {
            config.amqp.queue_type = "quorum".into();
        }
        if let Part::Redis | Part::RedisTls | Part::Sentinel = broker {
            // A delayed-task set of its own, polled often, so ETAs and retries are prompt.
            config.redis.delayed_tasks_key = format!("{queue}_delayed");
            config.redis.delayed_tasks_poll_period = 50;
        }
        if let Part::Amqp | Part::AmqpTls | Part::AmqpCluster = broker {
            config.amqp.exchange = "machinery_tests_workflows".into();
            config.amqp.binding_key = queue;
            config.results_expire_in = 600;
            config
                .amqp
                .queue_declare_args
                .insert("x-expires".into(), 600_000.into());
        }
        Some(Server::new(config).await.expect("server"))
    }

    /// How long results may take on this setup.
    pub fn timeout(self) -> Duration {
        Duration::from_secs(20)
    }
}
