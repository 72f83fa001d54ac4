use machinery::{task, TaskError};

#[task]
async fn greet(name: &str) -> Result<String, TaskError> {
    Ok(format!("Hi, {name}"))
}

fn main() {}
