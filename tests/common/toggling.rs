//! The hostile-process scenario (issue 12): a static key toggled while worker threads run its
//! branch, each worker counting the results that disagree with the key's settled state. Used as
//! `#[path = "common/toggling.rs"] mod toggling;` by the tests that need it, so the other test
//! binaries keep their sites as they are.
#![allow(dead_code)]

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use altpatch::StaticKey;

/// The key the scenario toggles, and its branch.
pub static SCENARIO_KEY: StaticKey = StaticKey::new(false);

#[inline(never)]
pub fn scenario_branch() -> bool {
    if altpatch::static_branch_unlikely!(SCENARIO_KEY) {
        black_box(true)
    } else {
        black_box(false)
    }
}

const MOVING: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;

/// The key's state once a `set()` has returned; `MOVING` while one runs.
static SETTLED: AtomicU8 = AtomicU8::new(MOVING);
static WRONG: AtomicU64 = AtomicU64::new(0);

fn settled_now() -> u8 {
    if SCENARIO_KEY.is_enabled() { ON } else { OFF }
}

/// Runs the branch once and counts it wrong when the key was settled the whole time and the
/// branch went the other way. Async-signal-safe (atomics only): signal handlers call it too.
#[inline(always)]
pub fn run_branch_checked() {
    let before = SETTLED.load(SeqCst);
    let took = scenario_branch();
    let after = SETTLED.load(SeqCst);
    if before == after && before != MOVING && took != (before == ON) {
        WRONG.fetch_add(1, SeqCst);
    }
}

/// What a run saw.
#[derive(Debug, Default)]
pub struct Toggled {
    /// Branch results that disagreed with the settled key.
    pub wrong: u64,
    /// Branches run by the workers.
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

/// Toggles [`SCENARIO_KEY`] `toggles` times (or until `limit` passes) while `workers` threads
/// run its branch; each worker runs `setup` first (to block signals, for example). Every toggle
/// waits until each worker has run the branch again, so the workers see every state.
pub fn toggle_while_running(
    workers: usize,
    toggles: u64,
    limit: Duration,
    setup: impl Fn() + Sync,
) -> Toggled {
    let stop = AtomicBool::new(false);
    let calls = AtomicU64::new(0);
    let ready = AtomicU64::new(0);
    let mut out = Toggled::default();
    SETTLED.store(settled_now(), SeqCst);
    std::thread::scope(|s| {
        for _ in 0..workers {
            let (stop, calls, ready, setup) = (&stop, &calls, &ready, &setup);
            s.spawn(move || {
                setup();
                ready.fetch_add(1, SeqCst);
                while !stop.load(SeqCst) {
                    run_branch_checked();
                    calls.fetch_add(1, SeqCst);
                }
            });
        }
        while ready.load(SeqCst) < workers as u64 {
            std::thread::yield_now();
        }
        let start = Instant::now();
        while out.toggles < toggles && start.elapsed() < limit {
            SETTLED.store(MOVING, SeqCst);
            let result = SCENARIO_KEY.set(!SCENARIO_KEY.is_enabled());
            SETTLED.store(settled_now(), SeqCst);
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
            let seen = calls.load(SeqCst);
            while calls.load(SeqCst) < seen + 2 * workers as u64 && start.elapsed() < limit {
                std::thread::yield_now();
            }
        }
        stop.store(true, SeqCst);
    });
    out.calls = calls.load(SeqCst);
    out.wrong = WRONG.load(SeqCst);
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
