use machinery::{task, TaskError};

#[task(queue = "math", retry = 3)]
async fn add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

fn main() {}
