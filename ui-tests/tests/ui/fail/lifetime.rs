use std::borrow::Cow;

use machinery::{task, TaskError};

#[task]
async fn echo<'a>(text: Cow<'a, str>) -> Result<String, TaskError> {
    Ok(text.into_owned())
}

fn main() {}
