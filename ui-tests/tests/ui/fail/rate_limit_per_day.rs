use machinery::{task, TaskError};

#[task(rate_limit = "10/d")]
async fn call_api(url: String) -> Result<String, TaskError> {
    Ok(url)
}

fn main() {}
