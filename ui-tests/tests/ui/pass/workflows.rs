//! Workflows type-check when the steps fit, and run.
use std::time::Duration;

use machinery::{task, Chain, Chord, Config, Group, Server, TaskError, Worker};

#[task]
async fn add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

#[task]
async fn sum(xs: Vec<i64>) -> Result<i64, TaskError> {
    Ok(xs.iter().sum())
}

#[task]
async fn label(prefix: String, n: i64) -> Result<String, TaskError> {
    Ok(format!("{prefix}{n}"))
}

#[tokio::main]
async fn main() {
    let server = Server::new(Config::default()).await.unwrap();
    let worker = Worker::auto(&server).start().await.unwrap();
    let t = Duration::from_secs(5);
    let chain = Chain::new(add::signature(1, 1)).then(add::partial(5)).then(label::partial("n="));
    let text: String = server.send_chain(chain).await.unwrap().get(t).await.unwrap();
    assert_eq!(text, "n=7");
    // A Vec<i64> last parameter also follows a step returning one i64.
    let chain = Chain::new(add::signature(1, 1)).then(sum::partial_with(vec![10]));
    assert_eq!(server.send_chain(chain).await.unwrap().get(t).await.unwrap(), 12);
    let chord = Chord::new(Group::new([add::signature(1, 1), add::signature(2, 2)]), sum::partial());
    assert_eq!(server.send_chord(chord).await.unwrap().get(t).await.unwrap(), 6);
    worker.shutdown(t).await.unwrap();
}
