//! `PvMutex` as a `lock_api` mutex: const construction, `try_lock` and `is_locked` in every
//! variant, guards released by another thread; and under `futex`, a waiter that has waited past
//! `FAIR_TIMEOUT` gets the lock handed over even though the owner keeps re-taking it.
#![cfg(not(loom))]

mod common;

use std::time::Duration;

use altpatch_sites::pv::PvLock;
use altpatch_sites::pvlock::stats;
use altpatch_sites::{FAIR_TIMEOUT, PvLockState, PvMutex, RawPvLock};
use common::*;
use lock_api::RawMutex;

static COUNTER: PvMutex<u64> = PvMutex::new(0);

#[test]
fn a_static_mutex_counts() {
    let _lock = patch_lock();
    four_threads_count_to_4000(&COUNTER);
}

#[test]
fn try_lock_and_is_locked_in_every_variant() {
    let _lock = patch_lock();
    for variant in PvLock::ALL {
        force(variant);
        let lock: &'static RawPvLock = Box::leak(Box::new(RawPvLock::new()));
        assert!(!lock.is_locked());
        assert!(lock.try_lock(), "{variant}");
        assert!(lock.is_locked());
        assert!(!lock.try_lock(), "{variant}: held");
        assert!(
            !std::thread::spawn(|| lock.try_lock()).join().unwrap(),
            "{variant}: held, seen from another thread"
        );
        // SAFETY: locked by the try_lock above.
        unsafe { lock.unlock() };
        assert_eq!(lock.state(), PvLockState(0), "{variant}");
        lock.lock();
        assert_eq!(lock.state(), PvLockState(1), "{variant}: the fast path");
        // SAFETY: locked just above.
        unsafe { lock.unlock() };
        assert!(!lock.is_locked());
    }
    force(PvLock::Native);
}

#[test]
fn a_guard_can_be_released_by_another_thread() {
    let _lock = patch_lock();
    for variant in [PvLock::Native, PvLock::Futex] {
        force(variant);
        let m: &'static PvMutex<u32> = Box::leak(Box::new(PvMutex::new(0)));
        let mut g = m.lock();
        *g += 1;
        std::thread::spawn(move || drop(g)).join().unwrap();
        assert_eq!(*m.try_lock().expect("released by the other thread"), 1);
    }
    force(PvLock::Native);
}

/// The owner unlocks (waking the parked waiter) and at once steals the lock back, as a running
/// thread does; the waiter, woken past `FAIR_TIMEOUT`, sets `WANT`, and the owner's next unlock
/// must hand the lock over. Retried a bounded number of times, since the waiter may instead win
/// the race for the free lock (then there is nothing to hand over).
#[test]
fn futex_hands_over_to_a_waiter_past_the_fairness_bound() {
    let _lock = patch_lock();
    force(PvLock::Futex);
    let before = stats();
    let m: &'static PvMutex<u64> = Box::leak(Box::new(PvMutex::new(0)));
    for _ in 0..200 {
        let g = m.lock();
        let waiter = std::thread::spawn(move || *m.lock() += 1);
        // The waiter spins out, parks, and is then past the bound.
        std::thread::sleep(FAIR_TIMEOUT * 4);
        drop(g);
        let g = m.lock();
        std::thread::sleep(Duration::from_millis(1));
        drop(g);
        waiter.join().unwrap();
        if stats().handoffs > before.handoffs {
            break;
        }
    }
    assert!(
        stats().handoffs > before.handoffs,
        "no handoff in 200 rounds: {:?}",
        stats()
    );
    // SAFETY: only reads the word.
    assert_eq!(unsafe { m.raw() }.state(), PvLockState(0));
    force(PvLock::Native);
}
