//! The generated code does not depend on what the user's scope calls `Result`, `String`, `Option`,
//! `Vec`, `Box`, `Ok`, `Err`, `Some`, `None` or `Send`, nor on parameter names that match its own items.

#![allow(dead_code, non_camel_case_types, non_snake_case, non_upper_case_globals)]

use std::time::Duration;

mod shadows {
    pub struct String;
    pub struct Option;
    pub struct Vec;
    pub struct Box;
    pub struct Some;
    pub struct None;
    pub struct Ok;
    pub struct Err;
    pub struct Send;
    pub struct Future;
    pub struct Into;
    pub struct serde;
    pub struct core;
}
use shadows::*;

type Result<T> = ::core::result::Result<T, machinery::TaskError>;

// Constants named like the generated code's locals would turn its bindings into constant patterns.
const value: i64 = 0;
const values: i64 = 0;
const error: i64 = 0;
const serializer: i64 = 0;
const deserializer: i64 = 0;

#[machinery::task]
async fn collide(
    server: i64,
    signature: std::string::String,
    args: i64,
    ctx: i64,
    reader: i64,
    NAME: i64,
    TASK: i64,
    numbers: std::vec::Vec<i64>,
) -> Result<(std::string::String, i64)> {
    let total = server + args + ctx + reader + NAME + TASK + numbers.iter().sum::<i64>();
    ::core::result::Result::Ok((signature, total))
}

#[tokio::main]
async fn main() {
    // The names in scope really are the shadows.
    let _: (String, Option, Vec, Box, Some, None, Ok, Err, Send, Future, Into, serde, core) =
        (String, Option, Vec, Box, Some, None, Ok, Err, Send, Future, Into, serde, core);
    let server = machinery::Server::new(machinery::Config::default()).await.unwrap();
    let worker = machinery::Worker::auto(&server).start().await.unwrap();

    let sig = collide::signature(1, "s", 2, 3, 4, 5, 6, vec![7]);
    assert_eq!(sig.args.len(), 8);
    let result = collide::send(&server, 1, "s", 2, 3, 4, 5, 6, vec![7]).await.unwrap();
    let (text, total) = result.get(Duration::from_secs(5)).await.unwrap();
    assert_eq!((text.as_str(), total), ("s", 28));

    worker.shutdown(Duration::from_secs(5)).await.unwrap();
}
