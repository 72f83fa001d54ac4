//! Every problem is reported in one compile, and the stub module keeps the call sites quiet: `send`,
//! `signature` and `NAME` exist with the signature the user meant.

use machinery::{task, Config, Server};

#[task(queue = 5, tries = 2)]
fn add(a: i64, b: &i64) -> i64 {
    a + b
}

#[tokio::main]
async fn main() {
    let server = Server::new(Config::default()).await.unwrap();
    let result = add::send(&server, 1, &2).await.unwrap();
    let _sum: i64 = result.get(std::time::Duration::from_secs(1)).await.unwrap();
    let _ = add::signature(1, &2);
    let _ = add::NAME;
}
