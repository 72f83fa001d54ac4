//! Helpers shared by the CLI test files: running the binary and reading its tables and JSON.

#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

pub mod web;
pub mod webdriver;

/// What one run of the binary gave.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Asserts exit status 0 and returns stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "expected success: {self:#?}");
        assert!(
            !self.stdout.contains('\x1b'),
            "colour codes in piped output: {self:#?}"
        );
        &self.stdout
    }

    /// Asserts exit status 0 and parses stdout as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.ok())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }

    /// Asserts this exit status and a message on stderr containing `text`.
    pub fn fails(&self, code: i32, text: &str) {
        assert_eq!(self.code, code, "{self:#?}");
        assert!(
            self.stderr.contains(text),
            "stderr lacks {text:?}: {self:#?}"
        );
    }
}

/// Runs `machinery <args>` with exactly the environment `env`.
pub async fn machinery(args: &[&str], env: &HashMap<String, String>) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_machinery"));
    cmd.args(args).env_clear().envs(env);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("machinery did not finish within 60 s")
        .expect("cannot run machinery");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The line of a table whose first column is `first`, split into columns.
pub fn row<'a>(table: &'a str, first: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&first))
        .unwrap_or_else(|| panic!("no row {first:?} in\n{table}"))
}

/// The object of a JSON array whose `key` is `value`.
pub fn find<'a>(rows: &'a Value, key: &str, value: &str) -> &'a Value {
    rows.as_array()
        .expect("a JSON array")
        .iter()
        .find(|row| row[key] == value)
        .unwrap_or_else(|| panic!("no {key} = {value:?} in {rows:#}"))
}
