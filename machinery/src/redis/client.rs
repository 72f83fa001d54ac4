//! A client for one Redis server ([`Target`]): the TCP settings of every connection ([`tcp_settings`])
//! and, for `rediss://`, the CA, client certificate, server name and insecure mode of a [`TlsConfig`].

use std::time::Duration;

use redis::aio::{MultiplexedConnection, PubSub};
use redis::{AsyncConnectionConfig, Client, RedisResult};

use super::conn::tcp_settings;
use super::named::{Named, NamedTls};
use super::url::{RedisAddr, RedisUrl};
use crate::config::TlsConfig;
use crate::tls::Material;

/// How connections to one server are made: by redis-rs from its [`Client`], or, when the server's
/// certificate is checked for `TLS_SERVER_NAME`, over a TLS stream of our own ([`NamedTls`]).
#[derive(Clone)]
pub(crate) struct Target {
    client: Client,
    named: Option<Named>,
}

impl From<Client> for Target {
    fn from(client: Client) -> Target {
        Target {
            client,
            named: None,
        }
    }
}

impl Target {
    /// The redis-rs client (its connection info: address, database).
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Whether redis-rs's connection manager may connect to this server by itself: not when the
    /// certificate is checked for a configured name, which only our own connections do.
    pub(crate) fn reconnects_itself(&self) -> bool {
        self.named.is_none()
    }

    /// A multiplexed connection whose commands time out after `response`, set up within `connect`.
    pub(crate) async fn multiplexed(
        &self,
        connect: Option<Duration>,
        response: Option<Duration>,
    ) -> RedisResult<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(connect)
            .set_response_timeout(response);
        match &self.named {
            Some(named) => named.multiplexed(&config, connect).await,
            None => {
                self.client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
            }
        }
    }

    /// A pub/sub connection.
    pub(crate) async fn pubsub(&self) -> RedisResult<PubSub> {
        match &self.named {
            Some(named) => named.pubsub().await,
            None => self.client.get_async_pubsub().await,
        }
    }
}

/// The CA and client certificate of `material` as redis-rs takes them (`None` when neither is set: the
/// system's roots, no client certificate).
pub(crate) fn certificates(material: &Material) -> Option<redis::TlsCertificates> {
    if material.ca.is_none() && material.identity.is_none() {
        return None;
    }
    Some(redis::TlsCertificates {
        client_tls: material.identity.clone().map(|(client_cert, client_key)| {
            redis::ClientTlsConfig {
                client_cert,
                client_key,
            }
        }),
        root_cert: material.ca.as_ref().map(|(pem, _)| pem.clone()),
    })
}

/// A client for `url`, whose TCP connections carry [`tcp_settings`] and, for `rediss://`, the TLS
/// settings of `tls`; and whether it presents a client certificate.
pub(crate) fn client(
    url: &RedisUrl,
    tls: &TlsConfig,
    role: &'static str,
) -> Result<(Target, bool), Box<dyn std::error::Error + Send + Sync + 'static>> {
    let mut info = url.connection_info()?.set_tcp_settings(tcp_settings());
    let RedisAddr::Tcp {
        tls: true,
        ref host,
        port,
    } = url.addr
    else {
        return Ok((Client::open(info)?.into(), false));
    };
    let mut material = crate::tls::load(tls)?;
    material.insecure |= url.tls_insecure;
    if material.insecure {
        crate::tls::warn_insecure(role, &url.redacted());
        if let redis::ConnectionAddr::TcpTls { host, port, .. } = info.addr().clone() {
            info = info.set_addr(redis::ConnectionAddr::TcpTls {
                host,
                port,
                insecure: true,
                tls_params: None,
            });
        }
    }
    let sends_certificate = material.sends_certificate();
    let named = match &material.server_name {
        Some(name) => Some(Named::new(NamedTls::new(
            host,
            port,
            name,
            &material,
            tcp_settings(),
            info.redis_settings().clone(),
        )?)),
        None => None,
    };
    let client = match certificates(&material) {
        Some(certificates) => Client::build_with_tls(info, certificates)?,
        None => Client::open(info)?,
    };
    Ok((Target { client, named }, sends_certificate))
}
