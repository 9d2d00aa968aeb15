//! The `pv_lock` sites' bytes after apply, read back and decoded: `native` leaves the
//! `lock_spinning` and `unlock_kick` sites as NOPs and the unlock as one inline
//! `add dword ptr [rdi], 2`; `futex` makes all three direct calls; `sched_yield` calls its yield
//! and inlines the native unlock; `default` calls the defaults. The lock works after each.
#![cfg(not(loom))]

mod common;

use altpatch::{How, SiteReport};
use altpatch_sites::TicketMutex;
use altpatch_sites::pv::{self, PvLock};
use common::*;
use iced_x86::{MemorySize, Mnemonic, OpKind, Register};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    LockSpinning,
    UnlockKick,
    Unlock,
}

/// Which op a `pv_lock` copy is, from its own candidate table: only the unlock has inline
/// `native` bytes; of the other two, only `lock_spinning` calls something for `sched_yield`.
fn op_of(site: &SiteReport) -> Op {
    let native = candidate_block(site, "native").0;
    let sched_yield = candidate_block(site, "sched_yield").0;
    match (native.is_empty(), sched_yield.is_empty()) {
        (false, _) => Op::Unlock,
        (true, false) => Op::LockSpinning,
        (true, true) => Op::UnlockKick,
    }
}

fn assert_native_unlock(site: &SiteReport) {
    assert_eq!(site.how(), How::Inline, "{site:?}");
    let instrs = decode_site(site);
    let add = instrs[0];
    assert_eq!(add.mnemonic(), Mnemonic::Add, "{instrs:?}");
    assert!(
        !add.has_lock_prefix(),
        "a plain add: the owner is the only writer"
    );
    assert_eq!(add.op0_kind(), OpKind::Memory);
    assert_eq!(add.memory_base(), Register::RDI);
    assert_eq!(add.memory_displacement64(), 0, "head is at offset 0");
    assert_eq!(add.memory_size(), MemorySize::UInt32);
    assert_eq!(add.immediate(1), 2, "TICKET_INC");
    assert!(rest_is_filler(&instrs, 1), "{instrs:?}");
}

fn check_variant(variant: PvLock) {
    let m = TicketMutex::new(0u64);
    *m.lock() += 1; // the sites are in this binary
    let report = force(variant);
    let mut seen = Vec::new();
    // The ticket lock's own sites: the hybrid lock's share the name and live in `pvlock.rs`
    // (linked in too where the build keeps them, as release builds do).
    for site in report
        .site(pv::SITE)
        .filter(|s| s.file().ends_with("/pv.rs"))
    {
        let op = op_of(site);
        seen.push(op);
        match (variant, op) {
            (PvLock::Native, Op::LockSpinning | Op::UnlockKick)
            | (PvLock::SchedYield, Op::UnlockKick) => {
                assert_eq!(site.how(), How::Nop, "{site:?}");
                assert_nops(site);
            }
            (PvLock::Native | PvLock::SchedYield, Op::Unlock) => assert_native_unlock(site),
            (PvLock::Futex | PvLock::SchedYield, _) => {
                assert_eq!(site.how(), How::Call, "{site:?}");
                assert_calls(site, variant.name());
            }
            (PvLock::Default, _) => assert_calls(site, "default"),
        }
    }
    for op in [Op::LockSpinning, Op::UnlockKick, Op::Unlock] {
        assert!(seen.contains(&op), "no {op:?} site in:\n{report}");
    }
    // The patched lock still excludes and counts.
    contended_run::<4>(2, 2_000, std::time::Duration::from_secs(20));
    *m.lock() += 1;
    assert_eq!(m.into_inner(), 2);
}

#[test]
fn native_nops_the_ops_and_inlines_a_plain_add() {
    let _lock = patch_lock();
    check_variant(PvLock::Native);
}

#[test]
fn futex_calls_all_three_ops() {
    let _lock = patch_lock();
    check_variant(PvLock::Futex);
}

#[test]
fn sched_yield_calls_its_yield_and_inlines_the_native_unlock() {
    let _lock = patch_lock();
    check_variant(PvLock::SchedYield);
}

#[test]
fn default_calls_the_defaults_again() {
    let _lock = patch_lock();
    check_variant(PvLock::Native);
    check_variant(PvLock::Default);
}
