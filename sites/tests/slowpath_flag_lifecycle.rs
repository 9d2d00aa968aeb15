//! The slowpath flag under `futex`, step by step: a sleeping waiter sets it, the unlock that
//! sees it kicks, the woken owner clears it when nobody is behind, a later sleeper sets it again
//! and is kicked in turn, and once contention is over an unlock no longer kicks (the native cost
//! comes back).
#![cfg(not(loom))]

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use altpatch_sites::RawTicketLock;
use altpatch_sites::pv::{self, PvLock};
use common::*;
use lock_api::RawMutex;

type Lock = RawTicketLock<1>;

fn wait_for(lock: &Lock, what: &str, cond: impl Fn(altpatch_sites::LockState) -> bool) {
    let start = Instant::now();
    while !cond(lock.state()) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "watchdog: {what}: {:?}",
            lock.state()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn set_by_sleepers_cleared_by_the_last_owner() {
    let _lock = patch_lock();
    force(PvLock::Futex);
    let lock: &'static Lock = Box::leak(Box::new(Lock::new()));
    let start = pv::stats();

    lock.lock();
    let (held_tx, held_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let first = std::thread::spawn(move || {
        lock.lock();
        held_tx.send(()).unwrap();
        release_rx.recv().unwrap();
        // SAFETY: locked above.
        unsafe { lock.unlock() };
    });
    wait_for(lock, "the first waiter sets the flag", |s| {
        s.queued() == 2 && s.slowpath()
    });
    std::thread::sleep(Duration::from_millis(20)); // asleep in the futex
    // SAFETY: locked above.
    unsafe { lock.unlock() };
    held_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the kick woke the first waiter");
    let s = lock.state();
    assert!(
        s.is_locked() && !s.slowpath(),
        "the new owner cleared the flag: {s:?}"
    );
    let mid = pv::stats();
    assert_eq!(mid.kicks - start.kicks, 1);
    assert_eq!(mid.flag_clears - start.flag_clears, 1);

    let second = std::thread::spawn(move || {
        lock.lock();
        // SAFETY: locked just above.
        unsafe { lock.unlock() };
    });
    wait_for(lock, "the second waiter sets the flag again", |s| {
        s.queued() == 2 && s.slowpath()
    });
    std::thread::sleep(Duration::from_millis(20));
    release_tx.send(()).unwrap();
    first.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !second.is_finished() {
        assert!(Instant::now() < deadline, "watchdog: {:?}", lock.state());
        std::thread::sleep(Duration::from_millis(1));
    }
    second.join().unwrap();
    let end = pv::stats();
    assert_eq!(end.kicks - mid.kicks, 1, "the second sleeper was kicked");
    assert_eq!(end.flag_clears - mid.flag_clears, 1);
    let s = lock.state();
    assert!(!s.is_locked() && !s.slowpath(), "{s:?}");

    // Contention is over: uncontended pairs take no slow path at all.
    for _ in 0..1000 {
        lock.lock();
        // SAFETY: locked just above.
        unsafe { lock.unlock() };
    }
    assert_eq!(
        pv::stats(),
        end,
        "no waits, kicks or clears without contention"
    );
}
