//! `memcaches://`: memcached over TLS (memcached 1.5.13+ built with TLS, started with `-Z`), with the
//! result backend's TLS settings (`docs/deploy.md`). Go machinery's memcache backend has no TLS; this
//! URL is ours.

use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::client::MemcacheError;
use crate::config::TlsConfig;
use crate::tls::TlsError;

/// The TLS scheme.
pub(crate) const SCHEME: &str = "memcaches://";

/// The TLS settings of a backend's connections, ready to connect with.
pub(crate) struct MemcacheTls {
    connector: TlsConnector,
    server_name: Option<String>,
    sends_certificate: bool,
}

impl std::fmt::Debug for MemcacheTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemcacheTls")
            .field("server_name", &self.server_name)
            .field("sends_certificate", &self.sends_certificate)
            .finish_non_exhaustive()
    }
}

/// The TLS settings for `url`: `None` for `memcache://`.
pub(crate) fn prepare(url: &str, tls: &TlsConfig) -> Result<Option<Arc<MemcacheTls>>, TlsError> {
    if !url.trim().starts_with(SCHEME) {
        return Ok(None);
    }
    let material = crate::tls::load(tls)?;
    if material.insecure {
        crate::tls::warn_insecure("result backend", url);
    }
    let mut config = rustls::ClientConfig::clone(&*crate::tls::client_config(&material)?);
    // memcached (1.6, OpenSSL) sets no session id context, so a resumed session on a second connection
    // to a server that requires client certificates is answered with an internal_error alert. Pooled
    // connections live long: a full handshake each costs little.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Some(Arc::new(MemcacheTls {
        connector: TlsConnector::from(Arc::new(config)),
        server_name: material.server_name.clone(),
        sends_certificate: material.sends_certificate(),
    })))
}

impl MemcacheTls {
    /// The TLS stream over `stream` to `addr` (`host:port`), its certificate checked for the server
    /// name if one is set, else for the host.
    pub(crate) async fn wrap(
        &self,
        addr: &str,
        stream: TcpStream,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = self.server_name.as_deref().unwrap_or(host).to_owned();
        let name = rustls::pki_types::ServerName::try_from(name)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        self.connector.connect(name, stream).await
    }
}

/// A failure of the first command, told in plain words when it is a TLS handshake's.
pub(crate) fn explain(
    error: MemcacheError,
    tls: Option<&MemcacheTls>,
) -> Box<dyn std::error::Error + Send + Sync + 'static> {
    let explained = tls.and_then(|tls| crate::tls::explain(&error, tls.sends_certificate));
    match explained {
        Some(tls_error) => Box::new(tls_error),
        None => Box::new(error),
    }
}
