//! The master that Redis Sentinels name ([`Watched`], behind [`super::endpoint::Endpoint::Sentinel`]).
//!
//! Behind Sentinel nothing is pinned to one address. Every new connection asks the sentinels for the
//! master (the `redis` crate's [`SentinelClient`], which also checks that the server it names says it is
//! a master). And, as go-redis does, the endpoint listens to a sentinel's `+switch-master` announcements:
//! a forced failover leaves the old master a master for up to ~10 s more, until the sentinels notice and
//! demote it, and whatever is written there in that time is lost when it resynchronises. On an
//! announcement, the connections taken before it are replaced ([`Watched::switches`]) by connections to
//! the announced master.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{Client, ConnectionAddr, IntoConnectionInfo as _, RedisError, RedisResult, TlsMode};
use tokio_util::task::AbortOnDropHandle;

use super::client::client;
use super::conn::{secs, tcp_settings};
use super::url::{RedisAddr, RedisUrl};
use crate::config::{RedisConfig, TlsConfig};
use crate::tls::{Material, TlsError};

/// The sentinels, and what they announced.
pub(crate) struct Watched {
    /// The lookups take turns on one client, which keeps its connections to the sentinels.
    sentinels: tokio::sync::Mutex<SentinelClient>,
    /// Bound on one lookup (`REDIS_CONNECT_TIMEOUT`).
    timeout: Option<Duration>,
    /// The URL, for the credentials, database and TLS of a connection to an announced master.
    url: RedisUrl,
    /// The TLS settings and role of connections to an announced master.
    tls: TlsConfig,
    role: &'static str,
    switches: Arc<Switches>,
    _watcher: AbortOnDropHandle<()>,
}

/// The `+switch-master` announcements heard so far.
#[derive(Default)]
struct Switches {
    count: AtomicU64,
    master: Mutex<Option<(String, u16)>>,
}

impl Watched {
    /// Starts watching the sentinels of `url` (`RedisAddr::Sentinel`) for `master`, listening to their
    /// announcements (so it needs the Tokio runtime); and whether its connections present a client
    /// certificate. With `rediss://` the CA, client certificate and insecure mode of `tls_material`
    /// apply to the sentinels and to the servers they name; `tls_material` and `role` also serve the
    /// connections to an announced master.
    pub(crate) fn start(
        url: &RedisUrl,
        master: &String,
        sentinels: &[(String, u16)],
        tls: &bool,
        config: &RedisConfig,
        tls_material: &TlsConfig,
        role: &'static str,
    ) -> Result<(Watched, bool), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let material = if *tls {
            Some(sentinel_tls(url, tls_material, role)?)
        } else {
            None
        };
        let insecure = material.as_ref().is_some_and(|m| m.insecure);
        let certificates = material.as_ref().and_then(super::client::certificates);
        let addrs: Vec<ConnectionAddr> = sentinels
            .iter()
            .map(|(host, port)| {
                if *tls {
                    ConnectionAddr::TcpTls {
                        host: host.clone(),
                        port: *port,
                        insecure,
                        tls_params: None,
                    }
                } else {
                    ConnectionAddr::Tcp(host.clone(), *port)
                }
            })
            .collect();
        let mut builder =
            SentinelClientBuilder::new(addrs.clone(), master, SentinelServerType::Master)?
                .set_client_to_redis_db(url.db)
                .set_client_to_redis_tcp_settings(tcp_settings())
                .set_client_to_sentinel_tcp_settings(tcp_settings());
        if *tls {
            let mode = if insecure {
                TlsMode::Insecure
            } else {
                TlsMode::Secure
            };
            builder = builder
                .set_client_to_redis_tls_mode(mode)
                .set_client_to_sentinel_tls_mode(mode);
        }
        if let Some(certificates) = &certificates {
            builder = builder
                .set_client_to_redis_certificates(certificates.clone())
                .set_client_to_sentinel_certificates(certificates.clone());
        }
        if let Some(user) = &url.username {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = &url.password {
            builder = builder.set_client_to_redis_password(password);
        }
        let mut sentinel_settings = redis::RedisConnectionInfo::default();
        if !config.sentinel_password.is_empty() {
            builder = builder.set_client_to_sentinel_password(&config.sentinel_password);
            sentinel_settings = sentinel_settings.set_password(&config.sentinel_password);
        }
        let watch_on = addrs
            .into_iter()
            .map(|addr| {
                let info = addr
                    .into_connection_info()?
                    .set_redis_settings(sentinel_settings.clone())
                    .set_tcp_settings(tcp_settings());
                match &certificates {
                    Some(certificates) => Client::build_with_tls(info, certificates.clone()),
                    None => Client::open(info),
                }
            })
            .collect::<RedisResult<Vec<_>>>()?;
        let switches = Arc::new(Switches::default());
        let watcher = tokio::spawn(watch(watch_on, master.clone(), switches.clone()));
        let watched = Watched {
            sentinels: tokio::sync::Mutex::new(builder.build()?),
            timeout: secs(config.connect_timeout),
            url: url.clone(),
            tls: tls_material.clone(),
            role,
            switches,
            _watcher: AbortOnDropHandle::new(watcher),
        };
        let sends_certificate = material.is_some_and(|m| m.sends_certificate());
        Ok((watched, sends_certificate))
    }

    /// A client for the server to connect to now: the master last announced if it still says it is
    /// one, else the master the sentinels name (and that says it is one).
    pub(crate) async fn client(&self) -> RedisResult<Client> {
        let lookup = async {
            let announced = self
                .switches
                .master
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some((host, port)) = announced {
                match self.announced_master(host, port).await {
                    Ok(client) => return Ok(client),
                    Err(error) => {
                        tracing::debug!(%error, "the announced master is not one (any more)");
                    }
                }
            }
            self.sentinels.lock().await.async_get_client().await
        };
        let client = match self.timeout {
            Some(limit) => tokio::time::timeout(limit, lookup)
                .await
                .unwrap_or_else(|_| {
                    Err(RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the sentinels did not name a master in time",
                    )))
                })?,
            None => lookup.await?,
        };
        tracing::debug!(master = ?client.get_connection_info().addr(), "connecting to the master");
        Ok(client)
    }

    /// How many master switches the sentinels announced so far: a connection taken at a lower count
    /// goes to a master that is no longer the one.
    pub(crate) fn switches(&self) -> u64 {
        self.switches.count.load(Ordering::SeqCst)
    }

    /// A client for the announced master, if it says it is a master.
    async fn announced_master(&self, host: String, port: u16) -> RedisResult<Client> {
        let RedisAddr::Sentinel { tls, .. } = self.url.addr else {
            unreachable!("a watched endpoint has a Sentinel URL")
        };
        let url = RedisUrl {
            addr: RedisAddr::Tcp { host, port, tls },
            ..self.url.clone()
        };
        let (target, _) = client(&url, &self.tls, self.role)
            .map_err(|e| RedisError::from((redis::ErrorKind::Client, "TLS", e.to_string())))?;
        let client = target.client().clone();
        let mut conn = client.get_multiplexed_async_connection().await?;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
        match role
            .into_iter()
            .next()
            .map(redis::from_redis_value::<String>)
        {
            Some(Ok(role)) if role == "master" => Ok(client),
            _ => Err(RedisError::from((
                redis::ErrorKind::Client,
                "the announced master says it is not a master",
            ))),
        }
    }
}

/// The TLS material of the sentinels and the servers they name: `tls` with the URL's `#insecure`. A
/// server name is refused: the servers are reached at the addresses the sentinels announce, and redis-rs
/// checks each certificate for the address it connects to.
fn sentinel_tls(url: &RedisUrl, tls: &TlsConfig, role: &'static str) -> Result<Material, TlsError> {
    let mut material = crate::tls::load(tls)?;
    if let Some(name) = material.server_name.take() {
        return Err(TlsError::ServerNameUnsupported {
            name,
            transport: "Redis Sentinel",
        });
    }
    material.insecure |= url.tls_insecure;
    if material.insecure {
        crate::tls::warn_insecure(role, &url.redacted());
    }
    Ok(material)
}

/// Listens to `+switch-master` on the first sentinel that answers, for ever (the task is aborted with
/// its endpoint), and records the announcements for `master`.
async fn watch(sentinels: Vec<Client>, master: String, switches: Arc<Switches>) {
    loop {
        for client in &sentinels {
            let opened =
                tokio::time::timeout(Duration::from_secs(5), client.get_async_pubsub()).await;
            let Ok(Ok(mut pubsub)) = opened else {
                continue;
            };
            if pubsub.subscribe("+switch-master").await.is_err() {
                continue;
            }
            let mut messages = pubsub.into_on_message();
            while let Some(message) = messages.next().await {
                let Ok(text) = message.get_payload::<String>() else {
                    continue;
                };
                // `<master name> <old ip> <old port> <new ip> <new port>`
                let parts: Vec<&str> = text.split_whitespace().collect();
                if let [name, _, _, host, port] = parts[..] {
                    if name != master {
                        continue;
                    }
                    let Ok(port) = port.parse::<u16>() else {
                        continue;
                    };
                    tracing::info!(master = %name, new = %format!("{host}:{port}"), "the sentinels switched the master");
                    *switches.master.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((host.to_owned(), port));
                    switches.count.fetch_add(1, Ordering::SeqCst);
                }
            }
            tracing::debug!("lost the sentinel announcement connection; reconnecting");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
