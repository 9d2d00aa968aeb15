//! The native baseline: a ticket lock with no paravirt support at all.

use std::hint::spin_loop;
use std::sync::atomic::{AtomicU32, Ordering};

pub struct PlainTicketLock {
    next: AtomicU32,
    serving: AtomicU32,
}

impl PlainTicketLock {
    pub const fn new() -> Self {
        PlainTicketLock {
            next: AtomicU32::new(0),
            serving: AtomicU32::new(0),
        }
    }

    #[inline]
    pub fn lock(&self) {
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        while self.serving.load(Ordering::Acquire) != ticket {
            spin_loop();
        }
    }

    #[inline]
    pub fn unlock(&self) {
        // Only the holder writes `serving`: a plain release increment.
        self.serving.store(
            self.serving.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Release,
        );
    }
}
