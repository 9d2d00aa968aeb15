//! A thread that runs a site while its first byte is the live protocol's `int3` is moved to the
//! new candidate by the SIGTRAP handler, and gets that candidate's result. Deterministic: the
//! writer pauses after step 1 until a worker has called the site.

mod common;

use std::hint::black_box;
use std::ops::Range;
use std::sync::mpsc;
use std::time::Duration;

use altpatch::writers::MprotectWriter;
use altpatch::{Feature, Patcher, TextWriter};
use common::*;

/// Writes like `MprotectWriter`, but after the first `int3` lets the worker run `mix` and waits
/// for its result.
struct PauseAtInt3 {
    inner: MprotectWriter,
    go: mpsc::Sender<()>,
    done: mpsc::Receiver<u64>,
    seen: Option<u64>,
}

impl TextWriter for PauseAtInt3 {
    fn name(&self) -> &'static str {
        "pause-at-int3"
    }
    fn prepare(&mut self, pages: Range<usize>) -> Result<(), String> {
        self.inner.prepare(pages)
    }
    fn write(&mut self, addr: usize, bytes: &[u8]) -> Result<(), String> {
        self.inner.write(addr, bytes)?;
        if bytes == [0xcc] && self.seen.is_none() {
            self.go.send(()).unwrap();
            self.seen = Some(
                self.done
                    .recv_timeout(Duration::from_secs(10))
                    .expect("the worker ran the site"),
            );
        }
        Ok(())
    }
    fn finish(&mut self) -> Result<(), String> {
        self.inner.finish()
    }
}

#[inline(never)]
fn call_mix(x: u64) -> u64 {
    mix(x)
}

#[test]
fn a_thread_on_an_int3_runs_the_new_candidate() {
    let _lock = patch_lock();
    Patcher::new().cpu(cpu_with(&[])).apply();
    assert_eq!(call_mix(black_box(5)), mix_expected("default", 5));
    let traps_before = altpatch::__private::traps_handled();

    let (go_tx, go_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        go_rx.recv().unwrap();
        // The site's first byte is `int3` now: this call traps.
        done_tx.send(call_mix(black_box(5))).unwrap();
    });
    let writer = PauseAtInt3 {
        inner: MprotectWriter::default(),
        go: go_tx,
        done: done_rx,
        seen: None,
    };
    let report = Patcher::new()
        .cpu(cpu_with(&[Feature::Avx2]))
        .writer(Box::new(writer))
        .apply();
    worker.join().unwrap();

    assert!(report.stats.live, "{report}");
    assert!(
        altpatch::__private::traps_handled() > traps_before,
        "the worker trapped"
    );
    assert_eq!(call_mix(black_box(5)), mix_expected("avx2", 5));
}
