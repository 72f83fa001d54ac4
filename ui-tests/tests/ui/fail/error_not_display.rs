use machinery::task;

#[derive(Debug)]
pub struct Oops;

#[task]
async fn add(a: i64, b: i64) -> Result<i64, Oops> {
    a.checked_add(b).ok_or(Oops)
}

fn main() {}
