//! A delivery dropped without being settled (its task cut off by a panic, or its batch aborted) goes back
//! to its queue at once and is delivered again, marked redelivered: on the memory broker, Redis and
//! RabbitMQ.

mod redis_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use machinery::broker::amqp::AmqpBroker;
use machinery::broker::memory::MemoryBroker;
use machinery::broker::{Broker, ConsumeOptions, Consumer, Outgoing};
use machinery::Server;
use machinery_tests::amqp::{self, Cleanup};
use machinery_tests::{require, unique, Service};
use redis_common::Names;

fn options(queue: &str) -> ConsumeOptions {
    ConsumeOptions {
        queue: queue.to_owned(),
        consumer_tag: unique("redeliver_tag"),
        concurrency: 1,
        prefetch: 1,
    }
}

fn message<'a>(routing_key: &'a str, body: &str) -> Outgoing<'a> {
    Outgoing {
        uuid: "",
        name: "",
        routing_key,
        body: body.as_bytes().to_vec(),
        eta: None,
        priority: 0,
        headers: Default::default(),
    }
}

/// Publishes one message, takes it, drops it unsettled, and checks that the same consumer gets it again
/// within a second, marked redelivered. `in_queue` checks (where the broker can tell) that it is waiting
/// in the queue again and not in flight.
async fn dropped_delivery_comes_back<F, Fut>(broker: &dyn Broker, queue: &str, in_queue: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut consumer: Box<dyn Consumer> = broker.consume(options(queue)).await.unwrap();
    let body = format!("{{\"redelivery test\":\"{}\"}}", unique("body"));
    let routing_key = broker.route(queue);
    broker.publish(message(&routing_key, &body)).await.unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(5), consumer.next_batch(1))
        .await
        .expect("the message is delivered")
        .unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].body, body.as_bytes());
    assert!(!batch[0].redelivered);
    let dropped_at = Instant::now();
    drop(batch);
    assert!(
        machinery_tests::eventually(Duration::from_secs(1), in_queue).await,
        "the dropped message is back in the queue within a second"
    );
    let again = tokio::time::timeout(Duration::from_secs(1), consumer.next_batch(1))
        .await
        .expect("the dropped message is delivered again within a second")
        .unwrap();
    assert!(dropped_at.elapsed() < Duration::from_secs(2));
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].body, body.as_bytes());
    assert!(again[0].redelivered, "marked redelivered");
    for delivery in again {
        delivery.ack().await.unwrap();
    }
    consumer.close().await.unwrap();
}

#[tokio::test]
async fn a_dropped_delivery_goes_back_to_the_memory_queue() {
    let broker = Arc::new(MemoryBroker::new("memory://", "redeliver_q"));
    let inspect = broker.clone();
    dropped_delivery_comes_back(broker.as_ref(), "redeliver_q", || async {
        let stats = inspect
            .inspect()
            .unwrap()
            .queue_stats("redeliver_q")
            .await
            .unwrap();
        stats.pending == 1
    })
    .await;
}

#[tokio::test]
async fn a_dropped_delivery_goes_back_to_the_redis_queue() {
    if !require(
        Service::Redis,
        "a_dropped_delivery_goes_back_to_the_redis_queue",
    ) {
        return;
    }
    let names = Names::new("redeliver");
    let server = Server::new(names.config()).await.unwrap();
    let broker = server.broker();
    dropped_delivery_comes_back(broker.as_ref(), &names.queue, || async {
        let stats = broker
            .inspect()
            .unwrap()
            .queue_stats(&names.queue)
            .await
            .unwrap();
        stats.pending == 1 && stats.in_flight == Some(0)
    })
    .await;
    names.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_delivery_goes_back_to_the_amqp_queue() {
    if !require(
        Service::RabbitMq,
        "a_dropped_delivery_goes_back_to_the_amqp_queue",
    ) {
        return;
    }
    let config = amqp::config("redeliver");
    let _cleanup = Cleanup::for_config(&config);
    let broker = AmqpBroker::new(&config).await.expect("AMQP broker");
    // With a prefetch of one, RabbitMQ hands the consumer nothing more until the dropped message is
    // settled: getting it again proves the nack.
    dropped_delivery_comes_back(&broker, &config.default_queue, || async { true }).await;
}
