use super::*;
use serde_json::json;

#[test]
fn a_message_that_is_not_utf8_is_an_error_saying_where() {
    let mut body = br#"{"UUID":"task_1","Name":"ad"#.to_vec();
    body.push(0xff);
    body.extend_from_slice(br#""}"#);
    let error = Signature::from_json(&body).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("invalid unicode code point at line 1 column 28"),
        "{error}"
    );
    let text = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(
        Signature::from_json(text.as_bytes()).unwrap().name,
        "ad\u{fffd}"
    );
}

#[test]
fn reads_keys_in_any_case_and_ignores_unknown_ones() {
    let sig: Signature = serde_json::from_str(
        r#"{"uuid":"task_1","name":"add","args":[{"type":"int64","value":1}],"extra":{"x":1},"retrycount":2}"#,
    )
    .unwrap();
    assert_eq!(sig.uuid, "task_1");
    assert_eq!(sig.name, "add");
    assert_eq!(sig.args, vec![Arg::new("", "int64", json!(1))]);
    assert_eq!(sig.retry_count, 2);
}

#[test]
fn nulls_are_zero_values() {
    let sig: Signature = serde_json::from_str(
        r#"{"UUID":null,"Name":"x","ETA":null,"Args":null,"Headers":null,"OnSuccess":null,"Priority":null}"#,
    )
    .unwrap();
    assert_eq!(sig.uuid, "");
    assert!(sig.args.is_empty() && sig.headers.is_none() && sig.eta.is_none());
}

#[test]
fn new_ids_are_a_prefix_and_a_hyphenated_lower_case_uuid4() {
    for (id, prefix) in [
        (new_task_uuid(), "task_"),
        (new_group_uuid(), "group_"),
        (new_chord_uuid(), "chord_"),
    ] {
        let rest = id.strip_prefix(prefix).expect(prefix);
        let uuid = uuid::Uuid::parse_str(rest).unwrap();
        assert_eq!(uuid.get_version_num(), 4);
        assert_eq!(rest, uuid.to_string(), "written as Display writes it");
    }
    assert_ne!(new_task_uuid(), new_task_uuid());
}

#[test]
fn writes_every_key_in_go_order() {
    let json =
        String::from_utf8(Signature::new("add").with_uuid("task_1").to_json().unwrap()).unwrap();
    assert_eq!(
        json,
        r#"{"UUID":"task_1","Name":"add","RoutingKey":"","ETA":null,"GroupUUID":"","GroupTaskCount":0,"Args":null,"Headers":null,"Priority":0,"Immutable":false,"RetryCount":0,"RetryTimeout":0,"OnSuccess":null,"OnError":null,"ChordCallback":null,"BrokerMessageGroupId":"","SQSReceiptHandle":"","StopTaskDeletionOnError":false,"IgnoreWhenTaskNotRegistered":false}"#
    );
}

#[test]
fn malformed_messages_are_errors() {
    assert!(Signature::from_json(b"not json").is_err());
    assert!(Signature::from_json(b"null").is_err());
    assert!(Signature::from_json(br#"{"ETA":"tomorrow"}"#).is_err());
    assert!(Signature::from_json(br#"{"Priority":300}"#).is_err());
}

#[test]
fn unreadable_argument_values_are_kept_as_text() {
    let body =
        br#"{"Name":"add","Args":[{"Type":"int64","Value":1},{"Type":"int64","Value":1e400}]}"#;
    let sig = Signature::from_json(body).unwrap();
    assert_eq!(sig.args[0].unreadable(), None);
    assert_eq!(sig.args[1].unreadable(), Some("number out of range"));
    let again = String::from_utf8(sig.to_json().unwrap()).unwrap();
    assert!(
        again.contains(r#"{"Name":"","Type":"int64","Value":1e400}"#),
        "{again}"
    );
    let deep = format!(
        r#"{{"Args":[{{"Type":"json","Value":{}{}}}]}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let sig = Signature::from_json(deep.as_bytes()).unwrap();
    assert_eq!(
        sig.args[0].unreadable(),
        Some("nested too deeply (more than 128 levels)")
    );
}

/// A chain of `steps` as Go writes it, built without recursion.
fn chain_json(steps: usize) -> String {
    let mut text = String::new();
    for i in 0..steps {
        text.push_str(&format!(
            r#"{{"UUID":"task_{i}","Name":"step","OnSuccess":["#
        ));
    }
    text.push_str(r#"{"Name":"last","Args":[{"Type":"int64","Value":1}]}"#);
    for _ in 0..steps {
        text.push_str("]}");
    }
    text
}

#[test]
fn ten_thousand_step_chains_decode_encode_clone_and_drop_on_a_small_stack() {
    // 256 KiB: smaller than any thread a worker runs on.
    let worker = std::thread::Builder::new().stack_size(256 * 1024);
    let handle = worker
        .spawn(|| {
            let sig = Signature::from_json(chain_json(10_000).as_bytes()).unwrap();
            let mut at = &sig;
            let mut length = 1;
            while let Some(next) = at.on_success.first() {
                at = next;
                length += 1;
            }
            assert_eq!((length, at.name.as_str()), (10_001, "last"));
            let json = sig.to_json().unwrap();
            let copy = sig.clone();
            assert!(copy == sig);
            assert!(format!("{copy:?}").len() > 10_000);
            let again = Signature::from_json(&json).unwrap();
            assert_eq!(again.to_json().unwrap(), json);
        })
        .unwrap();
    handle.join().unwrap();
}

#[test]
fn deep_free_form_values_are_refused_by_name() {
    let levels = 100_000;
    let deep = format!("{}{}", "[".repeat(levels), "]".repeat(levels));
    let body = format!(r#"{{"Args":[{{"Type":"json","Value":{deep}}}]}}"#);
    let sig = Signature::from_json(body.as_bytes()).unwrap();
    assert_eq!(
        sig.args[0].unreadable(),
        Some("nested too deeply (more than 128 levels)")
    );
    let body = format!(r#"{{"Headers":{{"x":{deep}}}}}"#);
    let error = Signature::from_json(body.as_bytes()).unwrap_err();
    assert!(
        error.to_string().starts_with("Headers: nested too deeply"),
        "{error}"
    );
    // Deep nesting where a signature's fields hold no free-form value is a type error, not a stack
    // overflow.
    let body = format!(r#"{{"OnSuccess":{deep}}}"#);
    assert!(Signature::from_json(body.as_bytes()).is_err());
    let body = format!(r#"{{"Unknown":{deep},"Name":"x"}}"#);
    assert_eq!(Signature::from_json(body.as_bytes()).unwrap().name, "x");
}

#[test]
fn numbers_keep_the_text_they_were_sent_as() {
    let body =
        br#"{"Args":[{"Type":"int64","Value":-0},{"Type":"int64","Value":-9223372036854775809}]}"#;
    let sig = Signature::from_json(body).unwrap();
    assert_eq!(sig.args[0].value, json!(0));
    assert_eq!(sig.args[1].unreadable(), None);
    let again = String::from_utf8(sig.to_json().unwrap()).unwrap();
    assert!(
        again.contains(r#""Value":-9223372036854775809}"#),
        "{again}"
    );
    let error = Signature::from_json(br#"{"RetryCount":1e30}"#).unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("RetryCount: integer 1e30 out of range"),
        "{error}"
    );
}

#[test]
fn deserializers_that_cannot_lend_their_text_read_the_same_signature() {
    // `from_json` borrows the text of integer fields and `Headers`; a `Value` or a reader cannot
    // lend it, and must read the same fields and give the same errors.
    let body = r#"{"UUID":"task_1","RetryCount":3,"Priority":2.0,"Headers":{"a":[1]}}"#;
    let value: Value = serde_json::from_str(body).unwrap();
    for sig in [
        Signature::from_json(body.as_bytes()).unwrap(),
        serde_json::from_value::<Signature>(value).unwrap(),
        serde_json::from_reader::<_, Signature>(body.as_bytes()).unwrap(),
    ] {
        assert_eq!(
            (sig.uuid.as_str(), sig.retry_count, sig.priority),
            ("task_1", 3, 2)
        );
        assert_eq!(sig.header_value("a"), Some(&json!([1])));
    }
    let error = serde_json::from_reader::<_, Signature>(&br#"{"RetryCount":1e30}"#[..])
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("RetryCount: integer 1e30 out of range"),
        "{error}"
    );
}

#[test]
fn long_names_are_cut_when_quoted() {
    assert_eq!(Signature::new("a\nb").quoted_name(), r#""a\nb""#);
    let long = Signature::new("n".repeat(10_240)).quoted_name();
    assert_eq!(
        long,
        format!("\"{}…\" (a name of 10240 bytes)", "n".repeat(100))
    );
}

#[test]
fn retry_timeout_rounds_up_to_whole_seconds() {
    assert_eq!(
        Signature::new("x")
            .retry_timeout(Duration::from_millis(1500))
            .retry_timeout,
        2
    );
    assert_eq!(
        Signature::new("x")
            .retry_timeout(Duration::from_secs(3))
            .retry_timeout,
        3
    );
}
