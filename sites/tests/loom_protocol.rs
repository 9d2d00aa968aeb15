//! Model checks of the lock protocol with loom: every interleaving (up to a preemption bound) and
//! every weak-memory outcome loom models, of the shipped protocol code, with a modeled futex.
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p altpatch-sites --release --test loom_protocol
//! ```
//!
//! Guards mutual exclusion in every variant; the two historical pvticketlock bugs (an unlock
//! touching the lock after releasing it, and a missing full barrier around the slowpath flag,
//! which left a waiter asleep with no one to kick it: loom reports that as a deadlock); and
//! `try_lock` racing with `lock`. `LOOM_MAX_PREEMPTIONS` overrides the bound (4).
#![cfg(loom)]

use altpatch_sites::RawTicketLock;
use altpatch_sites::pv::{self, PvLock};
use altpatch_sites::spinlock::model::{kill, lock, try_lock, unlock};
use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;

/// Spin once, then call `lock_spinning`: the pv op runs in every contended interleaving.
type Lock = RawTicketLock<1>;

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

fn model(variant: PvLock, f: impl Fn() + Sync + Send + 'static) {
    pv::model::set(variant);
    let mut builder = loom::model::Builder::new();
    if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
        builder.preemption_bound = Some(4);
    }
    builder.check(f);
}

fn two_threads_exclude_each_other(variant: PvLock) {
    model(variant, || {
        let g = Guarded::new();
        let other = {
            let g = g.clone();
            thread::spawn(move || g.increment())
        };
        g.increment();
        other.join().unwrap();
        assert_eq!(g.value(), 2);
    });
}

#[test]
fn native_excludes() {
    two_threads_exclude_each_other(PvLock::Native);
}

#[test]
fn futex_excludes() {
    two_threads_exclude_each_other(PvLock::Futex);
}

#[test]
fn sched_yield_excludes() {
    two_threads_exclude_each_other(PvLock::SchedYield);
}

#[test]
fn default_excludes() {
    two_threads_exclude_each_other(PvLock::Default);
}

/// Write-after-unlock: the waiter, once it owns the lock, frees it. Any access by the unlocker
/// after its release (a read of `tail`, a flag clear) races with the free, and loom reports it.
fn the_next_owner_may_free_the_lock(variant: PvLock) {
    model(variant, || {
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
    the_next_owner_may_free_the_lock(PvLock::Futex);
}

#[test]
fn native_unlock_never_touches_a_freed_lock() {
    the_next_owner_may_free_the_lock(PvLock::Native);
}

#[test]
fn default_unlock_never_touches_a_freed_lock() {
    the_next_owner_may_free_the_lock(PvLock::Default);
}

/// The missing-barrier deadlock: three threads under `futex`, so an owner that found the flag
/// set decides to clear it while a new waiter takes a ticket and sets the flag. Without the
/// barriers [A] (waiter) and [B] (owner) both can miss each other; the waiter then sleeps with no
/// flag for the unlock to see, nobody kicks it, and loom reports a deadlock.
#[test]
fn futex_never_loses_a_sleeper() {
    model(PvLock::Futex, || {
        let g = Guarded::new();
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let g = g.clone();
                thread::spawn(move || g.increment())
            })
            .collect();
        g.increment();
        for t in threads {
            t.join().unwrap();
        }
        assert!(
            !g.lock.state().slowpath(),
            "the last owner cleared the flag"
        );
        assert_eq!(g.value(), 3);
    });
}

/// `try_lock` races with `lock` and an unlock: it may fail, but never admits two owners.
#[test]
fn futex_try_lock_excludes() {
    model(PvLock::Futex, || {
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
