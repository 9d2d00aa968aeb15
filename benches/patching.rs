//! What patching costs: `Patcher::apply()` over 10,000 sites writing 100, 1,000 or 10,000 of
//! them, single-threaded and with a busy thread; a static key toggle with 1, 100 and 1,000
//! branch sites while threads run them; the first apply of a cold process, small programs with 1
//! and 100 sites (`examples/hello_altpatch.rs`, `examples/startup_sites.rs`, which report their
//! own load-time apply); and a hello world's CPU time with altpatch against one without
//! (`examples/hello_plain.rs`).
//!
//! `cargo build --release --examples && cargo bench --bench patching`; `cargo test --benches`
//! runs it once as a check.

#[path = "ratios.rs"]
mod ratios;

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

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

/// CPU time (user + system) of this process's waited-for children so far.
fn children_cpu() -> Duration {
    // SAFETY: an all-zero rusage is a valid value, and getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// The examples beside this bench's profile directory, if built (`cargo test` builds them;
/// `cargo bench` needs `cargo build --release --examples` first).
fn example(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.parent()?.join("examples").join(name);
    path.exists().then_some(path)
}

/// Runs `program` to completion and returns its stdout and its CPU time.
fn run_child(program: &Path, env: &[(&str, &str)]) -> (String, Duration) {
    let before = children_cpu();
    let out = Command::new(program)
        .envs(env.iter().copied())
        .env_remove("ALTPATCH")
        .env_remove("ALTPATCH_LOG")
        .output()
        .expect("run the example");
    assert!(out.status.success(), "{out:?}");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        children_cpu() - before,
    )
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The first apply of a cold process (detection + apply, as its load-time initializer ran them),
/// reported by the process itself: median and range over `runs` processes.
fn cold_first_apply(runs: usize) {
    for (name, target_us) in [("hello_altpatch", 65.0), ("startup_sites", 65.0)] {
        let Some(program) = example(name) else {
            println!(
                "first apply, cold process: examples/{name} not built (cargo build --release --examples)"
            );
            continue;
        };
        let mut micros = Vec::with_capacity(runs);
        let mut sites = String::new();
        for _ in 0..runs {
            let (out, _) = run_child(&program, &[("STARTUP_REPORT", "1")]);
            let line = out
                .lines()
                .find(|l| l.starts_with("apply_ns="))
                .expect("report line");
            let mut fields = line.split(' ');
            let ns: f64 = fields.next().unwrap()["apply_ns=".len()..].parse().unwrap();
            micros.push(ns / 1e3);
            sites = fields.collect::<Vec<_>>().join(" ");
        }
        let (min, max) = (
            micros.iter().copied().fold(f64::MAX, f64::min),
            micros.iter().copied().fold(0.0, f64::max),
        );
        let med = median(&mut micros);
        let verdict = if med <= target_us { "ok" } else { "MISSED" };
        println!(
            "first apply, cold process, {name} ({sites}): median {med:.1} us, {min:.1}-{max:.1} over {runs} runs (target <= {target_us} us) {verdict}"
        );
    }
}

/// A hello world's whole-process CPU time with altpatch (one site, applied at load) over one
/// without altpatch linked: median of `pairs` paired runs, the order alternating within pairs.
fn hello_cpu_ratio(pairs: usize) {
    let (Some(with), Some(without)) = (example("hello_altpatch"), example("hello_plain")) else {
        println!("hello-world CPU time: examples not built (cargo build --release --examples)");
        return;
    };
    let (mut ratios, mut with_us, mut without_us) = (vec![], vec![], vec![]);
    for i in 0..pairs {
        let (a, b) = if i % 2 == 0 {
            let a = run_child(&with, &[]).1;
            (a, run_child(&without, &[]).1)
        } else {
            let b = run_child(&without, &[]).1;
            (run_child(&with, &[]).1, b)
        };
        with_us.push(a.as_secs_f64() * 1e6);
        without_us.push(b.as_secs_f64() * 1e6);
        ratios.push(a.as_secs_f64() / b.as_secs_f64().max(1e-9));
    }
    let ratio = median(&mut ratios);
    let verdict = if ratio <= 1.05 { "ok" } else { "MISSED" };
    println!(
        "hello-world CPU time: with altpatch {:.0} us, without {:.0} us (medians); median ratio {ratio:.3} over {pairs} pairs (target <= 1.05) {verdict}",
        median(&mut with_us),
        median(&mut without_us),
    );
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    // Under `cargo test --benches` (no `--bench` argument) criterion runs each bench once; the
    // process rows likewise run only a few times.
    let check_only = !std::env::args().any(|a| a == "--bench");
    cold_first_apply(if check_only { 3 } else { 101 });
    hello_cpu_ratio(if check_only { 3 } else { 201 });
    // This process applied its 11,101 sites at load, cold: that is its first apply.
    if let Some(at_load) = altpatch::applied_report() {
        println!(
            "first apply (at load) of this binary: {:.2?} for {} sites ({} written)",
            at_load.elapsed,
            at_load.sites.len(),
            at_load.sites.iter().filter(|s| s.written()).count()
        );
    }
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
        "first Patcher::apply in main: {:.2?} for {} sites ({} written), {first_faults} page faults",
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
