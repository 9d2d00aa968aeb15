//! Patching in a child after `fork`: the child (one thread) patches its own copy of the text; the
//! parent's stays as it was.

mod common;

use std::hint::black_box;

use altpatch::{Feature, How, Patcher};
use common::*;

#[test]
fn a_forked_child_patches_its_own_text() {
    let _lock = patch_lock();
    Patcher::new().cpu(cpu_with(&[])).apply();
    // SAFETY: the child only patches, checks and `_exit`s; it does not return into the harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let report = Patcher::new().cpu(cpu_with(&[Feature::Bmi2])).apply();
        let ok = !report.stats.live
            && report
                .site("mix")
                .all(|s| s.how == How::Inline && s.written)
            && mix(black_box(3)) == mix_expected("bmi2", 3);
        // SAFETY: ends the child without running the parent's atexit handlers or test harness.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status:#x}"
    );
    assert_eq!(
        mix(black_box(3)),
        mix_expected("default", 3),
        "the parent's text is untouched"
    );
}
