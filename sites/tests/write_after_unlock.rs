//! Regression test for the pvticketlock write-after-unlock bug: the kernel's unlock added to
//! `head`, then read `tail` for the slowpath flag and cleared it with a `cmpxchg`, after the lock
//! was released and possibly freed by its next owner. Here the unlock's only access to the lock
//! is the releasing instruction; the kick is a futex wake by address.
//!
//! A hardware watchpoint (perf_event_open, `HW_BREAKPOINT_RW` over both words) counts the
//! unlocking thread's accesses to the lock during `unlock`, in every variant, with a waiter
//! queued (asleep in the futex, with the flag set, for `futex`): exactly one. The waiter then
//! takes the lock and scribbles over its memory, as an owner freeing it would.
//!
//! Where perf events are not available, set `ALTPATCH_SITES_NO_WATCHPOINT=1` to skip.
#![cfg(all(not(loom), target_os = "linux"))]

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use altpatch_sites::RawTicketLock;
use altpatch_sites::pv::{self, PvLock};
use common::*;
use lock_api::RawMutex;

/// `struct perf_event_attr` up to `PERF_ATTR_SIZE_VER7` (128 bytes).
#[repr(C)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    bp_addr: u64,
    bp_len: u64,
    rest: [u64; 7],
}

const PERF_TYPE_BREAKPOINT: u32 = 5;
const HW_BREAKPOINT_RW: u32 = 3;
const FLAG_DISABLED: u64 = 1 << 0;
const FLAG_EXCLUDE_KERNEL: u64 = 1 << 5;
const FLAG_EXCLUDE_HV: u64 = 1 << 6;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_DISABLE: libc::c_ulong = 0x2401;
const PERF_EVENT_IOC_RESET: libc::c_ulong = 0x2403;

/// Counts this thread's user-mode accesses to 8 bytes at `addr`.
struct Watchpoint(libc::c_int);

impl Watchpoint {
    fn new(addr: usize) -> Result<Watchpoint, std::io::Error> {
        assert_eq!(addr % 8, 0, "an 8-byte watchpoint needs 8-byte alignment");
        let attr = PerfEventAttr {
            kind: PERF_TYPE_BREAKPOINT,
            size: size_of::<PerfEventAttr>() as u32,
            config: 0,
            sample_period: 0,
            sample_type: 0,
            read_format: 0,
            flags: FLAG_DISABLED | FLAG_EXCLUDE_KERNEL | FLAG_EXCLUDE_HV,
            wakeup_events: 0,
            bp_type: HW_BREAKPOINT_RW,
            bp_addr: addr as u64,
            bp_len: 8,
            rest: [0; 7],
        };
        // SAFETY: a valid attr of the size it states; pid 0 / cpu -1 = this thread on any CPU;
        // no group, no flags.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                &attr as *const PerfEventAttr,
                0,
                -1,
                -1,
                0,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Watchpoint(fd as libc::c_int))
    }

    /// Accesses during `f`.
    fn count(&self, f: impl FnOnce()) -> u64 {
        // SAFETY: ioctls on our own perf fd, then an 8-byte read of its counter.
        unsafe {
            assert_eq!(libc::ioctl(self.0, PERF_EVENT_IOC_RESET, 0), 0);
            assert_eq!(libc::ioctl(self.0, PERF_EVENT_IOC_ENABLE, 0), 0);
            f();
            assert_eq!(libc::ioctl(self.0, PERF_EVENT_IOC_DISABLE, 0), 0);
            let mut count = 0u64;
            let n = libc::read(self.0, (&raw mut count).cast(), 8);
            assert_eq!(n, 8);
            count
        }
    }
}

impl Drop for Watchpoint {
    fn drop(&mut self) {
        // SAFETY: closes our own fd once.
        unsafe { libc::close(self.0) };
    }
}

/// The lock alone on its 8 aligned bytes, so the watchpoint sees nothing else.
#[repr(C, align(8))]
struct Aligned(RawTicketLock<1>);

fn unlock_touches_the_lock_once(variant: PvLock) {
    let _lock = patch_lock();
    force(variant);
    let lock: &'static Aligned = Box::leak(Box::new(Aligned(RawTicketLock::new())));
    let addr = &raw const lock.0 as usize;
    let watch = match Watchpoint::new(addr) {
        Ok(w) => w,
        Err(e) if std::env::var_os("ALTPATCH_SITES_NO_WATCHPOINT").is_some() => {
            eprintln!("skipped: no hardware watchpoint ({e})");
            return;
        }
        Err(e) => panic!(
            "perf_event_open for a hardware watchpoint failed ({e}); set \
             ALTPATCH_SITES_NO_WATCHPOINT=1 to skip this test where perf events are unavailable"
        ),
    };
    // The watchpoint works: a plain lock/unlock is at least two accesses.
    assert!(
        watch.count(|| {
            lock.0.lock();
            // SAFETY: locked just above.
            unsafe { lock.0.unlock() };
        }) >= 2
    );

    lock.0.lock();
    let (freed_tx, freed_rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        lock.0.lock();
        // The new owner is the last user: it frees the lock (scribbles over its words).
        // SAFETY: we own the lock and nobody else waits for it; the test never uses it again.
        unsafe { std::ptr::write_bytes((&raw const lock.0).cast_mut().cast::<u8>(), 0xa5, 8) };
        freed_tx.send(()).unwrap();
    });
    // Wait for the waiter to queue (and, for futex, to announce its sleep with the flag).
    let start = Instant::now();
    loop {
        let state = lock.0.state();
        if state.queued() == 2 && (state.slowpath() || !variant.sleeps()) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{state:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20)); // let it fall asleep in the futex
    let kicks = pv::stats().kicks;
    let accesses = watch.count(|| {
        // SAFETY: we hold the lock.
        unsafe { lock.0.unlock() };
    });
    assert_eq!(
        accesses, 1,
        "{variant}: unlock must touch the lock once, with the releasing instruction"
    );
    // With a sleeper, the unlock took the kick path: the case the kernel bug was in.
    let kicked = u64::from(variant.sleeps());
    assert_eq!(pv::stats().kicks - kicks, kicked, "{variant}");
    freed_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the waiter was never handed the lock");
    waiter.join().unwrap();
}

#[test]
fn native_unlock_touches_the_lock_once() {
    unlock_touches_the_lock_once(PvLock::Native);
}

#[test]
fn futex_unlock_with_a_sleeper_touches_the_lock_once() {
    unlock_touches_the_lock_once(PvLock::Futex);
}

#[test]
fn sched_yield_unlock_touches_the_lock_once() {
    unlock_touches_the_lock_once(PvLock::SchedYield);
}

#[test]
fn default_unlock_touches_the_lock_once() {
    unlock_touches_the_lock_once(PvLock::Default);
}
