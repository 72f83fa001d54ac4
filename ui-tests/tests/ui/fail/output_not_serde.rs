use machinery::{task, TaskError};

pub struct Point {
    pub x: i64,
    pub y: i64,
}

#[task]
async fn origin() -> Result<Point, TaskError> {
    Ok(Point { x: 0, y: 0 })
}

fn main() {}
