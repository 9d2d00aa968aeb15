//! Paravirt lock ops: the `pv_lock` sites of [`RawTicketLock`](crate::RawTicketLock), their
//! candidates, and how to read or force the selection.
//!
//! Three call sites share the name `pv_lock`, so one choice covers them all:
//!
//! * `lock_spinning(lock, ticket)`: a waiter has spun `SPINS` times;
//! * `unlock_kick(lock, ticket)`: the unlocker saw the slowpath flag; wake `ticket`'s waiter;
//! * the unlock itself: a plain `add` inline, or a call to an unlock that reads the flag.
//!
//! The hybrid lock ([`RawPvLock`](crate::RawPvLock), in [`pvlock`](crate::pvlock)) adds two more
//! under the same name and candidate table, so the same choice covers it: its slow path (a call
//! to a spinning, a parking or a yielding slow path) and its unlock (`mov byte ptr [rdi], 0`
//! inline, or a call to the unlock that may hand over and wake). [`force`] and [`chosen`] cover
//! both locks.
//!
//! | candidate | predicate | when it wins |
//! |---|---|---|
//! | `futex` | `all(hypervisor, not(kvm_hints_realtime))` | a hypervisor that may preempt vCPUs: a preempted lock holder must not be spun on |
//! | `sched_yield` | `when = only_if_forced` | only by `ALTPATCH=pv_lock=sched_yield` or [`force`] |
//! | `native` | `any(not(hypervisor), kvm_hints_realtime)` | bare metal, or KVM promising vCPUs are never preempted |
//!
//! ```text
//! ALTPATCH=pv_lock=futex ./program        # operations: force a variant at startup
//! ```

use altpatch::{Overrides, Patcher, Report};
use core::sync::atomic::AtomicU64;

use crate::futex;
use crate::spinlock::{SLOWPATH_FLAG, TICKET_INC, Tickets};
use crate::sync::Ordering::{Relaxed, Release, SeqCst};
use crate::sync::{fence, yield_now};

/// The name the three sites share, in reports and in `ALTPATCH` (`pv_lock=futex`).
pub const SITE: &str = "pv_lock";

/// A variant of the `pv_lock` sites.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PvLock {
    /// Unpatched: waiters yield; unlock reads the flag (never set) and kicks with a futex wake.
    Default,
    /// Spin only; unlock is `add dword ptr [rdi], 2` inline.
    Native,
    /// Block in a futex past the spin threshold; unlock reads the flag and wakes the next ticket.
    Futex,
    /// `sched_yield()` past the spin threshold; unlock as `Native`.
    SchedYield,
}

impl PvLock {
    /// Every variant, the default first.
    pub const ALL: [PvLock; 4] = [
        PvLock::Default,
        PvLock::Native,
        PvLock::Futex,
        PvLock::SchedYield,
    ];

    /// The candidate name: `default`, `native`, `futex`, `sched_yield`.
    pub const fn name(self) -> &'static str {
        match self {
            PvLock::Default => "default",
            PvLock::Native => "native",
            PvLock::Futex => "futex",
            PvLock::SchedYield => "sched_yield",
        }
    }

    /// The variant with this candidate name.
    pub fn from_name(name: &str) -> Option<PvLock> {
        PvLock::ALL.into_iter().find(|v| v.name() == name)
    }

    /// Whether waiters may block in the futex (and unlockers must therefore kick).
    pub const fn sleeps(self) -> bool {
        matches!(self, PvLock::Futex)
    }
}

impl core::fmt::Display for PvLock {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.pad(self.name())
    }
}

/// What `report` selected for the `pv_lock` sites: `None` when the program has none, or when
/// its copies disagree (one was refused or not written).
pub fn chosen(report: &Report) -> Option<PvLock> {
    let mut copies = report.site(SITE);
    let first = PvLock::from_name(copies.next()?.chosen())?;
    copies
        .all(|s| PvLock::from_name(s.chosen()) == Some(first))
        .then_some(first)
}

/// Re-selects every site of the program, forcing `pv_lock` to `variant` on top of the `ALTPATCH`
/// overrides in the environment (which it replaces for `pv_lock` only); returns the report.
///
/// Call it while no [`RawTicketLock`](crate::RawTicketLock) has sleeping waiters: switching away
/// from `futex` strands them (see the lock's docs). The report carries any error: a malformed
/// `ALTPATCH`, or a program without `pv_lock` sites.
pub fn force(variant: PvLock) -> Report {
    let mut overrides = match Overrides::from_env() {
        Ok(o) => o,
        Err(_) => return Patcher::from_env().apply(), // reports the malformed value
    };
    let forced = Overrides::parse(&format!("{SITE}={}", variant.name()))
        .expect("a valid override: a constant site and candidate name");
    overrides.choices.retain(|c| c.site != SITE);
    overrides.choices.extend(forced.choices);
    Patcher::new().overrides(overrides).apply()
}

/// The predicate of `sched_yield`: never chosen by selection, only by an override.
pub fn only_if_forced() -> bool {
    false
}

/// Counters of the slow paths, process-wide (relaxed, updated only off the fast paths).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PvStats {
    /// `futex` waiters that found the lock still taken after setting the flag, and waited.
    pub waits: u64,
    /// Kicks: futex wakes by unlockers that saw the flag.
    pub kicks: u64,
    /// New owners that cleared the flag (nobody left behind them).
    pub flag_clears: u64,
}

static WAITS: AtomicU64 = AtomicU64::new(0);
static KICKS: AtomicU64 = AtomicU64::new(0);
static FLAG_CLEARS: AtomicU64 = AtomicU64::new(0);

/// A snapshot of the slow-path counters.
pub fn stats() -> PvStats {
    PvStats {
        waits: WAITS.load(Relaxed),
        kicks: KICKS.load(Relaxed),
        flag_clears: FLAG_CLEARS.load(Relaxed),
    }
}

pub(crate) fn count_flag_clear() {
    FLAG_CLEARS.fetch_add(1, Relaxed);
}

// The three sites. Their candidate lists must stay identical in names, predicates and order (one
// `pv_lock` choice covers all three; tests/pv_lock_selection.rs checks it). `futex` and `native`
// are complementary, so their order does not change the selection; call candidates come before
// the others because the macro numbers its `sym` operands by position (a `call` candidate after
// a `nop` or `asm` one names an operand that does not exist). `2` in the `add` is `TICKET_INC`.
const _: () = assert!(TICKET_INC == 2);

/// The `lock_spinning` op: a waiter holding `ticket` has spun its threshold.
///
/// # Safety
/// `lock` points to a live lock on which the caller holds `ticket`.
#[cfg(not(loom))]
#[altpatch::alternative(
    inline,
    name = "pv_lock",
    futex: all(hypervisor, not(kvm_hints_realtime)) => futex_lock_spinning,
    sched_yield: when = only_if_forced => yield_lock_spinning,
    native: any(not(hypervisor), kvm_hints_realtime) => nop,
)]
pub(crate) unsafe fn lock_spinning(lock: *const Tickets, ticket: u32) {
    // Unpatched: yield. The default never sleeps, so selecting any variant later is safe even
    // while locks are contended.
    // SAFETY: forwarded from the caller.
    unsafe { yield_lock_spinning(lock, ticket) }
}

/// The `unlock_kick` op: the unlocker saw the slowpath flag; `ticket` is the next one served.
///
/// # Safety
/// None beyond `lock` having been a lock: it is used as an address only, never dereferenced
/// (the lock may already be freed by its next owner).
#[cfg(not(loom))]
#[altpatch::alternative(
    inline,
    name = "pv_lock",
    futex: all(hypervisor, not(kvm_hints_realtime)) => futex_unlock_kick,
    sched_yield: when = only_if_forced => nop,
    native: any(not(hypervisor), kvm_hints_realtime) => nop,
)]
pub(crate) unsafe fn unlock_kick(lock: *const Tickets, ticket: u32) {
    // SAFETY: forwarded from the caller.
    unsafe { futex_unlock_kick(lock, ticket) }
}

/// The unlock: `native` is one plain `add` of `TICKET_INC` to `head`: a release, since x86 stores
/// are releases and the asm block is a compiler barrier; not `lock`ed, since the owner is the only
/// writer of the ticket bits and nobody sets the flag in that mode. It carries two `ds` prefixes
/// (ignored in 64-bit mode; the kernel pads its 5-byte `xor eax, eax` with `cs` the same way) to
/// be one instruction as long as the default's `call`: a thread returning from that call, or
/// stopped after the `add`, resumes past the site whatever it holds by then, so every variant
/// can replace every other while threads run (see `altpatch::LiveWrite`).
///
/// # Safety
/// The caller holds the lock.
#[cfg(not(loom))]
#[altpatch::alternative(
    inline,
    name = "pv_lock",
    futex: all(hypervisor, not(kvm_hints_realtime)) => pv_unlock,
    sched_yield: when = only_if_forced => asm("ds ds add dword ptr [rdi], 2"),
    native: any(not(hypervisor), kvm_hints_realtime) => asm("ds ds add dword ptr [rdi], 2"),
)]
pub(crate) unsafe fn unlock(lock: *const Tickets) {
    // SAFETY: forwarded from the caller.
    unsafe { pv_unlock(lock) }
}

/// The pv unlock: release with one RMW that also returns the slowpath flag.
///
/// # Safety
/// The caller holds the lock.
unsafe fn pv_unlock(lock: *const Tickets) {
    // SAFETY: we hold the lock, so it is live up to and including this RMW, which releases it.
    let old = unsafe { &*lock }.head().fetch_add(TICKET_INC, Release);
    // From here on the next owner may free the lock: only its address is used.
    if old & SLOWPATH_FLAG != 0 {
        kick(lock, (old & !SLOWPATH_FLAG).wrapping_add(TICKET_INC));
    }
}

#[cold]
#[inline(never)]
fn kick(lock: *const Tickets, next: u32) {
    // SAFETY: `unlock_kick` uses `lock` as an address only.
    unsafe { unlock_kick(lock, next) }
}

/// `futex`'s `lock_spinning`: announce a possible sleep with the flag, and sleep unless our turn
/// came meanwhile.
///
/// # Safety
/// As [`lock_spinning`].
unsafe fn futex_lock_spinning(lock: *const Tickets, ticket: u32) {
    // SAFETY: we hold a ticket, so the lock is live.
    let lock = unsafe { &*lock };
    // [A], paired with [B] in `Tickets::clear_slowpath`: our ticket (taken from `tail`) is
    // visible to an owner deciding whether to clear the flag, or we see its clear below.
    fence(SeqCst);
    // Setting the flag and re-checking `head` are one atomic step: no unlock can slip between.
    let head = lock.head().fetch_or(SLOWPATH_FLAG, Relaxed);
    if head & !SLOWPATH_FLAG == ticket {
        return; // served meanwhile: the caller's next look at `head` acquires
    }
    WAITS.fetch_add(1, Relaxed);
    // Sleeps only while `head` is still exactly what we saw, flag included: an unlock in between
    // changes it, and one after it finds the flag and kicks us.
    futex::wait(lock, head | SLOWPATH_FLAG, futex::ticket_bit(ticket));
}

/// `futex`'s `unlock_kick`: wake the waiter of `ticket` (and any sharing its bit).
///
/// # Safety
/// As [`unlock_kick`].
unsafe fn futex_unlock_kick(lock: *const Tickets, ticket: u32) {
    KICKS.fetch_add(1, Relaxed);
    futex::wake(lock, futex::ticket_bit(ticket));
}

/// `sched_yield`'s `lock_spinning` (and the default's).
///
/// # Safety
/// None; the signature is the op's.
unsafe fn yield_lock_spinning(_lock: *const Tickets, _ticket: u32) {
    yield_now();
}

/// The sites under the loom model: plain dispatch on [`model::set`]'s variant, each arm the
/// candidate the patched site would run.
#[cfg(loom)]
pub(crate) unsafe fn lock_spinning(lock: *const Tickets, ticket: u32) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match model::variant() {
            // NOPs keep spinning; the model yields here so that a spinning waiter lets the
            // others run (scheduling only: loom still explores every interleaving).
            PvLock::Native => yield_now(),
            PvLock::Futex => futex_lock_spinning(lock, ticket),
            PvLock::SchedYield | PvLock::Default => yield_lock_spinning(lock, ticket),
        }
    }
}

#[cfg(loom)]
pub(crate) unsafe fn unlock_kick(lock: *const Tickets, ticket: u32) {
    match model::variant() {
        PvLock::Native | PvLock::SchedYield => {}
        // SAFETY: forwarded from the caller.
        PvLock::Futex | PvLock::Default => unsafe { futex_unlock_kick(lock, ticket) },
    }
}

#[cfg(loom)]
pub(crate) unsafe fn unlock(lock: *const Tickets) {
    match model::variant() {
        PvLock::Native | PvLock::SchedYield => {
            // `add dword ptr [rdi], 2` without `lock`: a load and a release store, fine because
            // the owner is the only writer of the ticket bits.
            // SAFETY: the caller holds the lock.
            let head = unsafe { &*lock }.head();
            let value = head.load(Relaxed);
            head.store(value.wrapping_add(TICKET_INC), Release);
        }
        // SAFETY: forwarded from the caller.
        PvLock::Futex | PvLock::Default => unsafe { pv_unlock(lock) },
    }
}

/// The variant the loom model runs (there are no patched sites under loom).
#[cfg(loom)]
#[doc(hidden)]
pub mod model {
    use super::PvLock;
    use std::cell::Cell;

    std::thread_local! {
        // Per test thread: loom runs a model's threads as coroutines on the thread that calls
        // `loom::model`, and tests run in parallel.
        static VARIANT: Cell<PvLock> = const { Cell::new(PvLock::Default) };
    }

    /// Selects the variant for the following `loom::model` runs on this thread.
    pub fn set(variant: PvLock) {
        VARIANT.set(variant);
    }

    pub(crate) fn variant() -> PvLock {
        VARIANT.get()
    }
}
