//! A tuple output is stored as one result per element (Go's multiple return values) and read back as
//! the tuple; `()` stores no result.

use std::time::Duration;

use machinery::{task, Config, Server, TaskError, Worker};

#[task]
async fn describe(n: i64) -> Result<(String, i64), TaskError> {
    Ok((format!("n={n}"), n * 2))
}

#[task]
async fn nothing(n: i64) -> Result<(), TaskError> {
    let _ = n;
    Ok(())
}

#[tokio::main]
async fn main() {
    let server = Server::new(Config::default()).await.unwrap();
    let worker = Worker::auto(&server).start().await.unwrap();

    let pair = describe::send(&server, 21).await.unwrap();
    let (text, double): (String, i64) = pair.get(Duration::from_secs(5)).await.unwrap();
    assert_eq!(text, "n=21");
    assert_eq!(double, 42);
    let state = pair.state().await.unwrap().unwrap();
    let results = state.results.unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0].type_tag, "string");
    assert_eq!(results[1].type_tag, "int64");

    let unit = nothing::send(&server, 1).await.unwrap();
    unit.get(Duration::from_secs(5)).await.unwrap();
    let state = unit.state().await.unwrap().unwrap();
    assert!(state.results.unwrap_or_default().is_empty());

    worker.shutdown(Duration::from_secs(5)).await.unwrap();
}
