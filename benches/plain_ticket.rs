//! The native baseline: a ticket lock with no paravirt support at all, guarding a `u64` like
//! the other locks in the benches.

use std::cell::UnsafeCell;
use std::hint::spin_loop;
use std::sync::atomic::{AtomicU32, Ordering};

pub struct PlainTicketMutex {
    next: AtomicU32,
    serving: AtomicU32,
    value: UnsafeCell<u64>,
}

// SAFETY: `value` is only touched between `lock` and `unlock`, which exclude each other.
unsafe impl Sync for PlainTicketMutex {}

impl PlainTicketMutex {
    pub const fn new() -> Self {
        PlainTicketMutex {
            next: AtomicU32::new(0),
            serving: AtomicU32::new(0),
            value: UnsafeCell::new(0),
        }
    }

    /// Takes the lock, adds one to the value, releases it.
    #[inline]
    pub fn increment(&self) {
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        while self.serving.load(Ordering::Acquire) != ticket {
            spin_loop();
        }
        // SAFETY: the lock is held.
        unsafe { *self.value.get() += 1 };
        // Only the holder writes `serving`: a plain release increment.
        self.serving.store(
            self.serving.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Release,
        );
    }
}
