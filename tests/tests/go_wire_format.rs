//! The JSON captured byte for byte from Go machinery (`tests/fixtures/go/`, see its README) decodes, and
//! our encoding of the decoded values is equal to it as JSON values. Typed values read from Go's results
//! and Go-form values written from Rust values match the fixtures too.

use std::path::PathBuf;

use machinery::args::{decode_results, encode_result, ArgReader};
use machinery::{GroupMeta, Signature, State, TaskState};
use serde_json::Value;

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/go")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn fixture_names(prefix: &str) -> Vec<String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/go");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(prefix) && n.ends_with(".json"))
        .collect();
    names.sort();
    names
}

fn as_value(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

#[test]
fn every_signature_fixture_round_trips() {
    let names = fixture_names("signature_");
    assert_eq!(names.len(), 14, "{names:?}");
    for name in names {
        let bytes = fixture(&name);
        let sig = Signature::from_json(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!sig.uuid.is_empty() && !sig.name.is_empty(), "{name}");
        assert_eq!(
            as_value(&sig.to_json().unwrap()),
            as_value(&bytes),
            "{name}"
        );
    }
}

/// A state record with progress is Go's record plus one key: taking the key away leaves the fixture, and a
/// Go record (without it) has no progress and gains no key when written again.
#[test]
fn progress_is_one_extra_key_on_a_go_state_record() {
    for name in fixture_names("state_") {
        let bytes = fixture(&name);
        let go = TaskState::from_json(&bytes).unwrap();
        assert_eq!(go.progress, None, "{name}");
        let mut with_progress = go.clone();
        with_progress.progress = Some(serde_json::json!({"done": 3, "total": 10}));
        let mut written = as_value(&with_progress.to_json().unwrap());
        let object = written.as_object_mut().unwrap();
        assert_eq!(
            object.remove("Progress"),
            Some(serde_json::json!({"done": 3, "total": 10})),
            "{name}"
        );
        assert_eq!(written, as_value(&bytes), "{name}: the rest is Go's record");
        let read = TaskState::from_json(&with_progress.to_json().unwrap()).unwrap();
        assert_eq!(read, with_progress, "{name}");
    }
}

#[test]
fn every_state_fixture_round_trips() {
    let names = fixture_names("state_");
    assert_eq!(names.len(), 18, "{names:?}");
    for name in names {
        let bytes = fixture(&name);
        let state = TaskState::from_json(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            as_value(&state.to_json().unwrap()),
            as_value(&bytes),
            "{name}"
        );
    }
}

#[test]
fn group_meta_fixtures_round_trip() {
    for name in ["group_meta.json", "group_meta_chord_triggered.json"] {
        let bytes = fixture(name);
        let meta = GroupMeta::from_json(&bytes).unwrap();
        assert_eq!(
            as_value(&meta.to_json().unwrap()),
            as_value(&bytes),
            "{name}"
        );
    }
    let triggered = GroupMeta::from_json(&fixture("group_meta_chord_triggered.json")).unwrap();
    assert!(triggered.chord_triggered);
    assert_eq!(triggered.task_uuids.len(), 2);
}

#[test]
fn go_args_read_as_rust_parameters() {
    let add = Signature::from_json(&fixture("signature_add.json")).unwrap();
    let mut reader = ArgReader::new("add", &add.args, 2, false);
    assert_eq!(
        (reader.next::<i64>().unwrap(), reader.next::<i64>().unwrap()),
        (40, 2)
    );
    reader.finish().unwrap();

    // A Go variadic call (`multiply(2, 4, 11)` from the chord) reads into a trailing Vec.
    let multiply =
        Signature::from_json(&fixture("signature_variadic_multiply_callback.json")).unwrap();
    let mut reader = ArgReader::new("multiply", &multiply.args, 1, true);
    assert_eq!(reader.rest::<i64>().unwrap(), vec![2, 4, 11]);

    // The slice-plus-extra fixture that Go rejects: a `sum(xs: Vec<i64>)` task takes both in order.
    let sum = Signature::from_json(&fixture("signature_slice_arg.json")).unwrap();
    let mut reader = ArgReader::new("sum", &sum.args, 1, true);
    assert_eq!(reader.rest::<i64>().unwrap(), vec![1, 2, 3, 5]);

    // A two-parameter task is told exactly what is wrong.
    let mut reader = ArgReader::new("sum", &sum.args, 2, false);
    let err = reader.next::<i64>().unwrap_err();
    assert_eq!(
        err.to_string(),
        "task sum: argument 1: expected int64, got []int64 [1,2,3]"
    );
}

#[test]
fn go_callbacks_and_chains_decode_with_their_nesting() {
    let chain = Signature::from_json(&fixture("signature_chain.json")).unwrap();
    let mut names = vec![chain.name.clone()];
    let mut step = &chain;
    while let Some(next) = step.on_success.first() {
        names.push(next.name.clone());
        step = next;
    }
    assert_eq!(names, ["add", "add", "add", "multiply"]);
    assert!(chain.on_success[0]
        .headers
        .as_ref()
        .is_some_and(|h| h.is_empty()));
    let plain = Signature::from_json(&fixture("signature_chain_nested_headers_null.json")).unwrap();
    assert!(plain.on_success[0].headers.is_none());

    let chord_member = Signature::from_json(&fixture("signature_chord_member.json")).unwrap();
    let callback = chord_member.chord_callback.as_ref().unwrap();
    assert_eq!((callback.name.as_str(), callback.args.len()), ("sum", 0));
    assert_eq!(chord_member.group_task_count, 2);

    let on_error = Signature::from_json(&fixture("signature_on_error_callback.json")).unwrap();
    assert_eq!(on_error.args[0].value, "fail: boom");

    let delayed = Signature::from_json(&fixture("signature_delayed_eta.json")).unwrap();
    assert_eq!(
        machinery::gotime::format(&delayed.eta.unwrap()),
        "2026-11-26T14:10:43.198869492Z"
    );
    let retry = Signature::from_json(&fixture("signature_retry.json")).unwrap();
    assert_eq!((retry.retry_count, retry.retry_timeout), (0, 1));
}

fn results_of(name: &str) -> TaskState {
    TaskState::from_json(&fixture(name)).unwrap()
}

fn results(state: &TaskState) -> &[machinery::TaskResult] {
    state.results.as_deref().unwrap()
}

#[test]
fn go_results_read_as_rust_types() {
    let s = results_of("state_success.json");
    assert_eq!(decode_results::<i64>(results(&s)).unwrap(), 2);
    let s = results_of("state_success_string.json");
    assert_eq!(
        decode_results::<String>(results(&s)).unwrap(),
        "Hello Gopher!"
    );
    let s = results_of("state_success_float64.json");
    assert_eq!(decode_results::<f64>(results(&s)).unwrap(), 0.1 + 0.2);
    let s = results_of("state_success_float64_integral.json");
    assert_eq!(decode_results::<f64>(results(&s)).unwrap(), 3.0);
    let s = results_of("state_success_bool.json");
    assert!(decode_results::<bool>(results(&s)).unwrap());
    let s = results_of("state_success_uint64.json");
    assert_eq!(decode_results::<u64>(results(&s)).unwrap(), u64::MAX);
    let s = results_of("state_success_bytes.json");
    assert_eq!(decode_results::<Vec<u8>>(results(&s)).unwrap(), b"hello");
    let s = results_of("state_success_string_slice.json");
    assert_eq!(
        decode_results::<Vec<String>>(results(&s)).unwrap(),
        ["foo", "bär", "<&>"]
    );
    let s = results_of("state_success_int32.json");
    assert_eq!(decode_results::<i32>(results(&s)).unwrap(), -42);
    let s = results_of("state_success_two_values.json");
    assert_eq!(
        decode_results::<(String, String)>(results(&s)).unwrap(),
        ("foo".into(), "bar".into())
    );
    let s = results_of("state_success_no_values.json");
    decode_results::<()>(results(&s)).unwrap();

    let failure = results_of("state_failure_panic.json");
    assert_eq!(
        (failure.state, failure.error.as_str(), failure.results),
        (State::Failure, "oops", None)
    );
    assert!(decode_results::<String>(results(&results_of("state_success_bool.json"))).is_err());
}

#[test]
fn rust_values_encode_as_go_writes_them() {
    let check = |fixture_name: &str, encoded: machinery::TaskResult| {
        let state = results_of(fixture_name);
        assert_eq!(results(&state)[0], encoded, "{fixture_name}");
    };
    check("state_success.json", encode_result(&2i64).unwrap());
    check(
        "state_success_string.json",
        encode_result(&"Hello Gopher!".to_string()).unwrap(),
    );
    check(
        "state_success_float64.json",
        encode_result(&(0.1f64 + 0.2)).unwrap(),
    );
    check(
        "state_success_float64_integral.json",
        encode_result(&3.0f64).unwrap(),
    );
    check("state_success_bool.json", encode_result(&true).unwrap());
    check(
        "state_success_uint64.json",
        encode_result(&u64::MAX).unwrap(),
    );
    check(
        "state_success_bytes.json",
        encode_result(&b"hello".to_vec()).unwrap(),
    );
    let strings: Vec<String> = vec!["foo".into(), "bär".into(), "<&>".into()];
    check(
        "state_success_string_slice.json",
        encode_result(&strings).unwrap(),
    );
    check("state_success_int32.json", encode_result(&-42i32).unwrap());
}

#[test]
fn timestamps_keep_go_precision() {
    let short = results_of("state_pending_created_at_short_fraction.json");
    assert_eq!(
        machinery::gotime::format(&short.created_at),
        "2026-11-26T14:23:29.28644458Z"
    );
    let received = results_of("state_received.json");
    assert_eq!(received.state, State::Received);
}
