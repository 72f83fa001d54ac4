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
            multiplexed_over(self.stream().await?, &self.redis, config).await
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

/// A multiplexed connection over `stream`, its driver task spawned. The task ends, and the stream is
/// closed, when the last clone of the connection is dropped, even with a blocking command unanswered
/// (tested below: redis-rs documents that its own connections need a task handle for that).
async fn multiplexed_over<S>(
    stream: S,
    redis: &RedisConnectionInfo,
    config: &AsyncConnectionConfig,
) -> RedisResult<MultiplexedConnection>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (conn, driver) =
        MultiplexedConnection::new_with_config(redis, stream, config.clone()).await?;
    tokio::spawn(driver);
    Ok(conn)
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

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
    use tokio::sync::oneshot;

    /// A server that answers `+OK` to every command until a `BLMOVE`, which it never answers; says when
    /// the client closes the stream.
    async fn serve(mut stream: DuplexStream, closed: oneshot::Sender<()>) {
        let mut buf = vec![0u8; 4096];
        let mut blocked = false;
        loop {
            let n = match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            blocked |= chunk.windows(6).any(|w| w == b"BLMOVE");
            if blocked {
                continue;
            }
            // Commands are arrays: one `*` at the start of a line each.
            let commands = (0..n)
                .filter(|&i| chunk[i] == b'*' && (i == 0 || chunk[i - 1] == b'\n'))
                .count();
            for _ in 0..commands {
                if stream.write_all(b"+OK\r\n").await.is_err() {
                    break;
                }
            }
        }
        let _ = closed.send(());
    }

    /// A consumer replaces its blocking connection while a `BLMOVE` waits on it (a silent link): the
    /// old socket must not live on.
    #[tokio::test]
    async fn a_connection_over_our_stream_closes_with_its_last_clone() {
        let (ours, theirs) = tokio::io::duplex(4096);
        let (closed, on_close) = oneshot::channel();
        tokio::spawn(serve(theirs, closed));
        let config = AsyncConnectionConfig::new().set_response_timeout(None);
        let mut conn = multiplexed_over(ours, &RedisConnectionInfo::default(), &config)
            .await
            .unwrap();
        let ok: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
        assert_eq!(ok, "OK");
        let mut other = conn.clone();
        let mut blmove = redis::cmd("BLMOVE");
        blmove.arg("a").arg("b").arg("LEFT").arg("RIGHT").arg(0);
        let waiting = blmove.query_async::<Value>(&mut other);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), waiting)
                .await
                .is_err(),
            "BLMOVE was answered"
        );
        drop(other);
        drop(conn);
        tokio::time::timeout(Duration::from_secs(2), on_close)
            .await
            .expect("the stream closes with the last clone, a BLMOVE still unanswered")
            .unwrap();
    }
}
