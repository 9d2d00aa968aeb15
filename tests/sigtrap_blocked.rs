//! Threads that block SIGTRAP: one worker (`pthread_sigmask`), or every thread in the `sigwait`
//! layout (all signals blocked before the workers start). An int3 there would kill the process,
//! so every live toggle is refused before any byte is written, and says which thread blocks it.

mod common;
#[path = "common/toggle.rs"]
mod toggle;

use std::time::Duration;

use common::child::run_bounded;
use toggle::*;

fn block(signals: &[libc::c_int]) {
    // SAFETY: changes the calling thread's signal mask with a valid set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &sig in signals {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn block_all() {
    // SAFETY: blocks every signal on the calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

#[test]
#[ignore = "run by the tests below, in a child process"]
fn child_entry() {
    altpatch::apply_patches();
    let run = match std::env::var("ALTPATCH_TEST_BLOCKED").unwrap().as_str() {
        "one_worker" => {
            let first = std::sync::atomic::AtomicBool::new(true);
            toggle_while_running(2, 5, Duration::from_secs(10), || {
                if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    block(&[libc::SIGTRAP]);
                }
            })
        }
        "sigwait_layout" => {
            block_all();
            toggle_while_running(2, 5, Duration::from_secs(10), || {})
        }
        other => panic!("unknown case {other}"),
    };
    println!("{}", run.summary());
    assert_eq!(run.wrong, 0, "{}", run.summary());
    assert_eq!(run.written, 0, "{}", run.summary());
    assert!(
        run.refusals.iter().all(|r| r.contains("blocks SIGTRAP")),
        "{}",
        run.summary()
    );
    assert!(!run.refusals.is_empty(), "{}", run.summary());
    println!("CHILD OK");
}

fn run_case(case: &str) {
    let run = run_bounded(
        &[],
        "child_entry",
        &[("ALTPATCH_TEST_BLOCKED", case)],
        Duration::from_secs(60),
    );
    run.assert_success(case);
    assert!(run.stdout.contains("CHILD OK"), "{}", run.stdout);
    let (wrong, calls, toggles, _) = parse_summary(&run.stdout).unwrap();
    assert_eq!(wrong, 0);
    assert!(calls > 0 && toggles > 0);
}

#[test]
fn one_worker_blocks_sigtrap() {
    run_case("one_worker");
}

#[test]
fn every_thread_blocks_every_signal() {
    run_case("sigwait_layout");
}
