//! Certificates for the TLS tests, made by the tests with `openssl`.
//!
//! `scripts/services.sh up` makes a private CA and the certificate of the TLS listeners (Redis :6390,
//! RabbitMQ :5676) in `target/services/tls/`, since the servers need theirs to start; the server
//! certificate names `machinery-tls.test` and `127.0.0.1` (not `localhost`). The tests make the rest
//! here, once per test binary, in a directory of their own (`target/services/tls/test-certs/`): a client
//! certificate signed by that CA, and a foreign CA with a client certificate of its own, which the
//! servers must refuse.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use machinery::TlsConfig;

/// The name the TLS listeners' certificate carries besides `127.0.0.1`.
pub const SERVER_NAME: &str = "machinery-tls.test";

/// The directory where `scripts/services.sh up` put the CA and the servers' certificate.
pub fn services_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/services/tls")
}

/// The certificates the tests use.
#[derive(Debug)]
pub struct Certs {
    dir: PathBuf,
}

/// The certificates, made on first use.
pub fn certs() -> &'static Certs {
    static CERTS: OnceLock<Certs> = OnceLock::new();
    CERTS.get_or_init(Certs::make)
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (scripts/services.sh up installs it): {e}"));
    assert!(
        output.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A P-256 key and a certificate signed by `ca` (`ca.pem`, `ca.key` in `ca_dir`), in `dir`.
fn issue(dir: &Path, name: &str, subject: &str, ca_dir: &Path, ca: &str, extensions: &str) {
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    let ext = format!("{name}.ext");
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            subject,
            "-keyout",
            &key,
            "-out",
            &csr,
        ],
    );
    std::fs::write(dir.join(&ext), extensions).expect("write the extensions file");
    let serial = format!(
        "0x{}",
        &machinery::signature::new_task_uuid()[5..21].replace('-', "")
    );
    let ca_pem = ca_dir.join(format!("{ca}.pem"));
    let ca_key = ca_dir.join(format!("{ca}.key"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem.to_string_lossy(),
            "-CAkey",
            &ca_key.to_string_lossy(),
            "-set_serial",
            &serial,
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

const CLIENT_EXTENSIONS: &str =
    "extendedKeyUsage=clientAuth\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n";

impl Certs {
    fn make() -> Certs {
        let services = services_dir();
        assert!(
            services.join("ca.key").exists() && services.join("ca.pem").exists(),
            "no private CA in {}; run scripts/services.sh up (the README's test command does)",
            services.display()
        );
        // Beside the CA, so that removing target/ removes them too; one directory per test binary.
        let dir = services.join("test-certs").join(format!(
            "{}-{}",
            std::process::id(),
            crate::unique("c")
        ));
        std::fs::create_dir_all(&dir).expect("create the certificates' directory");
        issue(
            &dir,
            "client",
            "/CN=machinery test client",
            &services,
            "ca",
            CLIENT_EXTENSIONS,
        );
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=foreign CA",
                "-keyout",
                "foreign-ca.key",
                "-out",
                "foreign-ca.pem",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        issue(
            &dir,
            "foreign-client",
            "/CN=foreign client",
            &dir,
            "foreign-ca",
            CLIENT_EXTENSIONS,
        );
        Certs { dir }
    }

    /// The private CA that signed the servers' certificate.
    pub fn ca(&self) -> String {
        services_dir().join("ca.pem").to_string_lossy().into_owned()
    }

    /// A CA that signed nothing the servers know.
    pub fn foreign_ca(&self) -> String {
        self.path("foreign-ca.pem")
    }

    /// A client certificate (and its key) signed by the servers' CA.
    pub fn client(&self) -> (String, String) {
        (self.path("client.pem"), self.path("client.key"))
    }

    /// A client certificate (and its key) signed by the foreign CA.
    pub fn foreign_client(&self) -> (String, String) {
        (
            self.path("foreign-client.pem"),
            self.path("foreign-client.key"),
        )
    }

    /// Trust the servers' CA and present the good client certificate.
    pub fn tls(&self) -> TlsConfig {
        let (cert, key) = self.client();
        TlsConfig::new()
            .ca_file(self.ca())
            .client_cert_files(cert, key)
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }
}
