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
    let material = cluster::material(&seeds, tls, role).map_err(|e| failed(Box::new(e)))?;
    let sends_certificate = material.as_ref().is_some_and(|m| m.sends_certificate());
    let cluster = cluster::client(
        &seeds,
        tcp_settings(),
        secs(config.connect_timeout),
        secs(config.read_timeout),
        material.as_ref(),
    )
    .map_err(|e| failed(Box::new(e)))?;
    let conn = cluster.get_async_connection().await.map_err(|error| {
        match crate::tls::explain(&error, sends_certificate) {
            Some(tls_error) => failed(Box::new(tls_error)),
            None => failed(Box::new(error)),
        }
    })?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::TlsError;

    /// Nothing listens on port 1: a test that reaches the network fails with a refused connection,
    /// not with the TLS error it expects.
    const NOWHERE: &str = "rediss://127.0.0.1:1,127.0.0.1:2";

    async fn open_error(url: &str, config: &RedisConfig, tls: &TlsConfig) -> OpenError {
        match open(url, config, tls, "broker").await {
            Ok(_) => panic!("{url} opened"),
            Err(error) => error,
        }
    }

    fn cluster() -> RedisConfig {
        RedisConfig {
            cluster_enabled: true,
            ..RedisConfig::default()
        }
    }

    fn sentinel() -> RedisConfig {
        RedisConfig {
            master_name: "mymaster".into(),
            ..RedisConfig::default()
        }
    }

    #[tokio::test]
    async fn cluster_and_sentinel_connections_read_the_tls_material() {
        let tls = TlsConfig::new().ca_file("/nonexistent/machinery-cluster-ca.pem");
        for config in [cluster(), sentinel()] {
            let error = open_error(NOWHERE, &config, &tls).await;
            assert!(
                matches!(
                    error.source.downcast_ref::<TlsError>(),
                    Some(TlsError::Read { .. })
                ),
                "{}",
                error.source
            );
            assert!(
                error
                    .source
                    .to_string()
                    .contains("machinery-cluster-ca.pem"),
                "{}",
                error.source
            );
        }
    }

    #[tokio::test]
    async fn cluster_and_sentinel_refuse_a_server_name_they_cannot_check() {
        let tls = TlsConfig::new().server_name("redis.internal");
        for (config, transport) in [(cluster(), "Redis Cluster"), (sentinel(), "Redis Sentinel")] {
            let error = open_error(NOWHERE, &config, &tls).await;
            match error.source.downcast_ref::<TlsError>() {
                Some(TlsError::ServerNameUnsupported { name, transport: t }) => {
                    assert_eq!((name.as_str(), *t), ("redis.internal", transport));
                }
                _ => panic!("{transport}: {}", error.source),
            }
        }
        // Over plain `redis://` there is no certificate to check: the name is not in the way.
        let plain = NOWHERE.replace("rediss://", "redis://");
        let error = open_error(&plain, &cluster(), &tls).await;
        assert!(
            error.source.downcast_ref::<TlsError>().is_none(),
            "{}",
            error.source
        );
    }

    #[test]
    fn a_server_name_makes_the_shared_connection_ours() {
        let url = RedisUrl::parse("rediss://localhost:6390").unwrap();
        let (target, _) = client(&url, &TlsConfig::new(), "broker").unwrap();
        assert!(target.reconnects_itself());
        // Insecure: the test needs no CA (and no system roots); the name still routes the connections.
        let named = TlsConfig::new()
            .server_name("machinery-tls.test")
            .insecure(true);
        let (target, _) = client(&url, &named, "broker").unwrap();
        assert!(!target.reconnects_itself());
        let endpoint = Endpoint::Direct(Box::new(target));
        assert!(endpoint.replaces_broken_links());
        assert!(!endpoint.follows_failover());
    }
}
