//! The fallback mode: with the `force-unpatched` feature (as on platforms other than x86_64
//! Linux) the same API compiles, nothing is written, every site runs its default and the report
//! says why. Without the feature, this file checks that apply does write here.

mod common;

use std::hint::black_box;

use altpatch::{Feature, How, Patcher};
use common::*;

#[test]
fn the_report_says_whether_this_build_patches() {
    let _lock = patch_lock();
    let report = Patcher::new().cpu(cpu_with(&[Feature::Avx2])).apply();
    assert!(report.site("mix").count() > 0, "{report}");
    if cfg!(feature = "force-unpatched") {
        assert_eq!(
            report.disabled.as_deref(),
            Some("built with the `force-unpatched` feature")
        );
        assert!(
            report
                .sites
                .iter()
                .all(|s| s.how() == How::Unpatched && !s.written()),
            "{report}"
        );
        assert_eq!(mix(black_box(6)), mix_expected("default", 6));
        assert!(
            report
                .to_string()
                .contains("nothing written: built with the `force-unpatched` feature")
        );
    } else {
        assert_eq!(report.disabled, None);
        assert!(
            report
                .site("mix")
                .all(|s| s.written() && s.how() == How::Call),
            "{report}"
        );
        assert_eq!(mix(black_box(6)), mix_expected("avx2", 6));
    }
}
