//! The `#[task]` attribute of [machinery](https://docs.rs/machinery). Use it through `machinery::task`;
//! the code it generates reaches the runtime only through `machinery::__private`.
//!
//! The pipeline: [`parse`] reads the options and the signature, [`model`] validates them into a task
//! description, [`expand`] writes the code. Errors are collected over the whole input and reported
//! together, each on the token that caused it; with errors, the function and a stub of its module are
//! still emitted so call sites add no errors of their own.

mod expand;
mod model;
mod parse;

use proc_macro::TokenStream;

/// Turns an `async fn` into a machinery task.
///
/// ```ignore
/// use machinery::{task, TaskError};
///
/// #[task]
/// pub async fn add(a: i64, b: i64) -> Result<i64, TaskError> {
///     Ok(a + b)
/// }
/// // add(1, 2) still calls the function; add::send(&server, 1, 2) sends the task.
/// ```
///
/// The function stays as written. A module of the same name, with the function's visibility, holds:
/// - `NAME`: the wire name;
/// - `Args`: a serde struct of the parameters;
/// - `TASK` and `task()`: the [`TaskDef`] a worker runs (registered for `Worker::auto`);
/// - `signature(..)`: a typed `Signature<T>` to adjust or to use in workflows;
/// - `send(&server, ..)`: a `Send` future (boxed, so a wrong argument is reported once, at the argument)
///   that sends the task and gives a typed `AsyncResult<T>`;
/// - `partial(..)`: every parameter but the last, as a `Partial<Last, T>` for chains and chords;
/// - `partial_with(.., head)` for a last `Vec<E>` parameter: the vector starts with `head`, and a chain's
///   previous output (an `E`) is appended to it.
///
/// A `String` parameter takes `impl Into<String>` in `send` and `signature`. An optional first parameter
/// `ctx: &TaskContext` is passed by the worker and is not an argument. The function must be `async`,
/// non-generic, take owned values, and return `Result<T, E>` (or an alias ending in `Result`, such as
/// `anyhow::Result<T>`) where `T` is serde and `E: Display`. A tuple output `(A, B)` is stored as one
/// result per element (Go's multiple return values), `()` as none. A last parameter written `Vec<T>`
/// also accepts Go's variadic form (trailing arguments of `T`).
///
/// Options:
/// - `name = "Add"`: the wire name (default: the function's name);
/// - `queue = "emails"`: the routing key `send` uses;
/// - `retries = 3`: the retry count `send` sets;
/// - `retry_timeout = 5` or `"5s"`: the retry timeout `send` sets, in whole seconds;
/// - `timeout = "30s"` (`ms`, `s`, `m`, `h`, or whole seconds): the time limit of one run;
/// - `backoff = EXPR`: a constant expression of a `machinery::retry::BackoffStrategy` type
///   (`Exponential`, `Fixed`, or your own) that sets the delay between retries instead of Go's
///   Fibonacci sequence;
/// - `unique_for = "1h"` (a duration string or whole seconds, longer than zero): `send` makes the task
///   unique for that long: sending the same name and arguments while an earlier one is pending or
///   running returns the earlier task's handle (needs a Redis or in-memory result backend);
/// - `rate_limit = "100/s"` (`/s`, `/m`, `/h`): at most that many starts per period, spaced evenly, across
///   every worker sharing a Redis result backend, per worker process otherwise;
/// - `variadic`: `send` spreads the last `Vec<T>` parameter into one argument per element, as a Go
///   worker's variadic function expects;
/// - `crate = "my_facade::machinery"`: where the machinery crate is, for crates that re-export it.
///
/// Trait requirements are checked by hidden items spanned on the cause: a parameter or output type
/// without serde, an error type without `Display`, or a future that is not `Send` is reported once, on
/// that type or on the function's name.
///
/// A task defined inside a block (a test function, say) works as long as the types of its parameters
/// and output can be named from the enclosing module, since the generated module sees that module's
/// items only.
///
/// [`TaskDef`]: https://docs.rs/machinery/latest/machinery/struct.TaskDef.html
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::task(attr.into(), item.into()).into()
}
