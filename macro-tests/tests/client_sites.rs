//! The library's sites, run from another crate with each candidate forced: every body form, a
//! `$t:ty` signature, niche-optimised pointer returns, a `#[target_feature]` default, a kept
//! `#[inline(never)]`, several instruction strings per `alternative_asm!` candidate, and methods
//! named after their type (`Histogram::add` and `Counter::add` are two sites).
//!
//! No test harness: its threads would defer the multi-instruction candidates (a live write
//! cannot replace several instructions while another thread may be inside them).

use std::hint::black_box;
use std::ptr::NonNull;

use altpatch_macro_tests::*;
use ap::{How, Patcher};

/// Forces every site of this crate to `choice` ("default" or "popcnt").
fn force(choice: &str) -> ap::Report {
    let names = [
        "through_trampoline",
        "classify",
        "make_point",
        "read",
        "next_usize",
        "first",
        "non_null",
        "ones",
        "not_inlined",
        "times3",
        "Histogram::add",
        "Histogram::summary",
        "Histogram::total",
        "Counter::add",
        "count",
        "pointers",
        "describe",
        "joined",
        "Tracked::into_value",
        "ones_tramp",
        "Histogram::scale",
    ];
    let spec: Vec<String> = names.iter().map(|n| format!("{n}={choice}")).collect();
    let report = Patcher::new().overrides_str(&spec.join(",")).apply();
    assert!(report.error.is_none(), "{report}");
    report
}

fn check_all(choice: &str) {
    let m = if choice == "default" { 0 } else { MARK };
    assert_eq!(through_trampoline(black_box(3)), 3 + m);
    assert_eq!(classify(black_box(0)), if m == 0 { 7 } else { MARK });
    assert_eq!(classify(black_box(4)), if m == 0 { 5 } else { 4 + MARK });
    assert_eq!(make_point(black_box(2)), Point { x: 2, y: m });
    let value = 9u64;
    // SAFETY: points at a live u64.
    assert_eq!(unsafe { read(black_box(&value)) }, 9 + m);
    assert_eq!(next_usize(black_box(41)), 42);
    let xs = [10u64, 20];
    assert_eq!(first(black_box(&xs)), Some(&xs[if m == 0 { 0 } else { 1 }]));
    assert_eq!(first(black_box(&[])), None);
    let mut byte = 0u8;
    let expected = if m == 0 {
        NonNull::new(&raw mut byte)
    } else {
        None
    };
    assert_eq!(non_null(black_box(&raw mut byte)), expected);
    assert_eq!(non_null(black_box(std::ptr::null_mut())), None);
    if std::arch::is_x86_feature_detected!("popcnt") {
        // SAFETY: the CPU has POPCNT, which `ones` is compiled for.
        assert_eq!(unsafe { ones(black_box(0b1011)) }, 3 + m);
        // SAFETY: as above.
        assert_eq!(unsafe { ones_tramp(black_box(0b111)) }, 3 + m);
    }
    assert_eq!(not_inlined(black_box(1)), 1 + m);
    assert_eq!(not_inlined(black_box(2)), 2 + m);
    assert_eq!(times3(black_box(5)), 15 + m);

    let mut h = Histogram {
        buckets: Vec::new(),
    };
    assert_eq!(h.add(black_box(4)), 1 + m);
    assert_eq!(h.add(black_box(6)), 2 + m);
    assert_eq!(h.summary(), Point { x: 2, y: m });
    assert_eq!(Total::total(&h), 10 + m);
    assert_eq!(Scale::scale(&h, black_box(3)), 6 + m);
    assert_eq!(count(black_box("abcab"), Some(&b'b')), 2 + m as usize);
    assert_eq!(count(black_box(""), None), m as usize);
    let (a, b) = (5u64, 7u64);
    let (pa, pb) = (NonNull::from(&a), NonNull::from(&b));
    // SAFETY: both point at live u64s.
    assert_eq!(unsafe { pointers(pa, Some(pb)) }, 12 + m);
    // SAFETY: as above.
    assert_eq!(unsafe { pointers(pa, None) }, 5 + m);
    let p = Point { x: 1, y: 2 };
    let described = if m == 0 { "1:2" } else { "1:2+1000" };
    // SAFETY: `describe` has no requirement.
    assert_eq!(unsafe { describe(black_box(&p)) }, described);
    let parts = vec!["a".to_string(), String::new(), "b".to_string()];
    let expected = if m == 0 { "a-b" } else { "a--b-1000" };
    assert_eq!(joined(black_box(parts), '-'), expected);
    let drops = DROPS.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(Tracked(black_box(4)).into_value(), 4 + m);
    assert_eq!(DROPS.load(std::sync::atomic::Ordering::SeqCst), drops + 1);
    let mut c = Counter { count: 0 };
    assert_eq!(c.add(black_box(3)), if m == 0 { 3 } else { 6 });
}

fn main() {
    for choice in ["popcnt", "default", "popcnt"] {
        let report = force(choice);
        for site in report.site("Histogram::add").chain(report.site("ones")) {
            assert_eq!(site.chosen(), choice, "{report}");
        }
        check_all(choice);
    }

    let report = force("default");
    // Methods are named after their type, so the two `add`s are two sites.
    let names: Vec<&str> = report
        .sites
        .iter()
        .map(|s| s.name())
        .filter(|n| n.ends_with("::add") || n.ends_with("::total"))
        .collect();
    for name in [
        "altpatch_macro_tests::Histogram::add",
        "altpatch_macro_tests::Counter::add",
        "altpatch_macro_tests::Histogram::total",
    ] {
        assert!(names.contains(&name), "{name} not in {names:?}");
    }
    // `#[inline(never)]` kept: one site, however many callers.
    assert_eq!(report.site("not_inlined").count(), 1, "{report}");
    assert!(
        report
            .site("not_inlined")
            .all(|s| s.how() == How::Unpatched)
    );
    println!("client_sites: every site ran each candidate");
}
