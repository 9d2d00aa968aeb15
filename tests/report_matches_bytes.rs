//! Every report entry says what its site's bytes are after the apply: each site is read back and
//! decoded (iced-x86) after every apply of a sequence (startup, forced variants, `off`, an error,
//! re-applies with another thread running) and compared with its entry's `chosen()` and `how()`.

mod common;

use std::sync::mpsc;

use altpatch::{Feature, How, Patcher, Report, StaticKey};
use common::*;

/// One CRC-32C step: two instructions inline where SSE4.2 is present, so a site holding them
/// cannot be rewritten while other threads run.
#[altpatch::alternative(inline, sse4_2 => asm("mov rax, rdi", "crc32 rax, rsi"))]
fn crc_step(crc: u64, data: u64) -> u64 {
    crc ^ data
}

fn double(x: u64) -> u64 {
    x * 2
}

/// A trampoline site.
#[altpatch::alternative(avx2 => double)]
fn twice(x: u64) -> u64 {
    x + x
}

static TRACE: StaticKey = StaticKey::new(false);

#[inline(never)]
fn traced() -> bool {
    altpatch::static_branch_unlikely!(TRACE)
}

/// Keeps the sites of this file in the program.
fn use_sites() {
    std::hint::black_box((crc_step as fn(u64, u64) -> u64, twice as fn(u64) -> u64));
    std::hint::black_box(traced as fn() -> bool);
    // `mix` is a call site: it exists where it is called (whichever candidate runs).
    std::hint::black_box(mix(std::hint::black_box(7)));
}

/// A CPU with every feature, so any candidate may be forced (the sites are only read back, not
/// run, while a candidate this machine may lack is in place).
fn every_feature() -> altpatch::Cpu {
    cpu_with(Feature::ALL)
}

fn apply(overrides: &str) -> Report {
    let report = Patcher::new()
        .cpu(every_feature())
        .overrides_str(overrides)
        .apply();
    assert_report_matches_bytes(&report);
    report
}

fn entries<'a>(report: &'a Report, name: &'a str) -> Vec<(&'static str, How, bool)> {
    let entries: Vec<_> = report
        .site(name)
        .map(|s| (s.chosen(), s.how(), s.written()))
        .collect();
    assert!(!entries.is_empty(), "no {name} in\n{report}");
    entries
}

fn all_are(report: &Report, name: &str, chosen: &str, how: How) {
    for (c, h, _) in entries(report, name) {
        assert_eq!((c, h), (chosen, how), "{name} in\n{report}");
    }
}

#[test]
fn entries_match_bytes_through_forced_variants_off_and_threads() {
    let _lock = patch_lock();
    use_sites();
    in_forked_child(|| {
        // Startup: every site selected for this (synthetic) CPU.
        let report = apply("");
        all_are(&report, "crc_step", "sse4_2", How::Inline);
        assert!(
            entries(&report, "twice").iter().all(|e| e.0 == "avx2"),
            "{report}"
        );

        for (site, candidate, how) in [
            ("mix", "bmi2", How::Inline),
            ("mix", "default", How::Unpatched),
            ("mix", "avx2", How::Call),
            ("crc_step", "default", How::Unpatched),
            ("crc_step", "sse4_2", How::Inline),
        ] {
            let report = apply(&format!("{site}={candidate}"));
            all_are(&report, site, candidate, how);
        }
        // A trampoline's default is its `jmp` as built or, when its body is straight-line code
        // (optimized builds), a copy of that body.
        let report = apply("twice=default");
        for (chosen, how, _) in entries(&report, "twice") {
            assert!(
                chosen == "default" && [How::Unpatched, How::Inline].contains(&how),
                "{report}"
            );
        }

        // `off` on a re-apply puts every default back (one thread: every site may be written).
        let off = apply("off");
        assert_eq!(off.disabled.as_deref(), Some("ALTPATCH=off"));
        for site in off.sites.iter().filter(|s| s.kind().is_some()) {
            assert_eq!(
                (site.chosen(), site.how()),
                ("default", How::Unpatched),
                "{off}"
            );
        }
        assert!(
            off.to_string().contains("sites restored to their defaults"),
            "{off}"
        );
        // A second `off` finds them in place.
        assert!(apply("off").sites.iter().all(|s| !s.written()));

        // The key's own write, then an apply with a configuration error: nothing is written and
        // each entry says what its site holds.
        apply("crc_step=sse4_2,mix=bmi2");
        assert!(TRACE.enable().expect("the key toggles").written > 0);
        let error = apply("mix=natve");
        assert!(error.error.is_some() && error.sites.iter().all(|s| !s.written()));
        all_are(&error, "crc_step", "sse4_2", How::Inline);
        all_are(&error, "mix", "bmi2", How::Inline);
        all_are(&error, "TRACE", "jmp", How::Jmp);

        // Another thread running: the two-instruction sequence cannot be rewritten, and its
        // entry says it still holds it, whatever was selected.
        let (stop, stopped) = mpsc::channel::<()>();
        let other = std::thread::spawn(move || stopped.recv());
        let live = apply("crc_step=default,mix=default");
        assert!(live.stats.live, "{live}");
        for site in live.site("crc_step") {
            assert_eq!(
                (site.chosen(), site.how()),
                ("sse4_2", How::Inline),
                "{live}"
            );
            assert!(
                !site.written() && site.why().contains("still runs sse4_2"),
                "{live}"
            );
            assert!(
                site.why()
                    .starts_with("default selected (forced by ALTPATCH)"),
                "{live}"
            );
        }
        all_are(&live, "mix", "default", How::Unpatched);
        let live_off = apply("off");
        all_are(&live_off, "crc_step", "sse4_2", How::Inline);
        all_are(&live_off, "TRACE", "default", How::Unpatched);
        stop.send(()).unwrap();
        other.join().unwrap().unwrap();

        // Alone again: `off` restores the rest.
        let off = apply("off");
        all_are(&off, "crc_step", "default", How::Unpatched);
        assert!(off.site("crc_step").all(|s| s.written()));
    });
}

/// The first case, in this (multi-threaded) test process: `apply_patches()`, then a
/// re-apply with `off`; each entry says what its site holds after each.
#[test]
fn off_after_startup_with_threads_running() {
    let _lock = patch_lock();
    use_sites();
    let startup = altpatch::apply_patches();
    assert_report_matches_bytes(startup);
    let off = Patcher::new().overrides_str("off").apply();
    assert_report_matches_bytes(&off);
    // Restore what the startup apply selected, for the other tests of this binary.
    let again = Patcher::new().apply();
    assert_report_matches_bytes(&again);
}
