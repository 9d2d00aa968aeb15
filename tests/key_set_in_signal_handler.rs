//! `set()` called from a signal handler that interrupted `set()` on the same thread returns
//! `KeyError::Reentered` at once, with nothing changed, instead of deadlocking on the patcher
//! lock. Runs in a child process with a time bound (a deadlock fails the test).

mod common;
#[path = "common/toggle.rs"]
mod toggle;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use altpatch::KeyError;
use common::run_child_entry_within;
use toggle::{KEY, Workers, branch_taken};

static REENTERED: AtomicU64 = AtomicU64::new(0);
static DONE: AtomicU64 = AtomicU64::new(0);
static OTHER: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_usr1(_: libc::c_int) {
    // Sets the key to the state it has: a toggle that changes nothing if it is let through.
    match KEY.set(KEY.is_enabled()) {
        Err(KeyError::Reentered) => REENTERED.fetch_add(1, Ordering::SeqCst),
        Ok(_) => DONE.fetch_add(1, Ordering::SeqCst),
        Err(_) => OTHER.fetch_add(1, Ordering::SeqCst),
    };
}

#[test]
#[ignore = "entry point of the child processes the other tests start"]
fn child_entry() {
    if std::env::var_os("ALTPATCH_TEST_SIGNAL_SET").is_none() {
        return;
    }
    altpatch::apply_patches();
    // SAFETY: on_usr1 is an `extern "C" fn(c_int)`. Its `set()` is not async-signal-safe (it
    // allocates): this test exercises the re-entry refusal, and its main thread only toggles.
    unsafe {
        common::set_signal_action(libc::SIGUSR1, on_usr1 as *const () as usize, 0);
    };
    let workers = Workers::start(2);
    // SAFETY: the calling thread's own handle.
    let me = unsafe { libc::pthread_self() };
    let stop = AtomicBool::new(false);
    let mut toggles = 0u64;
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: signals the toggling thread, alive until `stop` is set.
                unsafe { libc::pthread_kill(me, libc::SIGUSR1) };
                std::thread::sleep(Duration::from_micros(50));
            }
        });
        let end = Instant::now() + Duration::from_secs(20);
        while (REENTERED.load(Ordering::SeqCst) < 20 || toggles < 1000) && Instant::now() < end {
            let on = toggles.is_multiple_of(2);
            match workers.set(on) {
                Ok(_) => assert_eq!(KEY.is_enabled(), on),
                // A toggle refused only because our own handler ran it? Never: the handler
                // is the one refused.
                Err(e) => panic!("the interrupted toggle failed: {e}"),
            }
            assert_eq!(branch_taken(), KEY.is_enabled());
            toggles += 1;
        }
        stop.store(true, Ordering::Relaxed);
    });
    let seen = workers.stop_all_right();
    let (reentered, done, other) = (
        REENTERED.load(Ordering::SeqCst),
        DONE.load(Ordering::SeqCst),
        OTHER.load(Ordering::SeqCst),
    );
    assert!(reentered > 0, "no signal arrived inside set() in 20 s");
    assert_eq!(other, 0);
    println!("REENTERED={reentered} handler_toggles={done} toggles={toggles} {seen:?}");
}

#[test]
fn set_reentered_from_a_signal_handler_is_refused_not_deadlocked() {
    let out = run_child_entry_within(
        &[("ALTPATCH_TEST_SIGNAL_SET", "1")],
        Duration::from_secs(60),
    );
    assert!(out.contains("REENTERED="), "{out}");
}
