//! Patching while other threads execute the same sites: no crash, no wrong result. The short run
//! is part of the normal suite; `ALTPATCH_STRESS_ROUNDS=N` runs N re-selections instead.

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use altpatch::{Feature, Patcher};
use common::*;

#[test]
fn reselecting_while_threads_run_the_sites() {
    let _lock = patch_lock();
    let rounds: usize = std::env::var("ALTPATCH_STRESS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let cpus = [
        cpu_with(&[Feature::Avx2]),
        cpu_with(&[Feature::Bmi2]),
        cpu_with(&[]),
    ];
    let stop = AtomicBool::new(false);
    let calls = AtomicU64::new(0);
    let traps_before = altpatch::__private::traps_handled();

    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (stop, calls) = (&stop, &calls);
            s.spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let x = black_box(n * 2 + t);
                    let got = mix(x);
                    let valid = ["default", "avx2", "bmi2"]
                        .iter()
                        .any(|c| mix_expected(c, x) == got);
                    assert!(valid, "mix({x}) = {got}: no candidate returns that");
                    hook(black_box(0));
                    n += 1;
                }
                calls.fetch_add(n, Ordering::Relaxed);
            });
        }
        for round in 0..rounds {
            let report = Patcher::new().cpu(cpus[round % cpus.len()].clone()).apply();
            assert!(
                report
                    .sites
                    .iter()
                    .filter(|s| s.name().ends_with("::mix"))
                    .all(|s| s.written()),
                "{report}"
            );
            assert!(report.stats.live, "other threads are running");
            assert_eq!(
                report.stats.serializations, 3,
                "one batch, three serializations"
            );
        }
        stop.store(true, Ordering::Relaxed);
    });
    let traps = altpatch::__private::traps_handled() - traps_before;
    eprintln!(
        "{rounds} re-selections, {} calls by the workers, {traps} traps handled",
        calls.load(Ordering::Relaxed)
    );
    assert!(
        calls.load(Ordering::Relaxed) > rounds as u64,
        "the workers ran during the patching"
    );
}
