//! The house rules of `machinery/src` (docs/architecture.md, "The rooms"), checked on the source text so
//! that they stay kept:
//! 1. a transport room (`memory/`, `redis/`, `amqp/`, `memcache/`) never imports another one;
//! 2. `wire/` imports nothing of the crate outside itself;
//! 3. the engine reaches transports only through the traits and `connect`: it never names a transport
//!    room or a concrete transport type;
//! 4. the broker and backend traits do not name each other, and nothing downcasts a trait object
//!    (`as_any`, or a downcast to a transport type);
//! 5. no source file has more than 600 lines before its unit tests.
//!
//! Each rule is also run against a made-up file that breaks it, so a check that can no longer fail is
//! noticed.

use std::fs;
use std::path::{Path, PathBuf};

const ROOMS: [&str; 4] = ["memory", "redis", "amqp", "memcache"];
const ENGINE: [&str; 9] = [
    "server.rs",
    "worker",
    "workflow.rs",
    "result.rs",
    "periodic.rs",
    "task.rs",
    "retry.rs",
    "telemetry",
    "__private.rs",
];
const TRANSPORT_TYPES: [&str; 10] = [
    "MemoryBroker",
    "MemoryBackend",
    "MemoryLock",
    "RedisBroker",
    "RedisBackend",
    "RedisLock",
    "AmqpBroker",
    "AmqpBackend",
    "MemcacheBackend",
    "NullBackend",
];
const MAX_LINES: usize = 600;

/// One source file: its path below `src/` (with `/` separators) and its code, comments removed.
struct Source {
    path: String,
    code: String,
    lines_before_tests: usize,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../machinery/src")
}

fn sources() -> Vec<Source> {
    let root = src_dir();
    let mut files = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("read machinery/src") {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = fs::read_to_string(&path).expect("read a source file");
                let relative = path.strip_prefix(&root).expect("below src");
                files.push(source(
                    &relative.to_string_lossy().replace('\\', "/"),
                    &text,
                ));
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    assert!(
        files.len() > 30,
        "found only {} files under {}",
        files.len(),
        root.display()
    );
    files
}

fn source(path: &str, text: &str) -> Source {
    let code = text
        .lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let lines_before_tests = text
        .lines()
        .position(|line| line.trim_end() == "#[cfg(test)]")
        .unwrap_or_else(|| text.lines().count());
    Source {
        path: path.to_owned(),
        code,
        lines_before_tests,
    }
}

/// The room a file belongs to: its first path component without `.rs`.
fn room(path: &str) -> &str {
    let first = path.split('/').next().unwrap_or(path);
    first.strip_suffix(".rs").unwrap_or(first)
}

/// The crate modules a file's code names, as `crate::<module>` (imports and paths alike), with `super::`
/// paths that climb out of the room resolved to the crate root.
fn crate_modules(source: &Source) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = source.code.as_str();
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.push(name);
        }
        rest = after;
    }
    // `super::super::x` from `room/sub/file.rs`, or `super::x` from `room.rs`/`room/mod.rs`, leaves the room.
    let depth = source.path.matches('/').count();
    let is_mod = source.path.ends_with("mod.rs") || !source.path.contains('/');
    let climbs_out = if is_mod { depth } else { depth + 1 };
    let prefix = "super::".repeat(climbs_out.max(1));
    if climbs_out >= 1 {
        let mut rest = source.code.as_str();
        while let Some(at) = rest.find(&prefix) {
            let after = &rest[at + prefix.len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && !source.path.starts_with(&format!("{name}/")) {
                found.push(name);
            }
            rest = after;
        }
    }
    found
}

fn words(code: &str) -> impl Iterator<Item = &str> {
    code.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
}

/// Rule 1: the transport rooms a room's file names, other than its own.
fn rule1(source: &Source) -> Vec<String> {
    let own = room(&source.path);
    if !ROOMS.contains(&own) {
        return Vec::new();
    }
    crate_modules(source)
        .into_iter()
        .filter(|module| ROOMS.contains(&module.as_str()) && module != own)
        .map(|module| format!("{} imports the {module} room", source.path))
        .collect()
}

/// Rule 2: what a `wire/` file names of the crate outside `wire`.
fn rule2(source: &Source) -> Vec<String> {
    if room(&source.path) != "wire" {
        return Vec::new();
    }
    crate_modules(source)
        .into_iter()
        .filter(|module| module != "wire")
        .map(|module| format!("{} (wire) imports crate::{module}", source.path))
        .collect()
}

/// Rule 3: transport rooms and concrete transport types an engine file names.
fn rule3(source: &Source) -> Vec<String> {
    if !ENGINE.contains(&room(&source.path)) && !ENGINE.contains(&source.path.as_str()) {
        return Vec::new();
    }
    let rooms = crate_modules(source)
        .into_iter()
        .filter(|module| ROOMS.contains(&module.as_str()))
        .map(|module| format!("{} (engine) names the {module} room", source.path));
    let types = words(&source.code)
        .filter(|word| TRANSPORT_TYPES.contains(word))
        .map(|word| format!("{} (engine) names {word}", source.path));
    rooms.chain(types).collect()
}

/// Rule 4: the broker and backend traits naming each other, and downcasts of trait objects.
fn rule4(source: &Source) -> Vec<String> {
    let mut found = Vec::new();
    let forbidden: &[&str] = match source.path.as_str() {
        "broker.rs" => &["Backend", "BackendError", "backend"],
        "backend.rs" => &["Broker", "BrokerError", "broker"],
        _ => &[],
    };
    // The trait files keep re-export modules at the old paths (after the traits); only the traits count.
    let traits = source
        .code
        .split("pub use crate::connect::")
        .next()
        .unwrap_or("");
    for word in words(traits) {
        if forbidden.contains(&word) {
            found.push(format!("{} names {word}", source.path));
        }
    }
    for word in words(&source.code) {
        if word == "as_any" {
            found.push(format!("{} uses as_any", source.path));
        }
    }
    for ty in TRANSPORT_TYPES {
        for pattern in [format!("downcast::<{ty}"), format!("downcast_ref::<{ty}")] {
            if source.code.contains(&pattern) {
                found.push(format!("{} downcasts to {ty}", source.path));
            }
        }
    }
    found
}

/// Rule 5: files longer than [`MAX_LINES`] before their unit tests.
fn rule5(source: &Source) -> Vec<String> {
    if source.lines_before_tests > MAX_LINES {
        vec![format!(
            "{} has {} lines before its tests (at most {MAX_LINES})",
            source.path, source.lines_before_tests
        )]
    } else {
        Vec::new()
    }
}

type Rule = fn(&Source) -> Vec<String>;
const RULES: [(&str, Rule); 5] = [
    ("1: rooms stay apart", rule1),
    ("2: wire imports nothing above it", rule2),
    ("3: the engine names no transport", rule3),
    ("4: traits apart, no downcasts", rule4),
    ("5: files of at most 600 lines", rule5),
];

#[test]
fn the_source_tree_keeps_the_house_rules() {
    let sources = sources();
    let mut broken = Vec::new();
    for (name, rule) in RULES {
        for source in &sources {
            for finding in rule(source) {
                broken.push(format!("rule {name}: {finding}"));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[test]
fn each_rule_catches_a_file_that_breaks_it() {
    let cases: [(&str, &str, Rule); 9] = [
        (
            "amqp/backend/mod.rs",
            "use crate::redis::RedisBackend;",
            rule1,
        ),
        (
            "memcache/client/conn.rs",
            "use super::super::super::memory::MemoryLock;",
            rule1,
        ),
        ("wire/state.rs", "use crate::config::Config;", rule2),
        (
            "wire/args/read.rs",
            "use super::super::super::broker::Outgoing;",
            rule2,
        ),
        ("worker/process.rs", "use crate::redis::conn;", rule3),
        ("server.rs", "let b: Arc<RedisBroker> = todo!();", rule3),
        ("broker.rs", "fn f(b: &dyn Backend) {}", rule4),
        (
            "redis/broker/mod.rs",
            "x.downcast_ref::<RedisBackend>()",
            rule4,
        ),
        ("task.rs", &"let x = 1;\n".repeat(MAX_LINES + 1), rule5),
    ];
    for (path, code, rule) in cases {
        let found = rule(&source(path, code));
        assert!(
            !found.is_empty(),
            "{path} with {:?} was not caught",
            code.lines().next()
        );
    }
    // And what the rules allow stays allowed.
    let allowed: [(&str, &str, Rule); 5] = [
        ("redis/broker/mod.rs", "use super::backend::RedisBackend; use crate::broker::Broker;", rule1),
        ("wire/signature.rs", "use super::tolerant::Lenient; use crate::wire::gotime;", rule2),
        ("worker/process.rs", "use crate::broker::Delivery; // RedisBroker in a comment", rule3),
        ("broker.rs", "fn f(s: &TaskState) {}\npub use crate::connect::broker;\npub mod redis { pub use crate::redis::RedisBroker; }", rule4),
        ("task.rs", &"let x = 1;\n".repeat(MAX_LINES), rule5),
    ];
    for (path, code, rule) in allowed {
        assert_eq!(rule(&source(path, code)), Vec::<String>::new(), "{path}");
    }
}
