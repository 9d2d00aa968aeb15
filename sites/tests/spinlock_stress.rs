//! Contention for real, in every variant: 2, 4, 8 and 16 threads on this 2-core machine, no
//! overlap, no lost update, no hang (a watchdog fails the run after a bounded time). Both the
//! shipped spin threshold and a tiny one (1) that sends waiters to `lock_spinning` all the time.
//! `ALTPATCH_STRESS=1` runs many more operations.
#![cfg(not(loom))]

mod common;

use std::time::Duration;

use altpatch_sites::SPIN_THRESHOLD;
use altpatch_sites::pv::{self, PvLock};
use common::*;

const THREADS: [usize; 4] = [2, 4, 8, 16];
/// A run fails when no ticket is served for this long.
const STALL: Duration = Duration::from_secs(20);

/// Operations per thread. Every run starts as a convoy (all threads queued), and with more
/// threads than cores plain spinning keeps handing the lock to preempted waiters, each such
/// handoff waiting out a scheduler time slice (the collapse the pv ops exist to avoid: some
/// milliseconds per handoff here). So `native` gets about a hundred handoffs per oversubscribed
/// run, the others a few thousand.
fn ops(variant: PvLock, threads: usize) -> u64 {
    let handoffs = match (variant, threads) {
        (_, 2) => 3_000,
        (PvLock::Native, _) => 120,
        _ => 2_400,
    };
    let per_thread = handoffs / threads as u64;
    if long_stress() {
        per_thread * 20
    } else {
        per_thread
    }
}

fn stress(variant: PvLock) {
    let _lock = patch_lock();
    force(variant);
    for threads in THREADS {
        let before = pv::stats();
        let n = ops(variant, threads);
        let t1 = contended_run::<SPIN_THRESHOLD>(threads, n, STALL);
        let t2 = contended_run::<1>(threads, n, STALL);
        let after = pv::stats();
        eprintln!(
            "{variant:>11} {threads:2} threads x {n} ops: {t1:?} (threshold {SPIN_THRESHOLD}), \
             {t2:?} (threshold 1); futex waits {}, kicks {}, flag clears {}",
            after.waits - before.waits,
            after.kicks - before.kicks,
            after.flag_clears - before.flag_clears
        );
        if variant.sleeps() {
            // The tiny threshold sends every waiter through the futex op.
            assert!(after.waits > before.waits, "the futex slow path never ran");
            assert!(after.kicks > before.kicks, "no unlock ever kicked");
        } else {
            assert_eq!(
                after.waits, before.waits,
                "{variant} never waits in a futex"
            );
            assert_eq!(after.kicks, before.kicks, "{variant} never kicks");
        }
    }
}

#[test]
fn native_under_contention() {
    stress(PvLock::Native);
}

#[test]
fn futex_under_contention() {
    stress(PvLock::Futex);
}

#[test]
fn sched_yield_under_contention() {
    stress(PvLock::SchedYield);
}

#[test]
fn default_under_contention() {
    stress(PvLock::Default);
}
