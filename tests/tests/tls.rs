//! TLS as production needs it, against real listeners that require client certificates (started by
//! `scripts/services.sh up`: Redis on :6390, a Redis Cluster over TLS on :7100-7102, a Redis Sentinel
//! over TLS on :26390 (its master on :6391), a RabbitMQ node of its own on :5676, all with a
//! certificate of the private CA in `target/services/tls/` that names `machinery-tls.test` and
//! `127.0.0.1`). The workflow suite itself runs over :6390 and :5676 in `workflows.rs`
//! (`redis_tls`, `amqp_tls`); here: what goes wrong is told at start, on one line that names the
//! server, the role and the cause, without a retry loop; the server name; the settings read from the
//! environment, per role; and the unchecked mode.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use machinery::{task, Config, Server, TaskError, TlsConfig, Worker};
use machinery_tests::tls::{certs, SERVER_NAME};
use machinery_tests::{require, unique, Service, TLS_SENTINEL_MASTER};

/// No retry loop: a refused certificate is known after one handshake.
const PROMPT: Duration = Duration::from_secs(5);

#[task]
async fn tls_add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

/// The error of starting a server on `config`, and how long it took.
async fn start_error(config: Config) -> (String, Duration) {
    let started = Instant::now();
    match Server::new(config).await {
        Ok(_) => panic!("the server started, but it should have been refused"),
        Err(error) => (error.to_string(), started.elapsed()),
    }
}

/// Asserts a one-line, prompt start error naming the role, the server and the cause.
fn assert_clear(error: &str, took: Duration, role: &str, server: &str, cause: &str) {
    assert!(!error.contains('\n'), "not one line: {error}");
    assert!(took < PROMPT, "took {took:?}, a retry loop? {error}");
    assert!(error.contains(role), "no role {role:?} in: {error}");
    assert!(error.contains(server), "no server {server:?} in: {error}");
    assert!(error.contains(cause), "no cause {cause:?} in: {error}");
    assert!(!error.contains("PRIVATE KEY"), "{error}");
}

/// Sends one task through `server` with a worker of its own and checks the result.
async fn round_trip(server: &Server) {
    let running = Worker::auto(server)
        .concurrency(2)
        .start()
        .await
        .expect("worker starts");
    let result = server.send(tls_add::signature(2, 3)).await.expect("send");
    assert_eq!(
        result.get(Duration::from_secs(20)).await.expect("result"),
        5
    );
    running
        .shutdown(Duration::from_secs(20))
        .await
        .expect("shutdown");
}

fn redis_cluster(test: &str) -> Option<String> {
    require(Service::RedisTlsCluster, test).then(|| Service::RedisTlsCluster.url())
}

fn redis_sentinel(test: &str) -> Option<String> {
    require(Service::RedisTlsSentinel, test).then(|| Service::RedisTlsSentinel.url())
}

fn redis(test: &str) -> Option<String> {
    require(Service::RedisTls, test).then(|| Service::RedisTls.url())
}

fn amqp(test: &str) -> Option<String> {
    require(Service::RabbitMqTls, test).then(|| Service::RabbitMqTls.url())
}

fn config(broker: &str, backend: &str) -> Config {
    let queue = unique("tls");
    let mut config = Config::new(broker, backend).with_default_queue(&queue);
    config.amqp.binding_key = queue.clone();
    config.amqp.exchange = "machinery_tests_tls".into();
    config.redis.delayed_tasks_key = format!("{queue}_delayed");
    config.results_expire_in = 60;
    config
}

fn ca_only() -> TlsConfig {
    TlsConfig::new().ca_file(certs().ca())
}

fn foreign_client() -> TlsConfig {
    let (cert, key) = certs().foreign_client();
    ca_only().client_cert_files(cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_without_a_client_certificate_is_refused_at_start() {
    let Some(url) = redis("redis_without_a_client_certificate_is_refused_at_start") else {
        return;
    };
    let (error, took) = start_error(config(&url, &url).tls(ca_only())).await;
    assert_clear(
        &error,
        took,
        "result backend",
        &url,
        "requires a client certificate",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_refuses_a_client_certificate_of_another_ca() {
    let Some(url) = redis("redis_refuses_a_client_certificate_of_another_ca") else {
        return;
    };
    let (error, took) = start_error(config(&url, "null").tls(foreign_client())).await;
    assert_clear(
        &error,
        took,
        "broker",
        &url,
        "refused our client certificate",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_server_signed_by_an_untrusted_ca_is_refused() {
    let Some(url) = redis("redis_server_signed_by_an_untrusted_ca_is_refused") else {
        return;
    };
    let (cert, key) = certs().client();
    let tls = TlsConfig::new()
        .ca_file(certs().foreign_ca())
        .client_cert_files(cert, key);
    let (error, took) = start_error(config(&url, &url).tls(tls)).await;
    assert_clear(
        &error,
        took,
        "result backend",
        &url,
        "not signed by a CA we trust",
    );
}

/// The certificate names `machinery-tls.test` and `127.0.0.1`, not `localhost`: the URL's host is
/// checked unless `TLS_SERVER_NAME` names the certificate's name, and then that name is checked (the
/// CA still is, and a name the certificate does not carry still fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_checks_the_certificate_for_the_server_name_when_given() {
    let Some(url) = redis("redis_checks_the_certificate_for_the_server_name_when_given") else {
        return;
    };
    let by_name = url.replace("127.0.0.1", "localhost");
    let (error, took) = start_error(config(&by_name, "null").tls(certs().tls())).await;
    assert_clear(&error, took, "broker", &by_name, "does not carry the name");
    assert!(error.contains("\"localhost\""), "{error}");

    let other_name = certs().tls().server_name("other.machinery-tls.test");
    let (error, took) = start_error(config(&by_name, "null").tls(other_name)).await;
    assert_clear(&error, took, "broker", &by_name, "does not carry the name");
    assert!(error.contains("other.machinery-tls.test"), "{error}");

    let (cert, key) = certs().client();
    let untrusted = TlsConfig::new()
        .ca_file(certs().foreign_ca())
        .client_cert_files(cert, key)
        .server_name(SERVER_NAME);
    let (error, took) = start_error(config("memory://", &by_name).tls(untrusted)).await;
    assert_clear(
        &error,
        took,
        "result backend",
        &by_name,
        "not signed by a CA we trust",
    );

    let (error, took) =
        start_error(config(&by_name, "null").tls(ca_only().server_name(SERVER_NAME))).await;
    assert_clear(
        &error,
        took,
        "broker",
        &by_name,
        "requires a client certificate",
    );

    let server =
        Server::new(config(&by_name, &by_name).tls(certs().tls().server_name(SERVER_NAME)))
            .await
            .expect("with TLS_SERVER_NAME naming the certificate's name, the server starts");
    round_trip(&server).await;
}

/// A Redis Cluster over TLS that requires client certificates (`scripts/services.sh`: :7100-7102): the
/// CA and the client certificate reach every node, the seeds and those the cluster announces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_over_mutual_tls() {
    let Some(url) = redis_cluster("redis_cluster_over_mutual_tls") else {
        return;
    };
    let on_cluster = |config: Config| {
        let mut config = config;
        config.redis.cluster_enabled = true;
        config
    };
    let first_seed = url.split(',').next().unwrap_or(&url).to_owned();
    let (error, took) = start_error(on_cluster(config(&url, "null").tls(ca_only()))).await;
    assert_clear(
        &error,
        took,
        "broker",
        &first_seed,
        "requires a client certificate",
    );
    let (cert, key) = certs().client();
    let untrusted = TlsConfig::new()
        .ca_file(certs().foreign_ca())
        .client_cert_files(cert, key);
    let (error, took) = start_error(on_cluster(config(&url, "null").tls(untrusted))).await;
    assert_clear(
        &error,
        took,
        "broker",
        &first_seed,
        "not signed by a CA we trust",
    );
    let server = Server::new(on_cluster(config(&url, &url).tls(certs().tls())))
        .await
        .expect("with the CA and a client certificate, the server starts on the TLS cluster");
    round_trip(&server).await;
}

/// A Redis Sentinel over TLS that requires client certificates (`scripts/services.sh`: the sentinel on
/// :26390, the master on :6391): the CA and the client certificate reach the sentinel and the master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sentinel_over_mutual_tls() {
    let Some(url) = redis_sentinel("redis_sentinel_over_mutual_tls") else {
        return;
    };
    let behind_sentinel = |config: Config| {
        let mut config = config;
        config.redis.master_name = TLS_SENTINEL_MASTER.into();
        config
    };
    let (error, took) = start_error(behind_sentinel(config(&url, "null").tls(ca_only()))).await;
    assert_clear(
        &error,
        took,
        "broker",
        "127.0.0.1:26390",
        "requires a client certificate",
    );
    let (cert, key) = certs().client();
    let untrusted = TlsConfig::new()
        .ca_file(certs().foreign_ca())
        .client_cert_files(cert, key);
    let (error, took) = start_error(behind_sentinel(config(&url, "null").tls(untrusted))).await;
    assert_clear(
        &error,
        took,
        "broker",
        "127.0.0.1:26390",
        "not signed by a CA we trust",
    );
    // Insecure mode behind Sentinel leaves the configured certificate out (redis-rs): the error says so
    // instead of claiming that none is configured.
    let (error, took) = start_error(behind_sentinel(
        config(&url, "null").tls(certs().tls().insecure(true)),
    ))
    .await;
    assert_clear(
        &error,
        took,
        "broker",
        "127.0.0.1:26390",
        "did not get the one configured",
    );
    let server = Server::new(behind_sentinel(config(&url, &url).tls(certs().tls())))
        .await
        .expect("with the CA and a client certificate, the server starts behind the TLS sentinel");
    round_trip(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_without_a_client_certificate_is_refused_at_start() {
    let Some(url) = amqp("amqp_without_a_client_certificate_is_refused_at_start") else {
        return;
    };
    let (error, took) = start_error(config(&url, "null").tls(ca_only())).await;
    let shown = url.replace("guest@", "***@").replace(":guest@", ":***@");
    assert_clear(
        &error,
        took,
        "broker",
        &shown,
        "requires a client certificate",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_refuses_a_client_certificate_of_another_ca() {
    let Some(url) = amqp("amqp_refuses_a_client_certificate_of_another_ca") else {
        return;
    };
    let (error, took) = start_error(config(&url, "null").tls(foreign_client())).await;
    assert_clear(
        &error,
        took,
        "broker",
        "127.0.0.1:5676",
        "refused our client certificate",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_server_signed_by_an_untrusted_ca_is_refused() {
    let Some(url) = amqp("amqp_server_signed_by_an_untrusted_ca_is_refused") else {
        return;
    };
    let (cert, key) = certs().client();
    let tls = TlsConfig::new()
        .ca_file(certs().foreign_ca())
        .client_cert_files(cert, key);
    let (error, took) = start_error(config("memory://", &url).tls(tls)).await;
    assert_clear(
        &error,
        took,
        "result backend",
        "127.0.0.1:5676",
        "not signed by a CA we trust",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_checks_the_certificate_for_the_server_name_when_given() {
    let Some(url) = amqp("amqp_checks_the_certificate_for_the_server_name_when_given") else {
        return;
    };
    let by_name = url.replace("127.0.0.1", "localhost");
    let (error, took) = start_error(config(&by_name, "null").tls(certs().tls())).await;
    assert_clear(
        &error,
        took,
        "broker",
        "localhost:5676",
        "does not carry the name",
    );
    let server =
        Server::new(config(&by_name, &by_name).tls(certs().tls().server_name(SERVER_NAME)))
            .await
            .expect("with TLS_SERVER_NAME naming the certificate's name, the server starts");
    round_trip(&server).await;
}

/// Go's deployment shape: the broker on RabbitMQ, the backend on Redis, each with settings of its own,
/// all from the environment: the shared `TLS_*` trust the CA and present the client certificate; the
/// broker's `BROKER_TLS_SERVER_NAME` and the backend's `RESULT_BACKEND_TLS_SERVER_NAME` name their
/// certificate, since their URLs say `localhost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_from_the_environment_apply_per_role() {
    let test = "settings_from_the_environment_apply_per_role";
    let (Some(broker), Some(backend)) = (amqp(test), redis(test)) else {
        return;
    };
    let backend = backend.replace("127.0.0.1", "localhost");
    let (cert, key) = certs().client();
    let queue = unique("tls_env");
    let mut vars: HashMap<&str, String> = HashMap::from([
        ("BROKER", broker.replace("127.0.0.1", "localhost")),
        ("RESULT_BACKEND", backend.clone()),
        ("RESULT_BACKEND_TLS_SERVER_NAME", SERVER_NAME.into()),
        ("DEFAULT_QUEUE", queue.clone()),
        ("AMQP_BINDING_KEY", queue.clone()),
        ("AMQP_EXCHANGE", "machinery_tests_tls".into()),
        ("TLS_CA_FILE", certs().ca()),
        ("TLS_CERT_FILE", cert.clone()),
        ("TLS_KEY_FILE", key.clone()),
        ("BROKER_TLS_SERVER_NAME", SERVER_NAME.into()),
    ]);
    let load = |vars: &HashMap<&str, String>| {
        Config::from_lookup(|name| vars.get(name).cloned()).expect("configuration")
    };
    let server = Server::new(load(&vars)).await.expect("server starts");
    round_trip(&server).await;

    // The backend's own client certificate overrides the shared one: a foreign one is refused, and the
    // error names the result backend.
    let (foreign_cert, foreign_key) = certs().foreign_client();
    vars.insert("RESULT_BACKEND_TLS_CERT_FILE", foreign_cert);
    vars.insert("RESULT_BACKEND_TLS_KEY_FILE", foreign_key);
    let (error, took) = start_error(load(&vars)).await;
    assert_clear(
        &error,
        took,
        "result backend",
        &backend,
        "refused our client certificate",
    );
}

/// `#insecure` and `TLS_INSECURE` skip the server's certificate check (the client certificate is still
/// presented, as the servers require it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_mode_skips_the_server_check() {
    let test = "insecure_mode_skips_the_server_check";
    let (Some(redis_url), Some(amqp_url)) = (redis(test), amqp(test)) else {
        return;
    };
    let (cert, key) = certs().client();
    let client_only = TlsConfig::new().client_cert_files(cert, key);
    let insecure_redis = format!("{}#insecure", redis_url.replace("127.0.0.1", "localhost"));
    let server = Server::new(config(&insecure_redis, &insecure_redis).tls(client_only.clone()))
        .await
        .expect("rediss://…#insecure starts without a CA");
    round_trip(&server).await;
    let amqp_by_name = amqp_url.replace("127.0.0.1", "localhost");
    let server = Server::new(config(&amqp_by_name, &amqp_by_name).tls(client_only.insecure(true)))
        .await
        .expect("TLS_INSECURE starts without a CA");
    round_trip(&server).await;
}

#[tokio::test]
async fn unreadable_or_incomplete_material_is_refused_before_connecting() {
    let url = "rediss://127.0.0.1:6390";
    let tls = TlsConfig::new().ca_file("/nonexistent/machinery-ca.pem");
    let (error, took) = start_error(config(url, "null").tls(tls)).await;
    assert_clear(&error, took, "broker", url, "/nonexistent/machinery-ca.pem");
    let (cert, _) = certs().client();
    let mut tls = TlsConfig::new();
    tls.cert_file = cert;
    let (error, _) =
        start_error(config("amqps://guest:guest@127.0.0.1:5676/", "null").tls(tls)).await;
    assert!(error.contains("not its key (TLS_KEY_FILE)"), "{error}");
}
