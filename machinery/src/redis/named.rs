//! Connections to one Redis server whose certificate is checked for `TLS_SERVER_NAME` instead of the
//! URL's host ([`NamedTls`]).
//!
//! redis-rs checks a server's certificate for the host it connects to, and takes neither a rustls
//! configuration nor a resolver for its connection manager and pub/sub connections, so it cannot honour
//! another name. These connections make their own TLS stream instead (the same rustls configuration as
//! `amqps://` and `memcaches://`: the CA or the system's roots, the client certificate), checked for the
//! configured name, and hand it to redis-rs's multiplexed and pub/sub connections, which speak the
//! protocol over any stream.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{MultiplexedConnection, PubSub};
use redis::io::tcp::TcpSettings;
use redis::{AsyncConnectionConfig, RedisConnectionInfo, RedisResult};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::tls::{Material, TlsError};

/// How to reach one server over TLS with its certificate checked for a configured name: where it is
/// (the URL's host and port), the name, and the settings of the connection.
pub(crate) struct NamedTls {
    host: String,
    port: u16,
    name: ServerName<'static>,
    connector: TlsConnector,
    tcp: TcpSettings,
    /// The credentials, database and protocol of the URL, sent once the stream is up.
    redis: RedisConnectionInfo,
}

impl std::fmt::Debug for NamedTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No credentials, no key material: where, and which name.
        f.debug_struct("NamedTls")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl NamedTls {
    /// Connections to `host:port` whose certificate is checked for `name` with the CA and client
    /// certificate of `material` (or not checked at all when it is insecure).
    pub(crate) fn new(
        host: &str,
        port: u16,
        name: &str,
        material: &Material,
        tcp: TcpSettings,
        redis: RedisConnectionInfo,
    ) -> Result<NamedTls, TlsError> {
        let name = ServerName::try_from(name.to_owned())
            .map_err(|_| TlsError::ServerName(name.to_owned()))?;
        Ok(NamedTls {
            // `[::1]` in a URL is `::1` to the resolver.
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            name,
            connector: TlsConnector::from(crate::tls::client_config(material)?),
            tcp,
            redis,
        })
    }

    /// A multiplexed connection, as redis-rs makes one with `config` (its response timeout), set up
    /// within `connect` (TCP, TLS handshake, `AUTH`/`SELECT`).
    pub(crate) async fn multiplexed(
        &self,
        config: &AsyncConnectionConfig,
        connect: Option<Duration>,
    ) -> RedisResult<MultiplexedConnection> {
        within(connect, async {
            let stream = self.stream().await?;
            let (conn, driver) =
                MultiplexedConnection::new_with_config(&self.redis, stream, config.clone()).await?;
            // The driver ends when the last handle of the connection is dropped.
            tokio::spawn(driver);
            Ok(conn)
        })
        .await
    }

    /// A RESP2 pub/sub connection (its callers bound the time it takes).
    pub(crate) async fn pubsub(&self) -> RedisResult<PubSub> {
        let stream = self.stream().await?;
        PubSub::new(&self.redis, stream).await
    }

    /// A TLS stream to the server: the first of its addresses that accepts, with the TCP settings of
    /// every connection, then the handshake, the certificate checked for the name.
    async fn stream(&self) -> io::Result<TlsStream<TcpStream>> {
        let mut last = None;
        for addr in tokio::net::lookup_host((self.host.as_str(), self.port)).await? {
            match TcpStream::connect(addr).await {
                Ok(tcp) => {
                    let tcp = with_settings(tcp, &self.tcp)?;
                    return self.connector.connect(self.name.clone(), tcp).await;
                }
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}:{} resolves to no address", self.host, self.port),
            )
        }))
    }
}

/// `work` within `limit` (none: as long as it takes); a timeout is an I/O timeout, as redis-rs reports
/// its own.
async fn within<T>(
    limit: Option<Duration>,
    work: impl std::future::Future<Output = RedisResult<T>>,
) -> RedisResult<T> {
    match limit {
        None => work.await,
        Some(limit) => tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connecting to the Redis server timed out",
            )
            .into())
        }),
    }
}

/// `tcp` with the keepalive, `TCP_NODELAY` and (Linux) `TCP_USER_TIMEOUT` of `settings`, as redis-rs
/// sets them on its own connections.
fn with_settings(tcp: TcpStream, settings: &TcpSettings) -> io::Result<TcpStream> {
    tcp.set_nodelay(settings.nodelay())?;
    let socket = redis::io::tcp::socket2::SockRef::from(&tcp);
    if let Some(keepalive) = settings.keepalive() {
        socket.set_tcp_keepalive(keepalive)?;
    }
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    socket.set_tcp_user_timeout(settings.user_timeout())?;
    Ok(tcp)
}

/// Shared by the clones of one endpoint.
pub(crate) type Named = Arc<NamedTls>;
