//! The hybrid lock under contention for real, in every variant: 2, 4, 8 and 16 threads on this
//! 2-core machine, no overlap, no lost update, no hang (a watchdog fails the run when no critical
//! section completes for a bounded time), the word back to 0 afterwards. Both the shipped spin
//! threshold and a tiny one (1) that sends lockers to the slow-path op all the time.
//! `ALTPATCH_STRESS=1` runs twenty times as many operations.
#![cfg(not(loom))]

mod common;

use std::time::Duration;

use altpatch_sites::PV_SPIN_THRESHOLD;
use altpatch_sites::pv::PvLock;
use altpatch_sites::pvlock::stats;
use common::*;

const THREADS: [usize; 4] = [2, 4, 8, 16];
/// A run fails when no critical section completes for this long.
const STALL: Duration = Duration::from_secs(20);

/// Operations per thread: 20 000 critical sections per run.
fn ops(threads: usize) -> u64 {
    let per_thread = 20_000 / threads as u64;
    if long_stress() {
        per_thread * 20
    } else {
        per_thread
    }
}

fn stress(variant: PvLock) {
    let _lock = patch_lock();
    force(variant);
    let before = stats();
    for threads in THREADS {
        let n = ops(threads);
        let t1 = pv_mutex_run::<PV_SPIN_THRESHOLD>(threads, n, STALL);
        let t2 = pv_mutex_run::<1>(threads, n, STALL);
        eprintln!(
            "{variant:>11} {threads:2} threads x {n} ops: {t1:?} (threshold \
             {PV_SPIN_THRESHOLD}), {t2:?} (threshold 1); {:?} so far",
            stats()
        );
    }
    let after = stats();
    if variant.sleeps() {
        // A convoy of up to 16 threads behind a 3 ms hold, on 2 CPUs: lockers park.
        assert!(after.parks > before.parks, "the futex slow path never ran");
        assert!(after.wakes > before.wakes, "no unlock ever woke a sleeper");
    } else {
        assert_eq!(after.parks, before.parks, "{variant} never parks");
        assert_eq!(after.wakes, before.wakes, "{variant} never wakes");
        assert_eq!(
            after.handoffs, before.handoffs,
            "{variant} never hands over"
        );
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
