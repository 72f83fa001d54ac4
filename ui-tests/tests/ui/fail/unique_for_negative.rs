use machinery::{task, TaskError};

#[task(unique_for = "-1s")]
async fn report(day: String) -> Result<String, TaskError> {
    Ok(day)
}

fn main() {}
