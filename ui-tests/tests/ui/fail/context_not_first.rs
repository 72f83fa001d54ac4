use machinery::{task, TaskContext, TaskError};

#[task]
async fn add(a: i64, ctx: &TaskContext) -> Result<i64, TaskError> {
    Ok(a + i64::from(ctx.retry_count()))
}

fn main() {}
