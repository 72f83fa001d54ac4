//! A task defined, sent and run to completion on the in-memory server; the function stays callable.

use std::time::Duration;

use machinery::{task, Config, Server, TaskError, Worker};

#[task]
pub async fn add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

#[task]
async fn hello_world(arg: String) -> Result<String, TaskError> {
    Ok(format!("Hi, {arg}"))
}

#[tokio::main]
async fn main() {
    // The function itself is untouched.
    assert_eq!(add(2, 3).await.unwrap(), 5);
    assert_eq!(add::NAME, "add");
    assert_eq!(hello_world::NAME, "hello_world");
    assert_eq!(add::task().name, "add");
    assert!(add::task().rust_path.ends_with("::add"), "{}", add::task().rust_path);

    let server = Server::new(Config::default()).await.unwrap();
    let worker = Worker::auto(&server).start().await.unwrap();

    let sum = add::send(&server, 1, 2).await.unwrap();
    assert_eq!(sum.get(Duration::from_secs(5)).await.unwrap(), 3);
    // A `String` parameter takes anything that converts into one.
    let greeting = hello_world::send(&server, "task1").await.unwrap();
    assert_eq!(greeting.get(Duration::from_secs(5)).await.unwrap(), "Hi, task1");
    let greeting = hello_world::send(&server, String::from("task2")).await.unwrap();
    assert_eq!(greeting.get(Duration::from_secs(5)).await.unwrap(), "Hi, task2");

    // `signature` is the typed message `send` sends; `Args` names the arguments.
    let sig = add::signature(20, 22);
    assert_eq!(sig.name, "add");
    assert_eq!(sig.args.len(), 2);
    assert_eq!(sig.args[0].name, "a");
    let sum = server.send(sig).await.unwrap();
    assert_eq!(sum.get(Duration::from_secs(5)).await.unwrap(), 42);
    let _ = add::Args { a: 1, b: 2 };

    worker.shutdown(Duration::from_secs(5)).await.unwrap();
}
