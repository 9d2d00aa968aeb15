//! A ticket lock serves in arrival order, in every variant: threads that queue one after another
//! behind a held lock get it in that order, whether they spin, yield or sleep in the futex (where
//! each kick must wake the next ticket's waiter, not just any).
#![cfg(not(loom))]

mod common;

use std::time::{Duration, Instant};

use altpatch_sites::RawTicketLock;
use altpatch_sites::pv::PvLock;
use common::*;
use lock_api::Mutex;

const WAITERS: usize = 6;

fn served_in_arrival_order(variant: PvLock) {
    let _lock = patch_lock();
    force(variant);
    // Threshold 1: waiters reach `lock_spinning` (the futex, for `futex`) at once.
    let order: &'static Mutex<RawTicketLock<1>, Vec<usize>> =
        Box::leak(Box::new(Mutex::new(Vec::new())));
    // SAFETY: only reads the two words.
    let raw = unsafe { order.raw() };
    let held = order.lock();
    let mut threads = Vec::new();
    for id in 0..WAITERS {
        threads.push(std::thread::spawn(move || order.lock().push(id)));
        let start = Instant::now();
        while raw.state().queued() < id as u32 + 2 {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "waiter {id} never queued: {:?}",
                raw.state()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    if variant.sleeps() {
        assert!(
            raw.state().slowpath(),
            "futex waiters announced their sleep"
        );
    }
    drop(held);
    let start = Instant::now();
    while !threads.iter().all(|t| t.is_finished()) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "watchdog: lock {:?}",
            raw.state()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(*order.lock(), (0..WAITERS).collect::<Vec<_>>(), "{variant}");
    assert!(!raw.state().slowpath(), "{:?}", raw.state());
}

#[test]
fn native_serves_in_arrival_order() {
    served_in_arrival_order(PvLock::Native);
}

#[test]
fn futex_serves_in_arrival_order() {
    served_in_arrival_order(PvLock::Futex);
}

#[test]
fn sched_yield_serves_in_arrival_order() {
    served_in_arrival_order(PvLock::SchedYield);
}

#[test]
fn default_serves_in_arrival_order() {
    served_in_arrival_order(PvLock::Default);
}
