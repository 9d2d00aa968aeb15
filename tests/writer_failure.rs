//! When the text cannot be written (W^X policy, seccomp, anything), every site keeps running its
//! default and the report says why.

mod common;

use std::hint::black_box;

use altpatch::{Feature, How, Patcher};
use common::*;

#[test]
fn denied_writes_leave_the_defaults_running_and_say_why() {
    let _lock = patch_lock();
    // SAFETY: reading this program's own text.
    let snapshot = |r: &altpatch::Report| -> Vec<Vec<u8>> {
        r.sites
            .iter()
            .map(|s| unsafe { std::slice::from_raw_parts(s.addr() as *const u8, s.len()) }.to_vec())
            .collect()
    };
    let report = Patcher::new()
        .cpu(cpu_with(&[Feature::Avx2, Feature::Bmi2]))
        .writer(Box::new(RefusingWriter(
            "mprotect refused by policy (injected)",
        )))
        .apply();
    assert!(!report.sites.is_empty());
    for site in &report.sites {
        assert_eq!(site.how(), How::Unpatched, "{report}");
        assert!(!site.written());
        assert!(
            site.why().contains("mprotect refused by policy (injected)"),
            "{}",
            site.why()
        );
    }
    assert!(report.to_string().contains("mprotect refused by policy"));
    assert_eq!(mix(black_box(4)), mix_expected("default", 4));

    // Nothing changed: a second, denied apply sees the same bytes.
    let again = Patcher::new()
        .cpu(cpu_with(&[Feature::Avx2]))
        .writer(Box::new(RefusingWriter(
            "mprotect refused by policy (injected)",
        )))
        .apply();
    assert_eq!(snapshot(&report), snapshot(&again));
}
