use machinery::{task, TaskError};

#[task(unique_for = true)]
async fn report(day: String) -> Result<String, TaskError> {
    Ok(day)
}

fn main() {}
