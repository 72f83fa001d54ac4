//! A last `Vec<T>` parameter travels as one slice argument, or (`variadic`) as one argument per element
//! the way a Go worker's variadic function expects; the worker reads either form.

use std::time::Duration;

use machinery::{task, Config, Server, TaskError, Worker};

#[task]
async fn sum(numbers: Vec<i64>) -> Result<i64, TaskError> {
    Ok(numbers.iter().sum())
}

#[task(variadic)]
async fn scaled_sum(factor: i64, numbers: Vec<i64>) -> Result<i64, TaskError> {
    Ok(factor * numbers.iter().sum::<i64>())
}

#[tokio::main]
async fn main() {
    let sig = sum::signature(vec![1, 2, 3]);
    assert_eq!(sig.args.len(), 1);
    assert_eq!(sig.args[0].type_tag, "[]int64");

    let sig = scaled_sum::signature(10, vec![1, 2, 3]);
    assert_eq!(sig.args.len(), 4);
    assert!(sig.args[1..].iter().all(|a| a.type_tag == "int64" && a.name == "numbers"));

    let server = Server::new(Config::default()).await.unwrap();
    let worker = Worker::auto(&server).start().await.unwrap();

    let total = sum::send(&server, vec![1, 2, 3]).await.unwrap();
    assert_eq!(total.get(Duration::from_secs(5)).await.unwrap(), 6);

    let total = scaled_sum::send(&server, 10, vec![1, 2, 3]).await.unwrap();
    assert_eq!(total.get(Duration::from_secs(5)).await.unwrap(), 60);
    let total = scaled_sum::send(&server, 10, vec![]).await.unwrap();
    assert_eq!(total.get(Duration::from_secs(5)).await.unwrap(), 0);

    // The worker of a non-variadic task also accepts Go's variadic form.
    let mut spread = sum::signature(vec![]);
    spread.args = scaled_sum::signature(0, vec![4, 5]).args.split_off(1);
    let total = server.send(spread).await.unwrap();
    assert_eq!(total.get(Duration::from_secs(5)).await.unwrap(), 9);

    worker.shutdown(Duration::from_secs(5)).await.unwrap();
}
