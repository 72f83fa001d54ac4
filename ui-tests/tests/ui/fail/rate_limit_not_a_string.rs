use machinery::{task, TaskError};

#[task(rate_limit = 100)]
async fn call_api(url: String) -> Result<String, TaskError> {
    Ok(url)
}

fn main() {}
