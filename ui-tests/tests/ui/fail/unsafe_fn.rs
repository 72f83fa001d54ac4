use machinery::{task, TaskError};

#[task]
async unsafe fn add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

fn main() {}
