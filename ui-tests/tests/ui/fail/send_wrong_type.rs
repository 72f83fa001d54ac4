use machinery::{task, Config, Server, TaskError};

#[task]
async fn add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

#[task]
async fn hello_world(name: String) -> Result<String, TaskError> {
    Ok(format!("Hi, {name}"))
}

#[tokio::main]
async fn main() {
    let server = Server::new(Config::default()).await.unwrap();
    let _ = add::send(&server, 1, "2").await;
    let _ = hello_world::send(&server, 7).await;
}
