use machinery::{task, TaskError};

pub struct Point {
    pub x: i64,
    pub y: i64,
}

#[task]
async fn norm(scale: i64, point: Point) -> Result<i64, TaskError> {
    Ok(scale * (point.x.abs() + point.y.abs()))
}

fn main() {}
