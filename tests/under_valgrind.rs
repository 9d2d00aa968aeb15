//! Under valgrind (default `--smc-check`), which runs translations of the code and does not see
//! text rewritten outside the stack: every write tells it which range changed (its
//! discard-translations client request), so each toggle takes effect. Skips when valgrind is
//! not installed (`.ci/run` installs it).

mod common;
#[path = "common/toggle.rs"]
mod toggle;

use std::time::Duration;

use common::child::{run_bounded, tool_available};
use toggle::*;

#[test]
#[ignore = "run by the test below, under valgrind"]
fn child_entry() {
    altpatch::apply_patches();
    let run = toggle_while_running(2, 40, Duration::from_secs(60), || {});
    println!("{}", run.summary());
    assert_eq!(run.wrong, 0, "{}", run.summary());
    assert!(run.refusals.is_empty(), "{}", run.summary());
    assert_eq!(run.written as u64, run.toggles, "{}", run.summary());
    println!("CHILD OK");
}

#[test]
fn toggling_while_threads_run_under_valgrind() {
    if !tool_available("valgrind") {
        return;
    }
    let run = run_bounded(
        // Fair scheduling: valgrind runs one thread at a time, and its default lock lets the
        // spinning workers take it back again and again, stalling a `set()` for seconds (4 to
        // 15 s seen on an idle machine; past this limit on a CI runner).
        &["valgrind", "-q", "--fair-sched=yes", "--error-exitcode=0"],
        "child_entry",
        &[],
        Duration::from_secs(240),
    );
    run.assert_success("under valgrind");
    assert!(run.stdout.contains("CHILD OK"), "{}", run.stdout);
    let (wrong, calls, toggles, written) = parse_summary(&run.stdout).unwrap();
    assert_eq!((wrong, written as u64), (0, toggles));
    assert!(calls > 0 && toggles > 0);
}
