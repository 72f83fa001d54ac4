//! Connections of their own for blocking commands ([`Blocking`]), and commands that name no key sent to
//! the node that holds a key ([`on_node_of`]), and who a connection is on the server ([`ClientId`]).

use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use super::cluster;
use super::conn::{secs, silence_limit, Endpoint, Healing};
use crate::config::RedisConfig;

/// A connection of its own for blocking commands (`BLMOVE`), which would stall every other command on a
/// shared multiplexed connection. Its response timeout is the blocking command's own plus a margin
/// ([`silence_limit`]): a link that stays silent past it is dead, and the caller replaces it.
///
/// On a cluster it is a cluster connection of its own: its commands (all on one queue's slot) go to the
/// node that serves the queue, and it follows `MOVED`/`ASK` and failovers like the shared one.
pub(crate) async fn blocking_connection(
    endpoint: &Endpoint,
    config: &RedisConfig,
) -> RedisResult<Blocking> {
    match endpoint {
        Endpoint::Direct(_) | Endpoint::Sentinel(_) => {
            // Behind Sentinel, the master the sentinels name now.
            endpoint
                .client()
                .await?
                .multiplexed(secs(config.connect_timeout), Some(silence_limit(config)))
                .await
                .map(Blocking::Single)
        }
        Endpoint::Cluster { client, .. } => {
            let settings = redis::cluster::ClusterConfig::new()
                .set_response_timeout(silence_limit(config))
                .set_connection_timeout(
                    secs(config.connect_timeout).unwrap_or(Duration::from_secs(10)),
                );
            client
                .get_async_connection_with_config(settings)
                .await
                .map(Blocking::Cluster)
        }
    }
}

/// The connection a consumer's blocking fetch uses ([`blocking_connection`]).
pub(crate) enum Blocking {
    Single(redis::aio::MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Blocking {
    /// Runs a command that names no key (`CLIENT INFO`) on the server that holds `key`: on a cluster, the
    /// node this connection's commands for `key` go to.
    pub(crate) async fn on_node_of<T: redis::FromRedisValue>(
        &mut self,
        key: &str,
        cmd: Cmd,
    ) -> RedisResult<T> {
        match self {
            Blocking::Single(conn) => cmd.query_async(conn).await,
            Blocking::Cluster(conn) => {
                redis::from_redis_value(cluster::on_node_of(conn, key, cmd).await?)
                    .map_err(RedisError::from)
            }
        }
    }
}

impl ConnectionLike for Blocking {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Blocking::Single(conn) => conn.req_packed_command(cmd),
            Blocking::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Blocking::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            Blocking::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Blocking::Single(conn) => conn.get_db(),
            Blocking::Cluster(_) => 0,
        }
    }
}

/// Runs a command that names no key (`CLIENT KILL`) on the server that holds `key`, over the shared
/// connection.
pub(crate) async fn on_node_of<T: redis::FromRedisValue>(
    conn: &Healing,
    key: &str,
    cmd: Cmd,
) -> RedisResult<T> {
    match conn.cluster() {
        None => cmd.query_async(&mut conn.clone()).await,
        Some(mut cluster) => {
            redis::from_redis_value(cluster::on_node_of(&mut cluster, key, cmd).await?)
                .map_err(RedisError::from)
        }
    }
}

/// Who a connection is on the server, from `CLIENT INFO`: its id and its address as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientId {
    pub(crate) id: u64,
    pub(crate) addr: String,
}

impl ClientId {
    /// Reads `id=` and `addr=` from a `CLIENT INFO` line.
    pub(crate) fn parse(info: &str) -> Option<ClientId> {
        let field = |name: &str| {
            info.split_ascii_whitespace()
                .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
        };
        Some(ClientId {
            id: field("id")?.parse().ok()?,
            addr: field("addr")?.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::ClientId;

    #[test]
    fn client_info_gives_the_id_and_the_address_not_the_local_one() {
        let info =
            "id=42 addr=127.0.0.1:51234 laddr=127.0.0.1:6379 fd=9 name= age=0 idle=0 flags=N db=0";
        assert_eq!(
            ClientId::parse(info),
            Some(ClientId {
                id: 42,
                addr: "127.0.0.1:51234".into()
            })
        );
        assert_eq!(ClientId::parse("laddr=127.0.0.1:6379 idle=0"), None);
        assert_eq!(ClientId::parse("id=x addr=127.0.0.1:1"), None);
    }
}
