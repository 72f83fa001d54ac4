//! The `#[task]` attribute of machinery. Use it through `machinery::task`.

use proc_macro::TokenStream;

/// Turns an `async fn` into a machinery task. See `machinery::task`.
#[proc_macro_attribute]
pub fn task(_attr: TokenStream, item: TokenStream) -> TokenStream {
    item
}
