//! `crate = ".."` names machinery through a re-export (a facade crate would do this).

use std::time::Duration;

mod facade {
    pub use machinery as runtime;
}

#[machinery::task(crate = "crate::facade::runtime")]
async fn add(a: i64, b: i64) -> Result<i64, machinery::TaskError> {
    Ok(a + b)
}

#[tokio::main]
async fn main() {
    let server = facade::runtime::Server::new(facade::runtime::Config::default()).await.unwrap();
    let worker = facade::runtime::Worker::auto(&server).start().await.unwrap();
    let sum = add::send(&server, 1, 2).await.unwrap();
    assert_eq!(sum.get(Duration::from_secs(5)).await.unwrap(), 3);
    worker.shutdown(Duration::from_secs(5)).await.unwrap();
}
