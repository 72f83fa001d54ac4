//! What the Redis, AMQP and memcached rooms share about TLS: reading and checking the PEM material of a
//! [`TlsConfig`], a rustls client configuration built from it, the one-time warning of an unchecked
//! connection, and errors that say why a handshake failed in words an operator can act on.
//!
//! Nothing here logs or formats key material: a key is read, parsed and handed to rustls; errors name
//! the file, never its content.

use std::sync::atomic::{AtomicBool, Ordering};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// Why TLS could not be set up, or why a handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("TLS {what} {path}: cannot read it: {source}")]
    Read {
        /// `CA file`, `certificate file` or `key file`.
        what: &'static str,
        /// The path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A certificate or key is not usable PEM.
    #[error("TLS {what} {origin}: {reason}")]
    Pem {
        /// `CA file`, `certificate file` or `key file`.
        what: &'static str,
        /// The path, or `(given in code)`.
        origin: String,
        /// What is wrong with it (never its content).
        reason: String,
    },
    /// A client certificate without its key, or a key without its certificate.
    #[error("TLS: {0}")]
    Incomplete(&'static str),
    /// The server name is not a DNS name or an IP address.
    #[error("TLS server name {0:?} is not a valid DNS name or IP address")]
    ServerName(String),
    /// The topology reaches its servers at addresses they announce, and checks each certificate for
    /// the address it connects to: one configured name cannot stand for all of them.
    #[error("TLS server name {name:?}: {transport} connections check each server's certificate for the address the server is reached at (announced by the topology); unset TLS_SERVER_NAME and give the servers certificates that carry their addresses")]
    ServerNameUnsupported {
        /// The configured name.
        name: String,
        /// `Redis Sentinel` or `Redis Cluster`.
        transport: &'static str,
    },
    /// The TLS handshake failed; `cause` says why in plain words, `detail` is the TLS library's
    /// message.
    #[error("TLS handshake failed: {cause} ({detail})")]
    Handshake {
        /// Why, in plain words.
        cause: &'static str,
        /// The TLS library's message.
        detail: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The checked material of a [`TlsConfig`].
#[derive(Default)]
pub(crate) struct Material {
    /// PEM of the CA certificates to trust instead of the system's roots, and the certificates in it.
    pub(crate) ca: Option<(Vec<u8>, Vec<CertificateDer<'static>>)>,
    /// PEM of the client certificate chain and of its key.
    pub(crate) identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name to check the server's certificate for, instead of the URL's host.
    pub(crate) server_name: Option<String>,
    /// Do not check the server's certificate.
    pub(crate) insecure: bool,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("ca", &self.ca.as_ref().map(|(_, certs)| certs.len()))
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .field("server_name", &self.server_name)
            .field("insecure", &self.insecure)
            .finish()
    }
}

impl Material {
    /// Whether a client certificate is configured.
    pub(crate) fn sends_certificate(&self) -> bool {
        self.identity.is_some()
    }
}

/// The bytes of `pem`, or of the file `path`.
fn read(
    what: &'static str,
    path: &str,
    pem: &Option<Vec<u8>>,
) -> Result<Option<(Vec<u8>, String)>, TlsError> {
    if let Some(pem) = pem {
        return Ok(Some((pem.clone(), "(given in code)".to_owned())));
    }
    if path.is_empty() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    Ok(Some((bytes, path.to_owned())))
}

fn certificates(
    what: &'static str,
    pem: &[u8],
    origin: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::Pem {
        what,
        origin: origin.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad(
            "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
        ));
    }
    Ok(certs)
}

fn private_key(pem: &[u8], origin: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    // The parser's error names the PEM section it missed, never the key's bytes.
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Pem {
        what: "key file",
        origin: origin.to_owned(),
        reason: format!("no usable PEM private key (PKCS#8, PKCS#1 or SEC1) in it: {e}"),
    })
}

/// Reads and checks the files and PEM of `tls`.
pub(crate) fn load(tls: &TlsConfig) -> Result<Material, TlsError> {
    let ca = match read("CA file", &tls.ca_file, &tls.ca_pem)? {
        Some((pem, origin)) => {
            let certs = certificates("CA file", &pem, &origin)?;
            Some((pem, certs))
        }
        None => None,
    };
    let cert = read("certificate file", &tls.cert_file, &tls.cert_pem)?;
    let key = read("key file", &tls.key_file, &tls.key_pem)?;
    let identity = match (cert, key) {
        (Some((cert, cert_origin)), Some((key, key_origin))) => {
            certificates("certificate file", &cert, &cert_origin)?;
            private_key(&key, &key_origin)?;
            Some((cert, key))
        }
        (None, None) => None,
        (Some(_), None) => {
            return Err(TlsError::Incomplete(
                "a client certificate is set (TLS_CERT_FILE) but not its key (TLS_KEY_FILE)",
            ))
        }
        (None, Some(_)) => {
            return Err(TlsError::Incomplete(
                "a client key is set (TLS_KEY_FILE) but not its certificate (TLS_CERT_FILE)",
            ))
        }
    };
    let server_name = match tls.server_name.trim() {
        "" => None,
        name => {
            rustls::pki_types::ServerName::try_from(name)
                .map_err(|_| TlsError::ServerName(name.to_owned()))?;
            Some(name.to_owned())
        }
    };
    Ok(Material {
        ca,
        identity,
        server_name,
        insecure: tls.insecure.unwrap_or(false),
    })
}

/// Logs, once per process, that a connection does not check the server's certificate.
pub(crate) fn warn_insecure(role: &'static str, url: &str) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            role,
            url,
            "TLS certificate checks are OFF (#insecure or TLS_INSECURE): anyone on the path can read and \
             change this traffic; trust the server's CA with TLS_CA_FILE instead (logged once)"
        );
    }
}

/// A plain-words reading of a failed handshake, found in the text of `error` and its sources (the
/// clients wrap rustls's error in their own, so its type is not always reachable). `sent_certificate`
/// tells a refused client certificate from a missing one.
pub(crate) fn explain(
    error: &(dyn std::error::Error + 'static),
    sent_certificate: bool,
) -> Option<TlsError> {
    let mut texts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(inner) = source {
        texts.push(inner.to_string());
        source = inner.source();
    }
    let text = texts.join(": ");
    let cause = cause(&text, sent_certificate)?;
    // The innermost message that names the TLS failure, on one line.
    let detail = texts
        .iter()
        .rev()
        .find(|t| cause_of(t).is_some())
        .unwrap_or(&text)
        .replace('\n', " ");
    Some(TlsError::Handshake { cause, detail })
}

/// A connection our own TLS client set up that the server then reset or closed at once. With TLS 1.3 a
/// server that refuses the client's certificate says so after the client's side of the handshake is
/// done, and may close the connection before its alert is read: told as that refusal, hedged.
pub(crate) fn explain_reset(
    error: &(dyn std::error::Error + 'static),
    sent_certificate: bool,
) -> Option<TlsError> {
    let mut texts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(inner) = source {
        texts.push(inner.to_string());
        source = inner.source();
    }
    let text = texts.join(": ").replace('\n', " ");
    let reset = [
        "Connection reset by peer",
        "unexpected end of file",
        "UnexpectedEof",
    ]
    .iter()
    .any(|needle| text.contains(needle));
    if !reset {
        return None;
    }
    let cause = if sent_certificate {
        "the server reset the connection after the TLS handshake: it probably refused our client certificate (is it signed by a CA the server trusts, and still valid?)"
    } else {
        "the server reset the connection after the TLS handshake: it probably requires a client certificate, and none is configured (TLS_CERT_FILE, TLS_KEY_FILE)"
    };
    Some(TlsError::Handshake {
        cause,
        detail: text,
    })
}

/// The rustls message fragments we recognise.
fn cause_of(text: &str) -> Option<&'static str> {
    const KNOWN: [&str; 6] = [
        "invalid peer certificate",
        "received fatal alert",
        "received corrupt message",
        "peer sent no certificates",
        "peer is incompatible",
        "peer misbehaved",
    ];
    KNOWN.into_iter().find(|k| text.contains(k))
}

fn cause(text: &str, sent_certificate: bool) -> Option<&'static str> {
    cause_of(text)?;
    let has = |needle: &str| text.contains(needle);
    let refused_ours = if sent_certificate {
        "the server refused our client certificate (is it signed by a CA the server trusts, and still valid?)"
    } else {
        "the server requires a client certificate and none is configured (TLS_CERT_FILE, TLS_KEY_FILE)"
    };
    // The server's alerts first: their names ("CertificateExpired") overlap the certificate errors'.
    Some(if has("alert: CertificateRequired") && sent_certificate {
        // One is configured, yet the server saw none: the client that connected left it out.
        "the server requires a client certificate and did not get the one configured (behind Redis Sentinel, TLS_INSECURE leaves it out: trust the servers' CA with TLS_CA_FILE instead)"
    } else if has("alert: CertificateRequired") {
        "the server requires a client certificate and none is configured (TLS_CERT_FILE, TLS_KEY_FILE)"
    } else if has("alert: CertificateExpired") {
        "the server refused our client certificate: it has expired"
    } else if has("alert: UnknownCA")
        || has("alert: BadCertificate")
        || has("alert: CertificateUnknown")
        || has("alert: UnsupportedCertificate")
        || has("alert: AccessDenied")
        || has("alert: DecryptError")
        || has("alert: HandshakeFailure")
    {
        refused_ours
    } else if has("UnknownIssuer") || has("BadSignature") {
        "the server's certificate is not signed by a CA we trust (set TLS_CA_FILE to the CA that signed it)"
    } else if has("not valid for name") || has("NotValidForName") {
        "the server's certificate does not carry the name we checked (the URL's host, or TLS_SERVER_NAME)"
    } else if has("certificate expired") || has("Expired") {
        "the server's certificate has expired"
    } else if has("NotValidYet") || has("not valid yet") {
        "the server's certificate is not valid yet (check the clocks)"
    } else if has("Revoked") {
        "the server's certificate is revoked"
    } else if has("corrupt message") {
        "the server does not speak TLS on this port"
    } else {
        "the TLS handshake with the server failed"
    })
}

/// A rustls client configuration from `material`: its CA or the system's roots (or no check at all
/// when insecure), and its client certificate if any.
#[cfg(any(feature = "amqp", feature = "memcache", feature = "redis"))]
pub(crate) fn client_config(
    material: &Material,
) -> Result<std::sync::Arc<rustls::ClientConfig>, TlsError> {
    use std::sync::Arc;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = if material.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(insecure::AcceptAny(provider)))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &material.ca {
            Some((_, certs)) => {
                for cert in certs {
                    roots
                        .add(cert.clone())
                        .map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                if found.certs.is_empty() {
                    let why = found
                        .errors
                        .first()
                        .map(|e| e.to_string())
                        .unwrap_or_default();
                    return Err(TlsError::Config(format!(
                        "no system root certificates found ({why}); set TLS_CA_FILE"
                    )));
                }
                roots.add_parsable_certificates(found.certs);
            }
        }
        builder.with_root_certificates(roots)
    };
    let config = match &material.identity {
        Some((cert, key)) => {
            let chain = certificates("certificate file", cert, "")?;
            let key = private_key(key, "")?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Config(format!("client certificate and key: {e}")))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

#[cfg(any(feature = "amqp", feature = "memcache", feature = "redis"))]
mod insecure {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    /// Accepts any server certificate (TLS_INSECURE), still checking that the server holds its key.
    #[derive(Debug)]
    pub(super) struct AcceptAny(pub(super) Arc<CryptoProvider>);

    impl ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_failures_are_told_in_plain_words() {
        let cases = [
            ("invalid peer certificate: UnknownIssuer", false, "not signed by a CA we trust"),
            (
                "invalid peer certificate: certificate not valid for name \"localhost\"; certificate is only valid for x",
                false,
                "does not carry the name",
            ),
            (
                "invalid peer certificate: certificate expired: verification time 2, but certificate is not valid after 1",
                false,
                "has expired",
            ),
            ("received fatal alert: CertificateRequired", false, "none is configured"),
            (
                "received fatal alert: CertificateRequired",
                true,
                "did not get the one configured",
            ),
            ("received fatal alert: HandshakeFailure", false, "requires a client certificate"),
            ("received fatal alert: UnknownCA", true, "refused our client certificate"),
            ("received fatal alert: BadCertificate", true, "refused our client certificate"),
            ("received corrupt message of type InvalidContentType", false, "does not speak TLS"),
        ];
        for (message, sent, expected) in cases {
            let error = std::io::Error::other(message);
            let explained = explain(&error, sent)
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(explained.contains(expected), "{message}: {explained}");
            assert!(explained.contains(message), "{explained}");
        }
        assert!(explain(&std::io::Error::other("Connection refused"), false).is_none());
    }

    #[test]
    fn incomplete_and_unreadable_material_is_refused_by_name() {
        let err = load(&TlsConfig::new().client_cert_files("/nonexistent/c.pem", "")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/c.pem"), "{err}");
        let mut tls = TlsConfig::new().client_cert_pem(b"x".to_vec(), b"y".to_vec());
        tls.key_pem = None;
        assert!(matches!(load(&tls), Err(TlsError::Incomplete(_))));
        let err = load(&TlsConfig::new().ca_pem(b"not a certificate".to_vec())).unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
        let err = load(&TlsConfig::new().server_name("bad name!")).unwrap_err();
        assert!(matches!(err, TlsError::ServerName(_)), "{err}");
    }
}

#[cfg(test)]
mod reset_tests {
    use super::explain_reset;

    #[test]
    fn a_reset_right_after_our_handshake_is_told_as_a_refused_certificate() {
        let reset = std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "Connection reset by peer (os error 104)",
        );
        let without = explain_reset(&reset, false).map(|e| e.to_string());
        assert!(
            without
                .as_deref()
                .is_some_and(|t| t.contains("requires a client certificate")),
            "{without:?}"
        );
        let with = explain_reset(&reset, true).map(|e| e.to_string());
        assert!(
            with.as_deref()
                .is_some_and(|t| t.contains("refused our client certificate")),
            "{with:?}"
        );
        let refused = std::io::Error::other("Connection refused (os error 111)");
        assert!(explain_reset(&refused, false).is_none());
    }
}
