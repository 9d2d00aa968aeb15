//! The paravirt ticket spinlock: [`RawTicketLock`], and [`TicketMutex`] built on it.

use crate::pv;
use crate::sync::Ordering::{Acquire, Relaxed, SeqCst};
use crate::sync::{AtomicU32, fence, spin_loop};

/// How many `pause`-spins a waiter makes before it calls the `lock_spinning` pv op (and again
/// after each return from it).
///
/// The kernel spun 2^15 times with a `pause` of a few nanoseconds. On this project's machine (a
/// 2-vCPU KVM guest on AMD EPYC) one spin (a load and a `pause`) costs 24-41 ns and a futex
/// sleep-to-wake-up 3-15 µs, so
/// 2^10 spins last 25-40 µs: several wake-ups' worth, so a waiter whose turn comes within a
/// normal handoff never sleeps, yet 32 times shorter than the kernel's, which here would burn
/// about a millisecond per waiter on a preempted holder. Measured under `futex` (release build,
/// median of 13 interleaved runs): with 2 threads every threshold from 2^7 to 2^12 gave the same
/// 18 000 lock/unlock pairs per ms; with 4 and 16 threads the medians (0.6k-2.7k and 0.6k-1.1k
/// per ms) differed less than their quartiles, at every threshold. Nothing beat 2^10 beyond the
/// noise, so the shortest spin that covers the wake-up latency several times over wins.
pub const SPIN_THRESHOLD: u32 = 1 << 10;

/// Tickets advance by 2: bit 0 of `head` is the slowpath flag.
pub(crate) const TICKET_INC: u32 = 2;
/// Set in `head` by a waiter that may block in the futex: the unlocker must kick.
pub(crate) const SLOWPATH_FLAG: u32 = 1;

/// The two ticket words. `head` comes first: the native unlock is `add dword ptr [rdi], 2` on the
/// lock's address, and the futex waits on that same address.
#[repr(C)]
pub(crate) struct Tickets {
    /// The ticket being served (tickets count in steps of [`TICKET_INC`]), with
    /// [`SLOWPATH_FLAG`] in bit 0.
    head: AtomicU32,
    /// The next ticket to hand out (always even).
    tail: AtomicU32,
    /// The model's liveness marker: every access to the lock checks it, and a test "frees" the
    /// lock by writing it, so loom reports any access that is not ordered before the free.
    #[cfg(loom)]
    alive: loom::cell::UnsafeCell<bool>,
}

const _: () = assert!(core::mem::offset_of!(Tickets, head) == 0);

// SAFETY: `alive` is written only by `kill`, which the model calls after it owns the lock; loom's
// causality checks are the point of that cell, and they report every unordered access.
#[cfg(loom)]
unsafe impl Sync for Tickets {}

impl Tickets {
    #[cfg(not(loom))]
    const fn new() -> Tickets {
        Tickets {
            head: AtomicU32::new(0),
            tail: AtomicU32::new(0),
        }
    }

    #[cfg(loom)]
    fn new() -> Tickets {
        Tickets {
            head: AtomicU32::new(0),
            tail: AtomicU32::new(0),
            alive: loom::cell::UnsafeCell::new(true),
        }
    }

    #[inline(always)]
    pub(crate) fn head(&self) -> &AtomicU32 {
        self.check_alive();
        &self.head
    }

    #[inline(always)]
    fn tail(&self) -> &AtomicU32 {
        self.check_alive();
        &self.tail
    }

    #[cfg(not(loom))]
    #[inline(always)]
    fn check_alive(&self) {}

    #[cfg(loom)]
    fn check_alive(&self) {
        // SAFETY: loom checks this read against the write in `kill`.
        self.alive
            .with(|alive| assert!(unsafe { *alive }, "the lock was used after it was freed"));
    }

    /// The uncontended path: one `fetch_add`, one load, no pv hook.
    #[inline]
    fn lock(&self, spins: u32) {
        let ticket = self.tail().fetch_add(TICKET_INC, Relaxed);
        // Equal only when our ticket is served and the flag is clear; a set flag (left by the
        // last contention) sends us through the slow path once, which clears it.
        if self.head().load(Acquire) != ticket {
            self.lock_contended(ticket, spins);
        }
    }

    #[cold]
    #[inline(never)]
    fn lock_contended(&self, ticket: u32, spins: u32) {
        loop {
            for _ in 0..spins {
                let head = self.head().load(Acquire);
                if head & !SLOWPATH_FLAG == ticket {
                    if head & SLOWPATH_FLAG != 0 {
                        self.clear_slowpath(ticket);
                    }
                    return;
                }
                spin_loop();
            }
            // SAFETY: we hold a ticket, so the lock outlives this call.
            unsafe { pv::lock_spinning(self, ticket) };
        }
    }

    /// The new owner found the flag set: clear it when nobody queues behind us, so uncontended
    /// unlocks stop kicking. Only owners clear the flag; an unlocker never writes after its
    /// release (the historical write-after-unlock bug).
    #[cold]
    fn clear_slowpath(&self, ticket: u32) {
        let next = ticket.wrapping_add(TICKET_INC);
        if self.tail().load(Relaxed) != next {
            return; // waiters remain, and some may sleep: keep the flag
        }
        if self
            .head()
            .compare_exchange(ticket | SLOWPATH_FLAG, ticket, Relaxed, Relaxed)
            .is_err()
        {
            return;
        }
        // [B], paired with [A] in `pv::futex_lock_spinning`: a waiter that took its ticket after
        // our look at `tail` either sets the flag after our clear, or its ticket shows here and
        // we put the flag back. Without this full barrier both sides can miss each other, and
        // the waiter sleeps with no one to kick it (the historical missing-barrier deadlock).
        fence(SeqCst);
        if self.tail().load(Relaxed) != next {
            self.head().fetch_or(SLOWPATH_FLAG, Relaxed);
        } else {
            pv::count_flag_clear();
        }
    }

    #[inline]
    fn try_lock(&self) -> bool {
        let head = self.head().load(Acquire);
        let ticket = head & !SLOWPATH_FLAG;
        // Take ticket `head` only if nobody holds or awaits it, i.e. `tail == head`.
        let taken = self
            .tail()
            .compare_exchange(ticket, ticket.wrapping_add(TICKET_INC), Relaxed, Relaxed)
            .is_ok();
        if taken && head & SLOWPATH_FLAG != 0 {
            self.clear_slowpath(ticket);
        }
        taken
    }

    fn state(&self) -> LockState {
        LockState {
            tail: self.tail().load(Relaxed),
            head: self.head().load(Relaxed),
        }
    }
}

/// A ticket spinlock whose waiters, past `SPINS` pauses, call the paravirt `lock_spinning` op,
/// and whose unlock is an alternative selected with it (site name `pv_lock`).
///
/// Use it through [`TicketMutex`] (`lock_api::Mutex<RawTicketLock, T>`).
///
/// # Layout and protocol
///
/// Two 32-bit words: `head` (the ticket being served, counted in steps of 2, with the slowpath
/// flag in bit 0) and `tail` (the next ticket). Lock: `fetch_add` on `tail` takes ticket `t`,
/// one load of `head`, and when `head == t` the lock is ours: no pv hook, no call. Otherwise
/// spin on `head` with `pause`, calling `lock_spinning(lock, t)` every `SPINS` pauses. Unlock
/// advances `head` by 2:
///
/// | `pv_lock` | unlock (the `pv_lock` site in `unlock`) | `lock_spinning` | `unlock_kick` |
/// |---|---|---|---|
/// | `native` | `add dword ptr [rdi], 2` inline (a release on x86; no flag check) | NOPs: keep spinning | NOPs |
/// | `futex` | call: `lock xadd` returns the old `head`; flag set → `unlock_kick` | set the flag, re-check, futex wait | futex wake of the next ticket |
/// | `sched_yield` | as `native` | `sched_yield()` | NOPs |
/// | `default` (unpatched) | call: as `futex` | `sched_yield()` | futex wake |
///
/// Selection: `native` on bare metal or under KVM with `KVM_HINTS_REALTIME`, `futex` under any
/// other hypervisor; `sched_yield` only when forced (`ALTPATCH=pv_lock=sched_yield`).
///
/// # State
///
/// | `head` bit 0 (slowpath) | `head >> 1` vs `tail >> 1` | meaning |
/// |---|---|---|
/// | 0 | equal | unlocked |
/// | 0 | differ by `n + 1` | locked, `n` waiters, all spinning or yielding |
/// | 1 | differ | locked; a waiter may sleep in the futex: the unlocker must kick |
/// | 1 | equal | unlocked with a leftover flag: the next owner clears it |
///
/// Flag transitions: a `futex` waiter sets it (`lock or`) and re-checks `head` in the same
/// atomic step; only an owner clears it, and only when nobody queues behind it; an unlocker reads
/// it from its releasing `lock xadd` and never touches the lock again (the kick is a futex wake
/// by address).
///
/// # Changing `pv_lock` at run time
///
/// From the unpatched default to anything is safe at any time (the default never sleeps). Away
/// from `futex` is safe only while no lock has sleeping waiters: `native` and `sched_yield`
/// unlocks do not kick. The tests and [`pv::force`] re-select while locks are
/// quiescent.
///
/// # Where it fits
///
/// With no more running threads than CPUs it matches `std::sync::Mutex` (17k-19k contended
/// lock/unlock pairs per ms on 2 vCPUs, every variant). When lock holders get preempted (as many
/// CPU-bound threads again), `futex` keeps `std`'s pace (8.9k-12.3k against 9.3k-11.0k) where
/// plain spinning falls to 1.6k-6.3k: a waiter sleeps instead of spinning out the preempted
/// holder's time slice. With many more threads than CPUs every ticket lock collapses, pv or not:
/// strict FIFO hands the lock to a waiter that is not running, so each handoff waits for a
/// wake-up or a time slice, while a barging mutex lets the running thread take it again (4
/// threads per vCPU: 0.2k-1.5k pairs per ms against `std`'s 17k-18k). Numbers from
/// `examples/spinlock.rs`, three quiet runs.
#[repr(C)]
pub struct RawTicketLock<const SPINS: u32 = SPIN_THRESHOLD> {
    tickets: Tickets,
}

impl<const SPINS: u32> RawTicketLock<SPINS> {
    const SPINS_NONZERO: () = assert!(SPINS > 0, "RawTicketLock needs SPINS > 0");

    /// An unlocked lock.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        RawTicketLock {
            tickets: Tickets::new(),
        }
    }

    /// An unlocked lock.
    #[cfg(loom)]
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        RawTicketLock {
            tickets: Tickets::new(),
        }
    }

    /// A snapshot of the two words, for diagnostics and tests.
    pub fn state(&self) -> LockState {
        self.tickets.state()
    }

    #[inline]
    fn lock_ticket(&self) {
        let () = Self::SPINS_NONZERO;
        self.tickets.lock(SPINS);
    }

    /// # Safety
    /// The caller holds the lock.
    #[inline]
    unsafe fn unlock_ticket(&self) {
        // SAFETY: the caller holds the lock.
        unsafe { pv::unlock(&self.tickets) }
    }
}

impl<const SPINS: u32> core::fmt::Debug for RawTicketLock<SPINS> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RawTicketLock")
            .field("spins", &SPINS)
            .field("state", &self.state())
            .finish()
    }
}

#[cfg(not(loom))]
impl<const SPINS: u32> Default for RawTicketLock<SPINS> {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: tickets are handed out once each by `fetch_add` (or a `compare_exchange` that succeeds
// only when no ticket is outstanding) and served in order: only the holder of the ticket equal to
// `head` returns from `lock`. `lock` acquires the `head` value the previous owner released.
#[cfg(not(loom))]
unsafe impl<const SPINS: u32> lock_api::RawMutex for RawTicketLock<SPINS> {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = Self::new();
    /// Any thread may unlock: a ticket is not tied to a thread.
    type GuardMarker = lock_api::GuardSend;

    #[inline]
    fn lock(&self) {
        self.lock_ticket();
    }

    #[inline]
    fn try_lock(&self) -> bool {
        self.tickets.try_lock()
    }

    #[inline]
    unsafe fn unlock(&self) {
        // SAFETY: lock_api calls this only while the lock is held.
        unsafe { self.unlock_ticket() }
    }

    #[inline]
    fn is_locked(&self) -> bool {
        self.state().is_locked()
    }
}

/// A mutex whose lock is a [`RawTicketLock`]: FIFO, no pv cost when uncontended.
///
/// ```
/// use altpatch_sites::TicketMutex;
///
/// static COUNTER: TicketMutex<u64> = TicketMutex::new(0);
/// altpatch::apply_patches();
/// *COUNTER.lock() += 1;
/// assert_eq!(*COUNTER.lock(), 1);
/// ```
#[cfg(not(loom))]
pub type TicketMutex<T> = lock_api::Mutex<RawTicketLock, T>;

/// The guard of a [`TicketMutex`].
#[cfg(not(loom))]
pub type TicketMutexGuard<'a, T> = lock_api::MutexGuard<'a, RawTicketLock, T>;

/// The two words of a [`RawTicketLock`] at one moment (read `tail` first, then `head`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockState {
    /// The ticket being served (in steps of 2) with the slowpath flag in bit 0.
    pub head: u32,
    /// The next ticket to hand out.
    pub tail: u32,
}

impl LockState {
    /// A ticket is held.
    pub fn is_locked(&self) -> bool {
        self.head & !SLOWPATH_FLAG != self.tail
    }

    /// The slowpath flag: some waiter may be asleep, so the next unlock kicks.
    pub fn slowpath(&self) -> bool {
        self.head & SLOWPATH_FLAG != 0
    }

    /// Tickets taken and not yet released: the owner plus its waiters.
    pub fn queued(&self) -> u32 {
        self.tail.wrapping_sub(self.head & !SLOWPATH_FLAG) / TICKET_INC
    }
}

/// Entry points for the loom model (`--cfg loom`), where `lock_api` is not used.
#[cfg(loom)]
#[doc(hidden)]
pub mod model {
    use super::RawTicketLock;

    pub fn lock<const SPINS: u32>(lock: &RawTicketLock<SPINS>) {
        lock.lock_ticket();
    }

    pub fn try_lock<const SPINS: u32>(lock: &RawTicketLock<SPINS>) -> bool {
        lock.tickets.try_lock()
    }

    /// # Safety
    /// The caller holds the lock.
    pub unsafe fn unlock<const SPINS: u32>(lock: &RawTicketLock<SPINS>) {
        // SAFETY: forwarded from the caller.
        unsafe { lock.unlock_ticket() }
    }

    /// The owner frees the lock's memory: any later access by another thread that is not ordered
    /// before this (through the lock's own release and acquire) is reported by loom.
    pub fn kill<const SPINS: u32>(lock: &RawTicketLock<SPINS>) {
        // SAFETY: loom checks this write against every read in `check_alive`.
        lock.tickets
            .alive
            .with_mut(|alive| unsafe { *alive = false });
    }
}
