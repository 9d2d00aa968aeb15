//! The userland "halt" and "kick" of the `futex` pv ops: a futex on the lock's `head` word, with
//! one bitset bit per ticket, so a kick wakes the next ticket's waiter instead of all of them (the
//! kernel kicked the one vCPU waiting for that ticket).

use crate::spinlock::{TICKET_INC, Tickets};

/// The wait/wake bitset bit of `ticket`. Tickets 32 apart share a bit: a kick may wake another
/// waiter too, which re-checks `head` and sleeps again.
pub(crate) fn ticket_bit(ticket: u32) -> u32 {
    1 << ((ticket / TICKET_INC) % 32)
}

/// Sleeps while `head` equals `expected`, until a kick for one of `bits`. Any return (kicked, the
/// value differed, a signal, a spurious wake-up) sends the caller back to look at `head`.
#[cfg(all(not(loom), target_os = "linux"))]
pub(crate) fn wait(lock: &Tickets, expected: u32, bits: u32) {
    // SAFETY: FUTEX_WAIT_BITSET reads the aligned `u32` behind `head`, which lives as long as
    // `lock`; the kernel compares it with `expected` and queues us atomically. A null timeout
    // waits without limit; the unused `uaddr2` is null.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            lock.head().as_ptr(),
            libc::FUTEX_WAIT_BITSET | libc::FUTEX_PRIVATE_FLAG,
            expected,
            core::ptr::null::<libc::timespec>(),
            core::ptr::null::<u32>(),
            bits,
        );
    }
}

/// Wakes the waiters on `lock` whose bits meet `bits`. `lock` is only an address: the lock may
/// already be freed by its next owner.
#[cfg(all(not(loom), target_os = "linux"))]
pub(crate) fn wake(lock: *const Tickets, bits: u32) {
    // `head` is at offset 0: a cast, no dereference.
    let word = lock.cast::<u32>();
    // SAFETY: FUTEX_WAKE_BITSET on a private futex uses the address only as a key and never
    // touches the memory, so a freed lock is harmless (at worst a spurious wake-up of a later
    // futex at that address, which futex users tolerate). Timeout and `uaddr2` are unused.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word,
            libc::FUTEX_WAKE_BITSET | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
            core::ptr::null::<libc::timespec>(),
            core::ptr::null::<u32>(),
            bits,
        );
    }
}

/// Without futexes the "halt" is a yield; nothing sleeps, so nothing needs a kick.
#[cfg(all(not(loom), not(target_os = "linux")))]
pub(crate) fn wait(_lock: &Tickets, _expected: u32, _bits: u32) {
    std::thread::yield_now();
}

#[cfg(all(not(loom), not(target_os = "linux")))]
pub(crate) fn wake(_lock: *const Tickets, _bits: u32) {}

/// The model's futex: a wait queue outside the lock's memory (like the kernel's hash table), so
/// a wake by address touches nothing of a freed lock; the value check and the queueing are one
/// step under the queue's mutex, as in the kernel.
#[cfg(loom)]
mod model {
    use super::Tickets;
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

    pub(crate) fn wait(lock: &Tickets, expected: u32, bits: u32) {
        let key = lock as *const Tickets as usize;
        let mut queue = KERNEL.queue.lock().unwrap();
        if lock.head().load(SeqCst) != expected {
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

    pub(crate) fn wake(lock: *const Tickets, bits: u32) {
        let key = lock as usize;
        let mut queue = KERNEL.queue.lock().unwrap();
        let mut woke = false;
        for w in queue.waiters.iter_mut() {
            if w.key == key && w.bits & bits != 0 {
                w.woken = true;
                woke = true;
            }
        }
        drop(queue);
        if woke {
            KERNEL.wakeup.notify_all();
        }
    }
}

#[cfg(loom)]
pub(crate) use model::{wait, wake};
