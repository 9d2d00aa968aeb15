//! Both ways of writing text work on their own, and the default falls back from `mprotect` to
//! `/proc/self/mem` where `mprotect` is refused.

mod common;

use std::hint::black_box;

use altpatch::writers::{MprotectWriter, ProcMemWriter};
use altpatch::{FallbackWriter, Feature, How, Patcher, TextWriter};
use common::*;

/// Puts every site back to its default, then patches with `writer`.
fn patch_with(writer: Box<dyn TextWriter>, features: &[Feature]) -> altpatch::Report {
    Patcher::new().cpu(cpu_with(&[])).apply();
    Patcher::new()
        .cpu(cpu_with(features))
        .writer(writer)
        .apply()
}

fn assert_mix_runs(report: &altpatch::Report, candidate: &str) {
    assert!(
        report
            .site("mix")
            .all(|s| s.chosen() == candidate && s.written()),
        "{report}"
    );
    assert_eq!(mix(black_box(11)), mix_expected(candidate, 11));
}

#[test]
fn each_writer_patches_on_its_own() {
    let _lock = patch_lock();
    let report = patch_with(Box::new(ProcMemWriter::default()), &[Feature::Bmi2]);
    assert_eq!(report.writer, "/proc/self/mem");
    assert_mix_runs(&report, "bmi2");

    let report = patch_with(Box::new(MprotectWriter::default()), &[Feature::Avx2]);
    assert_eq!(report.writer, "mprotect");
    assert_mix_runs(&report, "avx2");
    assert_eq!(report.stats.warning, None, "protection restored");
}

#[test]
fn mprotect_refused_falls_back_to_proc_self_mem() {
    let _lock = patch_lock();
    let writer = FallbackWriter::new(
        // `mprotect` refused, as under an SELinux `execmod` denial.
        RefusingWriter("mprotect: permission denied (injected)"),
        ProcMemWriter::default(),
    );
    let report = patch_with(Box::new(writer), &[Feature::Bmi2]);
    assert_eq!(report.writer, "/proc/self/mem", "{report}");
    assert_mix_runs(&report, "bmi2");
    assert!(report.site("mix").all(|s| s.how() == How::Inline));
}

#[test]
fn text_protection_is_restored_after_mprotect_writes() {
    let _lock = patch_lock();
    let site = Patcher::new()
        .cpu(cpu_with(&[]))
        .apply()
        .site("mix")
        .next()
        .unwrap()
        .addr();
    let before = region::query(site as *const u8).unwrap().protection();
    patch_with(Box::new(MprotectWriter::default()), &[Feature::Avx2]);
    let after = region::query(site as *const u8).unwrap().protection();
    assert_eq!(before, after);
    assert!(!after.contains(region::Protection::WRITE));
}
