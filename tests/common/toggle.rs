//! A static key toggled while worker threads run its branch, for the tests of live toggling in a
//! hostile process (issue 12; `#[path]`-included by them, so the other test binaries keep their
//! sites as they are). A call counts as wrong when the branch it took disagrees with the key's
//! settled state: no `set` made through here ran during the call, and the branch went the other
//! way from `is_enabled()`.
#![allow(dead_code)]

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use altpatch::{KeyError, KeyUpdate, StaticKey};

pub static KEY: StaticKey = StaticKey::new(false);

/// The branch the workers run: `x + 1000` when `KEY` is enabled, else `x`.
#[inline(never)]
pub fn branch(x: u64) -> u64 {
    if altpatch::static_branch_unlikely!(KEY) {
        x + 1000
    } else {
        x
    }
}

/// Whether `branch` goes the enabled way now.
pub fn branch_taken() -> bool {
    branch(black_box(1)) == 1001
}

/// Odd while a [`set`] runs, even when none does.
static SEQ: AtomicU64 = AtomicU64::new(0);
static CALLS: AtomicU64 = AtomicU64::new(0);
static CHECKED: AtomicU64 = AtomicU64::new(0);
static WRONG: AtomicU64 = AtomicU64::new(0);

/// `KEY.set(enabled)`, marked as running for the calls' checks.
pub fn set(enabled: bool) -> Result<KeyUpdate, KeyError> {
    SEQ.fetch_add(1, SeqCst);
    let result = KEY.set(enabled);
    SEQ.fetch_add(1, SeqCst);
    result
}

/// Runs the branch once and checks it against the key when no [`set`] ran meanwhile.
/// Async-signal-safe (atomics only): signal handlers call it too.
#[inline(always)]
pub fn run_branch_checked() {
    let before = SEQ.load(SeqCst);
    let taken = branch_taken();
    let enabled = KEY.is_enabled();
    if SEQ.load(SeqCst) == before && before.is_multiple_of(2) {
        CHECKED.fetch_add(1, SeqCst);
        if taken != enabled {
            WRONG.fetch_add(1, SeqCst);
        }
    }
    CALLS.fetch_add(1, SeqCst);
}

/// A worker's loop: checked calls until `stop`.
fn work(stop: &AtomicBool) {
    while !stop.load(SeqCst) {
        run_branch_checked();
    }
}

/// What the calls of a scenario saw.
#[derive(Debug)]
pub struct Seen {
    pub calls: u64,
    /// Calls made with the key settled (no `set` running), each checked against it.
    pub checked: u64,
    /// Checked calls whose branch disagreed with the key.
    pub wrong: u64,
}

/// Starts a scenario: no `set` runs and nothing is counted yet (in a forked child too, whose
/// parent may have been inside `set`).
fn fresh() {
    for counter in [&SEQ, &CALLS, &CHECKED, &WRONG] {
        counter.store(0, SeqCst);
    }
}

fn seen() -> Seen {
    Seen {
        calls: CALLS.load(SeqCst),
        checked: CHECKED.load(SeqCst),
        wrong: WRONG.load(SeqCst),
    }
}

/// Worker threads running [`branch`] until stopped.
pub struct Workers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    pub fn start(threads: usize) -> Workers {
        fresh();
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || work(&stop))
            })
            .collect();
        Workers { stop, threads }
    }

    /// [`set`], while these workers run.
    pub fn set(&self, enabled: bool) -> Result<KeyUpdate, KeyError> {
        set(enabled)
    }

    /// Stops the workers; asserts calls were checked against a settled key and none was wrong.
    pub fn stop_all_right(self) -> Seen {
        let seen = self.stop();
        assert!(
            seen.checked > 0,
            "no call made with the key settled: {seen:?}"
        );
        assert_eq!(
            seen.wrong, 0,
            "branches disagreed with the settled key: {seen:?}"
        );
        seen
    }

    pub fn stop(self) -> Seen {
        self.stop.store(true, SeqCst);
        for t in self.threads {
            t.join().unwrap();
        }
        seen()
    }
}

/// Lets the workers make calls with the key settled before the next toggle.
pub fn settle() {
    std::thread::sleep(Duration::from_micros(200));
}

/// What a [`toggle_while_running`] run saw.
#[derive(Debug, Default)]
pub struct Toggled {
    /// Checked calls that disagreed with the settled key.
    pub wrong: u64,
    /// Branches run (by the workers, and by any signal handler that runs them).
    pub calls: u64,
    /// `set()` calls made.
    pub toggles: u64,
    /// Sites rewritten over all toggles.
    pub written: usize,
    /// Each distinct reason a toggle gave for leaving sites unwritten (its `KeyError`, or the
    /// `KeyUpdate`'s reason the sites read the flag).
    pub refusals: Vec<String>,
}

impl Toggled {
    /// One line for the parent test to read.
    pub fn summary(&self) -> String {
        format!(
            "SCENARIO wrong={} calls={} toggles={} written={} refusals={:?}",
            self.wrong, self.calls, self.toggles, self.written, self.refusals
        )
    }
}

/// Toggles [`KEY`] `toggles` times (or until `limit` passes) while `workers` threads run its
/// branch; each worker runs `setup` first (to block signals, for example). Every toggle waits
/// until each worker has run the branch again, so the workers see every state.
pub fn toggle_while_running(
    workers: usize,
    toggles: u64,
    limit: Duration,
    setup: impl Fn() + Sync,
) -> Toggled {
    let stop = AtomicBool::new(false);
    let ready = AtomicU64::new(0);
    let mut out = Toggled::default();
    fresh();
    std::thread::scope(|s| {
        for _ in 0..workers {
            let (stop, ready, setup) = (&stop, &ready, &setup);
            s.spawn(move || {
                setup();
                ready.fetch_add(1, SeqCst);
                work(stop);
            });
        }
        while ready.load(SeqCst) < workers as u64 {
            std::thread::yield_now();
        }
        let start = Instant::now();
        while out.toggles < toggles && start.elapsed() < limit {
            let result = set(!KEY.is_enabled());
            out.toggles += 1;
            let refusal = match result {
                Ok(update) => {
                    out.written += update.written;
                    update.unpatched
                }
                Err(e) => Some(e.to_string()),
            };
            if let Some(why) = refusal
                && !out.refusals.contains(&why)
            {
                out.refusals.push(why);
            }
            // Let every worker run the branch in the new state.
            let calls = CALLS.load(SeqCst);
            while CALLS.load(SeqCst) < calls + 2 * workers as u64 && start.elapsed() < limit {
                std::thread::yield_now();
            }
        }
        stop.store(true, SeqCst);
    });
    let seen = seen();
    out.calls = seen.calls;
    out.wrong = seen.wrong;
    out
}

/// Reads the numbers back out of a child's output ([`Toggled::summary`]).
pub fn parse_summary(stdout: &str) -> Option<(u64, u64, u64, usize)> {
    // The harness may have printed `test child_entry ... ` on the same line.
    let line = stdout
        .lines()
        .find_map(|l| Some(&l[l.find("SCENARIO ")?..]))?;
    let field = |name: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    Some((
        field("wrong")?,
        field("calls")?,
        field("toggles")?,
        field("written")? as usize,
    ))
}
