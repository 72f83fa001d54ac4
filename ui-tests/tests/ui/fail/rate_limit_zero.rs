use machinery::{task, TaskError};

#[task(rate_limit = "0/s")]
async fn call_api(url: String) -> Result<String, TaskError> {
    Ok(url)
}

fn main() {}
