//! A task or group id that names one of our Redis keys (issue 18, case 4): Go would overwrite the key with
//! a state record (a queue turns into a string, and senders then get WRONGTYPE); we refuse the write and
//! leave the key as it was.

mod redis_common;

use machinery::backend::{Backend, BackendError};
use machinery::redis::RedisBackend;
use machinery::{GroupMeta, SendError, Server, Signature, TaskResult, TaskState};
use machinery_tests::{require, Service};
use redis::AsyncCommands as _;
use redis_common::{raw, Names};

#[tokio::test]
async fn a_send_whose_id_names_the_queue_or_our_keys_is_refused_and_nothing_is_written() {
    if !require(Service::Redis, "reserved ids") {
        return;
    }
    let names = Names::new("reserved_send");
    let server = Server::new(names.config()).await.unwrap();
    let mut conn = raw().await;
    let dead = format!("{}.dead", names.queue);
    let inflight = format!("machinery:inflight:{}:someone", names.queue);
    for id in [&names.queue, &dead, &names.delayed, &inflight] {
        let mut signature = Signature::new("add");
        signature.uuid = id.clone();
        let error = server.send(signature).await.unwrap_err();
        assert!(
            matches!(&error, SendError::Backend { source: BackendError::ReservedKey { key, .. }, .. } if key == id),
            "{id}: {error:?}"
        );
        let kind: String = redis::cmd("TYPE")
            .arg(id)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(kind, "none", "{id} was written");
    }
    let queued: u64 = conn.llen(&names.queue).await.unwrap();
    assert_eq!(queued, 0, "nothing was published");
    // A group id is checked the same way.
    let meta = GroupMeta::new(names.queue.clone(), vec![names.task(1)]);
    let error = server.backend().init_group(&meta).await.unwrap_err();
    assert!(
        matches!(error, BackendError::ReservedKey { .. }),
        "{error:?}"
    );
    names.cleanup().await;
}

#[tokio::test]
async fn a_state_never_replaces_a_list_another_queue_holds() {
    if !require(Service::Redis, "state over a list") {
        return;
    }
    let names = Names::new("reserved_list");
    let backend = RedisBackend::connect(&names.config()).await.unwrap();
    let mut conn = raw().await;
    let other_queue = format!("{}_other_q", names.id);
    let _: () = conn.rpush(&other_queue, "a waiting message").await.unwrap();
    // PENDING goes through the plain SET, SUCCESS through the state script: neither may replace the list.
    let pending = TaskState::pending(&other_queue, "add");
    let success = TaskState::success(
        &other_queue,
        "add",
        vec![TaskResult::new("int64", 3.into())],
    );
    for state in [&pending, &success] {
        let error = backend.set_state(state).await.unwrap_err();
        assert!(error.to_string().contains("WRONGTYPE"), "{error}");
    }
    let left: Vec<String> = conn.lrange(&other_queue, 0, -1).await.unwrap();
    assert_eq!(left, vec!["a waiting message".to_owned()]);
    let _: () = conn.del(&other_queue).await.unwrap();
    names.cleanup().await;
}

static RESERVED_RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

#[machinery::task(name = "reserved_counted")]
async fn reserved_counted(n: i64) -> Result<i64, machinery::TaskError> {
    RESERVED_RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    Ok(n)
}

#[tokio::test]
async fn a_message_whose_id_names_the_queue_is_dead_lettered_without_running() {
    if !require(Service::Redis, "reserved id in a message") {
        return;
    }
    let names = Names::new("reserved_msg");
    let server = Server::new(names.config()).await.unwrap();
    let running = machinery::Worker::new(&server)
        .register(reserved_counted::task())
        .start()
        .await
        .unwrap();
    // As a Go sender (or anyone) could write it: a valid task whose UUID is the queue's own name.
    let body = Signature::with_args(
        "reserved_counted",
        vec![machinery::Arg::new("", "int64", serde_json::json!(5))],
    )
    .with_uuid(&names.queue)
    .to_json()
    .unwrap();
    let mut conn = raw().await;
    let _: () = conn.rpush(&names.queue, body).await.unwrap();

    let inspect = server.broker().inspect().unwrap();
    machinery_tests::eventually(std::time::Duration::from_secs(10), || async {
        !inspect
            .dead_letters(&names.queue, 10)
            .await
            .unwrap()
            .is_empty()
    })
    .await;
    let dead = inspect.dead_letters(&names.queue, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "dead-lettered within 10 s");
    assert!(
        dead[0].reason.contains("names a queue"),
        "{}",
        dead[0].reason
    );
    let kind: String = redis::cmd("TYPE")
        .arg(&names.queue)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_ne!(kind, "string", "the queue never became a state record");
    // It did not run, and the queue keeps serving.
    let normal = reserved_counted::send(&server, 9).await.unwrap();
    assert_eq!(
        normal
            .get(std::time::Duration::from_secs(10))
            .await
            .unwrap(),
        9
    );
    assert_eq!(
        RESERVED_RUNS.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the normal task ran"
    );
    running
        .shutdown(std::time::Duration::from_secs(5))
        .await
        .unwrap();
    names.cleanup().await;
}

#[tokio::test]
async fn an_id_that_names_a_custom_queue_is_refused_by_the_sender_and_dead_lettered_by_the_worker()
{
    if !require(Service::Redis, "id names a custom queue") {
        return;
    }
    let names = Names::new("reserved_custom");
    let custom = format!("{}_custom_q", names.id);
    let server = Server::new(names.config()).await.unwrap();
    // The sender refuses it outright.
    let mut signature = Signature::new("reserved_counted").routing_key(&custom);
    signature.uuid = custom.clone();
    let error = server.send(signature).await.unwrap_err();
    assert!(
        matches!(&error, SendError::Backend { source: BackendError::ReservedKey { key, .. }, .. } if key == &custom),
        "{error:?}"
    );
    // Pushed raw onto the (then empty) custom queue, it never turns the queue into a string.
    let running = machinery::Worker::new(&server)
        .queue(&custom)
        .register(reserved_counted::task())
        .start()
        .await
        .unwrap();
    let body = Signature::with_args(
        "reserved_counted",
        vec![machinery::Arg::new("", "int64", serde_json::json!(7))],
    )
    .routing_key(&custom)
    .with_uuid(&custom)
    .to_json()
    .unwrap();
    let mut conn = raw().await;
    let _: () = conn.rpush(&custom, body).await.unwrap();
    let inspect = server.broker().inspect().unwrap();
    machinery_tests::eventually(std::time::Duration::from_secs(10), || async {
        !inspect.dead_letters(&custom, 10).await.unwrap().is_empty()
    })
    .await;
    let dead = inspect.dead_letters(&custom, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "dead-lettered within 10 s");
    assert!(
        dead[0].reason.contains("names a queue"),
        "{}",
        dead[0].reason
    );
    let kind: String = redis::cmd("TYPE")
        .arg(&custom)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_ne!(kind, "string", "the queue never became a state record");
    let normal = server
        .send(reserved_counted::signature(8).routing_key(&custom))
        .await
        .unwrap();
    assert_eq!(
        normal
            .get(std::time::Duration::from_secs(10))
            .await
            .unwrap(),
        8
    );
    running
        .shutdown(std::time::Duration::from_secs(5))
        .await
        .unwrap();
    let _: () = conn
        .del(&[custom.clone(), format!("{custom}.dead")])
        .await
        .unwrap();
    names.cleanup().await;
}
