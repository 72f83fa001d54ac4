//! Redis Cluster (`REDIS_CLUSTER_MODE=true`, YAML `cluster_mode`, Go v2's `REDIS_CLUSTER_ENABLED`): the
//! seed addresses of a `redis://[pass@]h1:p1,h2:p2` URL, the cluster client, and the one thing a cluster
//! connection cannot do that a single server can, a pipeline whose commands live in different slots.
//!
//! The keys of one queue share its slot (`broker/keys.rs`: `{<queue>}:…` hashes like the list `<queue>`),
//! so every broker script and pipeline of a queue runs on one node. What cannot share a slot (a task's
//! state and the in-flight list it is acknowledged from, the states of a group's members) runs as
//! ordered single-slot steps instead: [`in_order`] sends a pipeline's commands one after the other,
//! stopping at the first failure, so a state is always written before the acknowledgement that follows
//! it. `docs/redis.md` ("Redis Cluster") says what this costs and what interoperates with Go.

use std::time::Duration;

use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::io::tcp::TcpSettings;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisResult, ServerErrorKind, TlsMode, Value};

use super::url::{RedisAddr, RedisUrl, RedisUrlError};
use crate::config::TlsConfig;
use crate::tls::{Material, TlsError};

/// The seed nodes of a cluster URL: `redis://[user:pass@|pass@]h1:p1,h2:p2[/db]` (or `rediss://`), one
/// URL per address with the same credentials. A single address is one seed.
pub(crate) fn seed_urls(url: &str) -> Result<Vec<RedisUrl>, RedisUrlError> {
    let url = url.trim();
    let Some((scheme, rest)) = url.split_once("://") else {
        return RedisUrl::parse(url).map(|one| vec![one]);
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
        None => (String::new(), authority),
    };
    let seeds = hosts
        .split(',')
        .map(str::trim)
        .filter(|host| !host.is_empty())
        .map(|host| RedisUrl::parse(&format!("{scheme}://{userinfo}{host}{tail}")))
        .collect::<Result<Vec<_>, _>>()?;
    if seeds.is_empty() {
        return RedisUrl::parse(url).map(|one| vec![one]);
    }
    Ok(seeds)
}

/// A cluster client over `seeds`, whose node connections carry `tcp` and answer within `response` (or
/// fail with a timeout), and with `rediss://` the CA, client certificate and insecure mode of `tls`
/// (on every node, the seeds and those the cluster announces). It follows `MOVED` and `ASK` by itself,
/// and reloads the slot map when a node goes away (a failover), retrying the command meanwhile.
pub(crate) fn client(
    seeds: &[RedisUrl],
    tcp: TcpSettings,
    connect: Option<Duration>,
    response: Option<Duration>,
    tls: Option<&Material>,
) -> RedisResult<ClusterClient> {
    let infos = seeds
        .iter()
        .map(RedisUrl::connection_info)
        .collect::<RedisResult<Vec<_>>>()?;
    let mut builder = ClusterClient::builder(infos).tcp_settings(tcp);
    if let Some(material) = tls {
        builder = builder.tls(if material.insecure {
            TlsMode::Insecure
        } else {
            TlsMode::Secure
        });
        if let Some(certificates) = super::client::certificates(material) {
            builder = builder.certs(certificates);
        }
    }
    if let Some(connect) = connect {
        builder = builder.connection_timeout(connect);
    }
    if let Some(response) = response {
        builder = builder.response_timeout(response);
    }
    builder.build()
}

/// The TLS material of a cluster's connections (`None` for `redis://`): `tls` with the first seed's
/// `#insecure`. A server name is refused: the nodes are reached at the addresses the cluster announces,
/// and redis-rs checks each certificate for the address it connects to.
pub(crate) fn material(
    seeds: &[RedisUrl],
    tls: &TlsConfig,
    role: &'static str,
) -> Result<Option<Material>, TlsError> {
    let Some(first) = seeds.first() else {
        return Ok(None);
    };
    if !matches!(first.addr, RedisAddr::Tcp { tls: true, .. }) {
        return Ok(None);
    }
    let mut material = crate::tls::load(tls)?;
    if let Some(name) = material.server_name.take() {
        return Err(TlsError::ServerNameUnsupported {
            name,
            transport: "Redis Cluster",
        });
    }
    material.insecure |= seeds.iter().any(|seed| seed.tls_insecure);
    if material.insecure {
        crate::tls::warn_insecure(role, &first.redacted());
    }
    Ok(Some(material))
}

/// Whether two keys hash to the same slot (so one script may touch both on a cluster).
pub(crate) fn same_slot(a: &str, b: &str) -> bool {
    redis::cluster_routing::Slot::for_key(a) == redis::cluster_routing::Slot::for_key(b)
}

/// Whether a pipeline was refused because its commands name keys in different slots (the client
/// checks before sending anything, so none of them ran).
pub(crate) fn is_cross_slot(error: &RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::CrossSlot)
}

/// Sends a non-transactional pipeline whose commands live in different slots as single commands, in
/// order, each to its own node; stops at the first failure (the commands after it do not run). Returns
/// the replies the pipeline would have (`offset`, `count` as the pipeline asked).
pub(crate) async fn in_order(
    conn: &mut ClusterConnection,
    pipeline: &Pipeline,
    offset: usize,
    count: usize,
) -> RedisResult<Vec<Value>> {
    use redis::aio::ConnectionLike as _;
    let mut replies = Vec::new();
    for cmd in pipeline.cmd_iter() {
        replies.push(conn.req_packed_command(cmd).await?);
    }
    Ok(replies.into_iter().skip(offset).take(count).collect())
}

/// Runs `cmd` on the master that serves `key`'s slot (for commands without a key of their own, such as
/// `CLIENT INFO` and `CLIENT KILL` for the connection a queue's blocking fetch uses).
pub(crate) async fn on_node_of(
    conn: &mut ClusterConnection,
    key: &str,
    cmd: Cmd,
) -> RedisResult<Value> {
    let route = Route::with_key(key, SlotAddr::Master);
    conn.route_command(
        cmd,
        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_addresses_are_seeds_with_the_same_credentials() {
        let seeds = seed_urls("redis://s3cret@127.0.0.1:7000,127.0.0.1:7001, h3:7002/0").unwrap();
        let shown: Vec<String> = seeds.iter().map(RedisUrl::redacted).collect();
        assert_eq!(
            shown,
            [
                "redis://***@127.0.0.1:7000/0",
                "redis://***@127.0.0.1:7001/0",
                "redis://***@h3:7002/0"
            ]
        );
        assert!(seeds
            .iter()
            .all(|s| s.password.as_deref() == Some("s3cret")));
    }

    #[test]
    fn one_address_is_one_seed() {
        let seeds = seed_urls("redis://127.0.0.1:7000").unwrap();
        assert_eq!(seeds.len(), 1);
        assert!(seed_urls("redis://a:1,b:x").is_err());
    }
}
