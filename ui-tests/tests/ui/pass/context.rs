//! A first `&TaskContext` parameter is passed by the worker and is not an argument of `send`.

use std::time::Duration;

use machinery::{task, Config, Server, TaskContext, TaskError, Worker};

#[task]
async fn whoami(ctx: &TaskContext, greeting: String) -> Result<String, TaskError> {
    Ok(format!("{greeting} from {} ({})", ctx.name(), ctx.uuid()))
}

#[task(name = "no_args")]
async fn only_context(_context: &machinery::TaskContext) -> Result<i64, TaskError> {
    Ok(7)
}

#[tokio::main]
async fn main() {
    let server = Server::new(Config::default()).await.unwrap();
    let worker = Worker::auto(&server).start().await.unwrap();

    let sig = whoami::signature("hello");
    assert_eq!(sig.args.len(), 1, "the context is not an argument");
    let _ = whoami::Args {
        greeting: String::new(),
    };

    let result = whoami::send(&server, "hello").await.unwrap();
    let text = result.get(Duration::from_secs(5)).await.unwrap();
    assert_eq!(text, format!("hello from whoami ({})", result.uuid()));

    let seven = only_context::send(&server).await.unwrap();
    assert_eq!(seven.get(Duration::from_secs(5)).await.unwrap(), 7);

    worker.shutdown(Duration::from_secs(5)).await.unwrap();
}
