use machinery::{task, Chain, TaskError};

#[task]
async fn add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

#[task]
async fn shout(prefix: String, text: String) -> Result<String, TaskError> {
    Ok(format!("{prefix}{}", text.to_uppercase()))
}

fn main() {
    // `add` returns an i64, but `shout`'s last parameter is a String.
    let _ = Chain::new(add::signature(1, 2)).then(shout::partial("!"));
}
