//! Whether static keys are patched is what the startup apply decided: `ALTPATCH` changed after
//! `apply_patches()` changes nothing (it was: keys stopped being rewritten while their flag
//! changed, 1.6 M wrong-branch results in one run). Each case runs in a child process, with a
//! time bound: `ALTPATCH` is read once per process.

mod common;
#[path = "common/toggle.rs"]
mod toggle;

use std::time::Duration;

use common::run_child_entry_within;
use toggle::{KEY, Workers, branch_taken, settle};

const TOGGLES: usize = 400;

#[test]
#[ignore = "entry point of the child processes the other tests start"]
fn child_entry() {
    let Ok(then) = std::env::var("ALTPATCH_TEST_SET_AFTER") else {
        return;
    };
    let report = altpatch::apply_patches();
    let patched = report.disabled.is_none();
    // SAFETY: no other thread exists yet to read or write the environment.
    unsafe {
        match then.as_str() {
            "unset" => std::env::remove_var("ALTPATCH"),
            value => std::env::set_var("ALTPATCH", value),
        }
    }
    let workers = Workers::start(2);
    for i in 0..TOGGLES {
        let update = workers.set(i % 2 == 0).expect("toggled");
        assert_eq!(update.sites, 1, "{update:?}");
        if patched {
            assert_eq!(update.unpatched, None, "{update:?}");
            assert_eq!(update.written, 1, "{update:?}");
        } else {
            // Unpatched at startup: the site keeps reading the flag, nothing is written.
            assert_eq!(update.written, 0, "{update:?}");
            assert_eq!(update.unpatched, report.disabled, "{update:?}");
        }
        assert_eq!(branch_taken(), KEY.is_enabled());
        settle();
    }
    let seen = workers.stop_all_right();
    println!("PATCHED={patched} {seen:?}");
}

#[test]
fn altpatch_off_after_startup_changes_nothing() {
    let out = run_child_entry_within(
        &[("ALTPATCH", ""), ("ALTPATCH_TEST_SET_AFTER", "off")],
        Duration::from_secs(60),
    );
    assert!(out.contains("PATCHED=true"), "{out}");
}

#[test]
fn altpatch_unset_after_an_off_startup_changes_nothing() {
    let out = run_child_entry_within(
        &[("ALTPATCH", "off"), ("ALTPATCH_TEST_SET_AFTER", "unset")],
        Duration::from_secs(60),
    );
    assert!(out.contains("PATCHED=false"), "{out}");
}
