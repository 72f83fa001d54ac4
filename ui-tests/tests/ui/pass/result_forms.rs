//! The error type can be anything `Display` (here `String` and `io::Error`), and the return type any
//! alias whose name ends in `Result` with the output first: the error's text is the FAILURE's text.

use std::time::Duration;

use machinery::{task, Config, ResultError, Server, Worker};

type StrResult<T> = core::result::Result<T, String>;

#[task]
async fn checked_div(a: i64, b: i64) -> Result<i64, String> {
    a.checked_div(b).ok_or_else(|| format!("cannot divide {a} by {b}"))
}

#[task]
async fn parse(text: String) -> StrResult<i64> {
    text.parse().map_err(|e| format!("{text:?}: {e}"))
}

#[task]
async fn open(path: String) -> std::io::Result<u64> {
    Ok(std::fs::metadata(path)?.len())
}

#[tokio::main]
async fn main() {
    let server = Server::new(Config::default()).await.unwrap();
    let worker = Worker::auto(&server).start().await.unwrap();
    let wait = Duration::from_secs(5);

    assert_eq!(checked_div::send(&server, 9, 3).await.unwrap().get(wait).await.unwrap(), 3);
    match checked_div::send(&server, 1, 0).await.unwrap().get(wait).await {
        Err(ResultError::Failed { error, .. }) => assert_eq!(error, "cannot divide 1 by 0"),
        other => panic!("expected a failure, got {other:?}"),
    }

    assert_eq!(parse::send(&server, "12").await.unwrap().get(wait).await.unwrap(), 12);
    match parse::send(&server, "x").await.unwrap().get(wait).await {
        Err(ResultError::Failed { error, .. }) => assert!(error.starts_with("\"x\": "), "{error}"),
        other => panic!("expected a failure, got {other:?}"),
    }

    match open::send(&server, "/no/such/file").await.unwrap().get(wait).await {
        Err(ResultError::Failed { error, .. }) => assert!(!error.is_empty()),
        other => panic!("expected a failure, got {other:?}"),
    }

    worker.shutdown(Duration::from_secs(5)).await.unwrap();
}
