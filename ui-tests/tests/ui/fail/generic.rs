use machinery::{task, TaskError};

#[task]
async fn echo<T: ToString>(value: T) -> Result<String, TaskError> {
    Ok(value.to_string())
}

fn main() {}
