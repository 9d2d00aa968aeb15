//! A trampoline takes its candidate's body in place of its `jmp` when that body is short
//! straight-line code through a `ret` and no other thread runs (as at a program's start): a call
//! through the trampoline then runs exactly what a direct call runs. With other threads running,
//! a body that branches or calls, or a body holding a site, the trampoline stays a `jmp`.
//!
//! The candidate's body is straight-line only when optimized (`cargo test --release --test
//! trampoline_body`, which CI runs); unoptimized, the shim calls the candidate, and the test
//! checks that such a body is not copied.

mod common;

use std::hint::black_box;

use altpatch::{How, Patcher, SiteKind};
use common::*;
use iced_x86::Mnemonic;

#[target_feature(enable = "popcnt")]
fn popcount_hw(x: u64) -> u64 {
    u64::from(x.count_ones())
}

#[altpatch::alternative(popcnt => popcount_hw)]
fn popcount(x: u64) -> u64 {
    let (mut n, mut v) = (0, x);
    while v != 0 {
        v &= v - 1;
        n += 1;
    }
    n
}

/// A call site of its own, inlined into `via_inner_site`: once patched, that candidate's body is
/// `popcnt rax, rdi; ret`, straight-line, but a copy would miss the site's later patches.
#[altpatch::alternative(inline, popcnt => asm("popcnt rax, rdi"))]
fn inner_site(x: u64) -> u64 {
    u64::from(x.count_ones())
}

#[target_feature(enable = "popcnt")]
fn via_inner_site(x: u64) -> u64 {
    inner_site(x)
}

#[altpatch::alternative(popcnt => via_inner_site)]
fn outer(x: u64) -> u64 {
    u64::from(x.count_ones())
}

fn patch_popcount() -> altpatch::Report {
    Patcher::new()
        .overrides_str("trampoline_body::popcount=popcnt")
        .apply()
}

#[test]
fn with_one_thread_the_trampoline_holds_the_body_when_it_is_straight_line() {
    let _lock = patch_lock();
    if !std::arch::is_x86_feature_detected!("popcnt") {
        eprintln!("no POPCNT here: nothing to run");
        return;
    }
    in_forked_child(|| {
        let report = patch_popcount();
        assert!(!report.stats.live, "{report}");
        let site = report.site("trampoline_body::popcount").next().unwrap();
        assert_eq!(site.kind(), Some(SiteKind::Trampoline));
        let instrs = decode_site(site);
        if cfg!(debug_assertions) {
            // Unoptimized, the shim calls `popcount_hw`: not straight-line, so a `jmp`.
            assert_eq!(site.how(), How::Jmp, "{report}");
            assert_eq!(instrs[0].mnemonic(), Mnemonic::Jmp, "{instrs:?}");
        } else {
            assert_eq!(site.how(), How::Inline, "{report}");
            let body: Vec<Mnemonic> = instrs.iter().map(|i| i.mnemonic()).collect();
            assert_eq!(body[..2], [Mnemonic::Popcnt, Mnemonic::Ret], "{instrs:?}");
            assert!(rest_is_filler(&instrs, 2), "{instrs:?}");
        }
        assert_eq!(popcount(black_box(0xff00_ff00)), 16);
        // And back to the default's `jmp` (still one thread).
        let report = Patcher::new()
            .overrides_str("trampoline_body::popcount=default")
            .apply();
        let site = report.site("trampoline_body::popcount").next().unwrap();
        assert_eq!(decode_site(site)[0].mnemonic(), Mnemonic::Jmp);
        assert_eq!(popcount(black_box(0xff00_ff00)), 16);
    });
}

#[test]
fn a_body_holding_a_site_is_not_copied() {
    let _lock = patch_lock();
    if !std::arch::is_x86_feature_detected!("popcnt") {
        eprintln!("no POPCNT here: nothing to run");
        return;
    }
    in_forked_child(|| {
        // Twice: the first apply patches the inner site to `popcnt`, which makes the body
        // straight-line for the second.
        for _ in 0..2 {
            let report = Patcher::new()
                .overrides_str("trampoline_body::outer=popcnt,trampoline_body::inner_site=popcnt")
                .apply();
            assert!(!report.stats.live, "{report}");
            let site = report.site("trampoline_body::outer").next().unwrap();
            assert_eq!(site.how(), How::Jmp, "{report}");
            assert_eq!(decode_site(site)[0].mnemonic(), Mnemonic::Jmp);
        }
        assert_eq!(outer(black_box(0b1011)), 3);
    });
}

#[test]
fn with_other_threads_the_trampoline_stays_a_jmp() {
    let _lock = patch_lock();
    let report = patch_popcount();
    assert!(report.stats.live, "the harness's threads run");
    let site = report.site("trampoline_body::popcount").next().unwrap();
    assert_eq!(site.how(), How::Jmp, "{report}");
    let instrs = decode_site(site);
    assert_eq!(instrs[0].mnemonic(), Mnemonic::Jmp, "{instrs:?}");
    assert_eq!(
        instrs[0].near_branch_target(),
        candidate_branch_target(site, "popcnt", Mnemonic::Jmp)
    );
    assert_eq!(popcount(black_box(7)), 3);
}
