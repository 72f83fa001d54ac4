//! Network faults between a client and Redis, injected with `machinery_tests::fault_proxy`.

use std::time::{Duration, Instant};

use machinery_tests::fault_proxy::FaultProxy;
use machinery_tests::{require, Service};
use redis::AsyncConnectionConfig;

async fn ping(conn: &mut redis::aio::MultiplexedConnection) -> redis::RedisResult<String> {
    redis::cmd("PING").query_async(conn).await
}

#[tokio::test]
async fn the_fault_proxy_forwards_freezes_stalls_delays_resets_and_refuses() {
    if !require(
        Service::Redis,
        "the_fault_proxy_forwards_freezes_stalls_delays_resets_and_refuses",
    ) {
        return;
    }
    let proxy = FaultProxy::start(Service::Redis.addr()).await;
    let client = redis::Client::open(proxy.redis_url()).unwrap();
    let connect = || async {
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(Some(Duration::from_secs(2)));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    };
    let within = |ms| Duration::from_millis(ms);

    let mut old = connect().await.unwrap();
    assert_eq!(ping(&mut old).await.unwrap(), "PONG");
    assert_eq!(proxy.open_connections(), 1);

    // Frozen: the open connection hears nothing; a new one works.
    assert_eq!(proxy.freeze_open(), 1);
    assert!(
        tokio::time::timeout(within(500), ping(&mut old))
            .await
            .is_err(),
        "a frozen connection answered"
    );
    let mut new = connect().await.unwrap();
    let answered = tokio::time::timeout(within(500), ping(&mut new)).await;
    assert_eq!(answered.unwrap().unwrap(), "PONG");

    // Delayed: each chunk waits (the request and the reply: two chunks).
    proxy.delay(within(150));
    let started = Instant::now();
    assert_eq!(ping(&mut new).await.unwrap(), "PONG");
    assert!(started.elapsed() >= within(300), "{:?}", started.elapsed());
    proxy.delay(Duration::ZERO);

    // Stalled: nothing moves until healed, then the reply arrives.
    proxy.stall();
    let mut stalled = new.clone();
    let waiting = tokio::spawn(async move { ping(&mut stalled).await });
    tokio::time::sleep(within(400)).await;
    assert!(!waiting.is_finished(), "a stalled connection answered");
    proxy.heal();
    let answered = tokio::time::timeout(within(1000), waiting).await;
    assert_eq!(answered.unwrap().unwrap().unwrap(), "PONG");

    // Reset: the client sees a connection error at once, not a timeout.
    assert_eq!(proxy.reset_all(), 2);
    let failed = tokio::time::timeout(within(1000), ping(&mut new)).await;
    let error = failed.expect("an answer within a second").unwrap_err();
    assert!(
        error.is_io_error() || error.is_connection_dropped(),
        "{error:?}"
    );

    // Refused: connecting fails until allowed again.
    proxy.refuse_new(true);
    assert!(
        async { ping(&mut connect().await?).await }.await.is_err(),
        "a refused connection worked"
    );
    proxy.refuse_new(false);
    let mut again = connect().await.unwrap();
    assert_eq!(ping(&mut again).await.unwrap(), "PONG");
}
