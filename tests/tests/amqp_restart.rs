//! RabbitMQ restarted in the middle of a run (issue 13): `rabbitmqctl stop_app`, then `start_app`, while a
//! sender keeps sending and a worker keeps working. Queues are durable and messages persistent, so every
//! task whose send was confirmed runs and its result (on Redis, which stays up) arrives: none is lost.
//!
//! Stopping the broker disturbs every client of it, so this test has a file, and so a process, of its own.

use std::time::{Duration, Instant};

use machinery::{Config, Server, Worker};
use machinery_tests::amqp::{self, rabbitmqctl, Cleanup};
use machinery_tests::tasks::probe;
use machinery_tests::{require, unique, Service};

const TASKS: i64 = 300;
const SETTLE: Duration = Duration::from_secs(90);

/// Starts the RabbitMQ application again if the test stops half way.
struct StartAgain;

impl Drop for StartAgain {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .output();
    }
}

async fn wait_for_rabbitmq() {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(Service::RabbitMq.addr())
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("RabbitMQ did not come back within 60 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_restart_mid_run_loses_no_confirmed_task() {
    if !require(Service::RabbitMq, "restart") || !require(Service::Redis, "restart") {
        return;
    }
    let mut config: Config = amqp::config("restart");
    config.result_backend = Service::Redis.url();
    let _cleanup = Cleanup::for_config(&config);
    let server = Server::new(config.clone()).await.unwrap();
    let worker = Worker::new(&server)
        .register(probe::task())
        .concurrency(4)
        .start()
        .await
        .unwrap();
    let key = unique("restart");
    let _start_again = StartAgain;

    let mut confirmed = Vec::new();
    let mut refused = 0u32;
    let mut restarted = false;
    for n in 0..TASKS {
        if n == TASKS / 3 {
            rabbitmqctl(&["stop_app"]);
            tokio::time::sleep(Duration::from_secs(1)).await;
            rabbitmqctl(&["start_app"]);
            wait_for_rabbitmq().await;
            restarted = true;
        }
        // A send during the outage fails with an error (it is not lost silently); the sender tries again,
        // as an application would.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match probe::send(&server, &key, n, 2).await {
                Ok(result) => {
                    confirmed.push((n, result));
                    break;
                }
                Err(error) => {
                    refused += 1;
                    assert!(Instant::now() < deadline, "sends fail for 30 s: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    assert!(restarted);
    assert_eq!(confirmed.len() as i64, TASKS);

    let mut lost = Vec::new();
    for (n, result) in &confirmed {
        match result.get(SETTLE).await {
            Ok(value) => assert_eq!(value, *n),
            Err(error) => lost.push(format!("{n}: {error}")),
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {TASKS} confirmed tasks never completed ({refused} sends were refused during the outage): {lost:?}",
        lost.len()
    );
    worker.shutdown(Duration::from_secs(20)).await.unwrap();
}
