use machinery::TaskError;

mod facade {}

#[machinery::task(rate_limit = "10/s", crate = "facade::machinery")]
async fn call_api(url: String) -> Result<String, TaskError> {
    Ok(url)
}

fn main() {}
