use machinery::{task, TaskError};

#[task(queue = "math", queue = "other")]
async fn add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

fn main() {}
