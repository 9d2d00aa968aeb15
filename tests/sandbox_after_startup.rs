//! A program that enters a seccomp sandbox after startup (making text writable and executable
//! refused, opening files for writing refused) can still toggle its keys: the startup apply kept
//! a `/proc/self/mem` descriptor, and the writer falls back to it. Before, the branch kept its
//! last direction while `is_enabled()` said the other. In a child process with a time bound,
//! since a seccomp filter cannot be removed.

mod common;
#[path = "common/toggle.rs"]
mod toggle;

use std::time::Duration;

use common::{run_child_entry_within, seccomp};
use toggle::{KEY, Workers, branch_taken, settle};

#[test]
#[ignore = "entry point of the child processes the other tests start"]
fn child_entry() {
    if std::env::var_os("ALTPATCH_TEST_SANDBOX").is_none() {
        return;
    }
    let report = altpatch::apply_patches();
    assert!(report.disabled.is_none(), "{report}");
    let workers = Workers::start(2);
    // On this thread, the one that toggles: `mprotect(W|X)` and writable opens refused.
    let [openat, open] = seccomp::writable_opens();
    seccomp::refuse([seccomp::wx_mprotect(), openat, open], libc::EACCES);
    // The sandbox holds: both ways a fresh writer would take are refused.
    assert!(
        std::fs::OpenOptions::new()
            .write(true)
            .open("/proc/self/mem")
            .is_err()
    );
    assert!(seccomp::wx_refused());
    for i in 0..1000 {
        let update = workers.set(i % 2 == 0).expect("toggles in the sandbox");
        assert_eq!((update.sites, update.written), (1, 1), "{update:?}");
        assert_eq!(branch_taken(), KEY.is_enabled());
        if i % 10 == 0 {
            settle();
        }
    }
    let seen = workers.stop_all_right();
    println!("SANDBOXED_TOGGLES=1000 {seen:?}");
}

#[test]
fn keys_toggle_after_a_sandbox_refuses_mprotect_and_opening_proc_self_mem() {
    let out = run_child_entry_within(&[("ALTPATCH_TEST_SANDBOX", "1")], Duration::from_secs(60));
    assert!(out.contains("SANDBOXED_TOGGLES=1000"), "{out}");
}
