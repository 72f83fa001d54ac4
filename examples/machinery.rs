//! machinery's example, after Go machinery's `example/` program.
//!
//! ```text
//! cargo run --example machinery                 # worker and sender in one process, in-memory broker
//! BROKER=redis://127.0.0.1:6379 RESULT_BACKEND=redis://127.0.0.1:6379 \
//!     cargo run --example machinery -- worker   # terminal 1
//! BROKER=redis://127.0.0.1:6379 RESULT_BACKEND=redis://127.0.0.1:6379 \
//!     cargo run --example machinery -- send     # terminal 2
//! ```
//!
//! Configuration comes from Go machinery's environment variables (`BROKER`, `RESULT_BACKEND`,
//! `DEFAULT_QUEUE`, `AMQP_EXCHANGE`, ...) or from a YAML/TOML file given with `-c path`.

use std::time::Duration;

use machinery::{task, Chain, Chord, Config, Group, Server, Signature, TaskError, Worker};

/// Adds its arguments (a Go variadic function: `add(1, 1)` sends two `int64` arguments).
#[task(variadic)]
async fn add(args: Vec<i64>) -> Result<i64, TaskError> {
    Ok(args.iter().sum())
}

/// Multiplies its arguments.
#[task(variadic)]
async fn multiply(args: Vec<i64>) -> Result<i64, TaskError> {
    Ok(args.iter().product())
}

/// Sums a slice of integers.
#[task]
async fn sum_ints(numbers: Vec<i64>) -> Result<i64, TaskError> {
    Ok(numbers.iter().sum())
}

/// Sums a slice of floats.
#[task]
async fn sum_floats(numbers: Vec<f64>) -> Result<f64, TaskError> {
    Ok(numbers.iter().sum())
}

/// Concatenates strings.
#[task]
async fn concat(strs: Vec<String>) -> Result<String, TaskError> {
    Ok(strs.concat())
}

/// Splits a string into its characters.
#[task]
async fn split(text: String) -> Result<Vec<String>, TaskError> {
    Ok(text.chars().map(String::from).collect())
}

/// Panics, to show that a panic becomes a FAILURE with its message.
#[task]
async fn panic_task() -> Result<String, TaskError> {
    panic!("oops")
}

/// Runs for a while and returns nothing.
#[task]
async fn long_running_task() -> Result<(), TaskError> {
    for i in 1..=5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        tracing::info!("long running task: step {i} of 5");
    }
    Ok(())
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();

    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let config = match args.iter().position(|a| a == "-c" || a == "--config") {
        Some(i) if i + 1 < args.len() => {
            let path = args.remove(i + 1);
            args.remove(i);
            Config::from_file(path)?
        }
        Some(_) => return Err("-c needs a configuration file path".into()),
        None => Config::from_env()?,
    };
    let server = Server::new(config).await?;

    match args.first().map(String::as_str) {
        Some("worker") => {
            if server.broker().kind() == "memory" {
                tracing::warn!("the in-memory broker is private to this process: set BROKER to share tasks with a sender");
            }
            worker(&server).launch().await?;
        }
        Some("send") => send(&server).await?,
        None => {
            let running = worker(&server).start().await?;
            send(&server).await?;
            running.shutdown(Duration::from_secs(10)).await?;
        }
        Some(other) => {
            return Err(format!("unknown command {other:?}; expected `worker` or `send`").into())
        }
    }
    Ok(())
}

/// A worker with every task above and Go's example hooks. Go's example names its consumer
/// `machinery_worker`; we keep the default tag, unique per process, because two copies of the example
/// under one tag would each return the other's in-flight messages to the queue at start.
fn worker(server: &Server) -> Worker {
    Worker::auto(server)
        .concurrency(10)
        .error_handler(|error| tracing::error!("I am an error handler: {error}"))
        .pre_task_handler(|sig: &Signature| {
            tracing::info!("I am a start of task handler for: {}", sig.name)
        })
        .post_task_handler(|sig: &Signature, _| {
            tracing::info!("I am an end of task handler for: {}", sig.name)
        })
}

/// Sends the tasks of Go's example and prints their results.
async fn send(server: &Server) -> Result<(), BoxError> {
    let timeout = Duration::from_secs(30);

    let sum = add::send(server, vec![1, 1]).await?.get(timeout).await?;
    println!("1 + 1 = {sum}");

    let sum = sum_ints::send(server, vec![1, 2])
        .await?
        .get(timeout)
        .await?;
    println!("sum([1, 2]) = {sum}");

    let sum = sum_floats::send(server, vec![1.5, 2.7])
        .await?
        .get(timeout)
        .await?;
    println!("sum([1.5, 2.7]) = {sum}");

    let text = concat::send(server, vec!["foo".into(), "bar".into()])
        .await?
        .get(timeout)
        .await?;
    println!("concat([\"foo\", \"bar\"]) = {text}");

    let parts = split::send(server, "foo").await?.get(timeout).await?;
    println!("split([\"foo\"]) = [{}]", parts.join(" "));

    let group = Group::new([
        add::signature(vec![1, 1]),
        add::signature(vec![2, 2]),
        add::signature(vec![5, 6]),
    ]);
    let sums = server.send_group(group.clone()).await?.get(timeout).await?;
    for (expression, sum) in ["1 + 1", "2 + 2", "5 + 6"].iter().zip(sums) {
        println!("{expression} = {sum}");
    }

    let product = server
        .send_chord(Chord::new(group, multiply::partial()))
        .await?
        .get(timeout)
        .await?;
    println!("(1 + 1) * (2 + 2) * (5 + 6) = {product}");

    let chain = Chain::new(add::signature(vec![1, 1]))
        .then(add::partial_with(vec![2, 2]))
        .then(add::partial_with(vec![5, 6]))
        .then(multiply::partial_with(vec![4]));
    let result = server.send_chain(chain).await?.get(timeout).await?;
    println!("(((1 + 1) + (2 + 2)) + (5 + 6)) * 4 = {result}");

    match panic_task::send(server).await?.get(timeout).await {
        Ok(value) => println!("Task panicked and returned value = {value}"),
        Err(machinery::ResultError::Failed { error, .. }) => {
            println!("Task panicked and returned error = {error}")
        }
        Err(other) => return Err(other.into()),
    }

    long_running_task::send(server).await?.get(timeout).await?;
    println!("Long running task returned = []");
    Ok(())
}
