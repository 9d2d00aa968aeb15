//! With the `manual-apply` feature nothing patches until the program asks
//! (`cargo test -p altpatch-library-pattern --features manual-apply --test manual_apply`).
#![cfg(feature = "manual-apply")]

#[test]
fn sites_wait_for_apply_patches() {
    assert!(altpatch::applied_report().is_none(), "no load-time apply");
    assert_eq!(bytestats::which(), 1, "the default, as built");
    let report = altpatch::apply_patches();
    assert_eq!(bytestats::which(), 2, "{report}");
    assert!(
        report.site("which").all(|s| s.chosen() == "patched"),
        "{report}"
    );
}
