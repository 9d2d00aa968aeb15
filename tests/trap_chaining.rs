//! The live protocol's SIGTRAP handler only takes traps on sites it is patching: a program's own
//! breakpoints still reach the handler it installed before.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use altpatch::{Feature, Patcher};
use common::*;

static USER_TRAPS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn user_handler(_sig: libc::c_int) {
    USER_TRAPS.fetch_add(1, Ordering::SeqCst);
}

#[test]
fn a_users_own_sigtrap_handler_still_gets_its_traps() {
    let _lock = patch_lock();
    // SAFETY: user_handler is an `extern "C" fn(c_int)` that only bumps an atomic counter.
    unsafe {
        common::set_signal_action(libc::SIGTRAP, user_handler as *const () as usize, 0);
    };
    // A live batch (another thread exists) installs altpatch's handler on top.
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        s.spawn(move || rx.recv().ok());
        let report = Patcher::new().cpu(cpu_with(&[Feature::Avx2])).apply();
        assert!(report.stats.live, "{report}");
        assert_eq!(mix(std::hint::black_box(2)), mix_expected("avx2", 2));
        tx.send(()).unwrap();
    });

    // SAFETY: `int3` traps into the handler chain and execution resumes after it.
    unsafe { std::arch::asm!("int3") };
    // SAFETY: raising a signal whose handler only bumps a counter.
    unsafe { libc::raise(libc::SIGTRAP) };
    assert_eq!(
        USER_TRAPS.load(Ordering::SeqCst),
        2,
        "both traps reached the user's handler"
    );
}
