//! The Redis result backend against a real Redis: Go's records both ways (byte-level), the server-side
//! merge of TaskName/CreatedAt, waiting woken by a notification, and the exactly-once chord step (alone,
//! under concurrency, beside Go's `TriggerChordMutex`, with members finished by Go workers, and with
//! 200-member chords run by 3 workers).

mod redis_common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use machinery::backend::redis::{completion_channel, RedisBackend, GO_CHORD_LOCK_KEY};
use machinery::backend::Backend;
use machinery::{GroupMeta, Server, Signature, State, TaskResult, TaskState, Worker};
use machinery_tests::{require, Service};
use redis::AsyncCommands as _;
use redis_common::{int, raw, wait_until, Names, ADD};
use serde_json::{json, Value};

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/go")
        .join(name);
    let mut bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
    }
    bytes
}

async fn backend(names: &Names) -> RedisBackend {
    RedisBackend::connect(&names.config()).await.unwrap()
}

async fn raw_get(key: &str) -> Vec<u8> {
    let mut conn = raw().await;
    let value: Option<Vec<u8>> = conn.get(key).await.unwrap();
    value.unwrap_or_else(|| panic!("no key {key}"))
}

const GO_STATE_KEYS: [&str; 7] = [
    "TaskUUID",
    "TaskName",
    "State",
    "Results",
    "Error",
    "CreatedAt",
    "TTL",
];

#[tokio::test]
async fn states_are_written_as_go_writes_them_and_keep_name_and_creation_time() {
    if !require(
        Service::Redis,
        "states_are_written_as_go_writes_them_and_keep_name_and_creation_time",
    ) {
        return;
    }
    let names = Names::new("rk_states");
    let backend = backend(&names).await;
    let id = names.task(1);
    let pending = TaskState::pending(&id, "add");
    backend.set_state(&pending).await.unwrap();
    // Go's worker writes later states without name and time; the record keeps the sender's.
    backend
        .set_state(&TaskState::started(&id, ""))
        .await
        .unwrap();
    let raw_state = raw_get(&id).await;
    let value: Value = serde_json::from_slice(&raw_state).unwrap();
    assert_eq!(value.as_object().unwrap().len(), 7, "{value}");
    for key in GO_STATE_KEYS {
        assert!(value.get(key).is_some(), "missing {key}");
    }
    assert_eq!(value["State"], "STARTED");
    assert_eq!(value["TaskName"], "add");
    assert_eq!(
        value["CreatedAt"],
        machinery::gotime::format(&pending.created_at).as_str()
    );
    assert_eq!(value["Results"], Value::Null);
    assert_eq!(value["TTL"], 0);
    let mut conn = raw().await;
    let ttl: i64 = conn.ttl(&id).await.unwrap();
    assert!(
        (290..=300).contains(&ttl),
        "SET ... EX results_expire_in: {ttl}"
    );

    // Results: integer literals for ints (u64::MAX exact), base64 for []uint8, integral floats without .0.
    let results = vec![
        TaskResult::new("int64", json!(2)),
        TaskResult::new("uint64", json!(18446744073709551615u64)),
        machinery::args::encode_result(&vec![1u8, 2]).unwrap(),
        TaskResult::new("float64", json!(4)),
    ];
    backend
        .set_state(&TaskState::success(&id, "", results))
        .await
        .unwrap();
    let text = String::from_utf8(raw_get(&id).await).unwrap();
    assert!(
        text.contains(r#""Results":[{"Type":"int64","Value":2},{"Type":"uint64","Value":18446744073709551615},{"Type":"[]uint8","Value":"AQI="},{"Type":"float64","Value":4}]"#),
        "{text}"
    );
    assert!(text.contains(r#""TaskName":"add""#), "{text}");
    let read = backend.get_state(&id).await.unwrap().unwrap();
    assert_eq!(read.state, State::Success);
    assert_eq!(read.created_at, pending.created_at);
    names.cleanup().await;
}

#[tokio::test]
async fn states_written_by_go_are_read_and_merged_without_re_encoding() {
    if !require(
        Service::Redis,
        "states_written_by_go_are_read_and_merged_without_re_encoding",
    ) {
        return;
    }
    let names = Names::new("rk_gostates");
    let backend = backend(&names).await;
    let mut conn = raw().await;
    let fixtures = [
        "state_pending.json",
        "state_success.json",
        "state_success_uint64.json",
        "state_success_bytes.json",
        "state_success_float64_integral.json",
        "state_success_no_values.json",
        "state_failure.json",
        "state_failure_panic.json",
    ];
    for (i, name) in fixtures.iter().enumerate() {
        let bytes = fixture(name);
        let key = names.task(format!("go{i}"));
        let _: () = conn.set(&key, &bytes).await.unwrap();
        let ours = backend.get_state(&key).await.unwrap().unwrap();
        assert_eq!(ours, TaskState::from_json(&bytes).unwrap(), "{name}");
    }

    // Go's sender wrote PENDING (CreatedAt with 8 fraction digits); our worker's RECEIVED keeps Go's
    // TaskName and CreatedAt text exactly.
    let go_pending = fixture("state_pending_created_at_short_fraction.json");
    let go_value: Value = serde_json::from_slice(&go_pending).unwrap();
    let id = go_value["TaskUUID"].as_str().unwrap().to_owned();
    let key = names.task("merge");
    let rewritten = String::from_utf8(go_pending.clone())
        .unwrap()
        .replace(&id, &key);
    let _: () = conn.set(&key, &rewritten).await.unwrap();
    backend
        .set_state(&TaskState::received(&key, ""))
        .await
        .unwrap();
    let merged: Value = serde_json::from_slice(&raw_get(&key).await).unwrap();
    assert_eq!(merged["State"], "RECEIVED");
    assert_eq!(merged["TaskName"], go_value["TaskName"]);
    assert_eq!(
        merged["CreatedAt"], go_value["CreatedAt"],
        "the text Go wrote, unchanged"
    );
    names.cleanup().await;
}

/// The state script copies TaskName and CreatedAt from the old record's text when that is safe, and
/// decodes the record when it is not: a name with an escape, and results that hold a `CreatedAt` key of
/// their own.
#[tokio::test]
async fn name_and_creation_time_come_from_the_top_level_of_any_old_record() {
    if !require(
        Service::Redis,
        "name_and_creation_time_come_from_the_top_level_of_any_old_record",
    ) {
        return;
    }
    let names = Names::new("rk_keep");
    let backend = backend(&names).await;
    let mut conn = raw().await;
    let key = names.task("tricky");
    let old = format!(
        r#"{{"TaskUUID":"{key}","TaskName":"say \"hi\"","State":"SUCCESS","Results":[{{"Type":"json","Value":{{"CreatedAt":"1999-01-01T00:00:00Z","TaskName":"inner"}}}}],"Error":"","CreatedAt":"2026-11-26T10:00:00.12345678Z","TTL":0}}"#
    );
    let _: () = conn.set(&key, &old).await.unwrap();
    backend
        .set_state(&TaskState::started(&key, ""))
        .await
        .unwrap();
    let merged: Value = serde_json::from_slice(&raw_get(&key).await).unwrap();
    assert_eq!(merged["State"], "STARTED");
    assert_eq!(
        merged["TaskName"], "say \"hi\"",
        "the escaped name, decoded"
    );
    assert_eq!(
        merged["CreatedAt"], "2026-11-26T10:00:00.12345678Z",
        "the top-level time, not the one inside the results"
    );
    // A plain record (no results): copied as text.
    let plain = names.task("plain");
    let _: () = conn
        .set(
            &plain,
            format!(r#"{{"TaskUUID":"{plain}","TaskName":"add","State":"PENDING","Results":null,"Error":"","CreatedAt":"2026-11-26T10:00:00.1Z","TTL":0}}"#),
        )
        .await
        .unwrap();
    backend
        .set_state(&TaskState::started(&plain, ""))
        .await
        .unwrap();
    let merged: Value = serde_json::from_slice(&raw_get(&plain).await).unwrap();
    assert_eq!(
        (merged["TaskName"].as_str(), merged["CreatedAt"].as_str()),
        (Some("add"), Some("2026-11-26T10:00:00.1Z"))
    );
    // A record without results whose name holds an escape: decoded, not cut at the escaped quote.
    let escaped = names.task("escaped");
    let _: () = conn
        .set(
            &escaped,
            format!(r#"{{"TaskUUID":"{escaped}","TaskName":"say \"hi\"","State":"PENDING","Results":null,"Error":"","CreatedAt":"2026-11-26T10:00:00.2Z","TTL":0}}"#),
        )
        .await
        .unwrap();
    backend
        .set_state(&TaskState::started(&escaped, ""))
        .await
        .unwrap();
    let merged: Value = serde_json::from_slice(&raw_get(&escaped).await).unwrap();
    assert_eq!(
        (merged["TaskName"].as_str(), merged["CreatedAt"].as_str()),
        (Some("say \"hi\""), Some("2026-11-26T10:00:00.2Z"))
    );
    names.cleanup().await;
}

#[tokio::test]
async fn group_records_are_gos_both_ways() {
    if !require(Service::Redis, "group_records_are_gos_both_ways") {
        return;
    }
    let names = Names::new("rk_groups");
    let backend = backend(&names).await;
    let group = format!("group_{}", names.id);
    let meta = GroupMeta::new(&group, vec![names.task(1), names.task(2)]);
    backend.init_group(&meta).await.unwrap();
    let value: Value = serde_json::from_slice(&raw_get(&group).await).unwrap();
    assert_eq!(
        value
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .len(),
        6,
        "{value}"
    );
    assert_eq!(value["TaskUUIDs"], json!([names.task(1), names.task(2)]));
    assert_eq!(value["ChordTriggered"], false);
    assert_eq!(backend.get_group(&group).await.unwrap().unwrap(), {
        let mut m = meta.clone();
        m.created_at = machinery::gotime::parse(value["CreatedAt"].as_str().unwrap()).unwrap();
        m
    });

    let mut conn = raw().await;
    for name in ["group_meta.json", "group_meta_chord_triggered.json"] {
        let bytes = fixture(name);
        let key = format!("group_{}_{name}", names.id);
        let _: () = conn.set(&key, &bytes).await.unwrap();
        assert_eq!(
            backend.get_group(&key).await.unwrap().unwrap(),
            GroupMeta::from_json(&bytes).unwrap(),
            "{name}"
        );
    }
    // group_states reads every member in group order, in one MGET.
    backend
        .set_state(&TaskState::success(&names.task(2), "add", vec![]))
        .await
        .unwrap();
    backend
        .set_state(&TaskState::failure(&names.task(1), "add", "no"))
        .await
        .unwrap();
    let states = backend.group_states(&group).await.unwrap();
    let order: Vec<&str> = states.iter().map(|s| s.task_uuid.as_str()).collect();
    assert_eq!(order, [names.task(1), names.task(2)]);
    names.cleanup().await;
}

#[tokio::test]
async fn waiting_is_woken_by_the_completion_notice_not_by_polling() {
    if !require(
        Service::Redis,
        "waiting_is_woken_by_the_completion_notice_not_by_polling",
    ) {
        return;
    }
    let names = Names::new("rk_wait");
    let waiter = backend(&names).await;
    let writer = backend(&names).await;
    let id = names.task(1);
    writer
        .set_state(&TaskState::pending(&id, "add"))
        .await
        .unwrap();
    let wait = {
        let waiter = waiter.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let state = waiter
                .wait_for_completion(&id, Duration::from_secs(10))
                .await;
            (state, Instant::now())
        })
    };
    // By 450 ms the poll fallback has slowed to 200 ms steps (10+20+40+80+160+200 ms...), so a wake-up
    // within a few milliseconds of the write can only come from the notification.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let written = Instant::now();
    writer
        .set_state(&TaskState::success(
            &id,
            "",
            vec![TaskResult::new("int64", json!(3))],
        ))
        .await
        .unwrap();
    let (state, woke) = wait.await.unwrap();
    let state = state.unwrap().unwrap();
    assert_eq!(state.state, State::Success);
    let latency = woke.duration_since(written);
    assert!(
        latency < Duration::from_millis(40),
        "woken {latency:?} after the write"
    );

    // A state written by Go (a plain SET, no notice) is still seen, by the slow poll.
    let go_id = names.task(2);
    let mut conn = raw().await;
    let go_writer = {
        let go_id = go_id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let bytes = String::from_utf8(fixture("state_success.json"))
                .unwrap()
                .replace("\"TaskUUID\":\"task_", &format!("\"TaskUUID\":\"{go_id}_"));
            let _: () = conn.set(&go_id, bytes).await.unwrap();
        })
    };
    let state = waiter
        .wait_for_completion(&go_id, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.state, State::Success);
    go_writer.await.unwrap();

    // Nobody is left subscribed once the waits are over.
    let channel = completion_channel(&id);
    wait_until(
        "the completion channel to be unsubscribed",
        Duration::from_secs(5),
        || {
            let channel = channel.clone();
            async move {
                let mut conn = raw().await;
                let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
                    .arg("NUMSUB")
                    .arg(&channel)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                counts.first().is_some_and(|(_, n)| *n == 0)
            }
        },
    )
    .await;
    // And a wait that times out returns the last state seen.
    let pending_id = names.task(3);
    waiter
        .set_state(&TaskState::pending(&pending_id, "add"))
        .await
        .unwrap();
    let started = Instant::now();
    let state = waiter
        .wait_for_completion(&pending_id, Duration::from_millis(100))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.state, State::Pending);
    assert!(started.elapsed() < Duration::from_millis(500));
    names.cleanup().await;
}

async fn chord_group(names: &Names, backend: &RedisBackend, size: usize) -> (String, Vec<String>) {
    let group = format!("group_{}", names.id);
    let members: Vec<String> = (0..size).map(|i| names.task(i)).collect();
    backend
        .init_group(&GroupMeta::new(&group, members.clone()))
        .await
        .unwrap();
    for member in &members {
        backend
            .set_state(&TaskState::pending(member, "add"))
            .await
            .unwrap();
    }
    (group, members)
}

#[tokio::test]
async fn the_chord_step_fires_exactly_once_under_concurrency() {
    if !require(
        Service::Redis,
        "the_chord_step_fires_exactly_once_under_concurrency",
    ) {
        return;
    }
    let names = Names::new("rk_chord");
    let first = backend(&names).await;
    let (group, members) = chord_group(&names, &first, 200).await;
    let fired = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..3 {
        let backend = backend(&names).await;
        let (group, members, fired) = (group.clone(), members.clone(), fired.clone());
        tasks.spawn(async move {
            // Every worker reports every member (as if each message were delivered three times).
            let mut order: Vec<&String> = members.iter().collect();
            order.rotate_left(worker * 67);
            for member in order {
                backend
                    .set_state(&TaskState::success(member, "", vec![]))
                    .await
                    .unwrap();
                if backend
                    .complete_group_member(&group, member, 200)
                    .await
                    .unwrap()
                {
                    fired.lock().unwrap().push(member.clone());
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    // Exactly one member completes the group. Its reports from the moment it did are all told to send
    // the callback (an earlier one, before the group was complete, is not); no other member's 597
    // reports are.
    let fired = fired.lock().unwrap().clone();
    assert!(
        (1..=3).contains(&fired.len()),
        "the winner's reports: {fired:?}"
    );
    assert!(
        fired.iter().all(|m| *m == fired[0]),
        "one winning member: {fired:?}"
    );
    let winner: Option<String> = raw()
        .await
        .hget(format!("machinery:chord:{group}"), "winner")
        .await
        .unwrap();
    assert_eq!(winner.as_ref(), Some(&fired[0]));
    assert!(first
        .complete_group_member(&group, &fired[0], 200)
        .await
        .unwrap());
    let loser = members.iter().find(|m| **m != fired[0]).unwrap();
    let meta = first.get_group(&group).await.unwrap().unwrap();
    assert!(
        meta.chord_triggered,
        "ChordTriggered set in Go's group record"
    );
    assert!(!first
        .complete_group_member(&group, loser, 200)
        .await
        .unwrap());
    first.purge_group(&group).await.unwrap();
    names.cleanup().await;
}

/// Issue 13: the winning call's reply can be lost (the connection dropped after the script ran); the
/// worker then calls again and must still be told to send the callback, while other members are not.
#[tokio::test]
async fn the_chord_winner_is_told_again_when_it_calls_again() {
    if !require(
        Service::Redis,
        "the_chord_winner_is_told_again_when_it_calls_again",
    ) {
        return;
    }
    let names = Names::new("rk_chordwin");
    let backend = backend(&names).await;
    let (group, members) = chord_group(&names, &backend, 3).await;
    let mut told = Vec::new();
    for member in members.iter().chain(&members).chain(&members) {
        backend
            .set_state(&TaskState::success(member, "", vec![]))
            .await
            .unwrap();
        told.push(
            backend
                .complete_group_member(&group, member, 3)
                .await
                .unwrap(),
        );
    }
    // Member 2 completed the group; its two later calls are told again, members 0 and 1 never.
    assert_eq!(
        told,
        [false, false, true, false, false, true, false, false, true]
    );
    let mut conn = raw().await;
    let progress = format!("machinery:chord:{group}");
    let winner: Option<String> = conn.hget(&progress, "winner").await.unwrap();
    assert_eq!(winner.as_deref(), Some(members[2].as_str()));
    let ttl: i64 = conn.ttl(&progress).await.unwrap();
    assert!((1..=300).contains(&ttl), "expires with the results: {ttl}");
    let text = String::from_utf8(raw_get(&group).await).unwrap();
    assert_eq!(text.matches("\"ChordTriggered\":true").count(), 1, "{text}");

    // A group Go fired has no winner of ours: its last member is told no, every time.
    let names2 = Names {
        id: format!("{}b", names.id),
        ..names.clone()
    };
    let (group2, members2) = chord_group(&names2, &backend, 1).await;
    let triggered = String::from_utf8(raw_get(&group2).await)
        .unwrap()
        .replace("\"ChordTriggered\":false", "\"ChordTriggered\":true");
    let _: () = conn.set(&group2, triggered).await.unwrap();
    for _ in 0..2 {
        assert!(!backend
            .complete_group_member(&group2, &members2[0], 1)
            .await
            .unwrap());
    }
    let winner2: Option<String> = conn
        .hget(format!("machinery:chord:{group2}"), "winner")
        .await
        .unwrap();
    assert_eq!(winner2, None);
    backend.purge_group(&group).await.unwrap();
    backend.purge_group(&group2).await.unwrap();
    names.cleanup().await;
}

#[tokio::test]
async fn the_chord_step_waits_for_gos_lock_and_counts_members_finished_by_go() {
    if !require(
        Service::Redis,
        "the_chord_step_waits_for_gos_lock_and_counts_members_finished_by_go",
    ) {
        return;
    }
    let names = Names::new("rk_chordgo");
    let backend = backend(&names).await;
    let (group, members) = chord_group(&names, &backend, 4).await;
    let mut conn = raw().await;
    // Members 0 and 2 were run by Go workers: they wrote SUCCESS and never call our chord step.
    for i in [0, 2] {
        let go_state = String::from_utf8(fixture("state_success.json"))
            .unwrap()
            .replace(
                "\"TaskUUID\":\"task_",
                &format!("\"TaskUUID\":\"{}_", members[i]),
            );
        let _: () = conn.set(&members[i], go_state).await.unwrap();
    }
    backend
        .set_state(&TaskState::success(&members[1], "", vec![]))
        .await
        .unwrap();
    assert!(
        !backend
            .complete_group_member(&group, &members[1], 4)
            .await
            .unwrap(),
        "member 3 still runs"
    );

    // A Go worker holds TriggerChordMutex (redsync: SET NX PX 8000) while our last member finishes.
    let lock_key = GO_CHORD_LOCK_KEY;
    let _: () = redis::cmd("SET")
        .arg(lock_key)
        .arg(&names.id)
        .arg("NX")
        .arg("PX")
        .arg(300)
        .query_async(&mut conn)
        .await
        .unwrap();
    backend
        .set_state(&TaskState::success(&members[3], "", vec![]))
        .await
        .unwrap();
    let started = Instant::now();
    assert!(
        backend
            .complete_group_member(&group, &members[3], 4)
            .await
            .unwrap(),
        "our last member completes the group"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "the step waited for Go's lock: {:?}",
        started.elapsed()
    );
    let text = String::from_utf8(raw_get(&group).await).unwrap();
    assert!(text.contains("\"ChordTriggered\":true"), "{text}");

    // A group Go already triggered is never triggered again by us.
    let (group2, members2) = {
        let names2 = Names {
            id: format!("{}b", names.id),
            ..names.clone()
        };
        chord_group(&names2, &backend, 1).await
    };
    let triggered = String::from_utf8(raw_get(&group2).await)
        .unwrap()
        .replace("\"ChordTriggered\":false", "\"ChordTriggered\":true");
    let _: () = conn.set(&group2, triggered).await.unwrap();
    backend
        .set_state(&TaskState::success(&members2[0], "", vec![]))
        .await
        .unwrap();
    assert!(!backend
        .complete_group_member(&group2, &members2[0], 1)
        .await
        .unwrap());
    backend.purge_group(&group).await.unwrap();
    backend.purge_group(&group2).await.unwrap();
    names.cleanup().await;
}

#[tokio::test]
async fn two_hundred_member_chords_under_three_workers_call_back_once() {
    if !require(
        Service::Redis,
        "two_hundred_member_chords_under_three_workers_call_back_once",
    ) {
        return;
    }
    let names = Names::new("rk_chords");
    let mut workers = Vec::new();
    for _ in 0..3 {
        let server = Server::new(names.config()).await.unwrap();
        workers.push(
            Worker::new(&server)
                .register(&ADD)
                .concurrency(8)
                .start()
                .await
                .unwrap(),
        );
    }
    let sender = Server::new(names.config()).await.unwrap();
    let chords = 2;
    let size = 200;
    let mut callbacks = Vec::new();
    for c in 0..chords {
        let group = format!("group_{}_{c}", names.id);
        let callback_id = format!("chord_{}_{c}", names.id);
        let members: Vec<String> = (0..size).map(|i| names.task(format!("{c}_{i}"))).collect();
        sender
            .backend()
            .init_group(&GroupMeta::new(&group, members.clone()))
            .await
            .unwrap();
        let callback: Signature = Signature::new("add").with_uuid(&callback_id);
        for (i, member) in members.iter().enumerate() {
            let mut sig: Signature =
                Signature::with_args("add", vec![int(i as i64), int(1)]).with_uuid(member);
            sig.group_uuid = group.clone();
            sig.group_task_count = size as u32;
            sig.chord_callback = Some(Box::new(callback.clone()));
            sender.send(sig).await.unwrap();
        }
        callbacks.push(callback_id);
    }
    let expected: i64 = (0..size as i64).map(|i| i + 1).sum();
    for callback in &callbacks {
        let result = sender.result::<i64>(callback.clone());
        assert_eq!(
            result.get(Duration::from_secs(60)).await.unwrap(),
            expected,
            "the callback got every member's result"
        );
    }
    for worker in workers {
        worker.shutdown(Duration::from_secs(10)).await.unwrap();
    }
    // Exactly one callback message per chord was published: each ran once and the queue is empty.
    let stats = sender
        .broker()
        .inspect()
        .unwrap()
        .queue_stats(&names.queue)
        .await
        .unwrap();
    assert_eq!(
        (stats.pending, stats.in_flight, stats.dead),
        (0, Some(0), Some(0))
    );
    let mut conn = raw().await;
    for (c, _) in callbacks.iter().enumerate() {
        let group = format!("group_{}_{c}", names.id);
        let text = String::from_utf8(raw_get(&group).await).unwrap();
        assert!(text.contains("\"ChordTriggered\":true"), "{text}");
        let finished: u64 = conn
            .scard(format!("machinery:chord:{group}:done"))
            .await
            .unwrap();
        assert_eq!(finished, size as u64);
    }
    names.cleanup().await;
}

#[tokio::test]
async fn received_is_refused_in_one_step_for_a_revoked_task() {
    if !require(
        Service::Redis,
        "received_is_refused_in_one_step_for_a_revoked_task",
    ) {
        return;
    }
    let names = Names::new("rk_revoke");
    let server = Server::new(names.config()).await.unwrap();
    let backend = server.backend();
    let live = names.task("live");
    let revoked = names.task("revoked");
    backend
        .set_state(&TaskState::pending(&live, "add"))
        .await
        .unwrap();
    backend
        .set_state(&TaskState::pending(&revoked, "add"))
        .await
        .unwrap();
    server.revoke(&revoked).await.unwrap();
    let before = raw_get(&revoked).await;

    assert!(backend
        .set_received(&TaskState::received(&live, ""))
        .await
        .unwrap());
    let state = backend.get_state(&live).await.unwrap().unwrap();
    assert_eq!(
        (state.state, state.task_name.as_str()),
        (State::Received, "add")
    );

    assert!(!backend
        .set_received(&TaskState::received(&revoked, ""))
        .await
        .unwrap());
    assert_eq!(
        raw_get(&revoked).await,
        before,
        "the revocation is left as it was"
    );
    let (received, started) = (
        TaskState::received(&revoked, ""),
        TaskState::started(&revoked, ""),
    );
    assert!(!backend
        .set_received_and_started(&received, &started)
        .await
        .unwrap());
    assert_eq!(
        raw_get(&revoked).await,
        before,
        "neither RECEIVED nor STARTED replaced it"
    );
    let (received, started) = (
        TaskState::received(&live, ""),
        TaskState::started(&live, ""),
    );
    assert!(backend
        .set_received_and_started(&received, &started)
        .await
        .unwrap());
    let state = backend.get_state(&live).await.unwrap().unwrap();
    assert_eq!(
        (state.state, state.task_name.as_str()),
        (State::Started, "add")
    );
    let state = backend.get_state(&revoked).await.unwrap().unwrap();
    assert!(state.is_revoked());
    assert_eq!(
        state.task_name, "add",
        "revoke keeps the sender's task name"
    );
    names.cleanup().await;
}

/// A worker's batch of STARTED writes answers for each task on its own: a revoked task is not started
/// (and keeps its revocation), nor is a task whose SUCCESS is stored (a second copy of its message: the
/// SUCCESS stays, results and all), a task whose id names a list is refused without touching the list,
/// and the tasks beside them are started.
#[tokio::test]
async fn a_batch_of_started_states_answers_for_each_task_on_its_own() {
    if !require(
        Service::Redis,
        "a_batch_of_started_states_answers_for_each_task_on_its_own",
    ) {
        return;
    }
    let names = Names::new("rbk_start_many");
    let backend = backend(&names).await;
    let id = |suffix: &str| format!("{}_{suffix}", names.id);
    let (first, revoked, listed, last) = (id("first"), id("revoked"), id("listed"), id("last"));
    let done = id("done");
    backend
        .set_state(&TaskState::revoked(&revoked))
        .await
        .unwrap();
    let success = TaskState::success(&done, "add", vec![TaskResult::new("int64", 5.into())]);
    backend.set_state(&success).await.unwrap();
    let done_before = raw_get(&done).await;
    let mut conn = raw().await;
    let _: () = conn.rpush(&listed, "x").await.unwrap();
    let started: Vec<TaskState> = [&first, &revoked, &listed, &done, &last]
        .into_iter()
        .map(|uuid| TaskState::started(uuid, "add"))
        .collect();
    let answers = backend.set_started_many(&started).await;
    assert_eq!(answers.len(), 5);
    assert!(matches!(answers[0], Ok(true)), "{:?}", answers[0]);
    assert!(matches!(answers[1], Ok(false)), "revoked: {:?}", answers[1]);
    let refusal = answers[2]
        .as_ref()
        .expect_err("the list is not a task state");
    assert!(refusal.to_string().contains("WRONGTYPE"), "{refusal}");
    assert!(
        matches!(answers[3], Ok(false)),
        "succeeded: {:?}",
        answers[3]
    );
    assert!(matches!(answers[4], Ok(true)), "{:?}", answers[4]);
    assert_eq!(
        raw_get(&done).await,
        done_before,
        "the SUCCESS stays as it was"
    );
    for uuid in [&first, &last] {
        let state = backend.get_state(uuid).await.unwrap().unwrap();
        assert_eq!(state.state, State::Started, "{uuid}");
    }
    let kept = backend.get_state(&revoked).await.unwrap().unwrap();
    assert_eq!(kept.state, State::Failure, "the revocation stays");
    let list: Vec<String> = conn.lrange(&listed, 0, -1).await.unwrap();
    assert_eq!(list, ["x"], "the list the id names is untouched");
    let _: () = conn
        .del(&[&first, &revoked, &listed, &done, &last])
        .await
        .unwrap();
}
