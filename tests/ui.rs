//! Unsupported uses of the macros are compile errors that say what to do instead.

#[test]
fn macro_errors() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
