//! Every option form: they land in the task's definition and in the signatures `send` sends, and a
//! worker on the task's queue runs it under its time limit.

use std::time::Duration;

use machinery::{task, Config, Server, TaskError, Worker};

#[task(name = "Add", queue = "math", retries = 3, retry_timeout = 7, timeout = "30s")]
async fn add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

#[task(retry_timeout = "1500ms", timeout = 2)]
async fn seconds() -> Result<(), TaskError> {
    Ok(())
}

#[task(timeout = "500ms", queue = "math")]
async fn slow() -> Result<(), TaskError> {
    tokio::time::sleep(Duration::from_secs(60)).await;
    Ok(())
}

#[task(timeout = "1m30s", retry_timeout = "2m")]
async fn minutes() -> Result<(), TaskError> {
    Ok(())
}

#[task(timeout = "1h")]
async fn hours() -> Result<(), TaskError> {
    Ok(())
}

#[task(unique_for = "1h")]
async fn unique_report(day: String) -> Result<String, TaskError> {
    Ok(day)
}

#[task(rate_limit = "50/s")]
async fn per_second() -> Result<(), TaskError> {
    Ok(())
}

#[task(rate_limit = "10/m", unique_for = 30)]
async fn per_minute() -> Result<(), TaskError> {
    Ok(())
}

#[task(rate_limit = "500/h")]
async fn per_hour() -> Result<(), TaskError> {
    Ok(())
}

#[tokio::main]
async fn main() {
    use machinery::rate_limit::RateLimit;
    assert_eq!(
        per_second::task().options.rate_limit,
        Some(RateLimit::new(50, Duration::from_secs(1)))
    );
    assert_eq!(
        per_minute::task().options.rate_limit,
        Some(RateLimit::new(10, Duration::from_secs(60)))
    );
    assert_eq!(per_minute::task().options.unique_for, Some(Duration::from_secs(30)));
    assert_eq!(
        per_hour::task().options.rate_limit.map(|l| l.interval()),
        Some(Duration::from_millis(7200))
    );
    assert_eq!(add::task().options.rate_limit, None);
    assert_eq!(
        unique_report::task().options.unique_for,
        Some(Duration::from_secs(3600))
    );
    let sig = unique_report::signature("monday");
    assert_eq!(
        sig.header_value(machinery::UNIQUE_FOR_HEADER)
            .and_then(|v| v.as_u64()),
        Some(3_600_000)
    );
    assert_eq!(add::task().options.unique_for, None);

    let def = add::task();
    assert_eq!(def.name, "Add");
    assert_eq!(add::NAME, "Add");
    assert_eq!(def.options.queue, Some("math"));
    assert_eq!(def.options.retries, 3);
    assert_eq!(def.options.retry_timeout, 7);
    assert_eq!(def.options.timeout, Some(Duration::from_secs(30)));
    assert!(def.rust_path.ends_with("::add"), "{}", def.rust_path);

    let sig = add::signature(1, 2);
    assert_eq!(sig.name, "Add");
    assert_eq!(sig.routing_key, "math");
    assert_eq!(sig.retry_count, 3);
    assert_eq!(sig.retry_timeout, 7);

    // Integers are whole seconds; a duration string for `retry_timeout` is rounded up to seconds.
    assert_eq!(seconds::task().options.timeout, Some(Duration::from_secs(2)));
    assert_eq!(seconds::task().options.retry_timeout, 2);
    assert_eq!(seconds::task().options.queue, None);
    assert_eq!(seconds::task().options.retries, 0);
    assert_eq!(slow::task().options.timeout, Some(Duration::from_millis(500)));
    assert_eq!(minutes::task().options.timeout, Some(Duration::from_secs(90)));
    assert_eq!(minutes::task().options.retry_timeout, 120);
    assert_eq!(hours::task().options.timeout, Some(Duration::from_secs(3600)));

    let server = Server::new(Config::default()).await.unwrap();
    let worker = Worker::auto(&server).queue("math").start().await.unwrap();

    let sum = add::send(&server, 40, 2).await.unwrap();
    assert_eq!(sum.get(Duration::from_secs(5)).await.unwrap(), 42);

    // The time limit cancels the run and fails the task.
    let slow = slow::send(&server).await.unwrap();
    let error = slow.get(Duration::from_secs(10)).await.unwrap_err();
    assert!(matches!(error, machinery::ResultError::Failed { .. }), "{error}");

    worker.shutdown(Duration::from_secs(5)).await.unwrap();
}
