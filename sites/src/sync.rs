//! The atomics and waiting primitives the lock protocol is written against: `core`/`std` in a
//! normal build, loom's instrumented versions under `--cfg loom`, so the model checker explores
//! the very code that ships.

#[cfg(not(loom))]
pub(crate) use core::hint::spin_loop;
#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{AtomicU32, Ordering, fence};
#[cfg(not(loom))]
pub(crate) use std::thread::yield_now;

/// A `pause` is only a hint: it changes no state, so the model leaves it out. (A waiter spins at
/// most `SPINS` times between `lock_spinning` calls, and the model's native `lock_spinning`
/// yields, so no model loop spins forever; a yield here would cost the model a preemption per
/// spin and hide the interleavings that matter behind its preemption bound.)
#[cfg(loom)]
pub(crate) fn spin_loop() {}
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, Ordering, fence};
#[cfg(loom)]
pub(crate) use loom::thread::yield_now;
