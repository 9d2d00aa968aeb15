//! Under gdb (or any tracer), an int3 of the live protocol would stop the program in the
//! debugger, and going on from there breaks it: altpatch sees the tracer (`TracerPid`) and
//! refuses live toggles before writing anything, saying why; the key keeps its state and the
//! branches keep agreeing with it. Two ways in: started under gdb, and gdb attached to a running
//! program whose branch was already patched. Skips when gdb is not installed (`.ci/run` installs
//! it) or cannot trace here.

mod common;
#[path = "common/toggle.rs"]
mod toggle;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::child::{run_bounded, tool_available};
use toggle::*;

fn traced() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .is_some_and(|pid| pid.trim() != "0")
}

#[test]
#[ignore = "run by the tests below, under gdb or attaching it"]
// The attached gdb stays until this process exits, so it cannot be waited for here.
#[allow(clippy::zombie_processes)]
fn child_entry() {
    altpatch::apply_patches();
    if std::env::var_os("ALTPATCH_TEST_ATTACH").is_some() {
        // Patched while untraced, then a debugger attaches.
        let before = toggle_while_running(2, 4, Duration::from_secs(10), || {});
        assert!(
            before.written > 0 && before.refusals.is_empty(),
            "{}",
            before.summary()
        );
        let gdb = Command::new("gdb")
            .args(["-nx", "-batch", "-ex", "continue", "-p"])
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !traced() && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !traced() {
            println!("SKIP: gdb could not attach");
            return;
        }
        drop(gdb); // it leaves when this process exits
    }
    let run = toggle_while_running(2, 50, Duration::from_secs(20), || {});
    println!("{}", run.summary());
    assert_eq!(run.wrong, 0, "{}", run.summary());
    assert_eq!(run.written, 0, "{}", run.summary());
    assert!(
        !run.refusals.is_empty() && run.refusals.iter().all(|r| r.contains("traced")),
        "{}",
        run.summary()
    );
    println!("CHILD OK");
}

fn check(run: &common::child::ChildRun) {
    let (wrong, calls, toggles, written) = parse_summary(&run.stdout).unwrap();
    assert_eq!((wrong, written), (0, 0));
    assert!(calls > 0 && toggles > 0);
}

#[test]
fn started_under_gdb() {
    if !tool_available("gdb") {
        return;
    }
    let run = run_bounded(
        &["gdb", "-nx", "-batch", "-ex", "run", "--args"],
        "child_entry",
        &[],
        Duration::from_secs(120),
    );
    if run.stderr.contains("ptrace: Operation not permitted")
        || run.stderr.contains("Could not trace the inferior")
    {
        eprintln!("skipped: gdb cannot trace here: {}", run.stderr);
        return;
    }
    run.assert_success("under gdb");
    assert!(
        run.stdout.contains("CHILD OK") && run.stdout.contains("exited normally"),
        "{}\n{}",
        run.stdout,
        run.stderr
    );
    check(&run);
}

#[test]
fn gdb_attached_after_the_branch_was_patched() {
    if !tool_available("gdb") {
        return;
    }
    let run = run_bounded(
        &[],
        "child_entry",
        &[("ALTPATCH_TEST_ATTACH", "1")],
        Duration::from_secs(120),
    );
    run.assert_success("gdb attached");
    if run.stdout.contains("SKIP:") {
        eprintln!("skipped: gdb could not attach here");
        return;
    }
    assert!(run.stdout.contains("CHILD OK"), "{}", run.stdout);
    check(&run);
}
