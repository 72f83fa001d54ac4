//! Delayed tasks on Redis meet hostile entries (issue 18, case 5): an entry whose RoutingKey names a key
//! that is not a list is dead-lettered with the reason instead of lost, a huge entry is routed without
//! being decoded inside Redis, and ordinary entries still reach their queues.

mod redis_common;

use machinery::broker::Inspect;
use machinery::redis::RedisBroker;
use machinery::{Server, Worker};
use machinery_tests::{require, Service};
use redis::AsyncCommands as _;
use redis_common::{raw, Names};

/// A due score: one second ago, in Unix nanoseconds.
fn due() -> i64 {
    (chrono::Utc::now() - chrono::Duration::seconds(1))
        .timestamp_nanos_opt()
        .unwrap()
}

#[tokio::test]
async fn a_due_task_for_a_key_that_is_not_a_list_is_dead_lettered_with_the_reason() {
    if !require(Service::Redis, "promotion to a non-list") {
        return;
    }
    let names = Names::new("promote_wrongtype");
    let mut conn = raw().await;
    let victim = format!("{}_victim", names.id);
    let _: () = conn.set(&victim, "a string, not a list").await.unwrap();
    let entry = format!(
        r#"{{"UUID":"{}","Name":"add","RoutingKey":"{victim}","Args":[]}}"#,
        names.task(1)
    );
    let _: () = conn.zadd(&names.delayed, &entry, due()).await.unwrap();
    let ordinary = format!(
        r#"{{"UUID":"{}","Name":"add","RoutingKey":"{}","Args":[]}}"#,
        names.task(2),
        names.queue
    );
    let _: () = conn.zadd(&names.delayed, &ordinary, due()).await.unwrap();

    let broker = RedisBroker::connect(&names.config()).await.unwrap();
    let moved = broker
        .promote_delayed()
        .await
        .expect("a refused push does not fail the promotion");
    assert_eq!(moved, 2);

    let left: u64 = conn.zcard(&names.delayed).await.unwrap();
    assert_eq!(left, 0, "nothing stays behind to block the set");
    let queued: Vec<String> = conn.lrange(&names.queue, 0, -1).await.unwrap();
    assert_eq!(
        queued,
        vec![ordinary],
        "the ordinary entry reached its queue"
    );
    let dead = broker.dead_letters(&names.queue, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].body, entry.as_bytes(), "kept byte for byte");
    assert_eq!(dead[0].queue, victim);
    assert!(
        dead[0].reason.contains("cannot move the delayed task")
            && dead[0].reason.contains("WRONGTYPE"),
        "{}",
        dead[0].reason
    );
    let victim_value: String = conn.get(&victim).await.unwrap();
    assert_eq!(
        victim_value, "a string, not a list",
        "the victim key is untouched"
    );
    // The queue keeps moving: a normal task sent now runs.
    let _: () = conn.del(&names.queue).await.unwrap();
    let server = Server::new(names.config()).await.unwrap();
    let running = Worker::new(&server)
        .register(promoted_add::task())
        .start()
        .await
        .unwrap();
    let normal = promoted_add::send(&server, 40, 2).await.unwrap();
    assert_eq!(
        normal
            .get(std::time::Duration::from_secs(10))
            .await
            .unwrap(),
        42
    );
    running
        .shutdown(std::time::Duration::from_secs(5))
        .await
        .unwrap();
    names.cleanup().await;
}

#[machinery::task(name = "promoted_add")]
async fn promoted_add(a: i64, b: i64) -> Result<i64, machinery::TaskError> {
    Ok(a + b)
}

#[tokio::test]
async fn a_huge_entry_is_routed_by_its_routing_key_without_being_decoded() {
    if !require(Service::Redis, "promotion of a huge entry") {
        return;
    }
    let names = Names::new("promote_huge");
    let mut conn = raw().await;
    let target = format!("{}_target", names.id);
    // 2 MB of argument, and JSON that stops half way: only a scan of the text finds the routing key (a
    // decoder would give up and send it to the default queue).
    let entry = format!(
        r#"{{"UUID":"{}","Name":"add","RoutingKey":"{target}","Args":[{{"Type":"string","Value":"{}"#,
        names.task(1),
        "x".repeat(2_000_000)
    );
    let _: () = conn.zadd(&names.delayed, &entry, due()).await.unwrap();
    // A small entry with another spelling of the key is still decoded and routed.
    let lower = format!(
        r#"{{"uuid":"{}","name":"add","routingkey":"{target}","args":[]}}"#,
        names.task(2)
    );
    let _: () = conn.zadd(&names.delayed, &lower, due() + 1).await.unwrap();

    let broker = RedisBroker::connect(&names.config()).await.unwrap();
    assert_eq!(broker.promote_delayed().await.unwrap(), 2);

    let queued: Vec<Vec<u8>> = conn.lrange(&target, 0, -1).await.unwrap();
    assert_eq!(queued.len(), 2);
    assert_eq!(queued[0], entry.as_bytes(), "byte for byte");
    assert_eq!(queued[1], lower.as_bytes());
    let default_len: u64 = conn.llen(&names.queue).await.unwrap();
    assert_eq!(default_len, 0);
    let _: () = conn.del(&target).await.unwrap();
    names.cleanup().await;
}
