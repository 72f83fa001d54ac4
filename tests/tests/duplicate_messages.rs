//! A second copy of a task's message (the broker redelivering it after an acknowledgement was lost, or a
//! publisher's retry after a lost confirm), started after the first copy's SUCCESS was stored. Every send
//! stores PENDING first, so a SUCCESS found at start means the task already ran since it was last sent:
//! the copy does not run again, its SUCCESS stays, and what follows the task is sent again. Before this,
//! the copy wrote STARTED over the SUCCESS, and a chord whose last member finished meanwhile read that
//! member as unfinished and failed its callback with an empty error (the RabbitMQ failover test saw it).

mod redis_common;

use std::time::Duration;

use machinery::{GroupMeta, Server, State, Worker};
use machinery_tests::tasks::{collect, probe, probe_record};
use machinery_tests::{eventually, require, Service};
use redis::AsyncCommands as _;
use redis_common::{raw, Names};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_a_succeeded_chord_member_neither_runs_again_nor_fails_the_chord() {
    if !require(Service::Redis, "duplicate messages") {
        return;
    }
    let names = Names::new("dup_member");
    let server = Server::new(names.config()).await.unwrap();
    let (members_key, callback_key) = (format!("{}_m", names.id), format!("{}_cb", names.id));

    // A chord of two members, written as a sender would, but pushed by hand so that the first member's
    // message can be pushed twice.
    let group = format!("group_{}", names.id);
    let uuids = [names.task("m0"), names.task("m1")];
    server
        .backend()
        .init_group(&GroupMeta::new(group.clone(), uuids.to_vec()))
        .await
        .unwrap();
    let mut callback = collect::signature(callback_key.clone(), vec![]).erase();
    callback.uuid = names.task("callback");
    let member = |uuid: &str, tag: i64, ms: i64| {
        let mut member = probe::signature(&members_key, tag, ms).erase();
        member.uuid = uuid.to_owned();
        member.group_uuid = group.clone();
        member.group_task_count = 2;
        member.chord_callback = Some(Box::new(callback.clone()));
        member.to_json().unwrap()
    };
    // With two slots: m0 and m1 start together; m0 succeeds at 200 ms and its copy takes the free slot
    // while m1 runs until 300 ms, when m1 completes the chord and reads both members' states.
    let first = member(&uuids[0], 1, 200);
    let mut conn = raw().await;
    for body in [first.clone(), member(&uuids[1], 2, 300), first] {
        let _: () = conn.rpush(&names.queue, body).await.unwrap();
    }
    let running = Worker::new(&server)
        .register(probe::task())
        .register(collect::task())
        .concurrency(2)
        .start()
        .await
        .unwrap();

    let outcome = server.result::<i64>(callback.uuid.clone()).get(WAIT).await;
    assert_eq!(
        outcome.as_ref().ok(),
        Some(&3),
        "the chord callback gets both members' results: {outcome:?}"
    );
    assert_eq!(probe_record(&callback_key).order, vec![1, 2]);
    // Every message, the copy included, is acknowledged.
    let inspect = server.broker().inspect().unwrap();
    let drained = eventually(WAIT, || async {
        inspect.queue_stats(&names.queue).await.is_ok_and(|stats| {
            stats.pending == 0 && stats.in_flight == Some(0) && stats.dead == Some(0)
        })
    })
    .await;
    assert!(
        drained,
        "every message is acknowledged: {:?}",
        inspect.queue_stats(&names.queue).await
    );
    running.shutdown(Duration::from_secs(5)).await.unwrap();
    let members = probe_record(&members_key);
    assert_eq!(
        (members.started, members.order.clone()),
        (2, vec![1, 2]),
        "each member ran once: {members:?}"
    );
    let state = server
        .result::<i64>(uuids[0].clone())
        .state()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.state, State::Success, "{state:?}");
    names.cleanup().await;
}
