//! Shared helpers of the integration tests in `tests/tests/`.
//!
//! Service-backed tests call [`require`] first. When the server is unreachable the test fails if
//! `CI=true` or `MACHINERY_REQUIRE_SERVICES=1` (the README's test command sets it); otherwise it prints a
//! loud `SKIPPED` line and returns early, so a developer without the servers can still run the rest.
//!
//! [`fault_proxy::FaultProxy`] sits between a client and a server to reset, refuse, stall, freeze or
//! delay its connections (`tests/tests/faults_redis.rs`).

pub mod amqp;
pub mod cluster;
pub mod fault_proxy;
pub mod ha;
pub mod tasks;
pub mod tls;

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// A server the tests may need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Redis on `MACHINERY_TEST_REDIS_ADDR` (default `127.0.0.1:6379`).
    Redis,
    /// RabbitMQ on `MACHINERY_TEST_AMQP_ADDR` (default `127.0.0.1:5672`).
    RabbitMq,
    /// memcached on `MACHINERY_TEST_MEMCACHE_ADDR` (default `127.0.0.1:11211`).
    Memcached,
    /// A second memcached on `MACHINERY_TEST_MEMCACHE2_ADDR` (default `127.0.0.1:11212`).
    Memcached2,
    /// Redis's TLS listener, which requires client certificates, on `MACHINERY_TEST_REDIS_TLS_ADDR`
    /// (default `127.0.0.1:6390`; see [`tls`]).
    RedisTls,
    /// A RabbitMQ node of its own with only a TLS listener, which requires client certificates, on
    /// `MACHINERY_TEST_AMQP_TLS_ADDR` (default `127.0.0.1:5676`).
    RabbitMqTls,
    /// The Redis Cluster `scripts/services.sh up` starts: 3 masters and 3 replicas on 127.0.0.1:7000-7005
    /// (`MACHINERY_TEST_REDIS_CLUSTER_ADDR` names the first seed, default `127.0.0.1:7000`).
    RedisCluster,
    /// The Redis Cluster over TLS only of `scripts/services.sh`, which requires client certificates: 3
    /// masters on `MACHINERY_TEST_REDIS_TLS_CLUSTER_ADDRS` (default
    /// `127.0.0.1:7100,127.0.0.1:7101,127.0.0.1:7102`), with the certificate of [`Service::RedisTls`].
    RedisTlsCluster,
    /// The Redis Sentinel over TLS only of `scripts/services.sh`, which requires client certificates: one
    /// sentinel on `MACHINERY_TEST_REDIS_TLS_SENTINEL_ADDR` (default `127.0.0.1:26390`) watching
    /// [`TLS_SENTINEL_MASTER`] on :6391, with the certificate of [`Service::RedisTls`].
    RedisTlsSentinel,
    /// The Redis Sentinel set of `scripts/services.sh`: the sentinels on `MACHINERY_TEST_SENTINEL_ADDRS`
    /// (default `127.0.0.1:26379,127.0.0.1:26380,127.0.0.1:26381`) watching [`SENTINEL_MASTER`], whose
    /// master and replica are on :6380 and :6381 (either way round after a failover).
    RedisSentinel,
    /// The 3-node RabbitMQ cluster of `scripts/services.sh` on `MACHINERY_TEST_AMQP_CLUSTER_ADDRS`
    /// (default `127.0.0.1:5673,127.0.0.1:5674,127.0.0.1:5675`), nodes `machinery-c1..3@localhost`.
    RabbitMqCluster,
}

/// The master name the test sentinels watch.
pub const SENTINEL_MASTER: &str = "mymaster";

/// The master name the TLS test sentinel watches.
pub const TLS_SENTINEL_MASTER: &str = "tlsmaster";

/// The data servers of the test Sentinel set (master and replica, in either role).
pub const SENTINEL_DATA_ADDRS: [&str; 2] = ["127.0.0.1:6380", "127.0.0.1:6381"];

impl Service {
    /// `host:port` (several, comma-separated, for a topology).
    pub fn addr(self) -> String {
        let (var, default) = match self {
            Service::Redis => ("MACHINERY_TEST_REDIS_ADDR", "127.0.0.1:6379"),
            Service::RabbitMq => ("MACHINERY_TEST_AMQP_ADDR", "127.0.0.1:5672"),
            Service::Memcached => ("MACHINERY_TEST_MEMCACHE_ADDR", "127.0.0.1:11211"),
            Service::Memcached2 => ("MACHINERY_TEST_MEMCACHE2_ADDR", "127.0.0.1:11212"),
            Service::RedisTls => ("MACHINERY_TEST_REDIS_TLS_ADDR", "127.0.0.1:6390"),
            Service::RabbitMqTls => ("MACHINERY_TEST_AMQP_TLS_ADDR", "127.0.0.1:5676"),
            Service::RedisCluster => ("MACHINERY_TEST_REDIS_CLUSTER_ADDR", "127.0.0.1:7000"),
            Service::RedisTlsCluster => (
                "MACHINERY_TEST_REDIS_TLS_CLUSTER_ADDRS",
                "127.0.0.1:7100,127.0.0.1:7101,127.0.0.1:7102",
            ),
            Service::RedisTlsSentinel => {
                ("MACHINERY_TEST_REDIS_TLS_SENTINEL_ADDR", "127.0.0.1:26390")
            }
            Service::RedisSentinel => (
                "MACHINERY_TEST_SENTINEL_ADDRS",
                "127.0.0.1:26379,127.0.0.1:26380,127.0.0.1:26381",
            ),
            Service::RabbitMqCluster => (
                "MACHINERY_TEST_AMQP_CLUSTER_ADDRS",
                "127.0.0.1:5673,127.0.0.1:5674,127.0.0.1:5675",
            ),
        };
        std::env::var(var).unwrap_or_else(|_| default.to_owned())
    }

    /// The URL machinery uses for this service.
    pub fn url(self) -> String {
        match self {
            Service::Redis => format!("redis://{}", self.addr()),
            Service::RabbitMq => format!("amqp://guest:guest@{}/", self.addr()),
            Service::Memcached | Service::Memcached2 => format!("memcache://{}", self.addr()),
            Service::RedisTls => format!("rediss://{}", self.addr()),
            Service::RabbitMqTls => format!("amqps://guest:guest@{}/", self.addr()),
            // Seeds on every master of the local topology (one is enough; more survive a dead seed).
            Service::RedisCluster => match std::env::var("MACHINERY_TEST_REDIS_CLUSTER_ADDR") {
                Ok(addr) => format!("redis://{addr}"),
                Err(_) => "redis://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003,127.0.0.1:7004,127.0.0.1:7005".to_owned(),
            },
            Service::RedisSentinel => format!("redis://{}", self.addr()),
            Service::RedisTlsCluster | Service::RedisTlsSentinel => {
                format!("rediss://{}", self.addr())
            }
            Service::RabbitMqCluster => self
                .addr()
                .split(',')
                .map(|addr| format!("amqp://guest:guest@{addr}/"))
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    fn reachable(self) -> bool {
        let mut addrs: Vec<String> = self.addr().split(',').map(str::to_owned).collect();
        if self == Service::RedisSentinel {
            addrs.extend(SENTINEL_DATA_ADDRS.map(str::to_owned));
        }
        addrs.iter().all(|addr| {
            let Ok(resolved) = addr.to_socket_addrs() else {
                return false;
            };
            resolved
                .into_iter()
                .any(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok())
        })
    }
}

/// Whether unreachable services must fail tests (`CI=true` or `MACHINERY_REQUIRE_SERVICES=1`).
pub fn services_required() -> bool {
    let set =
        |var: &str| std::env::var(var).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    set("CI") || set("MACHINERY_REQUIRE_SERVICES")
}

/// Checks that `service` is reachable. Returns `false` (after printing `SKIPPED`) when it is not and
/// services are not required; panics when they are.
pub fn require(service: Service, test: &str) -> bool {
    if service.reachable() {
        return true;
    }
    let message = format!(
        "{test}: {service:?} is not reachable at {}; run scripts/services.sh up (the README's test command does)",
        service.addr()
    );
    if services_required() {
        panic!("{message}");
    }
    eprintln!("SKIPPED {message}");
    false
}

/// A name no other test (or test run) uses, for queues, exchanges and key prefixes.
pub fn unique(prefix: &str) -> String {
    let id = machinery::signature::new_task_uuid();
    format!("{prefix}_{}", &id[5..13])
}

/// Polls `condition` every 10 ms until it holds or `timeout` passes; returns whether it held.
pub async fn eventually<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub mod setups;

/// The ids among `ids` whose state, read through `server`'s result backend, is not SUCCESS (or cannot be
/// read): what a fault test still waits for.
pub async fn unfinished(server: &machinery::Server, ids: &[String]) -> Vec<String> {
    let mut left = Vec::new();
    for id in ids {
        match server.backend().get_state(id).await {
            Ok(Some(state)) if state.state == machinery::State::Success => {}
            _ => left.push(id.clone()),
        }
    }
    left
}
