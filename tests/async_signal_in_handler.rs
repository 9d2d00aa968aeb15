//! An asynchronous signal handler (a SIGUSR1 flood) runs a static branch while the key toggles:
//! altpatch's SIGTRAP handler blocks asynchronous signals while it runs, so the SIGUSR1 handler
//! never runs inside it (where a trap on the branch, with SIGTRAP blocked, would kill the process).

mod common;
#[path = "common/toggle.rs"]
mod toggle;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use common::child::run_bounded;
use toggle::*;

static IN_HANDLER: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_usr1(_sig: libc::c_int) {
    run_branch_checked();
    IN_HANDLER.fetch_add(1, SeqCst);
}

#[test]
#[ignore = "run by the test below, in a child process"]
fn child_entry() {
    altpatch::apply_patches();
    // SAFETY: on_usr1 is an `extern "C" fn(c_int)` that only runs the branch and bumps atomics.
    unsafe {
        common::set_signal_action(
            libc::SIGUSR1,
            on_usr1 as *const () as usize,
            libc::SA_RESTART,
        );
    };
    let workers: std::sync::Mutex<Vec<libc::pid_t>> = Default::default();
    let stop = AtomicBool::new(false);
    let run = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(SeqCst) {
                for &tid in workers.lock().unwrap().iter() {
                    // SAFETY: tgkill only sends a signal; a thread that has ended (its id not
                    // reused within this process) gives ESRCH.
                    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR1) };
                }
                std::thread::yield_now();
            }
        });
        let run = toggle_while_running(2, 300, Duration::from_secs(20), || {
            // SAFETY: gettid has no preconditions.
            workers.lock().unwrap().push(unsafe { libc::gettid() });
        });
        stop.store(true, SeqCst);
        run
    });
    println!("{} in_handler={}", run.summary(), IN_HANDLER.load(SeqCst));
    assert_eq!(run.wrong, 0, "{}", run.summary());
    assert!(run.refusals.is_empty(), "{}", run.summary());
    assert_eq!(run.written as u64, run.toggles, "{}", run.summary());
    assert!(IN_HANDLER.load(SeqCst) > 0, "the flood reached the workers");
    println!("CHILD OK");
}

#[test]
fn a_signal_flood_whose_handler_runs_the_branch() {
    let run = run_bounded(&[], "child_entry", &[], Duration::from_secs(60));
    run.assert_success("SIGUSR1 flood while toggling");
    assert!(run.stdout.contains("CHILD OK"), "{}", run.stdout);
    let (wrong, calls, toggles, written) = parse_summary(&run.stdout).unwrap();
    assert_eq!((wrong, written as u64), (0, toggles));
    assert!(calls > 0);
}
