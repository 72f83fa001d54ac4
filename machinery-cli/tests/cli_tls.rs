//! The `machinery` binary over mutual TLS (the listeners of `scripts/services.sh up`: Redis :6390,
//! RabbitMQ :5676, both requiring a client certificate): the `TLS_*` variables reach its connections,
//! and a refused handshake is one clear line on stderr that shows no key material.

mod common;

use std::collections::HashMap;

use common::machinery;
use machinery_tests::tls::{certs, SERVER_NAME};
use machinery_tests::{require, unique, Service};

fn env(broker: &str, backend: &str, queue: &str) -> HashMap<String, String> {
    let (cert, key) = certs().client();
    [
        ("BROKER", broker.to_owned()),
        ("RESULT_BACKEND", backend.to_owned()),
        ("DEFAULT_QUEUE", queue.to_owned()),
        ("AMQP_BINDING_KEY", queue.to_owned()),
        ("TLS_CA_FILE", certs().ca()),
        ("TLS_CERT_FILE", cert),
        ("TLS_KEY_FILE", key),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_connects_over_mutual_tls_from_the_environment() {
    let test = "the_cli_connects_over_mutual_tls_from_the_environment";
    if !require(Service::RedisTls, test) || !require(Service::RabbitMqTls, test) {
        return;
    }
    let queue = unique("cli_tls");
    let redis = Service::RedisTls.url();
    let run = machinery(&["queues", "--json"], &env(&redis, &redis, &queue)).await;
    let rows = run.json();
    assert!(
        rows.as_array()
            .is_some_and(|rows| rows.iter().any(|r| r["queue"] == queue.as_str())),
        "{rows:#}"
    );

    let amqp = Service::RabbitMqTls.url().replace("127.0.0.1", "localhost");
    let mut vars = env(&amqp, &redis, &queue);
    vars.insert("BROKER_TLS_SERVER_NAME".into(), SERVER_NAME.into());
    let run = machinery(&["queues", "--queue", &queue, "--json"], &vars).await;
    run.json();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_handshake_is_one_clear_line_without_key_material() {
    let test = "a_refused_handshake_is_one_clear_line_without_key_material";
    if !require(Service::RedisTls, test) {
        return;
    }
    let queue = unique("cli_tls");
    let redis = Service::RedisTls.url();
    let mut vars = env(&redis, &redis, &queue);
    let (cert, key) = certs().foreign_client();
    vars.insert("TLS_CERT_FILE".into(), cert);
    vars.insert("TLS_KEY_FILE".into(), key.clone());
    let run = machinery(&["queues"], &vars).await;
    run.fails(1, "the server refused our client certificate");
    assert!(run.stderr.contains("rediss://127.0.0.1:6390"), "{run:#?}");
    let key_pem = std::fs::read_to_string(&key).expect("read the key");
    let key_body = key_pem.lines().nth(1).expect("a PEM body line");
    assert!(!run.stderr.contains(key_body), "{run:#?}");
    assert!(!run.stderr.contains("PRIVATE KEY"), "{run:#?}");
    assert!(!run.stdout.contains(key_body), "{run:#?}");

    vars.remove("TLS_CERT_FILE");
    vars.remove("TLS_KEY_FILE");
    let run = machinery(&["queues"], &vars).await;
    run.fails(1, "the server requires a client certificate");
}
