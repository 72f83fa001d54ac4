use machinery::{task, TaskError};

#[task(retries = -1)]
async fn add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

fn main() {}
