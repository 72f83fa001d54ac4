//! A serde struct travels as an argument (tag `json`) and as an output.
//!
//! This crate has no serde dependency on purpose (tasks need none of their own), so the struct derives
//! through machinery's private re-export; a real crate would depend on serde and write
//! `#[derive(serde::Serialize, serde::Deserialize)]`.

use std::time::Duration;

use machinery::__private::serde::{Deserialize, Serialize};
use machinery::{task, Config, Server, TaskError, Worker};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(crate = "machinery::__private::serde")]
pub struct Point {
    pub x: i64,
    pub y: i64,
}

#[task]
async fn mirror(point: Point, label: String) -> Result<(Point, String), TaskError> {
    Ok((Point { x: point.y, y: point.x }, label))
}

#[tokio::main]
async fn main() {
    let sig = mirror::signature(Point { x: 1, y: 2 }, "p");
    assert_eq!(sig.args[0].type_tag, "json");

    let server = Server::new(Config::default()).await.unwrap();
    let worker = Worker::auto(&server).start().await.unwrap();

    let result = mirror::send(&server, Point { x: 1, y: 2 }, "p").await.unwrap();
    let (point, label) = result.get(Duration::from_secs(5)).await.unwrap();
    assert_eq!(point, Point { x: 2, y: 1 });
    assert_eq!(label, "p");

    worker.shutdown(Duration::from_secs(5)).await.unwrap();
}
