//! Redis URLs as Go machinery reads them (reference §2.1), for the Redis broker and result backend.
//!
//! | URL | meaning |
//! |---|---|
//! | `redis://host:6379` | TCP, database 0 (the port defaults to 6379) |
//! | `redis://pass@host:6379/3` | a userinfo without `:` is the **password** (Go's rule), database 3 |
//! | `redis://user:pass@host/3` | ACL user name and password |
//! | `rediss://host:6380` | TLS, certificates checked against the system's roots; `#insecure` skips the check |
//! | `redis+socket://pass@/run/redis.sock:/2` | a unix socket, with optional password and database |
//!
//! A database that is not a number is database 0, as in Go.
//!
//! With a Sentinel master name (`REDIS_MASTER_NAME`, YAML `master_name`), the URL names the **sentinels**
//! in Go's go-redis form, `redis://[pass@]h1:p1,h2:p2,h3:p3[/db]` ([`RedisUrl::parse_sentinel`]): the
//! password is the master's, from the first address, the database from the last (Go's rules), and the
//! sentinels' own port defaults to 26379. Without one, several comma-separated addresses are refused
//! with a clear error.
//!
//! ```
//! use machinery::redis_url::{RedisAddr, RedisUrl};
//!
//! let url = RedisUrl::parse("redis://s3cret@127.0.0.1:6379/2")?;
//! assert_eq!(url.password.as_deref(), Some("s3cret"));
//! assert_eq!(url.username, None);
//! assert_eq!(url.db, 2);
//! assert_eq!(url.addr, RedisAddr::Tcp { host: "127.0.0.1".into(), port: 6379, tls: false });
//! assert_eq!(url.redacted(), "redis://***@127.0.0.1:6379/2");
//! # Ok::<(), machinery::redis_url::RedisUrlError>(())
//! ```

use std::fmt;
use std::path::PathBuf;

use percent_encoding::percent_decode_str;

/// Why a Redis URL was refused. The messages show the URL with its password replaced by `***`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RedisUrlError {
    /// The scheme is not one of ours.
    #[error("{url}: expected a redis://, rediss:// or redis+socket:// URL")]
    Scheme {
        /// The URL, redacted.
        url: String,
    },
    /// The URL does not parse.
    #[error("{url}: {reason}")]
    Invalid {
        /// The URL, redacted.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// Several addresses (Go's Sentinel/Cluster form) without a Sentinel master name.
    #[error("{url}: several addresses name Redis Sentinels only with a master name (REDIS_MASTER_NAME, YAML master_name); otherwise give one host:port")]
    SeveralAddresses {
        /// The URL, redacted.
        url: String,
    },
}

/// Where the Redis server is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RedisAddr {
    /// A TCP address, optionally with TLS (`rediss://`).
    Tcp {
        /// Host name or IP address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
        /// Use TLS.
        tls: bool,
    },
    /// A unix socket (`redis+socket://`).
    Unix(PathBuf),
    /// The master that Redis Sentinels know by a name, looked up through them at every connection.
    Sentinel {
        /// The master's name (`REDIS_MASTER_NAME`).
        master: String,
        /// The sentinels' `(host, port)`, asked in this order.
        sentinels: Vec<(String, u16)>,
        /// Use TLS, to the sentinels and to the master.
        tls: bool,
    },
}

/// A parsed Redis URL.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RedisUrl {
    /// Where to connect.
    pub addr: RedisAddr,
    /// ACL user name, if any.
    pub username: Option<String>,
    /// Password, if any.
    pub password: Option<String>,
    /// Database number.
    pub db: i64,
    /// `rediss://…#insecure`: do not check the server's certificate.
    pub tls_insecure: bool,
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the password, not even in debug output.
        f.debug_tuple("RedisUrl").field(&self.redacted()).finish()
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

const DEFAULT_PORT: u16 = 6379;
/// Redis Sentinel's own port.
const DEFAULT_SENTINEL_PORT: u16 = 26379;

impl RedisUrl {
    /// Parses a `redis://`, `rediss://` or `redis+socket://` URL with Go machinery's rules.
    pub fn parse(url: &str) -> Result<RedisUrl, RedisUrlError> {
        let url = url.trim();
        if let Some(rest) = url.strip_prefix("redis+socket://") {
            return Self::parse_socket(url, rest);
        }
        let tls = if url.starts_with("rediss://") {
            true
        } else if url.starts_with("redis://") {
            false
        } else {
            return Err(RedisUrlError::Scheme { url: redact(url) });
        };
        let invalid = |reason: String| RedisUrlError::Invalid {
            url: redact(url),
            reason,
        };
        let authority = authority(url);
        if authority
            .rsplit('@')
            .next()
            .is_some_and(|hosts| hosts.contains(','))
        {
            return Err(RedisUrlError::SeveralAddresses { url: redact(url) });
        }
        let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        let host = match parsed.host() {
            Some(url::Host::Domain(domain)) => domain.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(invalid("no host".into())),
        };
        let port = parsed.port().unwrap_or(DEFAULT_PORT);
        let (username, password) = credentials(parsed.username(), parsed.password())
            .map_err(|reason| invalid(reason.to_owned()))?;
        // Go: `strings.Split(u.Path, "/")[1]` through `strconv.Atoi`, and 0 when that fails.
        let db = parsed
            .path()
            .split('/')
            .nth(1)
            .map_or(0, |segment| segment.parse::<i64>().unwrap_or(0));
        Ok(RedisUrl {
            addr: RedisAddr::Tcp { host, port, tls },
            username,
            password,
            db,
            tls_insecure: tls && parsed.fragment() == Some("insecure"),
        })
    }

    /// Parses Go's go-redis form naming the sentinels that watch the master `master_name`:
    /// `redis://[pass@]h1:p1,h2:p2,…[/db]` (one address is enough). The userinfo is the master's login,
    /// the path its database.
    ///
    /// ```
    /// use machinery::redis_url::{RedisAddr, RedisUrl};
    ///
    /// let url = RedisUrl::parse_sentinel("redis://s3cret@h1:26379,h2:26380,h3/1", "mymaster")?;
    /// let RedisAddr::Sentinel { master, sentinels, .. } = &url.addr else { unreachable!() };
    /// assert_eq!(master, "mymaster");
    /// assert_eq!(sentinels[2], ("h3".to_owned(), 26379));
    /// assert_eq!((url.password.as_deref(), url.db), (Some("s3cret"), 1));
    /// # Ok::<(), machinery::redis_url::RedisUrlError>(())
    /// ```
    pub fn parse_sentinel(url: &str, master_name: &str) -> Result<RedisUrl, RedisUrlError> {
        let url = url.trim();
        let invalid = |reason: &str| RedisUrlError::Invalid {
            url: redact(url),
            reason: reason.to_owned(),
        };
        let (tls, rest) = if let Some(rest) = url.strip_prefix("rediss://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("redis://") {
            (false, rest)
        } else {
            return Err(RedisUrlError::Scheme { url: redact(url) });
        };
        let authority = authority(url);
        let path = &rest[authority.len()..];
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(userinfo) => match userinfo.split_once(':') {
                Some((user, pass)) => credentials(user, Some(pass)),
                None => credentials(userinfo, None),
            }
            .map_err(invalid)?,
        };
        let sentinels = hosts
            .split(',')
            .map(|host| host_port(host.trim(), DEFAULT_SENTINEL_PORT).ok_or(()))
            .collect::<Result<Vec<_>, ()>>()
            .map_err(|()| invalid("expected host:port,host:port,… naming the sentinels"))?;
        if master_name.trim().is_empty() {
            return Err(invalid("no Sentinel master name"));
        }
        let db = path
            .split(['?', '#'])
            .next()
            .unwrap_or("")
            .split('/')
            .nth(1)
            .map_or(0, |segment| segment.parse::<i64>().unwrap_or(0));
        Ok(RedisUrl {
            addr: RedisAddr::Sentinel {
                master: master_name.trim().to_owned(),
                sentinels,
                tls,
            },
            username,
            password,
            db,
            tls_insecure: tls && url.ends_with("#insecure"),
        })
    }

    /// Go's `ParseRedisSocketURL`: `[user:pass@|pass@]/path/to.sock[:/db]`.
    fn parse_socket(url: &str, rest: &str) -> Result<RedisUrl, RedisUrlError> {
        let (userinfo, rest) = match rest.split_once('@') {
            Some((userinfo, rest)) => (Some(userinfo), rest),
            None => (None, rest),
        };
        let (path, db) = match rest.split_once(':') {
            Some((path, db)) => (path, db),
            None => (rest, ""),
        };
        if path.is_empty() {
            return Err(RedisUrlError::Invalid {
                url: redact(url),
                reason: "no socket path; expected redis+socket://password@/path/to/file.sock:/db"
                    .into(),
            });
        }
        let db = db
            .split_once('/')
            .map_or(0, |(_, db)| db.parse::<i64>().unwrap_or(0));
        let (username, password) = match userinfo {
            None => (None, None),
            Some(userinfo) => match userinfo.split_once(':') {
                Some((user, pass)) => (non_empty(user), non_empty(pass)),
                None => (None, non_empty(userinfo)),
            },
        };
        Ok(RedisUrl {
            addr: RedisAddr::Unix(PathBuf::from(path)),
            username,
            password,
            db,
            tls_insecure: false,
        })
    }

    /// The URL with the password replaced by `***`, for logs and errors.
    pub fn redacted(&self) -> String {
        let userinfo = match (&self.username, &self.password) {
            (Some(user), Some(_)) => format!("{user}:***@"),
            (Some(user), None) => format!("{user}@"),
            (None, Some(_)) => "***@".to_owned(),
            (None, None) => String::new(),
        };
        match &self.addr {
            RedisAddr::Tcp { host, port, tls } => {
                let scheme = if *tls { "rediss" } else { "redis" };
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.clone()
                };
                format!("{scheme}://{userinfo}{host}:{port}/{}", self.db)
            }
            RedisAddr::Unix(path) => {
                format!("redis+socket://{userinfo}{}:/{}", path.display(), self.db)
            }
            RedisAddr::Sentinel {
                master,
                sentinels,
                tls,
            } => {
                let scheme = if *tls { "rediss" } else { "redis" };
                let hosts: Vec<String> = sentinels
                    .iter()
                    .map(|(host, port)| {
                        if host.contains(':') {
                            format!("[{host}]:{port}")
                        } else {
                            format!("{host}:{port}")
                        }
                    })
                    .collect();
                format!(
                    "{scheme}://{userinfo}{}/{} (sentinel master {master})",
                    hosts.join(","),
                    self.db
                )
            }
        }
    }

    /// Whether `other` names the same server and database (with the same user), so that one
    /// connection can serve both.
    pub fn same_database(&self, other: &RedisUrl) -> bool {
        self.addr == other.addr && self.db == other.db && self.username == other.username
    }

    /// The `redis` crate's connection settings for this URL (for tools that talk to the same server with
    /// the `redis` crate directly).
    pub fn connection_info(&self) -> redis::RedisResult<redis::ConnectionInfo> {
        use redis::IntoConnectionInfo as _;
        let addr = match &self.addr {
            RedisAddr::Tcp {
                host,
                port,
                tls: false,
            } => redis::ConnectionAddr::Tcp(host.clone(), *port),
            RedisAddr::Tcp {
                host,
                port,
                tls: true,
            } => redis::ConnectionAddr::TcpTls {
                host: host.clone(),
                port: *port,
                insecure: self.tls_insecure,
                tls_params: None,
            },
            RedisAddr::Unix(path) => redis::ConnectionAddr::Unix(path.clone()),
            RedisAddr::Sentinel { .. } => {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "a Sentinel URL names no one server; ask the sentinels for the master",
                )))
            }
        };
        let mut settings = redis::RedisConnectionInfo::default().set_db(self.db);
        if let Some(user) = &self.username {
            settings = settings.set_username(user);
        }
        if let Some(pass) = &self.password {
            settings = settings.set_password(pass);
        }
        Ok(addr.into_connection_info()?.set_redis_settings(settings))
    }
}

/// The part between `://` and the first `/`, `?` or `#` after it.
fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    &rest[..end]
}

/// `host:port`, `host` (with `default` port) or `[v6]:port`.
fn host_port(text: &str, default: u16) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, rest) = rest.split_once(']')?;
        match rest.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if rest.is_empty() => (host, None),
            None => return None,
        }
    } else {
        match text.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        Some(port) => port.parse().ok()?,
        None => default,
    };
    Some((host.to_owned(), port))
}

fn non_empty(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_owned())
}

/// Go's rule: `user:pass` is a user and a password, a lone `pass` is the password.
#[allow(clippy::type_complexity)]
fn credentials(
    user: &str,
    password: Option<&str>,
) -> Result<(Option<String>, Option<String>), &'static str> {
    let decode = |text: &str| {
        percent_decode_str(text)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| "the user name or password is not valid UTF-8 after percent-decoding")
    };
    let user = decode(user)?;
    match password {
        Some(password) => Ok((non_empty(&user), non_empty(&decode(password)?))),
        None => Ok((None, non_empty(&user))),
    }
}

pub use crate::config::redact_url as redact;

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, tls: bool) -> RedisAddr {
        RedisAddr::Tcp {
            host: host.into(),
            port,
            tls,
        }
    }

    #[test]
    fn a_lone_userinfo_is_the_password_as_in_go() {
        let url = RedisUrl::parse("redis://pwd@host:6379/3").unwrap();
        assert_eq!(url.addr, tcp("host", 6379, false));
        assert_eq!(
            (url.username, url.password, url.db),
            (None, Some("pwd".into()), 3)
        );
    }

    #[test]
    fn user_and_password_are_an_acl_login() {
        let url = RedisUrl::parse("redis://user:pwd@host/3").unwrap();
        assert_eq!(url.addr, tcp("host", 6379, false));
        assert_eq!(
            (url.username.as_deref(), url.password.as_deref()),
            (Some("user"), Some("pwd"))
        );
        let url = RedisUrl::parse("redis://:pwd@host").unwrap();
        assert_eq!(
            (url.username.as_deref(), url.password.as_deref()),
            (None, Some("pwd"))
        );
    }

    #[test]
    fn passwords_are_percent_decoded() {
        let url = RedisUrl::parse("redis://:p%40ss%3Aw@host").unwrap();
        assert_eq!(url.password.as_deref(), Some("p@ss:w"));
    }

    #[test]
    fn database_follows_gos_atoi_rules() {
        for (text, db) in [
            ("redis://h:1", 0),
            ("redis://h:1/", 0),
            ("redis://h:1/7", 7),
            ("redis://h:1/7/x", 7),
            ("redis://h:1/abc", 0),
        ] {
            assert_eq!(RedisUrl::parse(text).unwrap().db, db, "{text}");
        }
    }

    #[test]
    fn tls_and_ipv6() {
        let url = RedisUrl::parse("rediss://[::1]:6380#insecure").unwrap();
        assert_eq!(url.addr, tcp("::1", 6380, true));
        assert!(url.tls_insecure);
        assert_eq!(url.redacted(), "rediss://[::1]:6380/0");
        assert!(!RedisUrl::parse("rediss://h").unwrap().tls_insecure);
    }

    #[test]
    fn socket_urls_follow_go() {
        let url = RedisUrl::parse("redis+socket://pwd@/var/run/redis.sock:/2").unwrap();
        assert_eq!(url.addr, RedisAddr::Unix("/var/run/redis.sock".into()));
        assert_eq!((url.password.as_deref(), url.db), (Some("pwd"), 2));
        let url = RedisUrl::parse("redis+socket:///tmp/r.sock").unwrap();
        assert_eq!(url.addr, RedisAddr::Unix("/tmp/r.sock".into()));
        assert_eq!((url.password, url.db), (None, 0));
        let url = RedisUrl::parse("redis+socket://u:p@/tmp/r.sock:/x").unwrap();
        assert_eq!(
            (url.username.as_deref(), url.password.as_deref(), url.db),
            (Some("u"), Some("p"), 0)
        );
        assert!(matches!(
            RedisUrl::parse("redis+socket://pwd@"),
            Err(RedisUrlError::Invalid { .. })
        ));
    }

    #[test]
    fn errors_and_debug_output_never_show_the_password() {
        let errors = [
            RedisUrl::parse("redis://:hunter2@h1:1,h2:2/0").unwrap_err(),
            RedisUrl::parse("redis://:hunter2@h1:notaport").unwrap_err(),
            RedisUrl::parse("redis+socket://hunter2@").unwrap_err(),
            RedisUrl::parse("http://:hunter2@h").unwrap_err(),
        ];
        for error in errors {
            let text = error.to_string();
            assert!(!text.contains("hunter2"), "{text}");
            assert!(text.contains("***"), "{text}");
        }
        assert!(matches!(
            RedisUrl::parse("redis://h1:1,h2:2"),
            Err(RedisUrlError::SeveralAddresses { .. })
        ));
        let url = RedisUrl::parse("redis://admin:hunter2@h").unwrap();
        assert!(!format!("{url:?} {url}").contains("hunter2"));
        assert_eq!(url.redacted(), "redis://admin:***@h:6379/0");
    }

    #[test]
    fn sentinel_urls_follow_go() {
        let url = RedisUrl::parse_sentinel("redis://pw@h1:1,[::1]:2,h3/4", "m").unwrap();
        assert_eq!(
            url.addr,
            RedisAddr::Sentinel {
                master: "m".into(),
                sentinels: vec![("h1".into(), 1), ("::1".into(), 2), ("h3".into(), 26379)],
                tls: false,
            }
        );
        assert_eq!(
            (url.username, url.password.as_deref(), url.db),
            (None, Some("pw"), 4)
        );
        let url = RedisUrl::parse_sentinel("rediss://u:p%40w@h1:1", "m").unwrap();
        assert_eq!(
            (url.username.as_deref(), url.password.as_deref(), url.db),
            (Some("u"), Some("p@w"), 0)
        );
        assert!(url.redacted().starts_with("rediss://u:***@h1:1/0"));
        assert!(!format!("{url:?}").contains("p@w"));
        for bad in ["redis://h1:x,h2:1", "redis://,h2", "http://h1:1"] {
            assert!(RedisUrl::parse_sentinel(bad, "m").is_err(), "{bad}");
        }
        assert!(RedisUrl::parse_sentinel("redis://h1:1", " ").is_err());
    }

    #[test]
    fn same_database_compares_server_db_and_user() {
        let a = RedisUrl::parse("redis://127.0.0.1:6379").unwrap();
        assert!(a.same_database(&RedisUrl::parse("redis://127.0.0.1:6379/0").unwrap()));
        assert!(!a.same_database(&RedisUrl::parse("redis://127.0.0.1:6379/1").unwrap()));
    }
}
