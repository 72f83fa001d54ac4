//! Compile tests of `#[task]`: every `pass` case builds and runs, every `fail` case fails with the
//! message in its `.stderr` (one case per message).
//!
//! The `.stderr` files hold rustc's wording as of the toolchain that wrote them (rustc 1.95); another
//! toolchain may word the rustc-side errors differently. Regenerate them with
//! `TRYBUILD=overwrite cargo test -p machinery-ui-tests`, then read each one: it must point at the
//! offending token and hold no follow-up errors.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.pass("tests/ui/pass/*.rs");
    cases.compile_fail("tests/ui/fail/*.rs");
}
