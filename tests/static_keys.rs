//! Static keys: each branch site is a 5-byte NOP or a `jmp` after patching, follows `enable` and
//! `disable` before and after `apply_patches()`, and stays right while threads run it.

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use altpatch::{Patcher, StaticKey};
use common::*;
use iced_x86::Mnemonic;

static TRACE: StaticKey = StaticKey::new(false);
static FAST: StaticKey = StaticKey::new(true);

#[inline(never)]
fn traced(x: u64) -> u64 {
    if altpatch::static_branch_unlikely!(TRACE) {
        x + 1000
    } else {
        x
    }
}

#[inline(never)]
fn fast(x: u64) -> u64 {
    if altpatch::static_branch_likely!(FAST) {
        x * 2
    } else {
        x * 3
    }
}

fn branch_sites(report: &altpatch::Report, key: &str) -> Vec<altpatch::SiteReport> {
    report.site(key).cloned().collect()
}

#[test]
fn branches_follow_their_keys_and_become_a_nop_or_a_jmp() {
    let _lock = patch_lock();
    // Before apply: the out-of-line check gives the right answer.
    assert_eq!(traced(black_box(1)), 1);
    TRACE.enable().unwrap();
    assert_eq!(traced(black_box(1)), 1001);
    TRACE.disable().unwrap();

    let report = Patcher::new().apply();
    let sites = branch_sites(&report, "TRACE");
    assert_eq!(sites.len(), 1, "{report}");
    assert_eq!(sites[0].kind(), Some(altpatch::SiteKind::StaticBranch));
    let instrs = decode_site(&sites[0]);
    assert_eq!(
        instrs.len(),
        1,
        "disabled unlikely branch is one NOP: {instrs:?}"
    );
    assert_eq!((instrs[0].mnemonic(), instrs[0].len()), (Mnemonic::Nop, 5));
    assert_eq!(traced(black_box(1)), 1);

    let update = TRACE.enable().unwrap();
    assert_eq!(
        (update.sites, update.written, update.unpatched),
        (1, 1, None)
    );
    let instrs = decode_site(&sites[0]);
    assert_eq!(instrs[0].mnemonic(), Mnemonic::Jmp, "{instrs:?}");
    assert!(rest_is_filler(&instrs, 1));
    assert_eq!(traced(black_box(1)), 1001);
    TRACE.disable().unwrap();
    assert_eq!(traced(black_box(1)), 1);

    // Likely: enabled falls through a NOP, disabled jumps.
    let fast_site = &branch_sites(&report, "FAST")[0];
    assert_eq!(decode_site(fast_site)[0].mnemonic(), Mnemonic::Nop);
    assert_eq!(fast(black_box(5)), 10);
    FAST.disable().unwrap();
    assert_eq!(decode_site(fast_site)[0].mnemonic(), Mnemonic::Jmp);
    assert_eq!(fast(black_box(5)), 15);
    FAST.enable().unwrap();
    assert_eq!(fast(black_box(5)), 10);
}

#[test]
fn toggling_ten_thousand_times_while_two_threads_run_the_branches() {
    let _lock = patch_lock();
    Patcher::new().apply();
    let toggles: usize = std::env::var("ALTPATCH_STRESS_TOGGLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let stop = AtomicBool::new(false);
    let calls = AtomicU64::new(0);
    // Odd while a `set` runs (flag stored, sites being rewritten), even when none does.
    let seq = AtomicU64::new(0);
    let checked = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                let (mut n, mut stable) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let s1 = seq.load(Ordering::Acquire);
                    let got = traced(black_box(n));
                    let flag = TRACE.is_enabled();
                    let s2 = seq.load(Ordering::Acquire);
                    assert!(got == n || got == n + 1000, "traced({n}) = {got}");
                    // No `set` ran during the call: the site must agree with the flag.
                    if s1 == s2 && s1.is_multiple_of(2) {
                        assert_eq!(got == n + 1000, flag, "branch disagrees with a settled key");
                        stable += 1;
                    }
                    n += 1;
                }
                calls.fetch_add(n, Ordering::Relaxed);
                checked.fetch_add(stable, Ordering::Relaxed);
            });
        }
        for i in 0..toggles {
            seq.fetch_add(1, Ordering::AcqRel);
            let update = TRACE.set(i % 2 == 0).expect("the key toggles");
            seq.fetch_add(1, Ordering::AcqRel);
            assert_eq!(update.written, update.sites, "{update:?}");
        }
        seq.fetch_add(1, Ordering::AcqRel);
        TRACE.disable().unwrap();
        seq.fetch_add(1, Ordering::AcqRel);
        stop.store(true, Ordering::Relaxed);
    });
    assert!(calls.load(Ordering::Relaxed) > 0);
    eprintln!(
        "{toggles} toggles; {} calls, {} checked against a settled key",
        calls.load(Ordering::Relaxed),
        checked.load(Ordering::Relaxed)
    );
    assert_eq!(traced(black_box(3)), 3);
}
