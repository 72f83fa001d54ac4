use machinery::{task, Chord, Group, TaskError};

#[task]
async fn add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

#[task]
async fn double(x: i64) -> Result<i64, TaskError> {
    Ok(2 * x)
}

fn main() {
    // A chord callback's last parameter must be `Vec<i64>` for a group of i64 tasks.
    let group = Group::new([add::signature(1, 1), add::signature(2, 2)]);
    let _ = Chord::new(group, double::partial());
}
