//! trybuild cases of the `#[task]` attribute live in `tests/`.
