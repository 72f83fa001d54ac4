use machinery::{task, TaskError};

#[task]
async fn echo(value: impl ToString) -> Result<String, TaskError> {
    Ok(value.to_string())
}

fn main() {}
