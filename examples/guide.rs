//! The program of `docs/guide.md`: one binary that is a worker (`worker`) or a sender (`send`), sharing
//! a broker and a result backend named by `BROKER` and `RESULT_BACKEND`.
//!
//! ```text
//! BROKER=redis://127.0.0.1:6379 RESULT_BACKEND=redis://127.0.0.1:6379 cargo run --example guide -- worker
//! BROKER=redis://127.0.0.1:6379 RESULT_BACKEND=redis://127.0.0.1:6379 cargo run --example guide -- send
//! ```

use std::time::Duration;

use machinery::{task, Chain, Chord, Config, Group, Server, TaskError, Worker};

#[task]
async fn add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

#[task]
async fn multiply(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a * b)
}

#[task]
async fn sum(numbers: Vec<i64>) -> Result<i64, TaskError> {
    Ok(numbers.iter().sum())
}

#[task(retries = 3, timeout = "10s")]
async fn greet(name: String) -> Result<String, TaskError> {
    Ok(format!("Hello, {name}!"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let server = Server::new(Config::from_env()?).await?;
    match std::env::args().nth(1).as_deref() {
        Some("worker") => Worker::auto(&server).concurrency(10).launch().await?,
        Some("send") => {
            let timeout = Duration::from_secs(10);
            let greeting = greet::send(&server, "Gopher").await?.get(timeout).await?;
            println!("{greeting}");

            let sums = server
                .send_group(Group::new([
                    add::signature(1, 1),
                    add::signature(2, 2),
                    add::signature(5, 6),
                ]))
                .await?
                .get(timeout)
                .await?;
            println!("group: {sums:?}");

            let group = Group::new([
                add::signature(1, 1),
                add::signature(2, 2),
                add::signature(5, 6),
            ]);
            let total = server
                .send_chord(Chord::new(group, sum::partial()))
                .await?
                .get(timeout)
                .await?;
            println!("chord: {total}");

            let chain = Chain::new(add::signature(1, 1))
                .then(add::partial(2))
                .then(multiply::partial(4));
            let product = server.send_chain(chain).await?.get(timeout).await?;
            println!("chain: {product}");
        }
        _ => return Err("usage: guide worker|send".into()),
    }
    Ok(())
}
