use machinery::{task, TaskError};

#[task]
async fn run(self) -> Result<(), TaskError> {
    Ok(())
}

fn main() {}
