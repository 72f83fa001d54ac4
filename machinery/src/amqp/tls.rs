//! `amqps://` with the configured TLS settings: lapin's own TLS set-up takes extra roots and a client
//! certificate but neither a server name nor an unchecked mode, so when any setting is given the TLS
//! stream is made here, with a rustls configuration of our own ([`crate::tls::client_config`]), and
//! handed to lapin's connector.

use std::sync::Arc;

use lapin::tcp::{AsyncTcpStream, RustlsConnector};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};

use super::error::AmqpError;
use super::url::Endpoint;
use crate::config::TlsConfig;
use crate::tls::TlsError;

/// The TLS settings of one session, ready to connect with.
pub(crate) struct AmqpTls {
    connector: RustlsConnector,
    /// The name the server's certificate must carry, instead of the URL's host.
    server_name: Option<String>,
    sends_certificate: bool,
}

impl std::fmt::Debug for AmqpTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpTls")
            .field("server_name", &self.server_name)
            .field("sends_certificate", &self.sends_certificate)
            .finish_non_exhaustive()
    }
}

/// The TLS settings for `endpoints`, or `None` when lapin's defaults do (no `amqps://` URL, or no
/// setting given: the system's roots, the URL's host).
pub(crate) fn prepare(
    role: &'static str,
    endpoints: &[Endpoint],
    tls: &TlsConfig,
) -> Result<Option<Arc<AmqpTls>>, TlsError> {
    let secure = endpoints.iter().find(|e| e.uri.scheme == AMQPScheme::AMQPS);
    let Some(first) = secure else {
        return Ok(None);
    };
    if tls.is_empty() {
        return Ok(None);
    }
    let material = crate::tls::load(tls)?;
    if material.insecure {
        crate::tls::warn_insecure(role, &first.display);
    }
    let config = crate::tls::client_config(&material)?;
    Ok(Some(Arc::new(AmqpTls {
        connector: RustlsConnector::from(config),
        server_name: material.server_name.clone(),
        sends_certificate: material.sends_certificate(),
    })))
}

/// Connects to `endpoint`, over our TLS stream when `tls` is given and the URL is `amqps://`. A failed
/// TLS handshake comes back as [`AmqpError::Tls`], told in plain words.
pub(crate) async fn connect(
    endpoint: &Endpoint,
    properties: ConnectionProperties,
    tls: Option<Arc<AmqpTls>>,
) -> Result<Connection, AmqpError> {
    let failed = |source: lapin::Error, sends_certificate: bool| match crate::tls::explain(
        &source,
        sends_certificate,
    ) {
        Some(tls_error) => AmqpError::Tls {
            url: endpoint.display.clone(),
            source: tls_error,
        },
        None => AmqpError::Connect {
            url: endpoint.display.clone(),
            source,
        },
    };
    let tls = tls.filter(|_| endpoint.uri.scheme == AMQPScheme::AMQPS);
    let Some(tls) = tls else {
        // lapin's own amqps:// checks against the system's roots; its handshake failures are told too.
        return Connection::connect_uri(endpoint.uri.clone(), properties)
            .await
            .map_err(|e| failed(e, false));
    };
    let sends_certificate = tls.sends_certificate;
    let runtime = lapin::runtime::default_runtime().map_err(|e| failed(e, false))?;
    Connection::connector(
        endpoint.uri.clone(),
        runtime,
        async move |uri: AMQPUri, runtime| {
            let host = uri.authority.host.clone();
            let addrs: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), uri.authority.port))
                    .await?
                    .collect();
            let stream = AsyncTcpStream::connect(&runtime, addrs).await?;
            let name = tls.server_name.as_deref().unwrap_or(&host);
            Ok(stream.into_rustls(&tls.connector, name).await?)
        },
        properties,
    )
    .await
    .map_err(|e| match crate::tls::explain_reset(&e, sends_certificate) {
        // Only when no TLS alert explains it (the alert, when read, is the surer cause).
        Some(reset) if crate::tls::explain(&e, sends_certificate).is_none() => AmqpError::Tls {
            url: endpoint.display.clone(),
            source: reset,
        },
        _ => failed(e, sends_certificate),
    })
}
