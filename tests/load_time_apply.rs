//! Sites apply themselves at load: this binary never calls `apply_patches()` before looking, and
//! its sites already run their candidates (no `manual_apply!()` here, unlike `tests/common`).

use std::hint::black_box;

fn always() -> bool {
    true
}

fn doubled(x: u64) -> u64 {
    x * 2
}

#[altpatch::alternative(inline, patched: when = always => doubled)]
fn times(x: u64) -> u64 {
    x
}

#[altpatch::alternative(inline, patched: when = always => nop)]
fn hook(x: u64) {
    std::hint::black_box(x);
}

#[test]
fn sites_are_patched_before_main() {
    let report = altpatch::applied_report().expect("the load-time apply ran");
    assert!(report.disabled.is_none(), "{report}");
    assert_eq!(times(black_box(21)), 42, "{report}");
    hook(black_box(1));
    for name in ["times", "hook"] {
        let sites: Vec<_> = report.site(name).collect();
        assert!(!sites.is_empty(), "{report}");
        assert!(
            sites.iter().all(|s| s.chosen() == "patched" && s.written()),
            "{report}"
        );
    }
    assert_eq!(
        report.site("hook").next().unwrap().how(),
        altpatch::How::Nop
    );
    // Written while one thread existed (before the test harness started its threads).
    assert!(!report.stats.live, "{report}");
    // apply_patches() is optional and returns the same report.
    assert!(std::ptr::eq(altpatch::apply_patches(), report));
}
