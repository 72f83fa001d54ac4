//! A broker's cancellation listener is in place when `Broker::cancellations` returns: a worker starts
//! running tasks right after it, and a request published once one of them runs must reach it. (It
//! used to subscribe in the background, and under load RabbitMQ could bind its queue after a task had
//! started and its cancellation had been published: the request was lost and the task ran to its end.)

use std::time::Duration;

use machinery::Config;
use machinery_tests::{require, unique, Service};

/// Publishes a cancellation as soon as the listener of `config`'s broker is returned, and expects it.
async fn heard_at_once(config: Config) {
    let broker = machinery::broker::connect(&config).await.unwrap();
    let mut requests = broker.cancellations().await.unwrap();
    let id = unique("task_heard");
    broker.publish_cancel(&id).await.unwrap();
    let heard = tokio::time::timeout(Duration::from_secs(5), requests.recv()).await;
    assert_eq!(
        heard.ok().flatten().as_deref(),
        Some(id.as_str()),
        "{}: the request published right after the listener was returned",
        broker.kind()
    );
}

#[tokio::test]
async fn a_redis_listener_hears_a_request_published_as_soon_as_it_is_returned() {
    if !require(
        Service::Redis,
        "a_redis_listener_hears_a_request_published_as_soon_as_it_is_returned",
    ) {
        return;
    }
    heard_at_once(Config::new(Service::Redis.url(), "memory://")).await;
}

#[tokio::test]
async fn a_rabbitmq_listener_hears_a_request_published_as_soon_as_it_is_returned() {
    if !require(
        Service::RabbitMq,
        "a_rabbitmq_listener_hears_a_request_published_as_soon_as_it_is_returned",
    ) {
        return;
    }
    heard_at_once(machinery_tests::amqp::config("cancel_listen")).await;
}
