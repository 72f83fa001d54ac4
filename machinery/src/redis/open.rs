//! Opening a Redis broker's, result backend's or lock's connections from its URL: one server, the
//! master behind Sentinel, or a Redis Cluster.

use super::client::client;
use super::cluster;
use super::conn::{manager, secs, tcp_settings, Endpoint, Healing};
use super::url::RedisUrl;
use crate::config::{RedisConfig, TlsConfig};

/// Why [`open`] failed: the URL (password hidden) and the cause.
pub(crate) struct OpenError {
    pub(crate) url: String,
    pub(crate) source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

/// Parses `url` and connects its endpoint and self-healing connection, for a broker, a result backend or
/// a lock (`role`, named in the one warning of an unchecked TLS connection). The URL names the sentinels
/// when `config.master_name` is set, and the seed nodes of a Redis Cluster with `config.cluster_enabled`
/// (the returned URL is then the first seed's). A TLS handshake that fails is told in plain words
/// ([`crate::tls::explain`]), at once: no retry mends a wrong certificate.
pub(crate) async fn open(
    url: &str,
    config: &RedisConfig,
    tls: &TlsConfig,
    role: &'static str,
) -> Result<(RedisUrl, Endpoint, Healing), OpenError> {
    let refused = |e: super::url::RedisUrlError| OpenError {
        url: super::url::redact(url),
        source: Box::new(e),
    };
    if config.cluster_enabled {
        return open_cluster(url, config, tls, role).await;
    }
    let parsed = if config.master_name.trim().is_empty() {
        RedisUrl::parse(url)
    } else {
        RedisUrl::parse_sentinel(url, &config.master_name)
    }
    .map_err(refused)?;
    let failed = |source: Box<dyn std::error::Error + Send + Sync + 'static>| OpenError {
        url: parsed.redacted(),
        source,
    };
    let (endpoint, sends_certificate) =
        Endpoint::new(&parsed, config, tls, role).map_err(failed)?;
    let conn = manager(&endpoint, config).await.map_err(|error| {
        match crate::tls::explain(&error, sends_certificate) {
            Some(tls_error) => failed(Box::new(tls_error)),
            None => failed(Box::new(error)),
        }
    })?;
    Ok((parsed, endpoint, conn))
}

/// [`open`] on a Redis Cluster: a cluster client over the seeds, its connection, and a plain client
/// per seed for pub/sub.
async fn open_cluster(
    url: &str,
    config: &RedisConfig,
    tls: &TlsConfig,
    role: &'static str,
) -> Result<(RedisUrl, Endpoint, Healing), OpenError> {
    let seeds = cluster::seed_urls(url).map_err(|e| OpenError {
        url: super::url::redact(url),
        source: Box::new(e),
    })?;
    // `seed_urls` gives at least one URL or an error.
    let first = seeds[0].clone();
    let failed = |source: Box<dyn std::error::Error + Send + Sync + 'static>| OpenError {
        url: first.redacted(),
        source,
    };
    let cluster = cluster::client(
        &seeds,
        tcp_settings(),
        secs(config.connect_timeout),
        secs(config.read_timeout),
    )
    .map_err(|e| failed(Box::new(e)))?;
    let conn = cluster
        .get_async_connection()
        .await
        .map_err(|e| failed(Box::new(e)))?;
    let plain = seeds
        .iter()
        .map(|seed| client(seed, tls, role).map(|(client, _)| client))
        .collect::<Result<Vec<_>, _>>()
        .map_err(failed)?;
    let healing = Healing::over_cluster(conn);
    let endpoint = Endpoint::Cluster {
        client: cluster,
        seeds: plain,
    };
    Ok((first, endpoint, healing))
}
