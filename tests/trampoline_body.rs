//! A trampoline takes its candidate's body in place of its `jmp` when that body is short
//! straight-line code through a `ret` and no other thread runs (as at a program's start): a call
//! through the trampoline then runs exactly what a direct call runs. With other threads running,
//! a body that branches or calls, or a body holding a site, the trampoline stays a `jmp`.
//!
//! Whether a candidate's body is straight-line depends on the build (optimized or not, frame
//! pointers, coverage counters, `target-cpu`): the test decides it from the body's bytes and
//! checks the trampoline holds the body or, the documented fallback, its `jmp`. CI runs it in
//! release (straight-line bodies) and in debug (shims that call).

mod common;

use std::hint::black_box;

use altpatch::{How, Patcher, SiteKind, SiteReport};
use common::*;
use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind};

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

/// The instructions of the function at `target` up to and including its `ret`, when they are
/// straight-line (nothing before the `ret` branches, calls or traps) and fit in `room` bytes:
/// what a trampoline of `room` bytes may hold instead of its `jmp target`. Decided here from the
/// bytes alone, independently of the planner, since whether a body is straight-line depends on
/// the build (unoptimized, frame pointers, coverage counters, `target-cpu`).
fn straight_line_body(target: u64, room: usize) -> Option<Vec<Instruction>> {
    // SAFETY: `target` is a function in this program's text; the trampoline's 16 bytes from its
    // start are mapped (a function's code, or the padding and code after it).
    let bytes = unsafe { std::slice::from_raw_parts(target as *const u8, room) };
    let mut body = Vec::new();
    for instr in Decoder::with_ip(64, bytes, target, DecoderOptions::NONE).iter() {
        if instr.is_invalid() {
            return None;
        }
        body.push(instr);
        if instr.code() == Code::Retnq {
            return Some(body);
        }
        // Direct branches of every kind (jcc, jmp, call, loop, jrcxz) have a near-branch
        // operand; the rest that leave are named.
        let leaves = (0..instr.op_count()).any(|i| {
            matches!(
                instr.op_kind(i),
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
            )
        }) || matches!(
            instr.mnemonic(),
            Mnemonic::Jmp
                | Mnemonic::Call
                | Mnemonic::Ret
                | Mnemonic::Int3
                | Mnemonic::Int
                | Mnemonic::Ud2
                | Mnemonic::Syscall
        );
        if leaves {
            return None;
        }
    }
    None // no `ret` within `room` bytes
}

/// Asserts the trampoline `site` holds what choosing `candidate` promises with no other thread:
/// the candidate's body when it is straight-line, else a `jmp` to it. Returns which it was.
fn assert_holds(site: &SiteReport, candidate: &str) -> How {
    let target = candidate_branch_target(site, candidate, Mnemonic::Jmp);
    let instrs = decode_site(site);
    match straight_line_body(target, site.len()) {
        Some(body) => {
            // (The default's body copy is reported as the default running, `Unpatched`.)
            if candidate != "default" {
                assert_eq!(site.how(), How::Inline, "{candidate}: {site:?}");
            }
            let held: Vec<Mnemonic> = instrs.iter().map(|i| i.mnemonic()).collect();
            let want: Vec<Mnemonic> = body.iter().map(|i| i.mnemonic()).collect();
            assert_eq!(held[..want.len()], want[..], "{candidate}: {instrs:?}");
            assert!(rest_is_filler(&instrs, want.len()), "{instrs:?}");
            How::Inline
        }
        None => {
            assert_eq!(
                instrs[0].mnemonic(),
                Mnemonic::Jmp,
                "{candidate}: {instrs:?}"
            );
            assert_eq!(instrs[0].near_branch_target(), target, "{candidate}");
            How::Jmp
        }
    }
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
        let form = assert_holds(site, "popcnt");
        if form == How::Inline {
            let instrs = decode_site(site);
            assert!(
                instrs.iter().any(|i| i.mnemonic() == Mnemonic::Popcnt),
                "the body copied is popcount_hw's: {instrs:?}"
            );
        } else {
            // The documented fallback: this build's candidate body branches or calls
            // (unoptimized, or instrumented), so the trampoline keeps its `jmp`.
            eprintln!("popcount_hw is not straight-line in this build: the trampoline is a jmp");
        }
        assert_eq!(popcount(black_box(0xff00_ff00)), 16);
        // And back to the default (still one thread): its `jmp`, or its body where the build
        // made that straight-line too (`target-cpu` with POPCNT compiles the loop to `popcnt`).
        let report = Patcher::new()
            .overrides_str("trampoline_body::popcount=default")
            .apply();
        let site = report.site("trampoline_body::popcount").next().unwrap();
        assert_holds(site, "default");
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
