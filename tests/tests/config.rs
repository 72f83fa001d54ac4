//! Configuration reaches the server: unknown URL schemes are clear errors, and Go's environment names work.

use machinery::{Config, Server};

#[tokio::test]
async fn an_unknown_broker_scheme_names_the_supported_ones() {
    let err = Server::new(Config::new("kafka://localhost:9092", "memory://"))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("broker URL \"kafka://localhost:9092\": unsupported scheme; this build supports memory://"), "{text}");
}

#[tokio::test]
async fn an_unknown_backend_scheme_names_the_supported_ones() {
    let err = Server::new(Config::new("memory://", "cassandra://x"))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("result backend URL \"cassandra://x\": unsupported scheme"),
        "{text}"
    );
    assert!(text.contains("null"), "{text}");
}

#[tokio::test]
async fn the_default_config_is_in_memory_and_go_shaped() {
    let config = Config::default();
    assert_eq!(
        (config.broker.as_str(), config.result_backend.as_str()),
        ("memory://", "memory://")
    );
    assert_eq!(config.default_queue, "machinery_tasks");
    assert_eq!(config.amqp.exchange, "machinery_exchange");
    assert_eq!(config.amqp.binding_key, "machinery_task");
    let server = Server::new(config).await.unwrap();
    assert_eq!(
        (server.broker().kind(), server.backend().kind()),
        ("memory", "memory")
    );
}

#[tokio::test]
async fn the_null_backend_drops_results_and_says_so() {
    let server = Server::new(Config::new("memory://", "null")).await.unwrap();
    assert_eq!(server.backend().kind(), "null");
    let result = server
        .send(machinery::Signature::new("anything"))
        .await
        .unwrap();
    assert!(result
        .get(std::time::Duration::from_millis(50))
        .await
        .is_err());
    let text = result
        .wait(std::time::Duration::from_millis(50))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("the null result backend does not store task states"),
        "{text}"
    );
}

#[tokio::test]
async fn errors_never_show_passwords() {
    let err = Server::new(Config::new(
        "kafka://admin:hunter2@localhost:9092",
        "memory://",
    ))
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("kafka://admin:***@localhost:9092"), "{text}");
}

#[tokio::test]
async fn an_amqp_url_that_does_not_parse_is_a_configuration_error() {
    // Refused before any connection is tried, for both roles, without echoing the password.
    for config in [
        Config::new("amqp://user:secret@host:notaport/", "memory://"),
        Config::new("memory://", "amqp://user:secret@host:notaport/"),
    ] {
        let err = Server::new(config).await.unwrap_err();
        assert!(matches!(err, machinery::Error::Config(_)), "{err:?}");
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}

static NULL_RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

#[machinery::task(name = "null_backend_counted")]
async fn null_backend_counted(n: i64) -> Result<i64, machinery::TaskError> {
    NULL_RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    Ok(n)
}

#[tokio::test]
async fn a_worker_on_the_null_backend_runs_every_task() {
    // Nothing can be stored, and nothing can be revoked: every task runs, none is dead-lettered.
    let server = Server::new(Config::new("memory://", "null")).await.unwrap();
    let running = machinery::Worker::new(&server)
        .register(null_backend_counted::task())
        .start()
        .await
        .unwrap();
    for n in 0..5 {
        null_backend_counted::send(&server, n).await.unwrap();
    }
    let all_ran = machinery_tests::eventually(std::time::Duration::from_secs(10), || async {
        NULL_RUNS.load(std::sync::atomic::Ordering::SeqCst) == 5
    })
    .await;
    assert!(
        all_ran,
        "{} of 5 ran",
        NULL_RUNS.load(std::sync::atomic::Ordering::SeqCst)
    );
    let dead = server
        .broker()
        .inspect()
        .unwrap()
        .dead_letters(&server.config().default_queue, 10)
        .await
        .unwrap();
    assert!(dead.is_empty(), "{dead:?}");
    running
        .shutdown(std::time::Duration::from_secs(5))
        .await
        .unwrap();
}
