//! # altpatch-sites: sites to take off the shelf
//!
//! Ready-made [`altpatch`] sites. Call [`altpatch::apply_patches()`] once at startup, as for any
//! site; until then (and with `ALTPATCH=off`) every function here runs its portable default.
//!
//! * [`TicketMutex`] / [`RawTicketLock`]: the paravirt ticket spinlock. Uncontended, it is one
//!   `fetch_add` and one load with no pv code at all; its waiters call the `lock_spinning` pv op
//!   past [`SPIN_THRESHOLD`] pauses, and its unlock is itself an alternative. On bare metal (or
//!   KVM with `KVM_HINTS_REALTIME`) the ops are NOPs and the unlock is one `add`; under another
//!   hypervisor waiters block in a futex and unlockers wake them. See [`pv`].
//! * [`PvMutex`] / [`RawPvLock`]: the paravirt hybrid lock, for more threads than CPUs. One
//!   `cmpxchg` to lock and one release store to unlock when patched native; contended lockers
//!   spin and steal the lock whenever it is free, then call a `pv_lock` slow-path op: keep
//!   spinning (`native`), or park in a futex (`futex`), where unlocks wake one sleeper at a time
//!   and a waiter past [`FAIR_TIMEOUT`] gets the lock handed over. Its sites share the ticket
//!   lock's `pv_lock` name, so one choice covers both. See [`pvlock`].
//! * CPU alternatives: [`popcount`], [`leading_zeros`], [`trailing_zeros`] (POPCNT, LZCNT,
//!   BMI1), [`crc32c()`] (SSE4.2), [`rdtsc_ordered`] (`rdtscp` or `lfence; rdtsc`),
//!   [`copy_small`] (`rep movsb` with FSRM/ERMS), [`cache::flush`] (`clflushopt` or `clflush`).
//!
//! ```
//! use altpatch_sites::TicketMutex;
//!
//! let report = altpatch::apply_patches();
//! let total = TicketMutex::new(0u64);
//! std::thread::scope(|s| {
//!     for _ in 0..4 {
//!         s.spawn(|| *total.lock() += altpatch_sites::popcount(0b1011) as u64);
//!     }
//! });
//! assert_eq!(*total.lock(), 12);
//! println!("pv_lock: {:?}", altpatch_sites::pv::chosen(report));
//! ```

pub mod bits;
#[cfg(target_arch = "x86_64")]
pub mod cache;
pub mod copy;
pub mod crc32c;
mod futex;
pub mod pv;
pub mod pvlock;
pub mod spinlock;
mod sync;
#[cfg(target_arch = "x86_64")]
pub mod timestamp;

pub use bits::{leading_zeros, popcount, trailing_zeros};
pub use copy::copy_small;
pub use crc32c::{crc32c, crc32c_append};
pub use pvlock::{FAIR_TIMEOUT, PV_SPIN_THRESHOLD, PvLockState, RawPvLock};
#[cfg(not(loom))]
pub use pvlock::{PvMutex, PvMutexGuard};
pub use spinlock::{LockState, RawTicketLock, SPIN_THRESHOLD};
#[cfg(not(loom))]
pub use spinlock::{TicketMutex, TicketMutexGuard};
#[cfg(target_arch = "x86_64")]
pub use timestamp::rdtsc_ordered;
