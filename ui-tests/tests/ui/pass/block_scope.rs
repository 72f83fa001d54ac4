//! A task defined inside a function body (a test, a doctest) works: its handler sits beside it, where
//! the function is in scope, and `Worker::auto` finds it.

use std::time::Duration;

use machinery::{Config, Server, Worker};

#[tokio::main]
async fn main() {
    use machinery::{task, TaskError};

    #[task]
    async fn double(n: i64) -> Result<i64, TaskError> {
        Ok(n * 2)
    }

    let server = Server::new(Config::default()).await.unwrap();
    let worker = Worker::auto(&server).start().await.unwrap();
    let result = double::send(&server, 21).await.unwrap();
    assert_eq!(result.get(Duration::from_secs(5)).await.unwrap(), 42);
    assert_eq!(double(1).await.unwrap(), 2);
    worker.shutdown(Duration::from_secs(5)).await.unwrap();
}
