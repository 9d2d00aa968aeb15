//! The hybrid lock's `pv_lock` sites after apply, read back and decoded: `native` makes the
//! slow-path op a call to the spinning slow path and the unlock one inline
//! `mov byte ptr [rdi], 0`; `futex` makes both calls; `sched_yield` calls its yielding slow path
//! and inlines the native unlock; `default` calls the defaults. Selection follows the ticket
//! lock's (same name, same candidate table), and the lock works after each.
#![cfg(not(loom))]

mod common;

use altpatch::{How, Patcher, SiteReport};
use altpatch_sites::PvMutex;
use altpatch_sites::pv::{self, PvLock};
use common::*;
use iced_x86::{MemorySize, Mnemonic, OpKind, Register};

/// The hybrid lock's own sites (the ticket lock's, if linked in, live in `pv.rs`).
fn hybrid_sites(report: &altpatch::Report) -> Vec<&SiteReport> {
    report
        .site(pv::SITE)
        .filter(|s| s.file().ends_with("pvlock.rs"))
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Slowpath,
    Unlock,
}

/// Both ops have a `native` block: the slow path's is a call, the unlock's a `mov`.
fn op_of(site: &SiteReport) -> Op {
    let (bytes, ip) = candidate_block(site, "native");
    match decode(bytes, ip)[0].mnemonic() {
        Mnemonic::Call => Op::Slowpath,
        _ => Op::Unlock,
    }
}

fn use_the_lock() -> u64 {
    let m = PvMutex::new(1u64);
    *m.lock() += 1;
    m.into_inner()
}

fn assert_native_unlock(site: &SiteReport) {
    assert_eq!(site.how(), How::Inline, "{site:?}");
    let instrs = decode_site(site);
    let store = instrs[0];
    assert_eq!(store.mnemonic(), Mnemonic::Mov, "{instrs:?}");
    assert!(!store.has_lock_prefix());
    assert_eq!(store.op0_kind(), OpKind::Memory);
    assert_eq!(store.memory_base(), Register::RDI);
    assert_eq!(store.memory_displacement64(), 0, "the word is at offset 0");
    assert_eq!(
        store.memory_size(),
        MemorySize::UInt8,
        "the low byte: the word is LOCKED"
    );
    assert_eq!(
        store.len(),
        5,
        "as long as the call a thread may return from"
    );
    assert_eq!(store.immediate(1), 0);
    assert!(rest_is_filler(&instrs, 1), "{instrs:?}");
}

fn check_variant(variant: PvLock) {
    assert_eq!(use_the_lock(), 2); // the sites are in this binary
    let report = force(variant);
    let sites = hybrid_sites(&report);
    let mut seen = Vec::new();
    for site in sites {
        let op = op_of(site);
        seen.push(op);
        match (variant, op) {
            (PvLock::Native | PvLock::SchedYield, Op::Unlock) => assert_native_unlock(site),
            (PvLock::Default, _) => assert_calls(site, "default"),
            (_, _) => {
                assert_eq!(site.how(), How::Call, "{site:?}");
                assert_calls(site, variant.name());
            }
        }
    }
    for op in [Op::Slowpath, Op::Unlock] {
        assert!(seen.contains(&op), "no {op:?} site in:\n{report}");
    }
    // The patched lock still excludes and counts.
    pv_mutex_run::<4>(4, 2_000, std::time::Duration::from_secs(20));
    assert_eq!(use_the_lock(), 2);
}

#[test]
fn native_calls_the_spinning_slow_path_and_inlines_a_store() {
    let _lock = patch_lock();
    check_variant(PvLock::Native);
}

#[test]
fn futex_calls_both_ops() {
    let _lock = patch_lock();
    check_variant(PvLock::Futex);
}

#[test]
fn sched_yield_calls_its_slow_path_and_inlines_the_native_unlock() {
    let _lock = patch_lock();
    check_variant(PvLock::SchedYield);
}

#[test]
fn default_calls_the_defaults_again() {
    let _lock = patch_lock();
    check_variant(PvLock::Native);
    check_variant(PvLock::Default);
}

#[test]
fn the_sites_share_the_ticket_locks_candidate_table() {
    let _lock = patch_lock();
    use_the_lock();
    let descriptors: Vec<_> = altpatch::__private::records()
        .iter()
        .map(|r| r.descriptor())
        .filter(|d| d.name == pv::SITE && d.file.ends_with("pvlock.rs"))
        .collect();
    let lines: std::collections::BTreeSet<u32> = descriptors.iter().map(|d| d.line).collect();
    assert_eq!(lines.len(), 2, "the slow path and the unlock: {lines:?}");
    for d in &descriptors {
        let table: Vec<(&str, &str)> = d
            .candidates
            .iter()
            .map(|c| (c.name, c.predicate_text))
            .collect();
        // The literal table of tests/pv_lock_selection.rs.
        assert_eq!(
            table,
            [
                ("default", "always"),
                ("futex", "all(hypervisor, not(kvm_hints_realtime))"),
                ("sched_yield", "when = only_if_forced"),
                ("native", "any(not(hypervisor), kvm_hints_realtime)"),
            ],
            "{}:{}",
            d.file,
            d.line
        );
    }
}

#[test]
fn selection_follows_the_ticket_lock() {
    let _lock = patch_lock();
    use_the_lock();
    for (cpu, expected) in [
        (bare_metal(), PvLock::Native),
        (kvm(1), PvLock::Native),
        (kvm(0), PvLock::Futex),
        (other_hypervisor(b"XenVMMXenVMM"), PvLock::Futex),
    ] {
        let report = Patcher::new().cpu(cpu).apply();
        assert!(report.error.is_none(), "{report}");
        let sites = hybrid_sites(&report);
        assert!(!sites.is_empty(), "{report}");
        for s in sites {
            assert_eq!(s.chosen(), expected.name(), "{s:?}");
        }
        assert_eq!(pv::chosen(&report), Some(expected), "{report}");
        assert_eq!(use_the_lock(), 2);
    }
    force(PvLock::Native);
}
