//! What patching costs: `Patcher::apply()` over 10,000 sites writing 100, 1,000 or 10,000 of
//! them, single-threaded and with a busy thread; and a static key toggle with 1, 100 and 1,000
//! branch sites while threads run them.
//!
//! `cargo bench --bench patching`; `cargo test --benches` runs it once as a check.

#[path = "ratios.rs"]
mod ratios;

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use altpatch::{Cpu, Patcher, StaticKey};
use criterion::Criterion;

static SINK: AtomicU64 = AtomicU64::new(0);

macro_rules! rep10 {
    ($($t:tt)*) => { $($t)* $($t)* $($t)* $($t)* $($t)* $($t)* $($t)* $($t)* $($t)* $($t)* };
}
macro_rules! rep9 {
    ($($t:tt)*) => { $($t)* $($t)* $($t)* $($t)* $($t)* $($t)* $($t)* $($t)* $($t)* };
}

// Three groups of call sites (100 + 900 + 9,000 = 10,000), each with NOP candidates.
#[altpatch::alternative(inline, off: not(hypervisor) => nop, off_vm: hypervisor => nop)]
fn site_a(x: u64) {
    SINK.fetch_add(x, Ordering::Relaxed);
}
#[altpatch::alternative(inline, off: not(hypervisor) => nop, off_vm: hypervisor => nop)]
fn site_b(x: u64) {
    SINK.fetch_add(x, Ordering::Relaxed);
}
#[altpatch::alternative(inline, off: not(hypervisor) => nop, off_vm: hypervisor => nop)]
fn site_c(x: u64) {
    SINK.fetch_add(x, Ordering::Relaxed);
}

#[inline(never)]
fn run_a(x: u64) {
    rep10! { rep10! { site_a(x); } }
}
#[inline(never)]
fn run_b(x: u64) {
    rep9! { rep10! { rep10! { site_b(x); } } }
}
#[inline(never)]
fn run_c(x: u64) {
    rep9! { rep10! { rep10! { rep10! { site_c(x); } } } }
}

static KEY_1: StaticKey = StaticKey::new(false);
static KEY_100: StaticKey = StaticKey::new(false);
static KEY_1000: StaticKey = StaticKey::new(false);

#[inline(never)]
fn branches(x: u64) {
    if altpatch::static_branch_unlikely!(KEY_1) {
        SINK.fetch_add(x, Ordering::Relaxed);
    }
    rep10! { rep10! { if altpatch::static_branch_unlikely!(KEY_100) {
        SINK.fetch_add(x, Ordering::Relaxed);
    } } }
    rep10! { rep10! { rep10! { if altpatch::static_branch_unlikely!(KEY_1000) {
        SINK.fetch_add(x, Ordering::Relaxed);
    } } } }
}

/// The choice that makes the sites of the groups in `groups` calls to their defaults (`on`) or
/// NOPs; the other groups stay NOPs.
fn choice(groups: &str, on: bool) -> String {
    let cand = if on { "default" } else { "off" };
    let mut all = vec![];
    for g in groups.chars() {
        all.push(format!("site_{g}={cand}"));
    }
    // The others stay NOPs: unchanged, but still verified at each apply.
    for g in "abc".chars().filter(|g| !groups.contains(*g)) {
        all.push(format!("site_{g}=off"));
    }
    all.join(",")
}

fn bench_apply(c: &mut Criterion, cpu: &Cpu, busy: bool) {
    let mut g = c.benchmark_group("patching");
    let tag = if busy { "busy_thread" } else { "single_thread" };
    for (groups, written) in [("", 0), ("a", 100), ("ab", 1000), ("abc", 10000)] {
        // Start from every site a NOP, whatever the previous bench left.
        Patcher::new()
            .cpu(cpu.clone())
            .overrides_str(&choice("", false))
            .apply();
        let mut on = false;
        g.bench_function(format!("apply_10000_sites_writing_{written}_{tag}"), |b| {
            b.iter(|| {
                on = !on;
                let report = Patcher::new()
                    .cpu(cpu.clone())
                    .overrides_str(&choice(groups, on))
                    .apply();
                // Every iteration must write exactly what its name says.
                assert_eq!(report.sites.iter().filter(|s| s.written()).count(), written);
                report
            })
        });
    }
    g.finish();
}

fn bench_keys(c: &mut Criterion) {
    let mut g = c.benchmark_group("patching");
    for (key, n) in [(&KEY_1, 1), (&KEY_100, 100), (&KEY_1000, 1000)] {
        let mut on = false;
        g.bench_function(format!("toggle_key_{n}_sites_threads_running"), |b| {
            b.iter(|| {
                on = !on;
                key.set(on).expect("the key toggles")
            })
        });
    }
    g.finish();
}

/// Minor page faults of this process so far: what a first apply pays for memory touched for the
/// first time (its report, the records, text pages copied on write).
fn minor_faults() -> i64 {
    // SAFETY: an all-zero rusage is a valid value, and getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    usage.ru_minflt
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let cpu = Cpu::detect();
    let faults_before = minor_faults();
    let first = Patcher::new()
        .cpu(cpu.clone())
        .overrides_str(&choice("", false))
        .apply();
    let first_faults = minor_faults() - faults_before;
    assert_eq!(
        first
            .sites
            .iter()
            .filter(|s| s.kind() == Some(altpatch::SiteKind::CallSite))
            .count(),
        10_000,
        "{}",
        first.sites.len()
    );
    println!(
        "first apply: {:.2?} for {} sites ({} written), {first_faults} page faults",
        first.elapsed,
        first.sites.len(),
        first.sites.iter().filter(|s| s.written()).count()
    );

    bench_apply(&mut c, &cpu, false);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let x = black_box(1);
                    run_a(x);
                    run_b(x);
                    run_c(x);
                    branches(x);
                }
            });
        }
        bench_apply(&mut c, &cpu, true);
        bench_keys(&mut c);
        stop.store(true, Ordering::Relaxed);
    });
    c.final_summary();

    for (per, unit, base, rows) in [
        (
            1.0,
            "apply",
            "apply_10000_sites_writing_0_single_thread",
            vec![
                "apply_10000_sites_writing_100_single_thread",
                "apply_10000_sites_writing_1000_single_thread",
                "apply_10000_sites_writing_10000_single_thread",
                "apply_10000_sites_writing_10000_busy_thread",
            ],
        ),
        (
            1.0,
            "toggle",
            "toggle_key_1_sites_threads_running",
            vec![
                "toggle_key_100_sites_threads_running",
                "toggle_key_1000_sites_threads_running",
            ],
        ),
    ] {
        let rows: Vec<(&str, Option<f64>)> = rows.into_iter().map(|r| (r, None)).collect();
        ratios::print_table("patching", per, unit, base, &rows);
    }
    for (id, limit_ms) in [
        ("apply_10000_sites_writing_10000_single_thread", 2.0),
        ("toggle_key_1000_sites_threads_running", 1.0),
    ] {
        if let Some(ns) = ratios::mean_ns("patching", id) {
            let ms = ns / 1e6;
            let verdict = if ms <= limit_ms { "ok" } else { "MISSED" };
            println!(
                "  {id}: {ms:.3} ms (target <= {limit_ms} ms) {verdict}; {:.2} us per site",
                ns / 1e3
                    / if id.contains("toggle") {
                        1000.0
                    } else {
                        10000.0
                    }
            );
        }
    }
}
