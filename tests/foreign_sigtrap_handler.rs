//! A program installs its own SIGTRAP disposition after `apply_patches()` (a counting handler, a
//! one-shot `SA_RESETHAND` handler, `SIG_IGN`, a crash reporter that treats any SIGTRAP as fatal),
//! then toggles a key while threads run its branch: altpatch re-installs its handler over theirs
//! before the next live batch and chains to theirs, so no int3 of its own reaches their handler,
//! and their own traps still do.

mod common;
#[path = "common/toggle.rs"]
mod toggle;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use common::child::run_bounded;
use toggle::*;

static FOREIGN_CALLS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn counting(_sig: libc::c_int) {
    FOREIGN_CALLS.fetch_add(1, SeqCst);
}

extern "C" fn crash_reporter(_sig: libc::c_int) {
    const MSG: &[u8] = b"crash reporter: fatal SIGTRAP\n";
    // SAFETY: write and _exit are async-signal-safe.
    unsafe {
        libc::write(2, MSG.as_ptr().cast(), MSG.len());
        libc::_exit(99);
    }
}

fn install(handler: usize, flags: libc::c_int) {
    // SAFETY: the cases below pass SIG_IGN or `extern "C" fn(c_int)` handlers that only count,
    // or write and `_exit`.
    unsafe { common::set_signal_action(libc::SIGTRAP, handler, flags) };
}

#[test]
#[ignore = "run by the tests below, in a child process"]
fn child_entry() {
    let case = std::env::var("ALTPATCH_TEST_FOREIGN").unwrap();
    altpatch::apply_patches();
    // A live batch first, so altpatch's handler is installed before theirs goes over it.
    let first = toggle_while_running(2, 4, Duration::from_secs(10), || {});
    assert!(first.written > 0, "{}", first.summary());
    match case.as_str() {
        "counting" => install(counting as *const () as usize, 0),
        "reset" => install(counting as *const () as usize, libc::SA_RESETHAND),
        "ignore" => install(libc::SIG_IGN, 0),
        "reporter" => install(crash_reporter as *const () as usize, 0),
        other => panic!("unknown case {other}"),
    }
    let run = toggle_while_running(2, 200, Duration::from_secs(20), || {});
    println!("{}", run.summary());
    assert_eq!(run.wrong, 0, "{}", run.summary());
    assert!(run.refusals.is_empty(), "{}", run.summary());
    assert_eq!(run.written as u64, run.toggles, "{}", run.summary());
    assert_eq!(
        FOREIGN_CALLS.load(SeqCst),
        0,
        "altpatch's int3s reached their handler"
    );
    println!("CHILD OK");
    // Their own traps still reach their disposition, through altpatch's handler.
    // SAFETY: raises SIGTRAP, whose disposition here counts, ignores or exits.
    unsafe { libc::raise(libc::SIGTRAP) };
    let expected = match case.as_str() {
        "counting" | "reset" => 1,
        _ => 0,
    };
    assert_eq!(FOREIGN_CALLS.load(SeqCst), expected, "{case}");
    println!("RAISED OK");
}

fn run_case(case: &str) {
    let run = run_bounded(
        &[],
        "child_entry",
        &[("ALTPATCH_TEST_FOREIGN", case)],
        Duration::from_secs(60),
    );
    if case == "reporter" {
        // Its own SIGTRAP (raised at the end) reaches it, and it exits as it means to.
        assert_eq!(run.status.and_then(|s| s.code()), Some(99), "{run:?}");
        assert_eq!(
            run.stderr.matches("fatal SIGTRAP").count(),
            1,
            "{}",
            run.stderr
        );
    } else {
        run.assert_success(case);
        assert!(run.stdout.contains("RAISED OK"), "{}", run.stdout);
    }
    assert!(run.stdout.contains("CHILD OK"), "{}", run.stdout);
    let (wrong, calls, toggles, written) = parse_summary(&run.stdout).unwrap();
    assert_eq!((wrong, written as u64), (0, toggles));
    assert!(calls > 0);
}

#[test]
fn a_counting_handler_installed_after_apply() {
    run_case("counting");
}

#[test]
fn a_one_shot_handler_installed_after_apply() {
    run_case("reset");
}

#[test]
fn sigtrap_ignored_after_apply() {
    run_case("ignore");
}

#[test]
fn a_crash_reporter_installed_after_apply_sees_only_its_own_trap() {
    run_case("reporter");
}
