//! Shared by the root and the sites tests (`#[path]`): running a check in a one-thread child.

use std::io::Write;

/// Runs `check` in a forked child, which has one thread: there patches are written directly, as
/// at a program's start, rather than with the live protocol the harness's threads call for. The
/// child's text is its own copy; the parent's stays as it was. Panics if `check` panicked.
pub fn in_forked_child(check: impl FnOnce()) {
    // iced-x86 builds its decoder tables once per process under a lock, on the first decode
    // (the planner reaches it only for uncommon shapes, so possibly first in the child): built
    // here first, so the fork cannot copy that lock held by another test's thread.
    let _ = iced_x86::Decoder::new(64, &[0x90], iced_x86::DecoderOptions::NONE).decode();
    // SAFETY: the child runs `check`, then `_exit`s; it never returns into the harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(check));
        if let Err(payload) = &result {
            // The harness captures `eprintln!` and panic messages in the parent's buffer, which
            // the child never hands back: write to the stream itself.
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("(not a string)");
            let _ = writeln!(std::io::stderr(), "forked child panicked: {message}");
        }
        // SAFETY: ends the child without running the parent's atexit handlers or test harness.
        unsafe { libc::_exit(if result.is_ok() { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the forked child failed (status {status:#x}; its panic is on stderr)"
    );
}
