use machinery::{task, TaskError};

#[task(unique_for = "0s")]
async fn report(day: String) -> Result<String, TaskError> {
    Ok(day)
}

fn main() {}
