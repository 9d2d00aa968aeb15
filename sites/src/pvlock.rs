//! The paravirt hybrid lock: [`RawPvLock`], and [`PvMutex`] built on it.
//!
//! "Hybrid" as in the kernel's pv qspinlock hybrid mode: running threads may take a free lock
//! ahead of sleeping ones (bounded stealing), sleepers are woken one at a time in the futex's
//! FIFO order (with std's futex mutex's bookkeeping: one "someone may sleep" bit, which the
//! unlock that wakes clears and the woken waiter sets again, so that a running owner pays one
//! RMW per lock and per unlock while others sleep), and a waiter that has waited past [`FAIR_TIMEOUT`] closes the steal window and gets
//! the lock handed over directly. Its pv ops are `pv_lock` sites, the same name and candidate
//! table as [`RawTicketLock`](crate::RawTicketLock)'s, so one `ALTPATCH=pv_lock=...` choice (or
//! [`pv::force`](crate::pv::force)) covers both locks.

use core::sync::atomic::AtomicU64;

use crate::futex;
#[cfg(not(loom))]
use crate::pv::only_if_forced;
#[cfg(loom)]
use crate::pv::{self, PvLock};
use crate::sync::Ordering::{Acquire, Relaxed, Release};
use crate::sync::{AtomicU32, spin_loop, yield_now};

/// How many `pause`s a contended locker makes (with exponential backoff between its looks at the
/// lock, stealing it whenever it is free: four looks) before it calls the `pv_lock` slow-path op.
/// Under `futex` that op parks at once, and a woken waiter spins as many pauses again before it
/// parks again; under `native` it keeps looking, with the same backoff.
///
/// Shorter than the ticket lock's [`SPIN_THRESHOLD`](crate::SPIN_THRESHOLD): a ticket waiter
/// must be running when its turn comes, a hybrid waiter need not (the lock goes to whoever runs),
/// so spinning only has to cover a critical section or two, not a wake-up. Issue 15, on the
/// 2-vCPU KVM guest (AMD EPYC host, load average 5-13), `futex`, 14 alternating 300-400 ms runs
/// of `locks_contended` against 2^8: median throughput 99 / 99 / 87 / 94 M/s at 2 / 4 / 8 / 16
/// threads against 66 / 78 / 83 / 92. A longer spin lets a waiter on the other vCPU keep
/// stealing the lock (99 % of contended acquisitions at 2^8, traced), so both vCPUs trade its
/// line instead of one running it from its cache while the other waiter sleeps.
pub const PV_SPIN_THRESHOLD: u32 = 1 << 4;

/// How long a `futex` waiter waits before it asks for a direct handoff (closing the steal window
/// until it has the lock): parking_lot's eventual-fairness bound.
pub const FAIR_TIMEOUT: std::time::Duration = std::time::Duration::from_micros(500);

/// Bit 0: the lock is held (or, with [`HANDOFF`], being handed over).
pub(crate) const LOCKED: u32 = 1;
/// Bit 1: waiters may be asleep in the futex. Set by a waiter before it sleeps, and kept set by
/// every waiter that has slept when it takes the lock; the unlock that finds it clears it and
/// wakes one sleeper, which takes over the duty of keeping it set (std's futex mutex's
/// "contended" state, 2).
pub(crate) const PARKED: u32 = 1 << 1;
/// Bit 2, only with [`LOCKED`] and [`WANT`]: the owner handed the lock to the waiter that set
/// `WANT`, which claims it by clearing both.
pub(crate) const HANDOFF: u32 = 1 << 2;
/// Bit 3: a waiter past [`FAIR_TIMEOUT`] asks for the lock: nobody else may take it, and the
/// next unlock hands it over instead of releasing it.
pub(crate) const WANT: u32 = 1 << 3;

/// The lock word. First in the lock: the native unlock is `mov byte ptr [rdi], 0` on the lock's
/// address, and the futex waits on that same address.
#[repr(C)]
pub(crate) struct Word {
    state: AtomicU32,
    /// As in the ticket lock's model: a test "frees" the lock by writing it, and loom reports any
    /// access not ordered before that.
    #[cfg(loom)]
    alive: loom::cell::UnsafeCell<bool>,
}

const _: () = assert!(core::mem::offset_of!(Word, state) == 0);

// SAFETY: `alive` is written only by `kill`, which the model calls after it owns the lock; loom's
// causality checks are the point of that cell, and they report every unordered access.
#[cfg(loom)]
unsafe impl Sync for Word {}

impl Word {
    #[cfg(not(loom))]
    const fn new() -> Word {
        Word {
            state: AtomicU32::new(0),
        }
    }

    #[cfg(loom)]
    fn new() -> Word {
        Word {
            state: AtomicU32::new(0),
            alive: loom::cell::UnsafeCell::new(true),
        }
    }

    #[inline(always)]
    pub(crate) fn state(&self) -> &AtomicU32 {
        #[cfg(loom)]
        // SAFETY: loom checks this read against the write in `kill`.
        self.alive
            .with(|alive| assert!(unsafe { *alive }, "the lock was used after it was freed"));
        &self.state
    }

    /// Takes the lock if it is free and nobody asked for a handoff.
    #[inline]
    fn try_steal(&self, s: u32) -> bool {
        s & (LOCKED | WANT) == 0
            && self
                .state()
                .compare_exchange_weak(s, s | LOCKED, Acquire, Relaxed)
                .is_ok()
    }

    /// One load and one `cmpxchg` from the value seen: taken when neither `LOCKED` nor `WANT` is
    /// set, whatever the parked count, so parked waiters do not send a running owner down the
    /// slow path.
    #[inline]
    fn lock(&self, spins: u32) {
        // Free with nobody parked, the common case: one `cmpxchg` and no load before it (a load
        // would wait for the native unlock's byte store to retire: it cannot forward).
        if let Err(s) = self
            .state()
            .compare_exchange_weak(0, LOCKED, Acquire, Relaxed)
            && !self.try_steal(s)
        {
            self.lock_contended(spins);
        }
    }

    #[cold]
    #[inline(never)]
    fn lock_contended(&self, spins: u32) {
        let mut backoff = Backoff::new();
        trace::add(trace::CONTENDED, 1);
        while backoff.spent < spins {
            if self.try_steal(self.state().load(Relaxed)) {
                trace::add(trace::STEAL_SPIN, 1);
                trace::add(trace::PAUSES, backoff.spent as u64);
                return;
            }
            backoff.pause();
        }
        trace::add(trace::PAUSES, backoff.spent as u64);
        // SAFETY: `self` is a live lock; the op returns with it held.
        unsafe { lock_slowpath(self, spins) }
    }

    fn try_lock(&self) -> bool {
        let mut s = self.state().load(Relaxed);
        while s & (LOCKED | WANT) == 0 {
            match self
                .state()
                .compare_exchange_weak(s, s | LOCKED, Acquire, Relaxed)
            {
                Ok(_) => return true,
                Err(now) => s = now,
            }
        }
        false
    }
}

/// Exponential backoff between looks at a contended word: 1, 2, 4, ... up to [`MAX_BACKOFF`]
/// pauses. Looking less often leaves the line with the owner, which re-takes the lock from its
/// own cache instead of paying a transfer per acquisition to a spinner on another CPU.
struct Backoff {
    step: u32,
    /// Pauses made so far.
    spent: u32,
}

/// The longest run of pauses between two looks.
const MAX_BACKOFF: u32 = 64;

impl Backoff {
    fn new() -> Backoff {
        Backoff { step: 1, spent: 0 }
    }

    #[inline]
    fn pause(&mut self) {
        for _ in 0..self.step {
            spin_loop();
        }
        self.spent = self.spent.saturating_add(self.step);
        self.step = (self.step * 2).min(MAX_BACKOFF);
    }
}

/// A lock with a one-RMW fast path whose contended lockers steal while they spin, then call the
/// `pv_lock` slow-path op; its unlock is a `pv_lock` site too.
///
/// Use it through [`PvMutex`] (`lock_api::Mutex<RawPvLock, T>`).
///
/// # Protocol
///
/// Lock: one `cmpxchg` from 0 to `LOCKED`, and if the word held something else (`PARKED`) one
/// more from what it held, when `LOCKED` is clear (`WANT` is only ever set with `LOCKED`); no pv
/// code. Contended: up to `SPINS` pauses with exponential backoff between looks, taking the
/// lock whenever it is free (bounded stealing), then the slow-path op:
///
/// | `pv_lock` | slow path (a `pv_lock` call site) | unlock (a `pv_lock` site) |
/// |---|---|---|
/// | `native` | keep spinning and stealing | `mov byte ptr [rdi], 0` inline (a release store) |
/// | `futex` | set `PARKED` and park in the futex; woken, spin and steal again, setting `PARKED` with whatever it does next; past [`FAIR_TIMEOUT`] set `WANT` and spin until handed the lock | `cmpxchg`: hand over if `WANT`; else release, and if `PARKED` was set clear it and wake one sleeper |
/// | `sched_yield` | steal, `sched_yield()` every `SPINS` | as `native` |
/// | `default` (unpatched) | as `sched_yield` | as `futex` |
///
/// Selection is the ticket lock's: `native` on bare metal or under KVM with
/// `KVM_HINTS_REALTIME`, `futex` under any other hypervisor, `sched_yield` only when forced.
///
/// # State
///
/// One `u32`, the futex word:
///
/// | bits | name | set by | cleared by |
/// |---|---|---|---|
/// | 0 | `LOCKED` | a locker's `cmpxchg` | the unlock, unless it hands over |
/// | 1 | `PARKED` | a waiter about to sleep; every waiter that has slept, with the lock, `WANT` or its next park | the unlock that releases, which then wakes one sleeper |
/// | 2 | `HANDOFF` | an unlock that sees `WANT` (with `LOCKED` kept) | the `WANT` waiter, taking the lock |
/// | 3 | `WANT` | one waiter past [`FAIR_TIMEOUT`], only while `LOCKED` is set | that waiter, taking the lock |
///
/// | word | meaning |
/// |---|---|
/// | `0` | unlocked, nobody known to sleep (the fast paths) |
/// | `LOCKED` | held; waiters, if any, are spinning, or asleep with a woken one on its way |
/// | `LOCKED \| PARKED` | held, waiters may sleep: the unlock clears `PARKED` and wakes one |
/// | `PARKED` | free, waiters may sleep: the next owner's unlock wakes one |
/// | `… \| WANT` | held, a waiter waited too long: no stealing; the next unlock hands over |
/// | `LOCKED \| HANDOFF \| WANT …` | handed over: owned by the `WANT` waiter, which has yet to claim it |
///
/// Why nobody sleeps forever: a waiter sleeps only while the word is exactly the `LOCKED |
/// PARKED …` it saw or set, so a release before it is queued sends it back. Once it is queued,
/// `PARKED` stays set until an unlock clears it, and that unlock wakes one sleeper (or, if the
/// futex queue is empty, a waiter about to sleep finds the word changed). Whoever comes back
/// from the futex, for whatever reason, has slept: it sets `PARKED` again with whatever it does
/// next (takes the lock, asks for a handoff, parks), so the sleepers behind it are always behind
/// a `PARKED` that some unlock will see. A handover keeps `PARKED` as it was and wakes nobody:
/// the `WANT` waiter runs, and its own unlock does. Every decision is made in the unlock's one
/// releasing `cmpxchg`: after it the unlocker only wakes by address (the next owner may already
/// have freed the lock). With the lock contended, the cost of this bookkeeping is one wake
/// system call per woken waiter, and once per busy period one that finds nobody.
///
/// # Changing `pv_lock` at run time
///
/// As for the ticket lock: from the unpatched default to anything at any time (the default never
/// parks); away from `futex` only while no waiter is parked (`native` unlocks do not wake). When
/// quiescent the word is 0 in every variant.
///
/// # Where the time went (issue 15)
///
/// The word used to count parked waiters (bits 8-31, with a "wake in flight" bit). While any
/// waiter slept, the word was never `LOCKED` alone, so every lock (a failed `cmpxchg` from 0,
/// then one from what it held) and every unlock (the same) paid two RMWs, on a line the
/// spinners kept pulling away: at 8 threads on 2 vCPUs, 5 of the 8 threads slept on average,
/// and the lock ran at about half std's throughput per CPU-second. With one `PARKED` bit that
/// the waking unlock clears, a running owner finds `0`/`LOCKED` again between wake-ups.
#[repr(C)]
pub struct RawPvLock<const SPINS: u32 = PV_SPIN_THRESHOLD> {
    word: Word,
}

impl<const SPINS: u32> RawPvLock<SPINS> {
    const SPINS_NONZERO: () = assert!(SPINS > 0, "RawPvLock needs SPINS > 0");

    /// An unlocked lock.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        RawPvLock { word: Word::new() }
    }

    /// An unlocked lock.
    #[cfg(loom)]
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        RawPvLock { word: Word::new() }
    }

    /// The lock word (see the state table), for diagnostics and tests.
    pub fn state(&self) -> PvLockState {
        PvLockState(self.word.state().load(Relaxed))
    }

    #[inline]
    fn lock_word(&self) {
        let () = Self::SPINS_NONZERO;
        self.word.lock(SPINS);
    }

    /// # Safety
    /// The caller holds the lock.
    #[inline]
    unsafe fn unlock_word(&self) {
        // SAFETY: the caller holds the lock.
        unsafe { unlock(&self.word) }
    }
}

impl<const SPINS: u32> core::fmt::Debug for RawPvLock<SPINS> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RawPvLock")
            .field("spins", &SPINS)
            .field("state", &self.state())
            .finish()
    }
}

#[cfg(not(loom))]
impl<const SPINS: u32> Default for RawPvLock<SPINS> {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: a locker owns the lock only when its `cmpxchg` (Acquire) set `LOCKED` in a word without
// it, or when an unlock kept it set to hand over to the one `WANT` waiter, which claims it by a
// `cmpxchg` (Acquire) of the word the unlock released; so one owner at a time, each acquiring
// what the last released.
#[cfg(not(loom))]
unsafe impl<const SPINS: u32> lock_api::RawMutex for RawPvLock<SPINS> {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = Self::new();
    /// Any thread may unlock: ownership is not tied to a thread.
    type GuardMarker = lock_api::GuardSend;

    #[inline]
    fn lock(&self) {
        self.lock_word();
    }

    #[inline]
    fn try_lock(&self) -> bool {
        self.word.try_lock()
    }

    #[inline]
    unsafe fn unlock(&self) {
        // SAFETY: lock_api calls this only while the lock is held.
        unsafe { self.unlock_word() }
    }

    #[inline]
    fn is_locked(&self) -> bool {
        self.state().is_locked()
    }
}

/// A mutex whose lock is a [`RawPvLock`]: barging with bounded stealing, eventually fair, no pv
/// cost when uncontended.
///
/// ```
/// use altpatch_sites::PvMutex;
///
/// static COUNTER: PvMutex<u64> = PvMutex::new(0);
/// altpatch::apply_patches();
/// *COUNTER.lock() += 1;
/// assert_eq!(*COUNTER.lock(), 1);
/// ```
#[cfg(not(loom))]
pub type PvMutex<T> = lock_api::Mutex<RawPvLock, T>;

/// The guard of a [`PvMutex`].
#[cfg(not(loom))]
pub type PvMutexGuard<'a, T> = lock_api::MutexGuard<'a, RawPvLock, T>;

/// The word of a [`RawPvLock`] at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PvLockState(pub u32);

impl PvLockState {
    /// Held, or being handed over.
    pub fn is_locked(self) -> bool {
        self.0 & LOCKED != 0
    }

    /// Waiters may be asleep: the next unlock wakes one.
    pub fn parked(self) -> bool {
        self.0 & PARKED != 0
    }

    /// A waiter asked for a handoff.
    pub fn wants_handoff(self) -> bool {
        self.0 & WANT != 0
    }

    /// Handed over, not yet claimed.
    pub fn handed_off(self) -> bool {
        self.0 & HANDOFF != 0
    }
}

/// Counters of the hybrid lock's slow paths, process-wide (relaxed, off the fast paths).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PvMutexStats {
    /// `futex` waiters that counted themselves parked and called the futex wait.
    pub parks: u64,
    /// Unlocks that woke a parked waiter.
    pub wakes: u64,
    /// Handoffs claimed by a waiter that had waited past [`FAIR_TIMEOUT`].
    pub handoffs: u64,
}

static PARKS: AtomicU64 = AtomicU64::new(0);
static WAKES: AtomicU64 = AtomicU64::new(0);
static HANDOFFS: AtomicU64 = AtomicU64::new(0);

/// A snapshot of the hybrid lock's slow-path counters.
pub fn stats() -> PvMutexStats {
    use core::sync::atomic::Ordering::Relaxed;
    PvMutexStats {
        parks: PARKS.load(Relaxed),
        wakes: WAKES.load(Relaxed),
        handoffs: HANDOFFS.load(Relaxed),
    }
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
}

// The two sites. Candidate names, predicates and order are the ticket lock's (`pv.rs`): one
// `pv_lock` choice covers both locks, and tests/pv_mutex_bytes.rs checks the tables match.

/// The slow-path op: the caller has spun `spins` times; returns with the lock held.
///
/// # Safety
/// `word` points to a live lock, which the caller does not hold.
#[cfg(not(loom))]
#[altpatch::alternative(
    inline,
    name = "pv_lock",
    futex: all(hypervisor, not(kvm_hints_realtime)) => futex_lock_slowpath,
    sched_yield: when = only_if_forced => yield_lock_slowpath,
    native: any(not(hypervisor), kvm_hints_realtime) => spin_lock_slowpath,
)]
pub(crate) unsafe fn lock_slowpath(word: *const Word, spins: u32) {
    // Unpatched: yield between rounds of stealing. The default never parks, so selecting any
    // variant later is safe even while locks are contended.
    // SAFETY: forwarded from the caller.
    unsafe { yield_lock_slowpath(word, spins) }
}

/// The unlock: `native` is one plain store of 0 to the low byte (a release: x86 stores are
/// releases and the asm block is a compiler barrier). Under `native` and `sched_yield` the word
/// is only ever 0 or `LOCKED` (nothing parks, nothing asks for a handoff), so storing the low
/// byte is storing the word. Padded with two `ds` prefixes, it is one instruction as long as the
/// default's `call` (`mov dword ptr [rdi], 0` is 6 bytes), so every variant can replace every
/// other while threads run. Measured, 1,000 lock+unlock pairs: a byte store followed by a load
/// of the word cost 1.18 × the plain ticket lock (the load waits: a byte store cannot forward to
/// a word load), `and dword ptr [rdi], 0` 1.43 ×; so the lock's fast path starts with the
/// `cmpxchg` itself.
///
/// # Safety
/// The caller holds the lock.
#[cfg(not(loom))]
#[altpatch::alternative(
    inline,
    name = "pv_lock",
    futex: all(hypervisor, not(kvm_hints_realtime)) => futex_unlock,
    sched_yield: when = only_if_forced => asm("ds ds mov byte ptr [rdi], 0"),
    native: any(not(hypervisor), kvm_hints_realtime) => asm("ds ds mov byte ptr [rdi], 0"),
)]
pub(crate) unsafe fn unlock(word: *const Word) {
    // SAFETY: forwarded from the caller.
    unsafe { futex_unlock(word) }
}

/// `native`'s slow path: spin and steal until the lock is ours, looking with the contended
/// path's backoff (up to [`MAX_BACKOFF`] pauses between looks).
///
/// # Safety
/// As [`lock_slowpath`].
unsafe fn spin_lock_slowpath(word: *const Word, _spins: u32) {
    // SAFETY: the caller guarantees a live lock.
    let word = unsafe { &*word };
    let mut backoff = Backoff::new();
    loop {
        if word.try_steal(word.state().load(Relaxed)) {
            return;
        }
        backoff.pause();
        // The model has no `pause`; a spinning waiter lets the others run.
        #[cfg(loom)]
        yield_now();
    }
}

/// `sched_yield`'s slow path (and the default's): rounds of `spins` steal attempts, with a
/// `sched_yield()` after each.
///
/// # Safety
/// As [`lock_slowpath`].
unsafe fn yield_lock_slowpath(word: *const Word, spins: u32) {
    // SAFETY: the caller guarantees a live lock.
    let word = unsafe { &*word };
    loop {
        yield_now();
        for _ in 0..spins {
            if word.try_steal(word.state().load(Relaxed)) {
                return;
            }
            spin_loop();
        }
    }
}

/// `futex`'s slow path: park while the lock is held; woken, spin and steal like a new locker,
/// but keeping `PARKED` set for the sleepers behind us; once past [`FAIR_TIMEOUT`], set `WANT`
/// (no more stealing by anyone) and spin, never parking, until the lock is handed over.
///
/// # Safety
/// As [`lock_slowpath`].
unsafe fn futex_lock_slowpath(word: *const Word, spins: u32) {
    // SAFETY: the caller guarantees a live lock; we do not return before we hold it.
    let word = unsafe { &*word };
    let start = Clock::now();
    trace::add(trace::SLOW, 1);
    let mut want_t0 = 0;
    let mut wanting = false;
    // `PARKED` once we have slept: the unlock that woke us cleared it, and others may still be
    // asleep, so we set it again whatever we do next (take the lock, ask for it, park).
    let mut mark = 0;
    // The caller has just spun its round.
    let mut spun = spins;
    let mut s = word.state().load(Relaxed);
    loop {
        if wanting {
            // Only we set `WANT`, so `HANDOFF` (set only with `WANT`) is ours. `WANT` is only
            // set with `LOCKED`, and an unlock that sees it hands over instead of releasing, so
            // nobody else can take the lock meanwhile.
            if s & HANDOFF == 0 {
                spun += 1;
                if spun >= spins {
                    spun = 0;
                    // The owner may be preempted: let it (or anyone) run.
                    trace::add(trace::YIELDS, 1);
                    yield_now();
                } else {
                    trace::add(trace::PAUSES, 1);
                    spin_loop();
                }
                s = word.state().load(Relaxed);
                continue;
            }
            match word
                .state()
                .compare_exchange_weak(s, s & !(HANDOFF | WANT), Acquire, Relaxed)
            {
                Ok(_) => {
                    count(&HANDOFFS);
                    trace::add(trace::WANT_NS, trace::now_ns() - want_t0);
                    return;
                }
                Err(now) => s = now,
            }
            continue;
        }
        // `WANT` is only ever set with `LOCKED`: a free lock is anyone's.
        if s & LOCKED == 0 {
            match word
                .state()
                .compare_exchange_weak(s, s | LOCKED | mark, Acquire, Relaxed)
            {
                Ok(_) => {
                    trace::add(trace::SLOW_STEAL, 1);
                    return;
                }
                Err(now) => s = now,
            }
            continue;
        }
        if s & WANT == 0 && start.waited_too_long() {
            match word
                .state()
                .compare_exchange_weak(s, s | WANT | mark, Relaxed, Relaxed)
            {
                Ok(_) => {
                    trace::add(trace::WANTS, 1);
                    want_t0 = trace::now_ns();
                    wanting = true;
                    spun = 0;
                    s |= WANT | mark;
                }
                Err(now) => s = now,
            }
            continue;
        }
        if spun < spins {
            spun += 1;
            trace::add(trace::PAUSES, 1);
            spin_loop();
            s = word.state().load(Relaxed);
            continue;
        }
        // Park: mark the word, then sleep while it is exactly what we left (still held, not
        // released or handed over since).
        let parked = s | PARKED;
        if parked != s
            && let Err(now) = word
                .state()
                .compare_exchange_weak(s, parked, Relaxed, Relaxed)
        {
            s = now;
            continue;
        }
        count(&PARKS);
        trace::add(trace::PARKS, 1);
        let t0 = trace::now_ns();
        futex::wait_on(word.state(), parked, futex::ANY);
        let t1 = trace::now_ns();
        trace::add(trace::PARK_NS, t1 - t0);
        #[cfg(pvlock_trace)]
        {
            let w = trace::LAST_WAKE.swap(0, core::sync::atomic::Ordering::Relaxed);
            if w != 0 && w >= t0 {
                trace::add(trace::WAKE_LAT_NS, t1 - w);
                trace::add(trace::WAKE_LAT_N, 1);
            }
        }
        // Whatever woke us (a wake, a changed word, a signal), others may be asleep behind us.
        mark = PARKED;
        s = word.state().load(Relaxed);
        spun = 0;
    }
}

/// `futex`'s unlock (and the default's): one `cmpxchg` that releases the lock (clearing
/// `PARKED`, and then it wakes one sleeper) or hands it to a `WANT` waiter; then at most one
/// futex wake by address.
///
/// # Safety
/// The caller holds the lock.
unsafe fn futex_unlock(word: *const Word) {
    // SAFETY: we hold the lock, so it is live up to and including the `cmpxchg` that releases it.
    let state = unsafe { &*word }.state();
    let mut s = match state.compare_exchange(LOCKED, 0, Release, Relaxed) {
        Ok(_) => return,
        Err(now) => now,
    };
    let wake = loop {
        // Handing over wakes nobody: the `WANT` waiter runs, and keeps `PARKED` as it was.
        let (new, wake) = if s & WANT != 0 {
            (s | HANDOFF, false)
        } else {
            (s & !(LOCKED | PARKED), s & PARKED != 0)
        };
        match state.compare_exchange_weak(s, new, Release, Relaxed) {
            Ok(_) => break wake,
            Err(now) => s = now,
        }
    };
    // From here on the next owner may free the lock: only its address is used.
    if wake {
        count(&WAKES);
        let t0 = trace::now_ns();
        #[cfg(pvlock_trace)]
        trace::LAST_WAKE.store(t0, core::sync::atomic::Ordering::Relaxed);
        futex::wake_on(word.cast::<u32>(), 1, futex::ANY);
        trace::add(trace::WAKE_SYSCALL_NS, trace::now_ns() - t0);
    }
}

/// When a `futex` waiter started waiting. Under loom there is no clock: the model says whether
/// waiters count as having waited too long.
#[cfg(not(loom))]
struct Clock(std::time::Instant);

#[cfg(not(loom))]
impl Clock {
    fn now() -> Clock {
        Clock(std::time::Instant::now())
    }

    fn waited_too_long(&self) -> bool {
        self.0.elapsed() >= FAIR_TIMEOUT
    }
}

#[cfg(loom)]
struct Clock;

#[cfg(loom)]
impl Clock {
    fn now() -> Clock {
        Clock
    }

    fn waited_too_long(&self) -> bool {
        model::impatient()
    }
}

/// The sites under the loom model: dispatch on [`pv::model::set`]'s variant.
#[cfg(loom)]
pub(crate) unsafe fn lock_slowpath(word: *const Word, spins: u32) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match pv::model::variant() {
            PvLock::Native => spin_lock_slowpath(word, spins),
            PvLock::Futex => futex_lock_slowpath(word, spins),
            PvLock::SchedYield | PvLock::Default => yield_lock_slowpath(word, spins),
        }
    }
}

#[cfg(loom)]
pub(crate) unsafe fn unlock(word: *const Word) {
    match pv::model::variant() {
        // `mov byte ptr [rdi], 0` on a word that is `LOCKED`: the word becomes 0.
        // SAFETY: the caller holds the lock.
        PvLock::Native | PvLock::SchedYield => unsafe { &*word }.state().store(0, Release),
        // SAFETY: forwarded from the caller.
        PvLock::Futex | PvLock::Default => unsafe { futex_unlock(word) },
    }
}

/// Entry points for the loom model (`--cfg loom`), where `lock_api` is not used.
#[cfg(loom)]
#[doc(hidden)]
pub mod model {
    use super::RawPvLock;
    use std::cell::Cell;

    std::thread_local! {
        static IMPATIENT: Cell<bool> = const { Cell::new(false) };
    }

    /// Whether `futex` waiters count as past [`super::FAIR_TIMEOUT`] from the start (every one
    /// asks for a handoff) in the following `loom::model` runs on this thread.
    pub fn set_impatient(impatient: bool) {
        IMPATIENT.set(impatient);
    }

    pub(crate) fn impatient() -> bool {
        IMPATIENT.get()
    }

    pub fn lock<const SPINS: u32>(lock: &RawPvLock<SPINS>) {
        lock.lock_word();
    }

    pub fn try_lock<const SPINS: u32>(lock: &RawPvLock<SPINS>) -> bool {
        lock.word.try_lock()
    }

    /// # Safety
    /// The caller holds the lock.
    pub unsafe fn unlock<const SPINS: u32>(lock: &RawPvLock<SPINS>) {
        // SAFETY: forwarded from the caller.
        unsafe { lock.unlock_word() }
    }

    /// The owner frees the lock's memory: loom reports any later access by another thread that
    /// is not ordered before this.
    pub fn kill<const SPINS: u32>(lock: &RawPvLock<SPINS>) {
        // SAFETY: loom checks this write against every read in `Word::state`.
        lock.word.alive.with_mut(|alive| unsafe { *alive = false });
    }
}

/// Where a contended lock's time goes, for measuring (issue 15): built only with
/// `RUSTFLAGS="--cfg pvlock_trace"` (every call is an empty inline function otherwise). Counters
/// are per thread, added to the totals when a thread exits (or calls [`trace::flush`]), so
/// counting does not share a line between threads; `benches/locks_contended.rs` prints them per
/// second for the hybrid lock's points. Times are nanoseconds summed over threads: `park_ns`
/// (asleep in the futex), `wake_lat_ns` (from an unlock's wake to a sleeper's return, over
/// `wake_lat_n` returns), `want_ns` (from setting `WANT` to holding the lock),
/// `wake_syscall_ns` (the unlocker inside its futex wake, preemption included).
#[doc(hidden)]
pub mod trace {
    pub const CONTENDED: usize = 0;
    pub const STEAL_SPIN: usize = 1;
    pub const SLOW: usize = 2;
    pub const PAUSES: usize = 3;
    pub const PARKS: usize = 4;
    pub const PARK_NS: usize = 5;
    pub const WAKE_LAT_NS: usize = 6;
    pub const WAKE_LAT_N: usize = 7;
    pub const WANT_NS: usize = 8;
    pub const WANTS: usize = 9;
    pub const YIELDS: usize = 10;
    pub const SLOW_STEAL: usize = 11;
    pub const WAKE_SYSCALL_NS: usize = 12;
    pub const N: usize = 13;
    pub const NAMES: [&str; N] = [
        "contended",
        "steal_spin",
        "slow",
        "pauses",
        "parks",
        "park_ns",
        "wake_lat_ns",
        "wake_lat_n",
        "want_ns",
        "wants",
        "yields",
        "slow_steal",
        "wake_syscall_ns",
    ];
    #[cfg(pvlock_trace)]
    mod imp {
        use super::N;
        use std::cell::Cell;
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        pub static TOTAL: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];
        pub static LAST_WAKE: AtomicU64 = AtomicU64::new(0);
        struct Local([Cell<u64>; N]);
        impl Drop for Local {
            fn drop(&mut self) {
                flush_local(self)
            }
        }
        fn flush_local(l: &Local) {
            for (t, c) in TOTAL.iter().zip(l.0.iter()) {
                t.fetch_add(c.replace(0), Relaxed);
            }
        }
        std::thread_local! { static L: Local = const { Local([const { Cell::new(0) }; N]) }; }
        pub fn add(i: usize, n: u64) {
            let _ = L.try_with(|l| l.0[i].set(l.0[i].get() + n));
        }
        pub fn flush() {
            let _ = L.try_with(flush_local);
        }
        pub fn now_ns() -> u64 {
            static T0: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
            T0.get_or_init(std::time::Instant::now).elapsed().as_nanos() as u64
        }
        pub fn snapshot() -> [u64; N] {
            core::array::from_fn(|i| TOTAL[i].load(Relaxed))
        }
    }
    #[cfg(pvlock_trace)]
    pub use imp::*;
    #[cfg(not(pvlock_trace))]
    mod imp {
        use super::N;
        #[inline(always)]
        pub fn add(_: usize, _: u64) {}
        pub fn flush() {}
        #[inline(always)]
        pub fn now_ns() -> u64 {
            0
        }
        pub fn snapshot() -> [u64; N] {
            [0; N]
        }
    }
    #[cfg(not(pvlock_trace))]
    pub use imp::*;
}
