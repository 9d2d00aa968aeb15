//! `TicketMutex` as a `lock_api` mutex: const construction, `try_lock` only when no ticket is
//! outstanding, `is_locked`, guards that may be sent to and released by another thread, and the
//! state snapshot's accounting.
#![cfg(not(loom))]

mod common;

use std::time::{Duration, Instant};

use altpatch_sites::pv::PvLock;
use altpatch_sites::{RawTicketLock, TicketMutex};
use common::*;
use lock_api::RawMutex;

static COUNTER: TicketMutex<u64> = TicketMutex::new(0);

#[test]
fn a_static_mutex_counts() {
    let _lock = patch_lock();
    four_threads_count_to_4000(&COUNTER);
}

#[test]
fn try_lock_succeeds_only_when_no_ticket_is_outstanding() {
    let _lock = patch_lock();
    for variant in PvLock::ALL {
        force(variant);
        let lock: &'static RawTicketLock = Box::leak(Box::new(RawTicketLock::new()));
        assert!(!lock.is_locked());
        assert!(lock.try_lock());
        assert!(lock.is_locked());
        assert!(!lock.try_lock(), "held");
        assert_eq!(lock.state().queued(), 1);
        let waiter = std::thread::spawn(move || {
            lock.lock();
            // SAFETY: locked just above.
            unsafe { lock.unlock() };
        });
        let start = Instant::now();
        while lock.state().queued() < 2 {
            assert!(start.elapsed() < Duration::from_secs(20));
            std::thread::yield_now();
        }
        assert!(!lock.try_lock(), "held, with a waiter");
        // SAFETY: try_lock succeeded above.
        unsafe { lock.unlock() };
        waiter.join().unwrap();
        assert!(!lock.is_locked());
        assert!(lock.try_lock(), "free again");
        // SAFETY: just locked.
        unsafe { lock.unlock() };
        assert_eq!(lock.state().queued(), 0);
        assert_eq!(lock.state().head, 6, "three tickets served, in steps of 2");
    }
}

#[test]
fn a_guard_may_be_released_by_another_thread() {
    let _lock = patch_lock();
    let m: &'static TicketMutex<Vec<u32>> = Box::leak(Box::new(TicketMutex::new(Vec::new())));
    let mut guard = m.lock();
    guard.push(1);
    std::thread::spawn(move || {
        guard.push(2);
        drop(guard);
    })
    .join()
    .unwrap();
    assert!(!m.is_locked());
    assert_eq!(*m.lock(), [1, 2]);
}
