//! The periodic-task lock on Redis: with no `LOCK` URL a Redis broker lends its server, and a key is taken
//! by one process only (`SET NX PX`, as Go's Redis lock), until it expires.

mod redis_common;

use std::time::Duration;

use machinery::Server;
use machinery_tests::{require, Service};
use redis::AsyncCommands as _;
use redis_common::{raw, Names};

#[tokio::test]
async fn a_lock_key_is_taken_once_until_it_expires() {
    if !require(Service::Redis, "a_lock_key_is_taken_once_until_it_expires") {
        return;
    }
    let names = Names::new("rl_lock");
    let first = Server::new(names.config()).await.unwrap();
    let second = Server::new(names.config()).await.unwrap();
    assert!(
        format!("{:?}", first.lock()).contains("RedisLock"),
        "{:?}",
        first.lock()
    );
    let key = format!("machinery_periodic:{}:tick", names.id);
    let ttl = Duration::from_millis(300);
    assert!(first.lock().try_acquire(&key, ttl).await.unwrap());
    assert!(
        !second.lock().try_acquire(&key, ttl).await.unwrap(),
        "held by the first process"
    );
    assert!(
        !first.lock().try_acquire(&key, ttl).await.unwrap(),
        "not re-entrant"
    );
    let mut conn = raw().await;
    let pttl: i64 = conn.pttl(&key).await.unwrap();
    assert!((1..=300).contains(&pttl), "SET ... PX: {pttl}");
    let value: i64 = conn.get(&key).await.unwrap();
    let now = chrono::Utc::now().timestamp_nanos_opt().unwrap();
    assert!(
        value > now && value < now + 1_000_000_000,
        "value is the expiry in Unix ns, as Go's"
    );
    let lock = second.lock().clone();
    redis_common::wait_until(
        "the key to be free again once expired",
        Duration::from_secs(3),
        || {
            let (lock, key) = (lock.clone(), key.clone());
            async move { lock.try_acquire(&key, ttl).await.unwrap() }
        },
    )
    .await;
    names.cleanup().await;
}
