//! The wire decoders never panic (issue 13, decoder robustness): arbitrary bytes and random mutations of
//! the JSON captured from Go machinery (`tests/fixtures/go/`) go through the Signature, TaskState and
//! GroupMeta decoders, the argument reader and the result decoder; each answers with a value or an error.
//! Then a worker is handed a batch of such mutated messages and must dead-letter what it cannot read, with
//! a reason, and keep serving.

use std::path::PathBuf;
use std::time::Duration;

use machinery::args::{decode_results, ArgReader};
use machinery::broker::Outgoing;
use machinery::{GroupMeta, Server, Signature, TaskState, Worker};
use machinery_tests::tasks::probe;
use proptest::collection::vec;
use proptest::prelude::*;

fn fixtures() -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/go");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("fixtures/go")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let fixtures: Vec<Vec<u8>> = files
        .iter()
        .map(|p| std::fs::read(p).expect("read"))
        .collect();
    assert!(fixtures.len() >= 30, "found {} fixtures", fixtures.len());
    fixtures
}

/// One change to a message's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, byte: u8 },
    Delete { at: usize, len: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Duplicate { at: usize, len: usize },
    Truncate { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    // Bytes that JSON cares about, more often than chance would pick them.
    let byte = prop_oneof![
        any::<u8>(),
        prop::sample::select(b"{}[]\":,\\0123456789-.eE tfn".to_vec()),
    ];
    prop_oneof![
        (any::<usize>(), byte.clone()).prop_map(|(at, byte)| Mutation::Flip { at, byte }),
        (any::<usize>(), 1..40usize).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), vec(byte, 1..16)).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1..200usize).prop_map(|(at, len)| Mutation::Duplicate { at, len }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

fn apply(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let n = bytes.len().max(1);
        match m {
            Mutation::Flip { at, byte } => {
                if let Some(b) = bytes.get_mut(at % n) {
                    *b = *byte;
                }
            }
            Mutation::Delete { at, len } => {
                let start = (at % n).min(bytes.len());
                let end = (start + len).min(bytes.len());
                bytes.drain(start..end);
            }
            Mutation::Insert { at, bytes: new } => {
                let at = (at % n).min(bytes.len());
                bytes.splice(at..at, new.iter().copied());
            }
            Mutation::Duplicate { at, len } => {
                let start = (at % n).min(bytes.len());
                let end = (start + len).min(bytes.len());
                let copy = bytes[start..end].to_vec();
                bytes.splice(end..end, copy);
            }
            Mutation::Truncate { at } => bytes.truncate(at % n),
        }
    }
    bytes
}

/// Every decoder a worker or a sender runs on bytes from the network.
fn decode_everything(bytes: &[u8]) {
    let _ = GroupMeta::from_json(bytes);
    if let Ok(signature) = Signature::from_json(bytes) {
        let mut reader = ArgReader::new(&signature.name, &signature.args, 2, true);
        let _ = reader.next::<i64>();
        let _ = reader.rest::<String>();
        let _ = reader.finish();
        let mut reader = ArgReader::new(&signature.name, &signature.args, 3, false);
        let _ = reader.next::<Vec<u8>>();
        let _ = reader.next::<f64>();
        let _ = reader.next::<serde_json::Value>();
        let _ = signature.to_json();
    }
    if let Ok(state) = TaskState::from_json(bytes) {
        let results = state.results.clone().unwrap_or_default();
        let _ = decode_results::<i64>(&results);
        let _ = decode_results::<String>(&results);
        let _ = decode_results::<Vec<u8>>(&results);
        let _ = decode_results::<(i64, String)>(&results);
        let _ = decode_results::<()>(&results);
        let _ = decode_results::<Vec<f64>>(&results);
        let _ = decode_results::<serde_json::Value>(&results);
        let _ = state.to_json();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_a_decoder(bytes in vec(any::<u8>(), 0..600)) {
        decode_everything(&bytes);
    }

    #[test]
    fn mutated_go_messages_never_panic_a_decoder(
        pick in any::<prop::sample::Index>(),
        mutations in vec(mutation(), 1..6),
    ) {
        let fixtures = fixtures();
        let original = fixtures[pick.index(fixtures.len())].clone();
        decode_everything(&apply(original, &mutations));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dead_letters_mangled_messages_with_a_reason_and_keeps_serving() {
    let server = Server::new(machinery::Config::default()).await.unwrap();
    let queue = server.config().default_queue.clone();
    let worker = Worker::new(&server)
        .register(probe::task())
        .concurrency(4)
        .start()
        .await
        .unwrap();
    // Deterministic mangling of the Signature fixtures: every third byte of the first 40 flipped to a
    // quote, or the message cut in half.
    let signatures: Vec<Vec<u8>> = fixtures()
        .into_iter()
        .filter(|f| f.starts_with(b"{\"UUID\""))
        .collect();
    assert!(signatures.len() >= 10);
    let mut sent = 0;
    for (n, original) in signatures.iter().enumerate() {
        let mangled = if n % 2 == 0 {
            apply(
                original.clone(),
                &[Mutation::Truncate {
                    at: original.len() / 2,
                }],
            )
        } else {
            apply(
                original.clone(),
                &(0..40)
                    .step_by(3)
                    .map(|at| Mutation::Flip { at, byte: b'"' })
                    .collect::<Vec<_>>(),
            )
        };
        assert!(
            Signature::from_json(&mangled).is_err(),
            "still decodes: {n}"
        );
        server
            .broker()
            .publish(Outgoing {
                uuid: "",
                name: "",
                routing_key: &queue,
                body: mangled,
                eta: None,
                priority: 0,
                headers: Default::default(),
            })
            .await
            .unwrap();
        sent += 1;
    }
    let ok = probe::send(&server, "mangled", 5, 0).await.unwrap();
    assert_eq!(
        ok.get(Duration::from_secs(10)).await.unwrap(),
        5,
        "the worker keeps serving"
    );
    let dead = server
        .broker()
        .inspect()
        .unwrap()
        .dead_letters(&queue, 100)
        .await
        .unwrap();
    assert_eq!(dead.len(), sent, "every mangled message is dead-lettered");
    for letter in &dead {
        assert!(
            letter.reason.starts_with("malformed message"),
            "{}",
            letter.reason
        );
    }
    worker.shutdown(Duration::from_secs(10)).await.unwrap();
}
