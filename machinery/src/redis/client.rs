//! A client for one Redis server: the TCP settings of every connection ([`tcp_settings`]) and, for
//! `rediss://`, the CA, client certificate and insecure mode of a [`TlsConfig`].

use redis::Client;

use super::conn::tcp_settings;
use super::url::{RedisAddr, RedisUrl};
use crate::config::TlsConfig;

/// A client for `url`, whose TCP connections carry [`tcp_settings`] and, for `rediss://`, the CA and
/// client certificate of `tls`; and whether it presents a client certificate.
pub(crate) fn client(
    url: &RedisUrl,
    tls: &TlsConfig,
    role: &'static str,
) -> Result<(Client, bool), Box<dyn std::error::Error + Send + Sync + 'static>> {
    let mut info = url.connection_info()?.set_tcp_settings(tcp_settings());
    let RedisAddr::Tcp { tls: true, .. } = url.addr else {
        return Ok((Client::open(info)?, false));
    };
    let material = crate::tls::load(tls)?;
    if let Some(name) = material.server_name {
        // redis-rs checks the certificate for the host it connects to, and its connection manager
        // takes no resolver that could connect elsewhere: a different name cannot be honoured.
        return Err(Box::new(crate::tls::TlsError::ServerNameUnsupported {
            name,
            transport: "Redis",
        }));
    }
    if material.insecure || url.tls_insecure {
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
    if material.ca.is_none() && material.identity.is_none() {
        return Ok((Client::open(info)?, false));
    }
    let certificates = redis::TlsCertificates {
        client_tls: material
            .identity
            .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                client_cert,
                client_key,
            }),
        root_cert: material.ca.map(|(pem, _)| pem),
    };
    Ok((
        Client::build_with_tls(info, certificates)?,
        sends_certificate,
    ))
}
