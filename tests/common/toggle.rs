//! A static key toggled while worker threads run its branch, for the tests of live toggling in a
//! hostile process (`#[path]`-included by them). A worker counts a wrong-branch result when the
//! branch it took disagrees with the key's settled state: no `set` ran during the call, and the
//! branch went the other way from `is_enabled()`.
#![allow(dead_code)]

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

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

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Odd while a `set` runs, even when none does.
    seq: AtomicU64,
    calls: AtomicU64,
    checked: AtomicU64,
    wrong: AtomicU64,
}

/// Worker threads running [`branch`] until stopped.
pub struct Workers {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// What the workers saw.
#[derive(Debug)]
pub struct Seen {
    pub calls: u64,
    /// Calls made with the key settled (no `set` running), each checked against it.
    pub checked: u64,
    /// Checked calls whose branch disagreed with the key.
    pub wrong: u64,
}

impl Workers {
    pub fn start(threads: usize) -> Workers {
        let shared = Arc::new(Shared::default());
        let threads = (0..threads)
            .map(|_| {
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || {
                    let (mut n, mut checked, mut wrong) = (0u64, 0u64, 0u64);
                    while !shared.stop.load(Ordering::Relaxed) {
                        let s1 = shared.seq.load(Ordering::Acquire);
                        let got = branch(black_box(n));
                        let flag = KEY.is_enabled();
                        let s2 = shared.seq.load(Ordering::Acquire);
                        assert!(got == n || got == n + 1000, "branch({n}) = {got}");
                        if s1 == s2 && s1.is_multiple_of(2) {
                            checked += 1;
                            if (got == n + 1000) != flag {
                                wrong += 1;
                            }
                        }
                        n += 1;
                    }
                    shared.calls.fetch_add(n, Ordering::Relaxed);
                    shared.checked.fetch_add(checked, Ordering::Relaxed);
                    shared.wrong.fetch_add(wrong, Ordering::Relaxed);
                })
            })
            .collect();
        Workers { shared, threads }
    }

    /// `KEY.set(enabled)`, marked as running for the workers' checks.
    pub fn set(&self, enabled: bool) -> Result<KeyUpdate, KeyError> {
        self.shared.seq.fetch_add(1, Ordering::AcqRel);
        let result = KEY.set(enabled);
        self.shared.seq.fetch_add(1, Ordering::AcqRel);
        result
    }

    /// Stops the workers; asserts they checked calls against a settled key and none was wrong.
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
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        Seen {
            calls: self.shared.calls.load(Ordering::Relaxed),
            checked: self.shared.checked.load(Ordering::Relaxed),
            wrong: self.shared.wrong.load(Ordering::Relaxed),
        }
    }
}

/// Lets the workers make calls with the key settled before the next toggle.
pub fn settle() {
    std::thread::sleep(std::time::Duration::from_micros(200));
}
