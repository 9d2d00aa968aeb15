//! Several threads call sites of every kind in a loop, checking each result is one of the valid
//! variants, while another thread re-selects sites and toggles a static key. A short run here;
//! `ALTPATCH_STRESS_ROUNDS=N` runs N rounds (each a re-selection and a toggle).

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use altpatch::{Feature, Patcher, StaticKey};
use common::*;

fn sum_fast(xs: &[u64]) -> u64 {
    xs.iter().sum::<u64>() + 1
}

/// Trampoline: sum, +1 with avx2.
#[altpatch::alternative(avx2 => sum_fast)]
fn sum(xs: &[u64]) -> u64 {
    xs.iter().sum()
}

/// Inline sequence: 4x, or 4x + 1 with bmi2.
#[inline(always)]
fn times4(x: u64) -> u64 {
    let r: u64;
    // SAFETY: both candidates compute from `x` into `r` only.
    unsafe {
        altpatch::alternative_asm!(
            name = "times4",
            "lea {r}, [{x}*4]",
            bmi2 => "lea {r}, [{x}*4 + 1]",
            x = in(reg) x,
            r = lateout(reg) r,
            options(pure, nomem, nostack),
        );
    }
    r
}

static FLAG: StaticKey = StaticKey::new(false);

#[test]
fn every_kind_of_site_stays_right_under_reselection_and_toggling() {
    let _lock = patch_lock();
    let rounds: usize = std::env::var("ALTPATCH_STRESS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let cpus = [
        cpu_with(&[Feature::Avx2, Feature::Bmi2]),
        cpu_with(&[Feature::Bmi2]),
        cpu_with(&[]),
    ];
    let stop = AtomicBool::new(false);
    let calls = AtomicU64::new(0);
    let xs = [1u64, 2, 3, 4];
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let (stop, calls, xs) = (&stop, &calls, &xs);
            s.spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let x = black_box(n + t);
                    let m = mix(x);
                    assert!(
                        ["default", "avx2", "bmi2"]
                            .iter()
                            .any(|c| mix_expected(c, x) == m),
                        "mix({x}) = {m}"
                    );
                    let s = sum(black_box(xs));
                    assert!(s == 10 || s == 11, "sum = {s}");
                    let q = times4(x);
                    assert!(q == x * 4 || q == x * 4 + 1, "times4({x}) = {q}");
                    let b = if altpatch::static_branch_unlikely!(FLAG) {
                        1
                    } else {
                        0
                    };
                    assert!(b <= 1);
                    hook(0);
                    n += 1;
                }
                calls.fetch_add(n, Ordering::Relaxed);
            });
        }
        for round in 0..rounds {
            let report = Patcher::new().cpu(cpus[round % cpus.len()].clone()).apply();
            assert!(
                report.sites.iter().all(|s| !s.why().starts_with("refused")),
                "{report}"
            );
            FLAG.set(round % 2 == 0).expect("the key toggles");
        }
        FLAG.disable().expect("the key toggles");
        stop.store(true, Ordering::Relaxed);
    });
    eprintln!(
        "{rounds} rounds; {} calls checked",
        calls.load(Ordering::Relaxed)
    );
    assert!(calls.load(Ordering::Relaxed) > rounds as u64);
}
