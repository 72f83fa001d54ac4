//! The memcached result backend against real memcached servers (`scripts/services.sh up` starts them on
//! 127.0.0.1:11211 and :11212): Go's records at Go's keys, state merging, groups, exactly-once chords,
//! expiry, size limits, and gomemcache's key placement over two servers, read back from each server
//! directly.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use machinery::backend::memcache::{server_index, MemcacheBackend, CHORD_PROGRESS_SUFFIX};
use machinery::backend::{Backend, BackendError};
use machinery::signature::{new_group_uuid, new_task_uuid};
use machinery::{
    task, Chord, Config, Group, GroupMeta, Server, State, TaskError, TaskResult, TaskState, Worker,
};
use machinery_tests::{eventually, require, unique, Service};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(30);

fn backend_on(servers: &[Service], expire_in: Duration) -> MemcacheBackend {
    MemcacheBackend::new(servers.iter().map(|s| s.addr()).collect(), expire_in)
}

fn single() -> MemcacheBackend {
    backend_on(&[Service::Memcached], Duration::from_secs(600))
}

/// Reads `key` from one server directly, bypassing the backend (and its choice of server).
async fn raw_get(addr: &str, key: &str) -> Option<Vec<u8>> {
    let stream = TcpStream::connect(addr)
        .await
        .expect("connect to memcached");
    let mut io = BufReader::new(stream);
    io.get_mut()
        .write_all(format!("get {key}\r\n").as_bytes())
        .await
        .unwrap();
    let mut header = String::new();
    io.read_line(&mut header).await.unwrap();
    if header == "END\r\n" {
        return None;
    }
    let len: usize = header
        .split_whitespace()
        .nth(3)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected reply {header:?}"));
    let mut value = vec![0; len + 2];
    io.read_exact(&mut value).await.unwrap();
    value.truncate(len);
    Some(value)
}

/// Writes `key` on one server directly, as a Go client would.
async fn raw_set(addr: &str, key: &str, value: &[u8]) {
    let stream = TcpStream::connect(addr)
        .await
        .expect("connect to memcached");
    let mut io = BufReader::new(stream);
    let mut request = format!("set {key} 0 600 {}\r\n", value.len()).into_bytes();
    request.extend_from_slice(value);
    request.extend_from_slice(b"\r\n");
    io.get_mut().write_all(&request).await.unwrap();
    let mut reply = String::new();
    io.read_line(&mut reply).await.unwrap();
    assert_eq!(reply, "STORED\r\n");
}

fn fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/go")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test]
async fn states_go_from_pending_to_success_keeping_the_task_name_and_creation_time() {
    if !require(Service::Memcached, "memcache states") {
        return;
    }
    let backend = single();
    let uuid = new_task_uuid();
    let pending = TaskState::pending(&uuid, "add");
    backend.set_state(&pending).await.unwrap();
    assert_eq!(backend.get_state(&uuid).await.unwrap().unwrap(), pending);

    // Worker-side states, built as Go builds them: no name, zero creation time.
    for state in [
        TaskState::received(&uuid, ""),
        TaskState::started(&uuid, ""),
        TaskState::success(&uuid, "", vec![TaskResult::new("int64", json!(2))]),
    ] {
        backend.set_state(&state).await.unwrap();
        let stored = backend.get_state(&uuid).await.unwrap().unwrap();
        assert_eq!(stored.state, state.state);
        assert_eq!(stored.task_name, "add", "{}", state.state);
        assert_eq!(stored.created_at, pending.created_at, "{}", state.state);
    }

    // The record is Go's TaskState JSON, all seven keys, at the bare task uuid.
    let raw: Value =
        serde_json::from_slice(&raw_get(&Service::Memcached.addr(), &uuid).await.unwrap()).unwrap();
    let keys: HashSet<&str> = raw
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        HashSet::from([
            "TaskUUID",
            "TaskName",
            "State",
            "Results",
            "Error",
            "CreatedAt",
            "TTL"
        ])
    );
    assert_eq!(raw["State"], "SUCCESS");
    assert_eq!(raw["Results"], json!([{"Type": "int64", "Value": 2}]));
    assert_eq!(raw["TTL"], 0);
}

#[tokio::test]
async fn failure_and_retry_states_are_stored_with_their_error_and_null_results() {
    if !require(Service::Memcached, "memcache failure states") {
        return;
    }
    let backend = single();
    let uuid = new_task_uuid();
    backend
        .set_state(&TaskState::pending(&uuid, "flaky"))
        .await
        .unwrap();
    backend
        .set_state(&TaskState::retry(&uuid, ""))
        .await
        .unwrap();
    assert_eq!(
        backend.get_state(&uuid).await.unwrap().unwrap().state,
        State::Retry
    );
    backend
        .set_state(&TaskState::failure(&uuid, "", "boom: disk full"))
        .await
        .unwrap();
    let stored = backend.get_state(&uuid).await.unwrap().unwrap();
    assert_eq!(stored.state, State::Failure);
    assert_eq!(stored.error, "boom: disk full");
    assert_eq!(stored.task_name, "flaky");
    assert!(stored.results.is_none());
    assert!(stored.is_completed());
    let raw: Value =
        serde_json::from_slice(&raw_get(&Service::Memcached.addr(), &uuid).await.unwrap()).unwrap();
    assert!(raw["Results"].is_null());
}

#[tokio::test]
async fn records_written_by_go_are_read() {
    if !require(Service::Memcached, "memcache reads Go records") {
        return;
    }
    let backend = single();
    for name in [
        "state_success.json",
        "state_failure.json",
        "state_pending.json",
    ] {
        let bytes = fixture(name);
        let expected = TaskState::from_json(&bytes).unwrap();
        // Fixtures share uuids; store each under a fresh key, as Go would under its own uuid.
        let key = new_task_uuid();
        raw_set(&Service::Memcached.addr(), &key, &bytes).await;
        let read = backend.get_state(&key).await.unwrap().unwrap();
        assert_eq!(read, expected, "{name}");
    }
    let bytes = fixture("group_meta.json");
    let key = new_group_uuid();
    raw_set(&Service::Memcached.addr(), &key, &bytes).await;
    let meta = backend.get_group(&key).await.unwrap().unwrap();
    assert_eq!(meta, GroupMeta::from_json(&bytes).unwrap());

    raw_set(&Service::Memcached.addr(), &key, b"{not json").await;
    let error = backend.get_group(&key).await.unwrap_err();
    assert!(
        matches!(error, BackendError::Decode { .. }) && error.to_string().contains(&key),
        "{error}"
    );
}

#[tokio::test]
async fn received_is_not_stored_over_a_revocation_or_a_success() {
    if !require(Service::Memcached, "memcache revocation") {
        return;
    }
    let backend = single();
    let uuid = new_task_uuid();
    backend
        .set_state(&TaskState::pending(&uuid, "cancel_me"))
        .await
        .unwrap();
    assert!(backend
        .set_received(&TaskState::received(&uuid, "cancel_me"))
        .await
        .unwrap());
    assert_eq!(
        backend.get_state(&uuid).await.unwrap().unwrap().state,
        State::Received
    );
    backend.set_state(&TaskState::revoked(&uuid)).await.unwrap();
    assert!(!backend
        .set_received(&TaskState::received(&uuid, "cancel_me"))
        .await
        .unwrap());
    let stored = backend.get_state(&uuid).await.unwrap().unwrap();
    assert!(stored.is_revoked(), "{stored:?}");
    assert_eq!(stored.task_name, "cancel_me");

    // A second copy of a message whose task succeeded neither starts nor hides the SUCCESS.
    let done = TaskState::success(&uuid, "cancel_me", vec![TaskResult::new("int64", 3.into())]);
    backend.set_state(&done).await.unwrap();
    let (received, started) = (
        TaskState::received(&uuid, "cancel_me"),
        TaskState::started(&uuid, "cancel_me"),
    );
    assert!(!backend
        .set_received_and_started(&received, &started)
        .await
        .unwrap());
    let stored = backend.get_state(&uuid).await.unwrap().unwrap();
    assert_eq!(
        (stored.state, stored.results),
        (State::Success, done.results)
    );
}

#[tokio::test]
async fn concurrent_writers_never_lose_the_task_name_or_creation_time() {
    if !require(Service::Memcached, "memcache concurrent merges") {
        return;
    }
    let backend = Arc::new(single());
    let uuid = new_task_uuid();
    let pending = TaskState::pending(&uuid, "busy");
    backend.set_state(&pending).await.unwrap();
    let mut writers = tokio::task::JoinSet::new();
    for i in 0..40 {
        let (backend, uuid) = (backend.clone(), uuid.clone());
        writers.spawn(async move {
            let state = if i % 2 == 0 {
                TaskState::received(&uuid, "")
            } else {
                TaskState::started(&uuid, "")
            };
            backend.set_state(&state).await
        });
    }
    while let Some(joined) = writers.join_next().await {
        joined.unwrap().unwrap();
    }
    let stored = backend.get_state(&uuid).await.unwrap().unwrap();
    assert_eq!(stored.task_name, "busy");
    assert_eq!(stored.created_at, pending.created_at);
}

#[tokio::test]
async fn groups_keep_their_record_and_member_states_in_group_order() {
    if !require(Service::Memcached, "memcache groups") {
        return;
    }
    let backend = single();
    let group = new_group_uuid();
    let members: Vec<String> = (0..150).map(|_| new_task_uuid()).collect();
    let meta = GroupMeta::new(&group, members.clone());
    backend.init_group(&meta).await.unwrap();
    assert_eq!(backend.get_group(&group).await.unwrap().unwrap(), meta);
    assert!(backend
        .get_group(&new_group_uuid())
        .await
        .unwrap()
        .is_none());

    // Written in reverse order, one member left without a state.
    for (i, uuid) in members.iter().enumerate().rev().skip(1) {
        backend
            .set_state(&TaskState::success(
                uuid,
                "sq",
                vec![TaskResult::new("int64", json!(i))],
            ))
            .await
            .unwrap();
    }
    let states = backend.group_states(&group).await.unwrap();
    assert_eq!(states.len(), members.len() - 1);
    let order: Vec<&str> = states.iter().map(|s| s.task_uuid.as_str()).collect();
    let expected: Vec<&str> = members[..members.len() - 1]
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(order, expected);
    assert_eq!(states[7].results.as_deref().unwrap()[0].value, json!(7));

    let error = backend.group_states(&new_group_uuid()).await.unwrap_err();
    assert!(matches!(error, BackendError::UnknownGroup(_)), "{error}");
}

/// The core of the exactly-once guarantee: 200 members completed concurrently, a third of them twice
/// (redeliveries), by as many tasks as a few workers would run: exactly one call gets `true`, only once
/// every member is counted, and `ChordTriggered` ends up set.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_200_member_chord_completes_exactly_once_under_concurrent_and_repeated_calls() {
    if !require(Service::Memcached, "memcache chord exactly once") {
        return;
    }
    let backend = Arc::new(single());
    let group = new_group_uuid();
    let members: Vec<String> = (0..200).map(|_| new_task_uuid()).collect();
    backend
        .init_group(&GroupMeta::new(&group, members.clone()))
        .await
        .unwrap();

    // First 199 members (some twice), all concurrently: nobody may win yet.
    let mut calls = tokio::task::JoinSet::new();
    for (i, uuid) in members[..199].iter().enumerate() {
        let repeats = if i % 3 == 0 { 2 } else { 1 };
        for _ in 0..repeats {
            let (backend, group, uuid) = (backend.clone(), group.clone(), uuid.clone());
            calls.spawn(async move { backend.complete_group_member(&group, &uuid, 200).await });
        }
    }
    while let Some(joined) = calls.join_next().await {
        assert!(
            !joined.unwrap().unwrap(),
            "the chord fired before its last member"
        );
    }
    assert!(
        !backend
            .get_group(&group)
            .await
            .unwrap()
            .unwrap()
            .chord_triggered
    );

    // The last member, racing with redeliveries of others and with itself: exactly one winner.
    let winners = Arc::new(Mutex::new(Vec::new()));
    // The last member is delivered twice at once (a duplicate delivery): still one winner.
    let last = (199, &members[199]);
    for (i, uuid) in members.iter().enumerate().rev().take(60).chain([last]) {
        let (backend, group, uuid, winners) = (
            backend.clone(),
            group.clone(),
            uuid.clone(),
            winners.clone(),
        );
        calls.spawn(async move {
            if backend.complete_group_member(&group, &uuid, 200).await? {
                winners.lock().unwrap().push(i);
            }
            Ok::<_, BackendError>(false)
        });
    }
    while let Some(joined) = calls.join_next().await {
        joined.unwrap().unwrap();
    }
    // Only the last member is told to send the callback. Its two copies race: the one that completed
    // the group is told so unless the other, finding itself named the winner, set the chord's flag
    // first; then that other copy is told instead. Either way at least one copy is, and no other member.
    let winners = winners.lock().unwrap().clone();
    assert!(
        !winners.is_empty() && winners.len() <= 2 && winners.iter().all(|&i| i == 199),
        "winners: {winners:?}"
    );
    assert!(
        backend
            .get_group(&group)
            .await
            .unwrap()
            .unwrap()
            .chord_triggered
    );

    // Afterwards every other member's call gets false; the winning member's (a redelivery, or a retry
    // after its answer was lost) gets true again, so the callback is not lost.
    assert!(!backend
        .complete_group_member(&group, &members[0], 200)
        .await
        .unwrap());
    assert!(backend
        .complete_group_member(&group, &members[199], 200)
        .await
        .unwrap());
}

#[tokio::test]
async fn completing_a_member_of_an_unknown_group_or_a_stranger_is_an_error() {
    if !require(Service::Memcached, "memcache chord errors") {
        return;
    }
    let backend = single();
    let error = backend
        .complete_group_member(&new_group_uuid(), &new_task_uuid(), 2)
        .await
        .unwrap_err();
    assert!(matches!(error, BackendError::UnknownGroup(_)), "{error}");
    let group = new_group_uuid();
    backend
        .init_group(&GroupMeta::new(&group, vec![new_task_uuid()]))
        .await
        .unwrap();
    let stranger = new_task_uuid();
    let error = backend
        .complete_group_member(&group, &stranger, 1)
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains(&stranger) && error.to_string().contains("not a member"),
        "{error}"
    );
}

#[tokio::test]
async fn records_expire_after_results_expire_in() {
    if !require(Service::Memcached, "memcache expiry") {
        return;
    }
    let backend = backend_on(&[Service::Memcached], Duration::from_secs(2));
    let uuid = new_task_uuid();
    let group = new_group_uuid();
    backend
        .set_state(&TaskState::pending(&uuid, "short_lived"))
        .await
        .unwrap();
    backend
        .init_group(&GroupMeta::new(&group, vec![uuid.clone()]))
        .await
        .unwrap();
    let written = tokio::time::Instant::now();
    assert!(backend.get_state(&uuid).await.unwrap().is_some());
    let gone = eventually(Duration::from_secs(10), || async {
        backend.get_state(&uuid).await.unwrap().is_none()
            && backend.get_group(&group).await.unwrap().is_none()
    })
    .await;
    assert!(gone, "records still there 10 s after a 2 s expiry");
    // memcached's clock ticks in whole seconds: a 2 s expiry ends after more than 1 s.
    assert!(written.elapsed() > Duration::from_secs(1));
}

#[tokio::test]
async fn an_expiry_beyond_30_days_is_sent_as_a_unix_time_and_keeps_the_record() {
    if !require(Service::Memcached, "memcache long expiry") {
        return;
    }
    // Sent as plain seconds, 40 days would be read as a unix time in 1970: expired at once.
    let backend = backend_on(&[Service::Memcached], Duration::from_secs(40 * 24 * 3600));
    let uuid = new_task_uuid();
    backend
        .set_state(&TaskState::pending(&uuid, "long_lived"))
        .await
        .unwrap();
    assert!(backend.get_state(&uuid).await.unwrap().is_some());
    backend.purge_state(&uuid).await.unwrap();
}

#[tokio::test]
async fn records_over_the_item_size_limit_are_refused_with_a_clear_error() {
    if !require(Service::Memcached, "memcache size limit") {
        return;
    }
    let backend = single();
    let uuid = new_task_uuid();
    backend
        .set_state(&TaskState::pending(&uuid, "big"))
        .await
        .unwrap();
    let huge = TaskState::success(
        &uuid,
        "big",
        vec![TaskResult::new(
            "string",
            json!("x".repeat(2 * 1024 * 1024)),
        )],
    );
    let error = backend.set_state(&huge).await.unwrap_err();
    match &error {
        BackendError::TooLarge { key, size, limit } => {
            assert_eq!(key, &uuid);
            assert!(*size > 2 * 1024 * 1024);
            assert!(*limit < 1024 * 1024 && *limit > 1_000_000, "{limit}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(error.to_string().contains("bytes; the limit is"), "{error}");
    // Nothing was silently half-written: the previous record is intact.
    assert_eq!(
        backend.get_state(&uuid).await.unwrap().unwrap().state,
        State::Pending
    );

    // Just over the limit for this key is refused before sending; just under is stored. (Complete
    // states, with name and creation time, are written as they are, without a merge.)
    let BackendError::TooLarge { limit, .. } = error else {
        unreachable!()
    };
    let created_at = TaskState::pending(&uuid, "big").created_at;
    let success_with = |text: String| {
        let mut state =
            TaskState::success(&uuid, "big", vec![TaskResult::new("string", json!(text))]);
        state.created_at = created_at;
        state
    };
    let overhead = success_with(String::new()).to_json().unwrap().len();
    let fits = success_with("y".repeat(limit - overhead));
    assert_eq!(fits.to_json().unwrap().len(), limit);
    backend.set_state(&fits).await.unwrap();
    assert_eq!(backend.get_state(&uuid).await.unwrap().unwrap(), fits);
    let over = success_with("y".repeat(limit - overhead + 1));
    assert!(matches!(
        backend.set_state(&over).await,
        Err(BackendError::TooLarge { .. })
    ));

    // A group record over the limit (about 25 000 members) too.
    let members: Vec<String> = (0..26_000).map(|_| new_task_uuid()).collect();
    let error = backend
        .init_group(&GroupMeta::new(new_group_uuid(), members))
        .await
        .unwrap_err();
    assert!(matches!(error, BackendError::TooLarge { .. }), "{error}");
    backend.purge_state(&uuid).await.unwrap();
}

#[tokio::test]
async fn purging_removes_states_groups_and_chord_progress() {
    if !require(Service::Memcached, "memcache purge") {
        return;
    }
    let backend = single();
    let (a, b) = (new_task_uuid(), new_task_uuid());
    let group = new_group_uuid();
    backend
        .init_group(&GroupMeta::new(&group, vec![a.clone(), b.clone()]))
        .await
        .unwrap();
    backend
        .set_state(&TaskState::pending(&a, "x"))
        .await
        .unwrap();
    assert!(!backend.complete_group_member(&group, &a, 2).await.unwrap());
    let progress = format!("{group}{CHORD_PROGRESS_SUFFIX}");
    let addr = Service::Memcached.addr();
    assert!(raw_get(&addr, &progress).await.is_some());

    backend.purge_state(&a).await.unwrap();
    backend.purge_group(&group).await.unwrap();
    assert!(backend.get_state(&a).await.unwrap().is_none());
    assert!(backend.get_group(&group).await.unwrap().is_none());
    assert!(raw_get(&addr, &progress).await.is_none());
    // Purging what is not there is fine.
    backend.purge_state(&b).await.unwrap();
    backend.purge_group(&group).await.unwrap();
}

#[tokio::test]
async fn waiting_for_completion_polls_until_the_final_state() {
    if !require(Service::Memcached, "memcache wait") {
        return;
    }
    let backend = Arc::new(single());
    let uuid = new_task_uuid();
    backend
        .set_state(&TaskState::pending(&uuid, "slow"))
        .await
        .unwrap();
    let writer = {
        let (backend, uuid) = (backend.clone(), uuid.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            backend
                .set_state(&TaskState::success(&uuid, "", vec![]))
                .await
        })
    };
    let state = backend
        .wait_for_completion(&uuid, WAIT)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.state, State::Success);
    assert_eq!(state.task_name, "slow");
    writer.await.unwrap().unwrap();

    let started = tokio::time::Instant::now();
    let missing = backend
        .wait_for_completion(&new_task_uuid(), Duration::from_millis(200))
        .await
        .unwrap();
    assert!(missing.is_none());
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Keys go where gomemcache's `ServerList` puts them: crc32 IEEE of the key modulo the number of
/// servers, in URL order. Checked by reading every record back from each server directly.
#[tokio::test]
async fn two_servers_hold_each_key_where_gomemcache_would_look_for_it() {
    if !require(Service::Memcached, "memcache two servers")
        || !require(Service::Memcached2, "memcache two servers")
    {
        return;
    }
    let servers = [Service::Memcached.addr(), Service::Memcached2.addr()];
    // Placement of fixed keys, with crc32 values computed independently (Python's zlib.crc32).
    for (key, crc, server) in [
        (
            "task_00000000-0000-4000-8000-000000000001",
            0x9834_145c_u32,
            0,
        ),
        ("group_00000000-0000-4000-8000-000000000002", 0x31b0_b71a, 0),
        ("task_a", 0xbfbd_8b6f, 1),
        ("task_d", 0xcfd7_7fe0, 0),
    ] {
        assert_eq!(crc as usize % 2, server);
        assert_eq!(server_index(key, 2), server, "{key}");
    }

    let config = Config::new(
        "memory://",
        format!("memcache://{},{}", servers[0], servers[1]),
    );
    let server = Server::new(config).await.unwrap();
    let backend = server.backend();
    assert_eq!(backend.kind(), "memcache");

    let fixed = "task_00000000-0000-4000-8000-000000000001".to_owned();
    let mut uuids: Vec<String> = (0..40).map(|_| new_task_uuid()).collect();
    uuids.push(fixed.clone());
    let group = new_group_uuid();
    backend
        .init_group(&GroupMeta::new(&group, uuids.clone()))
        .await
        .unwrap();
    for uuid in &uuids {
        backend
            .set_state(&TaskState::pending(uuid, "spread"))
            .await
            .unwrap();
    }
    let mut per_server = [0usize; 2];
    for key in uuids.iter().chain([&group]) {
        let home = server_index(key, 2);
        per_server[home] += 1;
        assert!(
            raw_get(&servers[home], key).await.is_some(),
            "{key} is not on server {home} ({})",
            servers[home]
        );
        assert!(
            raw_get(&servers[1 - home], key).await.is_none(),
            "{key} is also on server {} ({})",
            1 - home,
            servers[1 - home]
        );
    }
    assert!(per_server[0] > 0 && per_server[1] > 0, "{per_server:?}");

    // Group reads gather members from both servers, in group order.
    let states = backend.group_states(&group).await.unwrap();
    let order: Vec<&String> = states.iter().map(|s| &s.task_uuid).collect();
    assert_eq!(order, uuids.iter().collect::<Vec<_>>());

    for uuid in &uuids {
        backend.purge_state(uuid).await.unwrap();
    }
    backend.purge_group(&group).await.unwrap();
    assert!(raw_get(&servers[0], &fixed).await.is_none());
}

#[tokio::test]
async fn a_batch_of_states_is_written_to_both_servers_and_merged_where_needed() {
    if !require(Service::Memcached, "memcache set_states")
        || !require(Service::Memcached2, "memcache set_states")
    {
        return;
    }
    let backend = backend_on(
        &[Service::Memcached, Service::Memcached2],
        Duration::from_secs(600),
    );
    let uuids: Vec<String> = (0..250).map(|_| new_task_uuid()).collect();
    // What a group's sender writes: PENDING for every member (pipelined per server).
    let pending: Vec<TaskState> = uuids
        .iter()
        .map(|u| TaskState::pending(u, "batch"))
        .collect();
    backend.set_states(&pending).await.unwrap();
    for (uuid, state) in uuids.iter().zip(&pending) {
        assert_eq!(backend.get_state(uuid).await.unwrap().as_ref(), Some(state));
    }
    // A mixed batch: worker-side states are merged; a task named twice keeps its order.
    let mut mixed: Vec<TaskState> = uuids[..10]
        .iter()
        .map(|u| TaskState::received(u, ""))
        .collect();
    mixed.push(TaskState::started(&uuids[0], ""));
    backend.set_states(&mixed).await.unwrap();
    let first = backend.get_state(&uuids[0]).await.unwrap().unwrap();
    assert_eq!(first.state, State::Started);
    assert_eq!(
        (first.task_name.as_str(), first.created_at),
        ("batch", pending[0].created_at)
    );
    let ninth = backend.get_state(&uuids[9]).await.unwrap().unwrap();
    assert_eq!(ninth.state, State::Received);
    assert_eq!(ninth.task_name, "batch");

    // One state too large refuses the batch with TooLarge before anything is sent.
    let (fits, huge) = (new_task_uuid(), new_task_uuid());
    let mut too_large = TaskState::pending(&huge, "batch");
    too_large.error = "e".repeat(2 * 1024 * 1024);
    let error = backend
        .set_states(&[TaskState::pending(&fits, "batch"), too_large])
        .await
        .unwrap_err();
    assert!(backend.get_state(&fits).await.unwrap().is_none());
    assert!(matches!(error, BackendError::TooLarge { .. }), "{error}");
}

/// The winning member's call can fail after it completed the group but before it set `ChordTriggered`
/// (say, the connection dropped); its retry must still fire the chord, once.
#[tokio::test]
async fn a_retry_of_the_winning_call_fires_the_chord_if_the_first_did_not_set_the_flag() {
    if !require(Service::Memcached, "memcache chord winner retry") {
        return;
    }
    let backend = single();
    let group = new_group_uuid();
    let (a, b) = (new_task_uuid(), new_task_uuid());
    backend
        .init_group(&GroupMeta::new(&group, vec![a.clone(), b.clone()]))
        .await
        .unwrap();
    assert!(!backend.complete_group_member(&group, &a, 2).await.unwrap());
    assert!(backend.complete_group_member(&group, &b, 2).await.unwrap());
    // Undo the flag, as if the winning call had failed before setting it.
    let mut meta = backend.get_group(&group).await.unwrap().unwrap();
    assert!(meta.chord_triggered);
    meta.chord_triggered = false;
    backend.init_group(&meta).await.unwrap();
    assert!(!backend.complete_group_member(&group, &a, 2).await.unwrap());
    assert!(backend.complete_group_member(&group, &b, 2).await.unwrap());
    // And once more (its answer lost after the flag was set): still the winner, still told so.
    assert!(backend.complete_group_member(&group, &b, 2).await.unwrap());
    assert!(!backend.complete_group_member(&group, &a, 2).await.unwrap());
    assert!(
        backend
            .get_group(&group)
            .await
            .unwrap()
            .unwrap()
            .chord_triggered
    );
}

#[tokio::test]
async fn a_chord_over_two_servers_fires_once() {
    if !require(Service::Memcached, "memcache two-server chord")
        || !require(Service::Memcached2, "memcache two-server chord")
    {
        return;
    }
    let backend = Arc::new(backend_on(
        &[Service::Memcached, Service::Memcached2],
        Duration::from_secs(600),
    ));
    let group = new_group_uuid();
    let members: Vec<String> = (0..50).map(|_| new_task_uuid()).collect();
    backend
        .init_group(&GroupMeta::new(&group, members.clone()))
        .await
        .unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for uuid in members.iter().chain(members.iter().take(10)) {
        let (backend, group, uuid) = (backend.clone(), group.clone(), uuid.clone());
        calls.spawn(async move {
            let won = backend.complete_group_member(&group, &uuid, 50).await?;
            Ok::<_, BackendError>((uuid, won))
        });
    }
    let mut wins = Vec::new();
    while let Some(joined) = calls.join_next().await {
        let (uuid, won) = joined.unwrap().unwrap();
        if won {
            wins.push(uuid);
        }
    }
    // One winning member; a copy of it that came after the completing call is told too.
    assert!(
        (1..=2).contains(&wins.len()) && wins.iter().all(|w| *w == wins[0]),
        "{wins:?}"
    );
    assert!(backend
        .complete_group_member(&group, &wins[0], 50)
        .await
        .unwrap());
    let other = members.iter().find(|m| **m != wins[0]).unwrap();
    assert!(!backend
        .complete_group_member(&group, other, 50)
        .await
        .unwrap());
    assert!(
        backend
            .get_group(&group)
            .await
            .unwrap()
            .unwrap()
            .chord_triggered
    );
}

/// A memcached of this test's own on a free port, ended when dropped; `None` (after printing `SKIPPED`,
/// or panicking when services are required) if the binary is missing.
async fn own_memcached(port: u16) -> Option<tokio::process::Child> {
    let spawned = tokio::process::Command::new("memcached")
        // -u is required when running as root and ignored otherwise.
        .args(["-u", "root", "-l", "127.0.0.1", "-U", "0", "-m", "16", "-p"])
        .arg(port.to_string())
        .kill_on_drop(true)
        .spawn();
    let child = match spawned {
        Ok(child) => child,
        Err(error) if machinery_tests::services_required() => {
            panic!("cannot start memcached: {error}")
        }
        Err(error) => {
            eprintln!("SKIPPED cannot start memcached: {error}");
            return None;
        }
    };
    let addr = format!("127.0.0.1:{port}");
    let up = eventually(Duration::from_secs(10), || async {
        TcpStream::connect(&addr).await.is_ok()
    })
    .await;
    assert!(up, "memcached did not come up on {addr}");
    Some(child)
}

/// After a memcached restart every pooled connection is dead: reads go on working at once (a read that
/// meets a dead connection is tried again on a new one, and the dead pool is dropped), and writes work
/// again by the next call.
#[tokio::test]
async fn the_backend_recovers_from_a_server_restart() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let Some(mut first) = own_memcached(port).await else {
        return;
    };
    let backend = Arc::new(MemcacheBackend::new(
        vec![format!("127.0.0.1:{port}")],
        Duration::from_secs(600),
    ));
    // Fill the pool with several connections.
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let backend = backend.clone();
        calls.spawn(async move {
            let uuid = new_task_uuid();
            backend
                .set_state(&TaskState::pending(&uuid, "before"))
                .await?;
            backend.get_state(&uuid).await
        });
    }
    while let Some(joined) = calls.join_next().await {
        assert!(joined.unwrap().unwrap().is_some());
    }
    first.kill().await.unwrap();
    let Some(_second) = own_memcached(port).await else {
        return;
    };

    let uuid = new_task_uuid();
    assert!(backend.get_state(&uuid).await.unwrap().is_none());
    backend
        .set_state(&TaskState::pending(&uuid, "after"))
        .await
        .unwrap();
    backend
        .set_state(&TaskState::started(&uuid, ""))
        .await
        .unwrap();
    let stored = backend.get_state(&uuid).await.unwrap().unwrap();
    assert_eq!(
        (stored.state, stored.task_name.as_str()),
        (State::Started, "after")
    );
}

#[tokio::test]
async fn connecting_reports_bad_urls_and_unreachable_servers() {
    let error = Server::new(Config::new("memory://", "memcache://"))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("empty server address"),
        "{error}"
    );

    // Nothing listens on port 1 of the loopback address.
    let error = Server::new(Config::new("memory://", "memcache://127.0.0.1:1"))
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("cannot connect to result backend memcache://127.0.0.1:1"),
        "{text}"
    );
    assert!(
        machinery::backend::supported_schemes().contains(&"memcache://"),
        "memcache:// is not among the supported schemes"
    );
}

// ---------------------------------------------------------------------------------------------------
// Worker-level: real workers and `#[task]` functions, the memory broker, the memcache backend.

#[task]
async fn memcache_square(x: i64) -> Result<i64, TaskError> {
    tokio::task::yield_now().await;
    Ok(x * x)
}

static COLLECT_CALLS: AtomicUsize = AtomicUsize::new(0);
static COLLECTED: Mutex<Vec<i64>> = Mutex::new(Vec::new());

#[task]
async fn memcache_collect(squares: Vec<i64>) -> Result<i64, TaskError> {
    COLLECT_CALLS.fetch_add(1, Ordering::SeqCst);
    let sum = squares.iter().sum();
    *COLLECTED.lock().unwrap() = squares;
    Ok(sum)
}

static HUGE_RUNS: AtomicUsize = AtomicUsize::new(0);

#[task]
async fn memcache_huge() -> Result<String, TaskError> {
    HUGE_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok("z".repeat(2 * 1024 * 1024))
}

#[task]
async fn memcache_greet(name: String) -> Result<String, TaskError> {
    Ok(format!("Hi, {name}"))
}

fn memory_broker_memcache_backend(name: &str) -> Config {
    Config::new(
        format!("memory://{}", unique(name)),
        Service::Memcached.url(),
    )
}

#[tokio::test]
async fn a_task_result_comes_back_through_memcached() {
    if !require(Service::Memcached, "memcache worker send/get") {
        return;
    }
    let server = Server::new(memory_broker_memcache_backend("memcache_greet"))
        .await
        .unwrap();
    let worker = Worker::new(&server)
        .register(memcache_greet::task())
        .start()
        .await
        .unwrap();
    let result = memcache_greet::send(&server, "memcached").await.unwrap();
    assert_eq!(result.get(WAIT).await.unwrap(), "Hi, memcached");
    let state = server
        .backend()
        .get_state(result.uuid())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.task_name, "memcache_greet");
    assert_eq!(state.state, State::Success);
    worker.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// Three workers on one shared memory broker run a 200-member chord whose records live in memcached;
/// the callback runs exactly once, with every member's result in group order.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn three_workers_run_a_200_member_chord_and_its_callback_runs_once() {
    if !require(Service::Memcached, "memcache worker chord") {
        return;
    }
    let server = Server::new(memory_broker_memcache_backend("memcache_chord"))
        .await
        .unwrap();
    let mut workers = Vec::new();
    for _ in 0..3 {
        let worker = Worker::new(&server)
            .register(memcache_square::task())
            .register(memcache_collect::task())
            .concurrency(8)
            .start()
            .await
            .unwrap();
        workers.push(worker);
    }

    let group = Group::new((0..200).map(memcache_square::signature));
    let chord = server
        .send_chord(Chord::new(group, memcache_collect::partial()))
        .await
        .unwrap();
    let expected: Vec<i64> = (0..200).map(|i| i * i).collect();
    assert_eq!(chord.get(WAIT).await.unwrap(), expected.iter().sum::<i64>());
    assert_eq!(*COLLECTED.lock().unwrap(), expected);
    let group_uuid = chord.group().group_uuid().to_owned();
    assert!(
        server
            .backend()
            .get_group(&group_uuid)
            .await
            .unwrap()
            .unwrap()
            .chord_triggered
    );
    // Every member had completed before the callback was sent; stop the workers (finishing anything in
    // flight) and count.
    for worker in workers {
        worker.shutdown(Duration::from_secs(10)).await.unwrap();
    }
    assert_eq!(COLLECT_CALLS.load(Ordering::SeqCst), 1);
}

/// A result too large for memcached fails the task with the reason, once; it is not dropped silently
/// and the message is not run again and again.
#[tokio::test]
async fn a_result_too_large_for_memcached_fails_the_task_with_the_reason() {
    if !require(Service::Memcached, "memcache worker too large") {
        return;
    }
    let server = Server::new(memory_broker_memcache_backend("memcache_huge"))
        .await
        .unwrap();
    let worker = Worker::new(&server)
        .register(memcache_huge::task())
        .concurrency(1)
        .start()
        .await
        .unwrap();
    let result = memcache_huge::send(&server).await.unwrap();
    let error = result.get(WAIT).await.unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("cannot be stored") && text.contains("the limit is"),
        "{text}"
    );
    let state = server
        .backend()
        .get_state(result.uuid())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.state, State::Failure);
    assert_eq!(state.task_name, "memcache_huge");
    worker.shutdown(Duration::from_secs(10)).await.unwrap();
    assert_eq!(HUGE_RUNS.load(Ordering::SeqCst), 1);
}
