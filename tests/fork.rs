//! Patching in a child after `fork`: the child (one thread) patches its own copy of the text; the
//! parent's stays as it was.

mod common;

use std::hint::black_box;

use altpatch::{Feature, How, Patcher};
use common::*;

#[test]
fn a_forked_child_patches_its_own_text() {
    let _lock = patch_lock();
    Patcher::new().cpu(cpu_with(&[])).apply();
    in_forked_child(|| {
        let report = Patcher::new().cpu(cpu_with(&[Feature::Bmi2])).apply();
        assert!(!report.stats.live, "one thread: {report}");
        assert!(
            report
                .site("mix")
                .all(|s| s.how() == How::Inline && s.written()),
            "{report}"
        );
        assert_eq!(mix(black_box(3)), mix_expected("bmi2", 3));
    });
    assert_eq!(
        mix(black_box(3)),
        mix_expected("default", 3),
        "the parent's text is untouched"
    );
}
