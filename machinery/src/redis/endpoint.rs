//! Where connections go ([`Endpoint`]): one fixed server, the master that Redis Sentinels name, or a
//! Redis Cluster through its seed nodes.

use std::sync::Arc;

use redis::cluster::ClusterClient;
use redis::RedisResult;

use super::client::{client, Target};
use super::sentinel::Watched;
use super::url::{RedisAddr, RedisUrl};
use crate::config::{RedisConfig, TlsConfig};

/// Where connections go.
// One per broker or backend, built once and cloned into consumers: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub(crate) enum Endpoint {
    /// A fixed address (boxed: a client is large).
    Direct(Box<Target>),
    /// A master found through Sentinel.
    Sentinel(Arc<Watched>),
    /// A cluster: its client, and a plain client per seed (for pub/sub, which any node relays).
    Cluster {
        client: ClusterClient,
        seeds: Vec<Target>,
    },
}

impl Endpoint {
    /// The endpoint `url` names (not a cluster: [`super::conn::open`] builds that), and whether its
    /// connections present a client certificate. Behind Sentinel this starts listening to the
    /// sentinels' announcements (so it needs the Tokio runtime).
    pub(crate) fn new(
        url: &RedisUrl,
        config: &RedisConfig,
        tls: &TlsConfig,
        role: &'static str,
    ) -> Result<(Endpoint, bool), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let RedisAddr::Sentinel {
            master,
            sentinels,
            tls: tls_on,
        } = &url.addr
        else {
            let (client, sends_certificate) = client(url, tls, role)?;
            return Ok((Endpoint::Direct(Box::new(client)), sends_certificate));
        };
        let (watched, sends_certificate) =
            Watched::start(url, master, sentinels, tls_on, config, tls, role)?;
        Ok((Endpoint::Sentinel(Arc::new(watched)), sends_certificate))
    }

    /// A client for the server to connect to now: behind Sentinel, the master last announced if it
    /// still says it is one, else the master the sentinels name; on a cluster, its first seed.
    pub(crate) async fn client(&self) -> RedisResult<Target> {
        match self {
            Endpoint::Direct(target) => Ok((**target).clone()),
            Endpoint::Sentinel(watched) => watched.client().await.map(Target::from),
            Endpoint::Cluster { seeds, .. } => seeds.first().cloned().ok_or_else(|| {
                redis::RedisError::from((redis::ErrorKind::Client, "a cluster without seeds"))
            }),
        }
    }

    /// A client for pub/sub on attempt `attempt` (0, 1, ...): the server, the master the sentinels
    /// name now, or the seeds of a cluster in turn (a cluster relays every `PUBLISH` to all its nodes,
    /// so any seed that answers will do).
    pub(crate) async fn pubsub_client(&self, attempt: usize) -> RedisResult<Target> {
        match self {
            Endpoint::Cluster { seeds, .. } if !seeds.is_empty() => {
                Ok(seeds[attempt % seeds.len()].clone())
            }
            _ => self.client().await,
        }
    }

    /// Whether the server behind this endpoint can change (Sentinel): then a broken connection, or a
    /// write refused as `READONLY` by a demoted master, sends the next connection to the sentinels.
    pub(crate) fn follows_failover(&self) -> bool {
        matches!(self, Endpoint::Sentinel(_))
    }

    /// Whether a broken shared connection is replaced by one of ours rather than mended by redis-rs's
    /// connection manager: behind Sentinel (the manager would reconnect to a demoted master), and on a
    /// server whose certificate is checked for `TLS_SERVER_NAME` (the manager would check the URL's
    /// host).
    pub(crate) fn replaces_broken_links(&self) -> bool {
        match self {
            Endpoint::Direct(target) => !target.reconnects_itself(),
            Endpoint::Sentinel(_) => true,
            Endpoint::Cluster { .. } => false,
        }
    }

    /// How many master switches the sentinels announced so far (0 elsewhere): a connection taken at a
    /// lower count goes to a master that is no longer the one.
    pub(crate) fn switches(&self) -> u64 {
        match self {
            Endpoint::Sentinel(watched) => watched.switches(),
            _ => 0,
        }
    }
}
