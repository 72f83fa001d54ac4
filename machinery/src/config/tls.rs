//! TLS settings: a private CA to trust, a client certificate (mutual TLS), the name the server's
//! certificate must carry, for `rediss://` and `amqps://` connections (`docs/deploy.md`).
//!
//! One set of settings applies to every connection ([`TlsSection::shared`], env `TLS_*`, YAML `tls:`);
//! the broker, the result backend and the lock may each override it field by field
//! (`BROKER_TLS_*`, `RESULT_BACKEND_TLS_*`, `LOCK_TLS_*`; YAML `tls: {broker: …}`), for deployments whose
//! broker and backend are different servers with different CAs or client certificates.
//!
//! ```
//! use machinery::{Config, TlsConfig};
//!
//! let config = Config::new("rediss://redis.internal:6380", "rediss://redis.internal:6380")
//!     .tls(TlsConfig::new().ca_file("/etc/machinery/ca.pem").client_cert_files(
//!         "/etc/machinery/client.pem",
//!         "/etc/machinery/client.key",
//!     ));
//! assert_eq!(config.tls.for_broker().ca_file, "/etc/machinery/ca.pem");
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

/// The TLS settings of a connection. Empty fields mean "not set": the server's certificate is then
/// checked against the system's roots, for the host name of the URL, and no client certificate is sent.
///
/// Paths are read when the connection is made; PEM given in code ([`TlsConfig::ca_pem`],
/// [`TlsConfig::client_cert_pem`]) is used as is. Neither a key nor its path is ever logged: `Debug`
/// shows only whether a key is set.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct TlsConfig {
    /// PEM file of the CA certificates to trust instead of the system's roots (env `TLS_CA_FILE`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub ca_file: String,
    /// PEM file of the client certificate chain, for servers that require one (env `TLS_CERT_FILE`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cert_file: String,
    /// PEM file of the client certificate's private key (env `TLS_KEY_FILE`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub key_file: String,
    /// The name the server's certificate must carry, when it is not the URL's host (env
    /// `TLS_SERVER_NAME`): `amqps://`, `memcaches://` and a single `rediss://` server, not Redis Sentinel
    /// or Cluster (see `docs/deploy.md`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub server_name: String,
    /// Do not check the server's certificate at all (env `TLS_INSECURE`; a `rediss://…#insecure` URL
    /// does the same for its connection). Logs a warning once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub insecure: Option<bool>,
    #[serde(skip)]
    pub(crate) ca_pem: Option<Vec<u8>>,
    #[serde(skip)]
    pub(crate) cert_pem: Option<Vec<u8>>,
    #[serde(skip)]
    pub(crate) key_pem: Option<Vec<u8>>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured so that a new field must be placed here; key material never shows.
        let TlsConfig {
            ca_file,
            cert_file,
            key_file,
            server_name,
            insecure,
            ca_pem,
            cert_pem,
            key_pem,
        } = self;
        let set = |v: &Option<Vec<u8>>| v.as_ref().map(|_| "<set>");
        f.debug_struct("TlsConfig")
            .field("ca_file", ca_file)
            .field("cert_file", cert_file)
            .field("key_file", key_file)
            .field("server_name", server_name)
            .field("insecure", insecure)
            .field("ca_pem", &set(ca_pem))
            .field("cert_pem", &set(cert_pem))
            .field("key_pem", &key_pem.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl TlsConfig {
    /// No settings: system roots, the URL's host name, no client certificate.
    pub fn new() -> Self {
        TlsConfig::default()
    }

    /// Trusts the CA certificates of this PEM file instead of the system's roots.
    pub fn ca_file(mut self, path: impl Into<String>) -> Self {
        self.ca_file = path.into();
        self.ca_pem = None;
        self
    }

    /// Trusts these PEM CA certificates instead of the system's roots.
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self.ca_file.clear();
        self
    }

    /// Presents the client certificate chain and key of these PEM files.
    pub fn client_cert_files(mut self, cert: impl Into<String>, key: impl Into<String>) -> Self {
        self.cert_file = cert.into();
        self.key_file = key.into();
        self.cert_pem = None;
        self.key_pem = None;
        self
    }

    /// Presents this PEM client certificate chain and PEM private key.
    pub fn client_cert_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.cert_pem = Some(cert.into());
        self.key_pem = Some(key.into());
        self.cert_file.clear();
        self.key_file.clear();
        self
    }

    /// Checks the server's certificate for this name instead of the URL's host.
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = name.into();
        self
    }

    /// Skips the check of the server's certificate (for tests; a warning is logged once).
    pub fn insecure(mut self, insecure: bool) -> Self {
        self.insecure = Some(insecure);
        self
    }

    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        *self == TlsConfig::default()
    }

    /// Whether a CA is set (file or PEM).
    pub(crate) fn has_ca(&self) -> bool {
        !self.ca_file.is_empty() || self.ca_pem.is_some()
    }

    /// Whether a client certificate or key is set (file or PEM).
    pub(crate) fn has_identity(&self) -> bool {
        !self.cert_file.is_empty()
            || !self.key_file.is_empty()
            || self.cert_pem.is_some()
            || self.key_pem.is_some()
    }

    /// `self` over `base`: the CA, the client certificate (with its key), the server name and the
    /// insecure flag each come from `self` when set there, else from `base`.
    pub fn over(&self, base: &TlsConfig) -> TlsConfig {
        let mut merged = base.clone();
        if self.has_ca() {
            merged.ca_file = self.ca_file.clone();
            merged.ca_pem = self.ca_pem.clone();
        }
        if self.has_identity() {
            merged.cert_file = self.cert_file.clone();
            merged.key_file = self.key_file.clone();
            merged.cert_pem = self.cert_pem.clone();
            merged.key_pem = self.key_pem.clone();
        }
        if !self.server_name.is_empty() {
            merged.server_name = self.server_name.clone();
        }
        if self.insecure.is_some() {
            merged.insecure = self.insecure;
        }
        merged
    }
}

/// The `tls` section of a [`Config`](super::Config): settings for every connection, and per-role
/// overrides.
///
/// ```yaml
/// tls:
///   ca_file: /etc/machinery/ca.pem        # every connection
///   result_backend:                        # only the result backend's, over the shared ones
///     cert_file: /etc/machinery/backend.pem
///     key_file: /etc/machinery/backend.key
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct TlsSection {
    /// The settings of every connection (env `TLS_*`).
    #[serde(flatten)]
    pub shared: TlsConfig,
    /// The broker's overrides (env `BROKER_TLS_*`).
    #[serde(skip_serializing_if = "TlsConfig::is_empty")]
    pub broker: TlsConfig,
    /// The result backend's overrides (env `RESULT_BACKEND_TLS_*`).
    #[serde(skip_serializing_if = "TlsConfig::is_empty")]
    pub result_backend: TlsConfig,
    /// The periodic-task lock's overrides (env `LOCK_TLS_*`), over the broker's settings when the lock
    /// is the broker's Redis (`LOCK` unset), else over the shared ones.
    #[serde(skip_serializing_if = "TlsConfig::is_empty")]
    pub lock: TlsConfig,
}

impl TlsSection {
    /// The broker's settings: its overrides over the shared ones.
    pub fn for_broker(&self) -> TlsConfig {
        self.broker.over(&self.shared)
    }

    /// The result backend's settings: its overrides over the shared ones.
    pub fn for_result_backend(&self) -> TlsConfig {
        self.result_backend.over(&self.shared)
    }

    /// The lock's settings; `on_broker` when the lock is the broker's server.
    pub fn for_lock(&self, on_broker: bool) -> TlsConfig {
        let base = if on_broker {
            self.for_broker()
        } else {
            self.shared.clone()
        };
        self.lock.over(&base)
    }
}

impl super::Config {
    /// Uses these TLS settings for every connection (the broker's, the result backend's and the
    /// lock's, unless overridden with [`Config::broker_tls`](super::Config::broker_tls), …).
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.tls.shared = tls;
        self
    }

    /// Overrides the TLS settings of the broker's connections, field by field.
    pub fn broker_tls(mut self, tls: TlsConfig) -> Self {
        self.tls.broker = tls;
        self
    }

    /// Overrides the TLS settings of the result backend's connections, field by field.
    pub fn result_backend_tls(mut self, tls: TlsConfig) -> Self {
        self.tls.result_backend = tls;
        self
    }

    /// Overrides the TLS settings of the periodic-task lock's connection, field by field.
    pub fn lock_tls(mut self, tls: TlsConfig) -> Self {
        self.tls.lock = tls;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;

    #[test]
    fn role_overrides_replace_the_shared_settings_field_by_field() {
        let config = Config::default()
            .tls(
                TlsConfig::new()
                    .ca_file("shared-ca.pem")
                    .client_cert_files("c.pem", "c.key"),
            )
            .result_backend_tls(TlsConfig::new().ca_pem(b"PEM".to_vec()).server_name("b"));
        let broker = config.tls.for_broker();
        assert_eq!(broker.ca_file, "shared-ca.pem");
        assert_eq!(broker.cert_file, "c.pem");
        let backend = config.tls.for_result_backend();
        assert_eq!(
            (backend.ca_file.as_str(), backend.ca_pem.as_deref()),
            ("", Some(&b"PEM"[..]))
        );
        assert_eq!(backend.cert_file, "c.pem");
        assert_eq!(backend.server_name, "b");
        let lock = config.tls.for_lock(true);
        assert_eq!(lock, broker);
    }

    #[test]
    fn toml_reads_the_same_keys() {
        let config =
            Config::from_toml_str("[tls]\nca_file = \"ca.pem\"\n[tls.lock]\ninsecure = true\n")
                .unwrap();
        assert_eq!(config.tls.shared.ca_file, "ca.pem");
        assert_eq!(config.tls.for_lock(false).insecure, Some(true));
        assert_eq!(config.tls.for_lock(false).ca_file, "ca.pem");
    }

    #[test]
    fn debug_output_never_shows_key_material() {
        let tls = TlsConfig::new().client_cert_pem(
            b"CERT".to_vec(),
            b"-----BEGIN PRIVATE KEY----- s3cret".to_vec(),
        );
        let text = format!("{:?}", Config::default().tls(tls));
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
    }

    #[test]
    fn yaml_reads_the_shared_settings_and_the_overrides() {
        let config = Config::from_yaml_str(
            "tls:\n  ca_file: ca.pem\n  insecure: false\n  broker:\n    server_name: rabbit.internal\n  result_backend:\n    cert_file: b.pem\n    key_file: b.key\n",
        )
        .unwrap();
        assert_eq!(config.tls.shared.ca_file, "ca.pem");
        assert_eq!(config.tls.for_broker().server_name, "rabbit.internal");
        assert_eq!(config.tls.for_broker().ca_file, "ca.pem");
        assert_eq!(config.tls.for_result_backend().key_file, "b.key");
        assert_eq!(config.tls.for_result_backend().insecure, Some(false));
        let back = serde_yaml_ng::to_string(&config).unwrap();
        assert_eq!(Config::from_yaml_str(&back).unwrap(), config);
    }
}
