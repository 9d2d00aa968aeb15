//! The patcher's locks: one writer of text at a time, safe across `fork`, refusing re-entry.
//!
//! A `std::sync::Mutex` held by another thread when the process forks stays locked forever in the
//! child (only the forking thread exists there), and one taken again by the thread holding it (a
//! signal handler that interrupted `StaticKey::set`) deadlocks. These locks:
//!
//! | situation | what happens |
//! |---|---|
//! | another thread holds it | wait (futex) |
//! | this thread holds it (re-entry from a signal handler) | [`Reentered`], nothing waits |
//! | `fork()` while another thread holds it | `fork` waits until it is released (`pthread_atfork` prepare handler), so the child starts with it free and the text, page protections and bookkeeping it guards whole |
//! | `fork()` by the thread holding it | the child's thread goes on in its critical section and releases it as usual |
//!
//! Taking the lock at fork (rather than resetting it in the child) is what keeps the child sound:
//! a batch interrupted half-way would leave `int3`s and half-written sites in the child's copy of
//! the text with no thread to finish them. The cost is that `fork()` waits for a batch in progress
//! (a toggle: ~0.2-0.5 ms). `posix_spawn` (what `std::process::Command` uses when it can) runs no
//! fork handlers and does not wait. A raw `clone`/`syscall(SYS_fork)` runs no handlers either:
//! its child may inherit a held lock, as with any `pthread` mutex.
//!
//! Everything the patcher keeps between calls (interned reasons, the key-site map, the memory map,
//! the startup decision) lives inside [`PATCHER`]'s data, not in `OnceLock`s or mutexes of its own,
//! so nothing else on the path can be caught half-initialised or locked by a fork.

use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering::SeqCst};

/// The calling thread already holds this lock (a signal handler interrupted its critical section).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reentered;

/// A mutex safe across `fork` that refuses re-entry instead of deadlocking. No poisoning: the
/// critical sections write text before anything that can panic.
pub struct ForkSafeMutex<T> {
    raw: RawLock,
    data: UnsafeCell<T>,
}

// SAFETY: the data is reached only through a guard, which exists on one thread at a time.
unsafe impl<T: Send> Sync for ForkSafeMutex<T> {}

impl<T> ForkSafeMutex<T> {
    /// A free lock around `data`.
    pub const fn new(data: T) -> Self {
        ForkSafeMutex {
            raw: RawLock::new(),
            data: UnsafeCell::new(data),
        }
    }

    /// Takes the lock, waiting for another holder; [`Reentered`] if this thread holds it.
    pub fn lock(&self) -> Result<Guard<'_, T>, Reentered> {
        register_fork_handlers();
        self.raw.lock()?;
        Ok(Guard { lock: self })
    }
}

/// Access to the data; releases the lock when dropped.
pub struct Guard<'a, T> {
    lock: &'a ForkSafeMutex<T>,
}

impl<T> Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock, so no other reference to the data exists.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes this the only borrow through the guard.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        self.lock.raw.unlock();
    }
}

/// The lock word: 0 when free, else the holder's thread id.
struct RawLock {
    owner: AtomicU32,
    waiters: AtomicU32,
    /// Taken by the fork prepare handler, to be released after `fork` in parent and child.
    held_for_fork: AtomicBool,
}

impl RawLock {
    const fn new() -> Self {
        RawLock {
            owner: AtomicU32::new(0),
            waiters: AtomicU32::new(0),
            held_for_fork: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> Result<(), Reentered> {
        let me = thread_id();
        loop {
            match self.owner.compare_exchange(0, me, SeqCst, SeqCst) {
                Ok(_) => return Ok(()),
                Err(holder) if holder == me => return Err(Reentered),
                Err(holder) => {
                    self.waiters.fetch_add(1, SeqCst);
                    wait_while(&self.owner, holder);
                    self.waiters.fetch_sub(1, SeqCst);
                }
            }
        }
    }

    fn unlock(&self) {
        self.owner.store(0, SeqCst);
        // SeqCst on both sides: a waiter either counted itself before this load (and is woken)
        // or compares the word after the store (and does not sleep).
        if self.waiters.load(SeqCst) != 0 {
            wake_all(&self.owner);
        }
    }

    /// Fork prepare: take the lock unless this thread holds it.
    fn take_for_fork(&self) {
        if self.lock().is_ok() {
            self.held_for_fork.store(true, SeqCst);
        }
    }

    /// Fork parent/child: release what `take_for_fork` took. In the child no other thread
    /// exists, so no one waits.
    fn release_after_fork(&self, child: bool) {
        if self.held_for_fork.swap(false, SeqCst) {
            if child {
                self.waiters.store(0, SeqCst);
            }
            self.unlock();
        }
    }
}

/// Every fork-safe lock, in the order they nest (the patcher lock is taken before `INSTALL`).
fn all_locks() -> [&'static RawLock; 2] {
    [&crate::apply::PATCHER.raw, install_lock()]
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn install_lock() -> &'static RawLock {
    &crate::os::linux::INSTALL.raw
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn install_lock() -> &'static RawLock {
    static NONE: RawLock = RawLock::new();
    &NONE
}

/// Registers the fork handlers once, before any lock is first taken.
fn register_fork_handlers() {
    const NOT_YET: u8 = 0;
    const REGISTERING: u8 = 1;
    const DONE: u8 = 2;
    static STATE: AtomicU8 = AtomicU8::new(NOT_YET);
    if STATE.load(SeqCst) == DONE {
        return;
    }
    if STATE
        .compare_exchange(NOT_YET, REGISTERING, SeqCst, SeqCst)
        .is_ok()
    {
        #[cfg(unix)]
        // SAFETY: the handlers are plain functions of this crate that only take and release these
        // locks; registration has no other effect.
        unsafe {
            libc::pthread_atfork(
                Some(before_fork),
                Some(after_fork_parent),
                Some(after_fork_child),
            );
        }
        STATE.store(DONE, SeqCst);
        return;
    }
    // Another thread is registering: no lock may be taken before the handlers exist, or a fork in
    // between would copy it held.
    while STATE.load(SeqCst) != DONE {
        std::thread::yield_now();
    }
}

#[cfg(unix)]
extern "C" fn before_fork() {
    all_locks().iter().for_each(|l| l.take_for_fork());
}

#[cfg(unix)]
extern "C" fn after_fork_parent() {
    all_locks()
        .iter()
        .rev()
        .for_each(|l| l.release_after_fork(false));
}

#[cfg(unix)]
extern "C" fn after_fork_child() {
    all_locks()
        .iter()
        .rev()
        .for_each(|l| l.release_after_fork(true));
}

/// The kernel's id of the calling thread: never 0, unique among the process's live threads, and
/// async-signal-safe to read.
#[cfg(target_os = "linux")]
fn thread_id() -> u32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::gettid() as u32 }
}

#[cfg(not(target_os = "linux"))]
fn thread_id() -> u32 {
    use std::cell::Cell;
    static NEXT: AtomicU32 = AtomicU32::new(1);
    thread_local!(static ID: Cell<u32> = const { Cell::new(0) });
    ID.with(|id| {
        if id.get() == 0 {
            id.set(NEXT.fetch_add(1, SeqCst));
        }
        id.get()
    })
}

/// Sleeps while `word` holds `value` (or returns at once if it no longer does).
#[cfg(target_os = "linux")]
fn wait_while(word: &AtomicU32, value: u32) {
    // SAFETY: FUTEX_WAIT on a live, aligned u32 with no timeout; it returns when woken, on a
    // signal, or at once if the word changed.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            value,
            core::ptr::null::<libc::timespec>(),
        );
    }
}

#[cfg(target_os = "linux")]
fn wake_all(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a live, aligned u32.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn wait_while(word: &AtomicU32, value: u32) {
    while word.load(SeqCst) == value {
        std::thread::yield_now();
    }
}

#[cfg(not(target_os = "linux"))]
fn wake_all(_word: &AtomicU32) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holding_thread_is_refused_and_others_wait() {
        static LOCK: ForkSafeMutex<u32> = ForkSafeMutex::new(0);
        let mut guard = LOCK.lock().unwrap();
        assert_eq!(LOCK.lock().err(), Some(Reentered));
        std::thread::scope(|s| {
            let other = s.spawn(|| *LOCK.lock().unwrap() + 1);
            std::thread::sleep(std::time::Duration::from_millis(20));
            *guard = 41;
            drop(guard);
            assert_eq!(other.join().unwrap(), 42);
        });
        assert_eq!(*LOCK.lock().unwrap(), 41);
    }
}
