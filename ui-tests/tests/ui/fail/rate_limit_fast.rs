use machinery::{task, TaskError};

#[task(rate_limit = "fast")]
async fn call_api(url: String) -> Result<String, TaskError> {
    Ok(url)
}

fn main() {}
