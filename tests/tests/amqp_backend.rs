//! The AMQP result backend against a real RabbitMQ: Go's per-task queue layout both ways, reading without
//! consuming, waiting by notification, and the chord trigger (exactly once, under concurrency, with a
//! crashed holder, and end to end with two workers).

use std::sync::Arc;
use std::time::{Duration, Instant};

use machinery::backend::amqp::{group_record_queue, group_states_queue, AmqpBackend};
use machinery::backend::{Backend, BackendError};
use machinery::broker::amqp::AmqpBroker;
use machinery::signature::{new_group_uuid, new_task_uuid};
use machinery::{Chord, Config, Group, GroupMeta, Server, State, TaskResult, TaskState, Worker};
use machinery_tests::amqp::{
    self, bindings_from, int32, int64, queue_info, table, Cleanup, Rabbit,
};
use machinery_tests::tasks::{collect, probe_record, sleep_add};
use machinery_tests::{require, unique, Service};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

async fn backend(config: &Config) -> AmqpBackend {
    AmqpBackend::new(config)
        .await
        .expect("AMQP backend connects")
}

fn fixture(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/go")
        .join(name);
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn states_go_to_gos_per_task_queue_and_go_reads_them_in_order() {
    if !require(Service::RabbitMq, "layout") {
        return;
    }
    let config = amqp::config("layout");
    let cleanup = Cleanup::for_config(&config);
    let b = backend(&config).await;
    let uuid = new_task_uuid();
    cleanup.queue(&uuid);
    let success = TaskState::success(&uuid, "", vec![TaskResult::new("int64", json!(42))]);
    b.set_state(&TaskState::pending(&uuid, "add"))
        .await
        .unwrap();
    b.set_states(&[
        TaskState::received(&uuid, ""),
        TaskState::started(&uuid, ""),
    ])
    .await
    .unwrap();
    b.set_state(&success).await.unwrap();

    let q = queue_info(&uuid).expect("a queue named by the task id");
    assert!(!q.durable && q.auto_delete, "{q:?}");
    assert_eq!(
        q.arguments,
        json!({"x-message-ttl": ["signedint", 600_000], "x-expires": ["signedint", 600_000]}),
        "Go's arguments, 32-bit"
    );
    assert_eq!(q.ready, 4, "one message per state");
    assert!(bindings_from(&config.amqp.exchange).contains(&(uuid.clone(), uuid.clone())));

    let rabbit = Rabbit::connect().await;
    // Go's GetState declares the queue with int32 arguments before reading: accepted, and so is int64.
    for width in [int32(600_000), int64(600_000)] {
        rabbit
            .declare_queue(
                &uuid,
                false,
                true,
                table(&[("x-message-ttl", width.clone()), ("x-expires", width)]),
                Some((&config.amqp.exchange, &uuid)),
            )
            .await
            .expect("Go's declaration of the task queue is accepted");
    }
    // Go's reader takes one message per call: the states in order.
    let mut seen = Vec::new();
    while let Some(d) = rabbit.take(&uuid).await {
        assert_eq!(
            d.properties.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(*d.properties.delivery_mode(), Some(2));
        let body: Value = serde_json::from_slice(&d.data).unwrap();
        seen.push(body);
    }
    let states: Vec<_> = seen.iter().map(|s| s["State"].as_str().unwrap()).collect();
    assert_eq!(states, ["PENDING", "RECEIVED", "STARTED", "SUCCESS"]);
    assert_eq!(
        seen[3],
        json!({"TaskUUID": uuid, "TaskName": "", "State": "SUCCESS",
               "Results": [{"Type": "int64", "Value": 42}], "Error": "",
               "CreatedAt": "0001-01-01T00:00:00Z", "TTL": 0})
    );
    // The one-reader limitation: what a Go reader took is gone for everyone.
    assert_eq!(b.get_state(&uuid).await.unwrap(), None);
}

/// A second copy of a message whose task succeeded (redelivered after a lost acknowledgement) stores
/// neither RECEIVED nor STARTED after the SUCCESS: the worker sees `false` and does not run it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_is_not_stored_after_a_success() {
    if !require(Service::RabbitMq, "start after success") {
        return;
    }
    let config = amqp::config("start_after_success");
    let cleanup = Cleanup::for_config(&config);
    let b = backend(&config).await;
    let uuid = new_task_uuid();
    cleanup.queue(&uuid);
    let (received, started) = (
        TaskState::received(&uuid, "add"),
        TaskState::started(&uuid, "add"),
    );
    assert!(b
        .set_received_and_started(&received, &started)
        .await
        .unwrap());
    let success = TaskState::success(&uuid, "add", vec![TaskResult::new("int64", json!(42))]);
    b.set_state(&success).await.unwrap();
    assert!(!b
        .set_received_and_started(&received, &started)
        .await
        .unwrap());
    let stored = b.get_state(&uuid).await.unwrap().unwrap();
    assert_eq!(
        (stored.state, stored.results),
        (State::Success, success.results)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn we_read_what_go_wrote_without_consuming_it() {
    if !require(Service::RabbitMq, "read_go") {
        return;
    }
    let config = amqp::config("readgo");
    let cleanup = Cleanup::for_config(&config);
    let uuid = new_task_uuid();
    cleanup.queue(&uuid);
    let rabbit = Rabbit::connect().await;
    rabbit
        .declare_exchange_like_go(&config.amqp.exchange, "direct")
        .await
        .unwrap();
    rabbit
        .declare_queue(
            &uuid,
            false,
            true,
            table(&[
                ("x-message-ttl", int32(600_000)),
                ("x-expires", int32(600_000)),
            ]),
            Some((&config.amqp.exchange, &uuid)),
        )
        .await
        .unwrap();
    for name in ["state_pending.json", "state_success.json"] {
        let mut state = fixture(name);
        state["TaskUUID"] = json!(uuid);
        let properties = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        rabbit
            .publish(
                &config.amqp.exchange,
                &uuid,
                &serde_json::to_vec(&state).unwrap(),
                properties,
            )
            .await;
    }
    let b = backend(&config).await;
    for _ in 0..2 {
        let state = b.get_state(&uuid).await.unwrap().expect("a state");
        assert_eq!(state.state, State::Success);
        assert_eq!(state.task_name, "add");
        assert_eq!(
            state.results,
            Some(vec![TaskResult::new("int64", json!(2))])
        );
    }
    let q = queue_info(&uuid).unwrap();
    assert_eq!(
        (q.ready, q.unacked),
        (2, 0),
        "reading put every message back"
    );
    assert_eq!(b.get_state(&new_task_uuid()).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_is_woken_by_the_write_and_times_out_with_the_last_state() {
    if !require(Service::RabbitMq, "wait") {
        return;
    }
    let config = amqp::config("wait");
    let cleanup = Cleanup::for_config(&config);
    let uuid = new_task_uuid();
    let other = new_task_uuid();
    cleanup.queue(&uuid);
    cleanup.queue(&other);
    let writer = backend(&config).await;
    let reader = backend(&config).await;
    writer
        .set_state(&TaskState::pending(&uuid, "add"))
        .await
        .unwrap();

    let write = tokio::spawn({
        let writer = writer.clone();
        let uuid = uuid.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let at = Instant::now();
            writer
                .set_state(&TaskState::success(
                    &uuid,
                    "",
                    vec![TaskResult::new("int64", json!(7))],
                ))
                .await
                .unwrap();
            at
        }
    });
    let state = reader
        .wait_for_completion(&uuid, WAIT)
        .await
        .unwrap()
        .unwrap();
    let done = Instant::now();
    let written = write.await.unwrap();
    assert_eq!(state.state, State::Success);
    // Polling alone would notice only at the next read (up to 2 s later); the notification is immediate.
    assert!(
        done.saturating_duration_since(written) < Duration::from_millis(150),
        "{:?} after the write",
        done.saturating_duration_since(written)
    );

    writer
        .set_state(&TaskState::pending(&other, "add"))
        .await
        .unwrap();
    let started = Instant::now();
    let last = reader
        .wait_for_completion(&other, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(last.map(|s| s.state), Some(State::Pending));
}

fn member_ids(n: usize) -> Vec<String> {
    (0..n).map(|_| new_task_uuid()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chord_trigger_goes_to_exactly_one_member_under_concurrency() {
    if !require(Service::RabbitMq, "trigger") {
        return;
    }
    let config = amqp::config("trigger");
    let cleanup = Cleanup::for_config(&config);
    let group = new_group_uuid();
    cleanup.queue(&group_record_queue(&group));
    cleanup.queue(&group_states_queue(&group));
    let members = member_ids(12);
    let n = members.len() as u32;
    // Four "workers", each with its own connection.
    let mut backends = Vec::new();
    for _ in 0..4 {
        backends.push(backend(&config).await);
    }
    backends[0]
        .init_group(&GroupMeta::new(&group, members.clone()))
        .await
        .unwrap();
    backends[1]
        .init_group(&GroupMeta::new(&group, members.clone()))
        .await
        .expect("initialising twice is harmless");

    // All but the last member finish, each twice (a redelivered message), all at once: nobody wins.
    let mut calls = tokio::task::JoinSet::new();
    for (i, member) in members[..11].iter().enumerate() {
        for copy in 0..2 {
            let b = backends[(i + copy) % 4].clone();
            let (group, member) = (group.clone(), member.clone());
            calls.spawn(async move { b.complete_group_member(&group, &member, n).await });
        }
    }
    let mut wins = 0;
    while let Some(result) = calls.join_next().await {
        wins += usize::from(result.unwrap().unwrap());
    }
    assert_eq!(wins, 0, "11 of 12 members finished: no trigger yet");
    assert!(
        !backends[2]
            .get_group(&group)
            .await
            .unwrap()
            .unwrap()
            .chord_triggered
    );

    // The last member and more duplicates race: exactly one call wins.
    for (i, member) in members.iter().enumerate() {
        let b = backends[i % 4].clone();
        let (group, member) = (group.clone(), member.clone());
        calls.spawn(async move { b.complete_group_member(&group, &member, n).await });
    }
    let last = members[11].clone();
    for b in &backends {
        let (b, group, last) = (b.clone(), group.clone(), last.clone());
        calls.spawn(async move { b.complete_group_member(&group, &last, n).await });
    }
    let mut wins = 0;
    while let Some(result) = calls.join_next().await {
        wins += usize::from(result.unwrap().unwrap());
    }
    // The last member completes the group, and is the only one told to send the callback: all five of
    // its calls are (the one that triggered, and the four that find it named as the trigger), none of
    // the twelve others.
    assert_eq!(
        wins, 5,
        "only the last member's five calls are told to send the callback"
    );
    let meta = backends[3].get_group(&group).await.unwrap().unwrap();
    assert!(meta.chord_triggered);
    assert_eq!(meta.task_uuids, members);
    assert!(!backends[0]
        .complete_group_member(&group, &members[0], n)
        .await
        .unwrap());
    // The winner calling again (its answer was lost, its message redelivered) is told again.
    assert!(backends[1]
        .complete_group_member(&group, &members[11], n)
        .await
        .unwrap());
    assert_eq!(
        queue_info(&group_record_queue(&group)).map(|q| q.ready),
        Some(1),
        "one record"
    );

    let missing = new_group_uuid();
    assert!(matches!(
        backends[0]
            .complete_group_member(&missing, &members[0], n)
            .await,
        Err(BackendError::UnknownGroup(_))
    ));
    assert_eq!(backends[0].get_group(&missing).await.unwrap(), None);

    backends[0].purge_group(&group).await.unwrap();
    let rabbit = Rabbit::connect().await;
    assert!(!rabbit.queue_exists(&group_record_queue(&group)).await);
    assert!(!rabbit.queue_exists(&group_states_queue(&group)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_held_by_a_crashed_worker_comes_back() {
    if !require(Service::RabbitMq, "crashed_holder") {
        return;
    }
    let config = amqp::config("holder");
    let cleanup = Cleanup::for_config(&config);
    let group = new_group_uuid();
    cleanup.queue(&group_record_queue(&group));
    cleanup.queue(&group_states_queue(&group));
    let members = member_ids(2);
    let b = backend(&config).await;
    b.init_group(&GroupMeta::new(&group, members.clone()))
        .await
        .unwrap();

    // Another "worker" took the record and dies before putting it back.
    let crashed = Rabbit::connect().await;
    let (_held, record) = crashed.hold(&group_record_queue(&group)).await;
    assert!(record.is_some());
    let waiting = tokio::spawn({
        let (b, group, member) = (b.clone(), group.clone(), members[0].clone());
        async move { b.complete_group_member(&group, &member, 2).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "waits while the record is held");
    crashed.connection.close(200, "crash".into()).await.unwrap();
    let first = tokio::time::timeout(WAIT, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!first);
    assert!(b
        .complete_group_member(&group, &members[1], 2)
        .await
        .unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_states_are_whole_while_readers_hold_member_queues() {
    if !require(Service::RabbitMq, "group_states") {
        return;
    }
    let config = amqp::config("gstates");
    let cleanup = Cleanup::for_config(&config);
    let group = new_group_uuid();
    cleanup.queue(&group_record_queue(&group));
    cleanup.queue(&group_states_queue(&group));
    let members = member_ids(3);
    for m in &members {
        cleanup.queue(m);
    }
    let b = backend(&config).await;
    b.init_group(&GroupMeta::new(&group, members.clone()))
        .await
        .unwrap();
    // Finished in reverse order, each through the full sequence of states.
    for (i, m) in members.iter().enumerate().rev() {
        b.set_states(&[
            TaskState::pending(m, "add"),
            TaskState::received(m, ""),
            TaskState::started(m, ""),
            TaskState::success(m, "", vec![TaskResult::new("int64", json!(i))]),
        ])
        .await
        .unwrap();
    }
    // Someone reads member 0's states right now and holds them.
    let rabbit = Rabbit::connect().await;
    let (_holding, _) = rabbit.hold(&members[0]).await;
    let states = b.group_states(&group).await.unwrap();
    let got: Vec<_> = states
        .iter()
        .map(|s| (s.task_uuid.clone(), s.state.clone(), s.results.clone()))
        .collect();
    let want: Vec<_> = members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            (
                m.clone(),
                State::Success,
                Some(vec![TaskResult::new("int64", json!(i))]),
            )
        })
        .collect();
    assert_eq!(got, want, "in group order, complete");
    assert_eq!(
        queue_info(&group_states_queue(&group)).map(|q| q.ready),
        Some(12),
        "read without consuming"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chord_across_two_workers_calls_back_once_with_results_in_group_order() {
    if !require(Service::RabbitMq, "chord") {
        return;
    }
    let mut config = amqp::config("chord");
    config.amqp.prefetch_count = 4;
    let cleanup = Cleanup::for_config(&config);
    let key = unique("chord");

    let mut servers = Vec::new();
    let mut workers = Vec::new();
    for _ in 0..2 {
        let server = Server::from_parts(
            config.clone(),
            Arc::new(AmqpBroker::new(&config).await.unwrap()),
            Arc::new(backend(&config).await),
        );
        workers.push(
            Worker::new(&server)
                .register(sleep_add::task())
                .register(collect::task())
                .concurrency(4)
                .start()
                .await
                .unwrap(),
        );
        servers.push(server);
    }
    let n = 10;
    let group = Group::new((0..n).map(|i| sleep_add::signature(i, 100, 20 * (n - i))));
    let chord = servers[0]
        .send_chord(Chord::new(group, collect::partial(&key)))
        .await
        .unwrap();
    for member in chord.group().members() {
        cleanup.queue(member.uuid());
    }
    cleanup.queue(chord.callback().uuid());
    cleanup.queue(&group_record_queue(chord.group().group_uuid()));
    cleanup.queue(&group_states_queue(chord.group().group_uuid()));
    let sum = chord.get(WAIT).await.expect("the chord callback runs");
    assert_eq!(sum, (0..n).map(|i| i + 100).sum::<i64>());
    // Give a second, wrong, callback the time to show up before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let record = probe_record(&key);
    assert_eq!(record.started, 1, "one callback: {record:?}");
    assert_eq!(
        record.order,
        (0..n).map(|i| i + 100).collect::<Vec<_>>(),
        "group order"
    );
    for w in workers {
        w.shutdown(WAIT).await.unwrap();
    }
}
