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
    // SAFETY: installs a plain handler that only bumps an atomic counter.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = user_handler as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        assert_eq!(
            libc::sigaction(libc::SIGTRAP, &action, std::ptr::null_mut()),
            0
        );
    }
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
