use std::rc::Rc;
use std::time::Duration;

use machinery::{task, TaskError};

#[task]
async fn count(n: i64) -> Result<i64, TaskError> {
    let shared = Rc::new(n);
    tokio::time::sleep(Duration::from_millis(1)).await;
    Ok(*shared)
}

fn main() {}
