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
            matches!(&error, SendError::Backend { source: BackendError::Refused { key, .. }, .. } if key == id),
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
    assert!(matches!(error, BackendError::Refused { .. }), "{error:?}");
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
