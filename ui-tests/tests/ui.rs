//! Compile tests of `#[task]`: every `pass` case builds and runs, every `fail` case fails with the
//! message in its `.stderr`. Regenerate the messages with `TRYBUILD=overwrite cargo test -p
//! machinery-ui-tests`, then read each one.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.pass("tests/ui/pass/*.rs");
    cases.compile_fail("tests/ui/fail/*.rs");
}
