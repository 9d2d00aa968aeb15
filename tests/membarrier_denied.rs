//! `membarrier` refused (a seccomp sandbox entered after startup) while threads run: a live
//! toggle cannot serialize the other cores, so it is refused whole and the key keeps its state,
//! whether the process had registered for core-serializing barriers before the sandbox (the
//! batch's first barrier fails after its `int3`s: they are taken back) or not (refused before
//! any byte). Before, the branch kept its last direction while `is_enabled()` said the other.
//! In a child process with a time bound, since a seccomp filter cannot be removed.

mod common;
#[path = "common/toggle.rs"]
mod toggle;

use std::time::Duration;

use altpatch::KeyError;
use common::{run_child_entry_within, seccomp};
use toggle::{KEY, Workers, branch_taken, settle};

fn site_bytes() -> Vec<u8> {
    let report = altpatch::applied_report().unwrap();
    let site = report.site("toggle::KEY").next().unwrap();
    // SAFETY: a site of this program's mapped text.
    unsafe { std::slice::from_raw_parts(site.addr() as *const u8, site.len()) }.to_vec()
}

#[test]
#[ignore = "entry point of the child processes the other tests start"]
fn child_entry() {
    let Ok(when) = std::env::var("ALTPATCH_TEST_MEMBARRIER") else {
        return;
    };
    let report = altpatch::apply_patches();
    assert!(report.disabled.is_none(), "{report}");
    let workers = Workers::start(2);
    if when == "registered" {
        // A live toggle registers the process for core-serializing barriers.
        workers.set(true).expect("toggles before the sandbox");
        workers.set(false).expect("toggles before the sandbox");
    }
    // On this thread, the one that toggles: every `membarrier` call fails.
    seccomp::refuse([(libc::SYS_membarrier, vec![])], libc::EPERM);
    let bytes = site_bytes();
    let mut refused = 0;
    for i in 0..200 {
        let before = KEY.is_enabled();
        match workers.set(i % 2 == 0) {
            Err(KeyError::NotWritten { why, .. }) => {
                assert!(why.contains("membarrier"), "{why}");
                refused += 1;
            }
            Ok(update) if update.written == 0 => {} // already in that state
            other => panic!("a live toggle without membarrier must be refused: {other:?}"),
        }
        assert_eq!(KEY.is_enabled(), before, "the key keeps its state");
        assert_eq!(site_bytes(), bytes, "and its site its bytes");
        assert_eq!(branch_taken(), KEY.is_enabled());
        settle();
    }
    let seen = workers.stop_all_right();
    println!("REFUSED={refused} {seen:?}");
}

#[test]
fn membarrier_denied_before_any_live_toggle_refuses_toggles_whole() {
    let out = run_child_entry_within(
        &[("ALTPATCH_TEST_MEMBARRIER", "unregistered")],
        Duration::from_secs(60),
    );
    assert!(out.contains("REFUSED=100"), "{out}");
}

#[test]
fn membarrier_denied_after_registration_refuses_toggles_whole() {
    let out = run_child_entry_within(
        &[("ALTPATCH_TEST_MEMBARRIER", "registered")],
        Duration::from_secs(60),
    );
    assert!(out.contains("REFUSED=100"), "{out}");
}
