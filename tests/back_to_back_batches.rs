//! Regression: a thread that traps on a batch's `int3` but reaches the handler only after that
//! batch has ended and the next batch has put an `int3` back on the same site must be moved on,
//! not have the trap passed to the default action (the process died of SIGTRAP in the patching
//! bench, toggling a one-site key back to back while two threads ran it).
//!
//! A one-site key is toggled as fast as the writer goes while two threads run the site; the
//! window is a few instructions wide, so the run is long enough to hit it repeatedly on this
//! machine (2 s; `ALTPATCH_STRESS=1` for 30 s).

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use altpatch::StaticKey;
use common::patch_lock;

static KEY: StaticKey = StaticKey::new(false);

#[inline(never)]
fn branch(x: u64) -> u64 {
    if altpatch::static_branch_unlikely!(KEY) {
        x + 1
    } else {
        x
    }
}

#[test]
fn back_to_back_toggles_of_one_site_while_threads_run_it() {
    let _lock = patch_lock();
    let secs = if std::env::var_os("ALTPATCH_STRESS").is_some() {
        30
    } else {
        2
    };
    let stop = AtomicBool::new(false);
    let calls = AtomicU64::new(0);
    let mut toggles = 0u64;
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let got = branch(black_box(1));
                    // Either branch is right while the key changes; nothing else is.
                    assert!(got == 1 || got == 2, "branch returned {got}");
                    n += 1;
                }
                calls.fetch_add(n, Ordering::Relaxed);
            });
        }
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            let update = KEY.set(toggles.is_multiple_of(2)).expect("the key toggles");
            assert_eq!(update.unpatched, None, "{update:?}");
            toggles += 1;
        }
        stop.store(true, Ordering::Relaxed);
    });
    KEY.disable().expect("the key toggles");
    assert_eq!(branch(black_box(1)), 1);
    assert!(toggles > 0 && calls.load(Ordering::Relaxed) > 0);
    println!(
        "{toggles} toggles, {} calls, {} traps handled",
        calls.load(Ordering::Relaxed),
        altpatch::__private::traps_handled()
    );
}
