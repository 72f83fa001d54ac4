use super::*;
use std::time::Duration;

fn message<'a>(queue: &'a str, body: &str) -> Outgoing<'a> {
    Outgoing {
        uuid: "",
        name: "",
        routing_key: queue,
        body: body.as_bytes().to_vec(),
        eta: None,
        priority: 0,
        headers: Default::default(),
    }
}

fn options(queue: &str) -> ConsumeOptions {
    ConsumeOptions {
        queue: queue.into(),
        consumer_tag: "t".into(),
        concurrency: 1,
        prefetch: 1,
    }
}

#[tokio::test]
async fn batches_are_capped_and_fifo() {
    let broker = MemoryBroker::new("memory://", "q");
    for i in 0..5 {
        broker.publish(message("q", &i.to_string())).await.unwrap();
    }
    let mut consumer = broker.consume(options("q")).await.unwrap();
    let batch = consumer.next_batch(3).await.unwrap();
    let bodies: Vec<_> = batch
        .iter()
        .map(|d| String::from_utf8(d.body.clone()).unwrap())
        .collect();
    assert_eq!(bodies, ["0", "1", "2"]);
    let stats = broker.queue_stats("q").await.unwrap();
    assert_eq!((stats.pending, stats.in_flight), (2, Some(3)));
}

#[tokio::test]
async fn unacknowledged_messages_return_when_the_consumer_closes() {
    let broker = MemoryBroker::new("memory://", "q");
    broker.publish(message("q", "a")).await.unwrap();
    broker.publish(message("q", "b")).await.unwrap();
    let mut consumer = broker.consume(options("q")).await.unwrap();
    let mut batch = consumer.next_batch(2).await.unwrap();
    batch.remove(0).ack().await.unwrap();
    consumer.close().await.unwrap();
    let mut again = broker.consume(options("q")).await.unwrap();
    let batch = again.next_batch(10).await.unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].body, b"b");
    assert!(batch[0].redelivered);
}

#[tokio::test]
async fn delayed_messages_wait_for_their_eta() {
    let broker = MemoryBroker::new("memory://", "q");
    let mut m = message("q", "later");
    m.eta = Some(Utc::now() + chrono::Duration::milliseconds(150));
    broker.publish(m).await.unwrap();
    let mut consumer = broker.consume(options("q")).await.unwrap();
    let started = std::time::Instant::now();
    let batch = tokio::time::timeout(Duration::from_secs(5), consumer.next_batch(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(batch[0].body, b"later");
    assert!(
        started.elapsed() >= Duration::from_millis(140),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn dead_letters_keep_their_reason_and_requeue_goes_to_the_tail() {
    let broker = MemoryBroker::new("memory://", "q");
    broker.publish(message("q", "bad")).await.unwrap();
    broker.publish(message("q", "retry")).await.unwrap();
    broker.publish(message("q", "other")).await.unwrap();
    let mut consumer = broker.consume(options("q")).await.unwrap();
    let mut batch = consumer.next_batch(2).await.unwrap();
    let retry = batch.pop().unwrap();
    batch.pop().unwrap().dead_letter("malformed").await.unwrap();
    retry.requeue(b"retry2".to_vec()).await.unwrap();
    assert_eq!(
        broker.pending("q", 10).await.unwrap(),
        vec![b"other".to_vec(), b"retry2".to_vec()]
    );
    let dead = broker.dead_letters("q", 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].reason.as_str(), dead[0].body.as_slice()),
        ("malformed", b"bad".as_slice())
    );
}

fn task<'a>(queue: &'a str, uuid: &str) -> Outgoing<'a> {
    let body = format!(r#"{{"UUID":"{uuid}","Name":"add","RoutingKey":"{queue}"}}"#);
    message(queue, &body)
}

#[tokio::test]
async fn inspection_lists_queues_delayed_messages_and_consumers() {
    let broker = MemoryBroker::new("memory://", "default_q");
    broker.publish(message("a", "1")).await.unwrap();
    let mut later = message("b", "2");
    later.eta = Some(Utc::now() + chrono::Duration::hours(1));
    broker.publish(later).await.unwrap();
    assert_eq!(broker.queues().await.unwrap(), ["a", "b", "default_q"]);
    let delayed = broker.delayed(10).await.unwrap();
    assert_eq!(delayed.len(), 1);
    assert_eq!(delayed[0].body, b"2");
    assert!(delayed[0].eta > Utc::now());

    let mut consumer = broker.consume(options("a")).await.unwrap();
    let _held = consumer.next_batch(1).await.unwrap();
    let workers = broker.workers().await.unwrap();
    assert_eq!(workers.len(), 1);
    assert_eq!(
        (workers[0].queue.as_str(), workers[0].consumer_tag.as_str()),
        ("a", "t")
    );
    assert_eq!((workers[0].in_flight, workers[0].alive), (1, true));
    drop(_held);
    drop(consumer);
    assert!(broker.workers().await.unwrap().is_empty());
}

#[tokio::test]
async fn requeue_dead_moves_one_task_or_all_to_the_tail() {
    let broker = MemoryBroker::new("memory://", "q");
    for uuid in ["task_1", "task_2", "task_3"] {
        broker.publish(task("q", uuid)).await.unwrap();
    }
    let mut consumer = broker.consume(options("q")).await.unwrap();
    for delivery in consumer.next_batch(3).await.unwrap() {
        delivery.dead_letter("unknown task").await.unwrap();
    }
    broker.publish(message("q", "fresh")).await.unwrap();
    assert_eq!(broker.requeue_dead("q", Some("task_2")).await.unwrap(), 1);
    assert_eq!(broker.requeue_dead("q", Some("task_9")).await.unwrap(), 0);
    let pending = broker.pending("q", 10).await.unwrap();
    assert_eq!(pending[0], b"fresh");
    assert!(crate::broker::has_task_uuid(&pending[1], "task_2"));
    assert_eq!(broker.requeue_dead("q", None).await.unwrap(), 2);
    assert_eq!(broker.queue_stats("q").await.unwrap().dead, Some(0));
    assert_eq!(broker.pending("q", 10).await.unwrap().len(), 4);
    assert_eq!(broker.requeue_dead("nowhere", None).await.unwrap(), 0);
}

#[tokio::test]
async fn named_instances_are_shared_and_anonymous_ones_are_not() {
    let a = MemoryBroker::new("memory://shared-test", "q");
    let b = MemoryBroker::new("memory://shared-test", "q");
    let c = MemoryBroker::new("memory://", "q");
    a.publish(message("q", "x")).await.unwrap();
    assert_eq!(b.queue_stats("q").await.unwrap().pending, 1);
    assert_eq!(c.queue_stats("q").await.unwrap().pending, 0);
}
