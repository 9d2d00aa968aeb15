//! The userland "halt" and "kick" of the `futex` pv ops. For the ticket lock: a futex on the
//! lock's `head` word, with one bitset bit per ticket, so a kick wakes the next ticket's waiter
//! instead of all of them (the kernel kicked the one vCPU waiting for that ticket). For the hybrid
//! lock ([`crate::pvlock`]): a futex on its state word, woken one waiter at a time.

use crate::spinlock::{TICKET_INC, Tickets};
#[cfg(not(loom))]
use crate::sync::AtomicU32;

/// The bitset that matches every waiter.
pub(crate) const ANY: u32 = u32::MAX;

/// The wait/wake bitset bit of `ticket`. Tickets 32 apart share a bit: a kick may wake another
/// waiter too, which re-checks `head` and sleeps again.
pub(crate) fn ticket_bit(ticket: u32) -> u32 {
    1 << ((ticket / TICKET_INC) % 32)
}

/// Sleeps while `head` equals `expected`, until a kick for one of `bits`. Any return (kicked, the
/// value differed, a signal, a spurious wake-up) sends the caller back to look at `head`.
pub(crate) fn wait(lock: &Tickets, expected: u32, bits: u32) {
    wait_on(lock.head(), expected, bits);
}

/// Wakes the waiters on `lock` whose bits meet `bits`. `lock` is only an address: the lock may
/// already be freed by its next owner.
pub(crate) fn wake(lock: *const Tickets, bits: u32) {
    // `head` is at offset 0: a cast, no dereference.
    wake_on(lock.cast::<u32>(), i32::MAX, bits);
}

/// Sleeps while `word` holds `expected`, until a wake for one of `bits`. Any return (woken, the
/// value differed, a signal, a spurious wake-up) sends the caller back to look at the word.
#[cfg(all(not(loom), target_os = "linux"))]
pub(crate) fn wait_on(word: &AtomicU32, expected: u32, bits: u32) {
    // SAFETY: FUTEX_WAIT_BITSET reads the aligned `u32` behind `word`, which outlives this call;
    // the kernel compares it with `expected` and queues us atomically. A null timeout waits
    // without limit; the unused `uaddr2` is null.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT_BITSET | libc::FUTEX_PRIVATE_FLAG,
            expected,
            core::ptr::null::<libc::timespec>(),
            core::ptr::null::<u32>(),
            bits,
        );
    }
}

/// Wakes up to `count` waiters on `word` whose bits meet `bits`, oldest first. `word` is only an
/// address: the lock it belongs to may already be freed by its next owner.
#[cfg(all(not(loom), target_os = "linux"))]
pub(crate) fn wake_on(word: *const u32, count: i32, bits: u32) {
    // SAFETY: FUTEX_WAKE_BITSET on a private futex uses the address only as a key and never
    // touches the memory, so a freed lock is harmless (at worst a spurious wake-up of a later
    // futex at that address, which futex users tolerate). Timeout and `uaddr2` are unused.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word,
            libc::FUTEX_WAKE_BITSET | libc::FUTEX_PRIVATE_FLAG,
            count,
            core::ptr::null::<libc::timespec>(),
            core::ptr::null::<u32>(),
            bits,
        );
    }
}

/// Without futexes the "halt" is a yield; nothing sleeps, so nothing needs a kick.
#[cfg(all(not(loom), not(target_os = "linux")))]
pub(crate) fn wait_on(_word: &AtomicU32, _expected: u32, _bits: u32) {
    std::thread::yield_now();
}

#[cfg(all(not(loom), not(target_os = "linux")))]
pub(crate) fn wake_on(_word: *const u32, _count: i32, _bits: u32) {}

/// The model's futex: a wait queue outside the lock's memory (like the kernel's hash table), so
/// a wake by address touches nothing of a freed lock; the value check and the queueing are one
/// step under the queue's mutex, as in the kernel.
#[cfg(loom)]
mod model {
    use crate::sync::AtomicU32;
    use crate::sync::Ordering::SeqCst;
    use loom::sync::{Condvar, Mutex};

    struct Waiter {
        id: usize,
        key: usize,
        bits: u32,
        woken: bool,
    }

    #[derive(Default)]
    struct Queue {
        next_id: usize,
        waiters: Vec<Waiter>,
    }

    struct Kernel {
        queue: Mutex<Queue>,
        wakeup: Condvar,
    }

    loom::lazy_static! {
        static ref KERNEL: Kernel = Kernel {
            queue: Mutex::new(Queue::default()),
            wakeup: Condvar::new(),
        };
    }

    pub(crate) fn wait_on(word: &AtomicU32, expected: u32, bits: u32) {
        let key = word as *const AtomicU32 as usize;
        let mut queue = KERNEL.queue.lock().unwrap();
        if word.load(SeqCst) != expected {
            return;
        }
        let id = queue.next_id;
        queue.next_id += 1;
        queue.waiters.push(Waiter {
            id,
            key,
            bits,
            woken: false,
        });
        loop {
            queue = KERNEL.wakeup.wait(queue).unwrap();
            if let Some(i) = queue.waiters.iter().position(|w| w.id == id && w.woken) {
                queue.waiters.remove(i);
                return;
            }
        }
    }

    /// Wakes the `count` oldest matching waiters not woken yet (the queue is in arrival order).
    pub(crate) fn wake_on(word: *const u32, count: i32, bits: u32) {
        let key = word as usize;
        let mut queue = KERNEL.queue.lock().unwrap();
        let mut woke = false;
        let mut left = count;
        for w in queue.waiters.iter_mut() {
            if left > 0 && w.key == key && !w.woken && w.bits & bits != 0 {
                w.woken = true;
                woke = true;
                left -= 1;
            }
        }
        drop(queue);
        if woke {
            KERNEL.wakeup.notify_all();
        }
    }
}

#[cfg(loom)]
pub(crate) use model::{wait_on, wake_on};
