//! The code `#[task]` generates raises no warning under strict lints (and, through `cargo clippy
//! --all-targets -- -D warnings`, no clippy lint), whether the task is public or private, used or not.

#![deny(
    warnings,
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub,
    unused_qualifications,
    unused_results,
    clippy::all
)]

use machinery::{task, TaskContext, TaskError};

/// Tasks reachable from outside the crate.
pub mod public {
    use super::{task, TaskError};

    /// Adds.
    #[task(
        name = "Add",
        queue = "math",
        retries = 2,
        retry_timeout = "3s",
        timeout = "1m"
    )]
    pub async fn add(a: i64, b: i64) -> Result<i64, TaskError> {
        Ok(a + b)
    }
}

mod private {
    use super::{task, TaskContext, TaskError};

    /// Never sent, never registered by hand: its module must not raise dead-code warnings.
    #[task]
    async fn unused(
        ctx: &TaskContext,
        text: String,
        numbers: Vec<u8>,
    ) -> Result<(String, u8), TaskError> {
        let _ = ctx.uuid();
        Ok((text, numbers.iter().copied().max().unwrap_or_default()))
    }

    #[task(variadic)]
    pub(crate) async fn sum(numbers: Vec<i64>) -> Result<i64, TaskError> {
        Ok(numbers.iter().sum())
    }

    // The function's own lint; the generated `send` (nine parameters) and `signature` raise none.
    #[allow(clippy::too_many_arguments)]
    #[task]
    pub(crate) async fn many(
        a: i64,
        b: i64,
        c: i64,
        d: i64,
        e: i64,
        f: i64,
        g: i64,
        h: i64,
    ) -> Result<(), TaskError> {
        let _ = (a, b, c, d, e, f, g, h);
        Ok(())
    }
}

/// Configured out: the `#[cfg]` below `#[task]` applies to everything generated, or this would not build.
#[task]
#[cfg(any())]
pub async fn configured_out(a: i64) -> Result<i64, TaskError> {
    Ok(a)
}

#[tokio::test]
async fn the_functions_stay_callable() {
    assert_eq!(public::add(1, 2).await.unwrap(), 3);
    assert_eq!(private::sum(vec![1, 2, 3]).await.unwrap(), 6);
    private::many(1, 2, 3, 4, 5, 6, 7, 8).await.unwrap();
    assert_eq!(public::add::NAME, "Add");
    assert_eq!(private::sum::signature(vec![1, 2]).args.len(), 2);
    assert_eq!(private::many::task().name, "many");
}
