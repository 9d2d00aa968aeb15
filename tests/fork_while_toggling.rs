//! `fork()` while another thread toggles a key: every child can toggle (before, 3 of 4 children
//! hung in their first `set`, the patcher lock held at fork by a thread the child does not
//! have). The fork waits for a toggle in progress (a `pthread_atfork` handler takes the patcher
//! lock), so each child starts with whole text and a free lock. Runs in a child process with a
//! time bound; each forked child has its own bound too.

mod common;
#[path = "common/toggle.rs"]
mod toggle;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::run_child_entry_within;
use toggle::{KEY, Workers, branch_taken};

const FORKS: usize = 20;

/// In the forked child: toggle alone (direct writes), then with a worker (the live protocol).
fn in_child() -> Result<(), String> {
    if branch_taken() != KEY.is_enabled() {
        return Err("the branch disagrees with the key at fork".into());
    }
    for i in 0..50 {
        let update = KEY.set(i % 2 == 0).map_err(|e| e.to_string())?;
        if update.written > update.sites {
            return Err(format!("{update:?}"));
        }
        if branch_taken() != KEY.is_enabled() {
            return Err("the branch disagrees with the key after a direct toggle".into());
        }
    }
    let workers = Workers::start(1);
    for i in 0..50 {
        workers.set(i % 2 == 1).map_err(|e| e.to_string())?;
        if branch_taken() != KEY.is_enabled() {
            return Err("the branch disagrees with the key after a live toggle".into());
        }
    }
    let seen = workers.stop();
    if seen.wrong != 0 {
        return Err(format!("{seen:?}"));
    }
    Ok(())
}

/// Waits for `pid` at most `limit`; `Some(exit status)`, or `None` (then killed) if it hangs.
fn wait_within(pid: libc::pid_t, limit: Duration) -> Option<i32> {
    let end = Instant::now() + limit;
    loop {
        let mut status = 0;
        // SAFETY: polls our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Some(status);
        }
        if Instant::now() > end {
            // SAFETY: kills and reaps our own hung child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
#[ignore = "entry point of the child processes the other tests start"]
fn child_entry() {
    if std::env::var_os("ALTPATCH_TEST_FORK").is_none() {
        return;
    }
    altpatch::apply_patches();
    let workers = Workers::start(2);
    let stop = AtomicBool::new(false);
    let toggles = AtomicU64::new(0);
    let (mut ok, mut failed, mut hung) = (0, 0, 0);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut on = false;
            while !stop.load(Ordering::Relaxed) {
                on = !on;
                workers.set(on).expect("the parent toggles");
                toggles.fetch_add(1, Ordering::Relaxed);
            }
        });
        while toggles.load(Ordering::Relaxed) < 10 {
            std::thread::yield_now();
        }
        for _ in 0..FORKS {
            let before = toggles.load(Ordering::Relaxed);
            // SAFETY: the child only toggles and runs the key, then `_exit`s.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                let result = in_child();
                if let Err(why) = &result {
                    eprintln!("forked child: {why}");
                }
                // SAFETY: ends the child without running the parent's harness or destructors.
                unsafe { libc::_exit(if result.is_ok() { 0 } else { 1 }) };
            }
            match wait_within(pid, Duration::from_secs(10)) {
                Some(status) if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 => {
                    ok += 1
                }
                Some(_) => failed += 1,
                None => hung += 1,
            }
            // The parent kept toggling between forks.
            while toggles.load(Ordering::Relaxed) < before + 2 {
                std::thread::yield_now();
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    let seen = workers.stop_all_right();
    assert_eq!((ok, failed, hung), (FORKS, 0, 0));
    println!(
        "FORKS_OK={ok} toggles={} {seen:?}",
        toggles.load(Ordering::Relaxed)
    );
}

#[test]
fn children_forked_while_a_thread_toggles_can_toggle() {
    let out = run_child_entry_within(&[("ALTPATCH_TEST_FORK", "1")], Duration::from_secs(120));
    assert!(out.contains(&format!("FORKS_OK={FORKS}")), "{out}");
}
