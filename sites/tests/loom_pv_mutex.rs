//! Model checks of the hybrid lock ([`RawPvLock`]) with loom, the same way as
//! `loom_protocol.rs` does the ticket lock: the shipped protocol code, every interleaving up to a
//! preemption bound, a modelled futex that wakes one waiter at a time in arrival order.
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p altpatch-sites --release --test loom_pv_mutex
//! ```
//!
//! Mutual exclusion in every variant; under `futex`, no sleeper left behind (loom reports a
//! waiter asleep with nobody to wake it as a deadlock), with and without handoffs (the model's
//! waiters are either never or always past the fairness bound); no unlock or handoff touching the
//! lock after the next owner may have freed it; `try_lock` racing with `lock`; and the word back
//! to 0 once everyone is done. `LOOM_MAX_PREEMPTIONS` overrides the bound (3).
#![cfg(loom)]

use altpatch_sites::pv::{self, PvLock};
use altpatch_sites::pvlock::model::{kill, lock, set_impatient, try_lock, unlock};
use altpatch_sites::{PvLockState, RawPvLock};
use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;

/// Spin once, then call the slow-path op: it runs in every contended interleaving.
type Lock = RawPvLock<1>;

struct Guarded {
    lock: Lock,
    data: UnsafeCell<u32>,
}

// SAFETY: `data` is only touched under `lock`; loom reports any access that is not.
unsafe impl Sync for Guarded {}

impl Guarded {
    fn new() -> Arc<Guarded> {
        Arc::new(Guarded {
            lock: Lock::new(),
            data: UnsafeCell::new(0),
        })
    }

    fn increment(&self) {
        lock(&self.lock);
        // SAFETY: under the lock; loom checks that no other access is concurrent.
        self.data.with_mut(|d| unsafe { *d += 1 });
        // SAFETY: locked just above.
        unsafe { unlock(&self.lock) };
    }

    fn value(&self) -> u32 {
        lock(&self.lock);
        // SAFETY: under the lock.
        let v = self.data.with(|d| unsafe { *d });
        // SAFETY: locked just above.
        unsafe { unlock(&self.lock) };
        v
    }
}

fn model(variant: PvLock, impatient: bool, f: impl Fn() + Sync + Send + 'static) {
    pv::model::set(variant);
    set_impatient(impatient);
    let mut builder = loom::model::Builder::new();
    if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(f);
}

fn threads_exclude_each_other(variant: PvLock, impatient: bool, threads: usize) {
    model(variant, impatient, move || {
        let g = Guarded::new();
        let others: Vec<_> = (1..threads)
            .map(|_| {
                let g = g.clone();
                thread::spawn(move || g.increment())
            })
            .collect();
        g.increment();
        for t in others {
            t.join().unwrap();
        }
        assert_eq!(g.value(), threads as u32);
        assert_eq!(g.lock.state(), PvLockState(0), "quiescent word");
    });
}

#[test]
fn native_excludes() {
    threads_exclude_each_other(PvLock::Native, false, 2);
}

#[test]
fn sched_yield_excludes() {
    threads_exclude_each_other(PvLock::SchedYield, false, 2);
}

#[test]
fn default_excludes() {
    threads_exclude_each_other(PvLock::Default, false, 2);
}

#[test]
fn futex_excludes() {
    threads_exclude_each_other(PvLock::Futex, false, 2);
}

#[test]
fn futex_with_handoffs_excludes() {
    threads_exclude_each_other(PvLock::Futex, true, 2);
}

/// Three threads: parked waiters, a wake in flight (`PARKED` cleared, the woken waiter not back
/// yet) while another unlock happens, and stealing; nobody may be left asleep.
#[test]
fn futex_never_loses_a_sleeper() {
    threads_exclude_each_other(PvLock::Futex, false, 3);
}

/// The same with every waiter asking for a handoff: `WANT` closes the steal window, the unlock
/// hands over, and the one `WANT` waiter claims it.
#[test]
fn futex_handoffs_never_lose_a_sleeper() {
    threads_exclude_each_other(PvLock::Futex, true, 3);
}

/// The waiter, once it owns the lock, frees it: an unlocker (or a handoff) that touched the lock
/// after its releasing `cmpxchg` would race with the free, and loom reports it.
fn the_next_owner_may_free_the_lock(variant: PvLock, impatient: bool) {
    model(variant, impatient, || {
        let l = Arc::new(Lock::new());
        lock(&l);
        let next = {
            let l = l.clone();
            thread::spawn(move || {
                lock(&l);
                kill(&l);
            })
        };
        // SAFETY: locked above.
        unsafe { unlock(&l) };
        next.join().unwrap();
    });
}

#[test]
fn futex_unlock_never_touches_a_freed_lock() {
    the_next_owner_may_free_the_lock(PvLock::Futex, false);
}

#[test]
fn futex_handoff_never_touches_a_freed_lock() {
    the_next_owner_may_free_the_lock(PvLock::Futex, true);
}

#[test]
fn native_unlock_never_touches_a_freed_lock() {
    the_next_owner_may_free_the_lock(PvLock::Native, false);
}

/// `try_lock` races with `lock` and an unlock: it may fail, but never admits two owners.
fn try_lock_excludes(impatient: bool) {
    model(PvLock::Futex, impatient, || {
        let g = Guarded::new();
        let locker = {
            let g = g.clone();
            thread::spawn(move || g.increment())
        };
        let mut got = 0;
        if try_lock(&g.lock) {
            // SAFETY: under the lock.
            g.data.with_mut(|d| unsafe { *d += 1 });
            // SAFETY: try_lock succeeded.
            unsafe { unlock(&g.lock) };
            got = 1;
        }
        locker.join().unwrap();
        assert_eq!(g.value(), 1 + got);
    });
}

#[test]
fn futex_try_lock_excludes() {
    try_lock_excludes(false);
}

#[test]
fn futex_try_lock_with_handoffs_excludes() {
    try_lock_excludes(true);
}
