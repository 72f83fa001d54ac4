//! What TLS connections log, captured at TRACE from a whole start and one task: an unchecked connection
//! (`rediss://…#insecure`, `TLS_INSECURE`) is warned about once per process, however many connections
//! are unchecked, and the client key never shows. A test binary of its own: the warning is once per
//! process.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use machinery::{task, Config, Server, TaskError, TlsConfig, Worker};
use machinery_tests::tls::certs;
use machinery_tests::{require, unique, Service};

#[task]
async fn tls_log_add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

/// Everything logged, as text.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn an_unchecked_connection_is_warned_about_once_and_keys_never_show() {
    if !require(
        Service::RedisTls,
        "an_unchecked_connection_is_warned_about_once",
    ) || !require(
        Service::RabbitMqTls,
        "an_unchecked_connection_is_warned_about_once",
    ) {
        return;
    }
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // The key given as PEM in code, so that a Debug of the configuration anywhere would print it.
    let (cert, key) = certs().client();
    let key_pem = std::fs::read(&key).unwrap();
    let cert_pem = std::fs::read(&cert).unwrap();
    let client = TlsConfig::new().client_cert_pem(cert_pem, key_pem.clone());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // Broker, backend and lock on Redis, all unchecked; then a broker on RabbitMQ, unchecked too.
        let redis = format!("{}#insecure", Service::RedisTls.url());
        let queue = unique("tls_log");
        let config = Config::new(&redis, &redis)
            .with_default_queue(&queue)
            .tls(client.clone());
        let server = Server::new(config).await.expect("server");
        let running = Worker::auto(&server).start().await.expect("worker");
        let result = server.send(tls_log_add::signature(1, 2)).await.unwrap();
        assert_eq!(result.get(Duration::from_secs(20)).await.unwrap(), 3);
        running.shutdown(Duration::from_secs(20)).await.unwrap();
        let amqp = Config::new(Service::RabbitMqTls.url(), "null").tls(client.insecure(true));
        Server::new(amqp).await.expect("amqp server");
    });
    let text = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert_eq!(
        text.matches("TLS certificate checks are OFF").count(),
        1,
        "{text}"
    );
    let key_text = String::from_utf8_lossy(&key_pem).into_owned();
    for line in key_text.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!text.contains(line), "a key line was logged");
    }
    assert!(!text.contains("PRIVATE KEY"), "{text}");
}
