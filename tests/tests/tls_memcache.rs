//! The memcached result backend over TLS (`memcaches://`), against a real memcached with TLS on that
//! requires client certificates (`-Z`, `ssl_verify_mode=2`), with the certificate and private CA of
//! `scripts/services.sh up`. memcached starts in milliseconds, so this file starts its own on a free
//! port (and stops it at the end) rather than keeping one running.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use machinery::{task, Chord, Config, Group, Server, TaskError, TlsConfig, Worker};
use machinery_tests::services_required;
use machinery_tests::tls::{certs, services_dir, SERVER_NAME};

#[task]
async fn tls_mc_add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

#[task]
async fn tls_mc_sum(xs: Vec<i64>) -> Result<i64, TaskError> {
    Ok(xs.iter().sum())
}

/// A memcached with TLS on a port of its own, stopped when dropped.
struct TlsMemcached {
    child: Child,
    port: u16,
}

impl Drop for TlsMemcached {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts one, or returns `None` (after printing `SKIPPED`) when memcached is not installed and the
/// services are not required.
fn start(test: &str) -> Option<TlsMemcached> {
    let user = Command::new("id").arg("-un").output().expect("id -un");
    let user = String::from_utf8_lossy(&user.stdout).trim().to_owned();
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let tls = services_dir();
    let options = format!(
        "ssl_chain_cert={},ssl_key={},ssl_ca_cert={},ssl_verify_mode=2",
        tls.join("server.pem").display(),
        tls.join("server.key").display(),
        tls.join("ca.pem").display()
    );
    let spawned = Command::new("memcached")
        .args([
            "-Z",
            "-o",
            &options,
            "-l",
            "127.0.0.1",
            "-U",
            "0",
            "-m",
            "16",
        ])
        .args(["-p", &port.to_string(), "-u", &user])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn();
    let child = match spawned {
        Ok(child) => child,
        Err(error) if !services_required() => {
            eprintln!("SKIPPED {test}: cannot run memcached ({error}); scripts/services.sh up installs it");
            return None;
        }
        Err(error) => {
            panic!("{test}: cannot run memcached ({error}); scripts/services.sh up installs it")
        }
    };
    let server = TlsMemcached { child, port };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "memcached with TLS did not come up on :{port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(server)
}

fn config(backend: &str, tls: TlsConfig) -> Config {
    let mut config = Config::new("memory://", backend)
        .with_default_queue(machinery_tests::unique("tls_mc"))
        .result_backend_tls(tls);
    config.results_expire_in = 60;
    config
}

async fn start_error(config: Config) -> String {
    let started = Instant::now();
    let error = match Server::new(config).await {
        Ok(_) => panic!("the server started, but it should have been refused"),
        Err(error) => error.to_string(),
    };
    assert!(started.elapsed() < Duration::from_secs(5), "{error}");
    assert!(!error.contains('\n'), "{error}");
    assert!(error.contains("result backend memcaches://"), "{error}");
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_and_chords_over_mutual_tls() {
    let Some(memcached) = start("results_and_chords_over_mutual_tls") else {
        return;
    };
    let url = format!("memcaches://127.0.0.1:{}", memcached.port);
    let server = Server::new(config(&url, certs().tls()))
        .await
        .expect("server");
    let running = Worker::auto(&server).concurrency(4).start().await.unwrap();
    let result = server.send(tls_mc_add::signature(2, 3)).await.unwrap();
    assert_eq!(result.get(Duration::from_secs(20)).await.unwrap(), 5);
    let group = Group::new([tls_mc_add::signature(1, 1), tls_mc_add::signature(2, 2)]);
    let chord = server
        .send_chord(Chord::new(group, tls_mc_sum::partial()))
        .await
        .unwrap();
    assert_eq!(chord.get(Duration::from_secs(20)).await.unwrap(), 6);
    running.shutdown(Duration::from_secs(20)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_certificates_are_told_at_start() {
    let Some(memcached) = start("refused_certificates_are_told_at_start") else {
        return;
    };
    let url = format!("memcaches://127.0.0.1:{}", memcached.port);
    let ca_only = TlsConfig::new().ca_file(certs().ca());
    let error = start_error(config(&url, ca_only.clone())).await;
    assert!(error.contains("requires a client certificate"), "{error}");
    let (cert, key) = certs().foreign_client();
    let error = start_error(config(&url, ca_only.client_cert_files(cert, key))).await;
    assert!(error.contains("refused our client certificate"), "{error}");
    let (cert, key) = certs().client();
    let foreign_ca = TlsConfig::new()
        .ca_file(certs().foreign_ca())
        .client_cert_files(cert, key);
    let error = start_error(config(&url, foreign_ca)).await;
    assert!(error.contains("not signed by a CA we trust"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_name_is_checked_and_can_be_named() {
    let Some(memcached) = start("the_server_name_is_checked_and_can_be_named") else {
        return;
    };
    let url = format!("memcaches://localhost:{}", memcached.port);
    let error = start_error(config(&url, certs().tls())).await;
    assert!(error.contains("does not carry the name"), "{error}");
    Server::new(config(&url, certs().tls().server_name(SERVER_NAME)))
        .await
        .expect("with the certificate's name as TLS_SERVER_NAME");
}
