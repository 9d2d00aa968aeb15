//! Contended throughput and fairness at 1, 2, 4, 8 and 16 threads on this machine, for every lock:
//! each thread takes the lock, bumps a shared counter, releases, for a fixed time. Fairness is
//! max/min acquisitions per thread, printed next to max/min CPU time per thread (the part of the
//! spread the scheduler decided). Writes `benches/contended.svg`.
//!
//! `cargo bench --bench locks_contended` (1 s per point: at 8 threads on 2 cores a thread runs
//! only about 20 time slices in 300 ms, and their count alone spreads max/min); `ALTPATCH_BENCH_QUICK=1` or
//! `cargo test --benches` (a short run that only checks it works). `ALTPATCH_BENCH_POINT_MS=n`
//! sets the time per point; `cargo bench --bench locks_contended -- hybrid` measures only the
//! locks whose name contains `hybrid` (and writes no plot).

#[path = "plain_ticket.rs"]
mod plain_ticket;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use altpatch_sites::pv::{self, PvLock};
use altpatch_sites::{PvMutex, TicketMutex};
use plain_ticket::PlainTicketMutex;
use plotters::prelude::*;

const THREADS: [usize; 5] = [1, 2, 4, 8, 16];

/// CPU time this thread has run.
fn thread_cpu_time() -> Duration {
    // SAFETY: clock_gettime fills the timespec it is given; an all-zero timespec is valid.
    let ts = unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
        ts
    };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `threads` threads for `time`, each calling `critical` in a loop; returns acquisitions
/// and CPU time per thread.
fn run(threads: usize, time: Duration, critical: &(dyn Fn() + Sync)) -> Vec<(u64, Duration)> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut n = 0u64;
                    let cpu = thread_cpu_time();
                    while !stop.load(Ordering::Relaxed) {
                        critical();
                        n += 1;
                    }
                    (n, thread_cpu_time() - cpu)
                })
            })
            .collect();
        std::thread::sleep(time);
        stop.store(true, Ordering::Relaxed);
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

struct Point {
    threads: usize,
    mops: f64,
    fairness: f64,
    /// max/min CPU time per thread: the part of `fairness` the scheduler decided.
    cpu_fairness: f64,
}

/// The name filter given on the command line, if any.
static FILTER: OnceLock<Option<String>> = OnceLock::new();

fn measure(name: &str, time: Duration, critical: &(dyn Fn() + Sync)) -> Vec<Point> {
    if FILTER
        .get()
        .and_then(Option::as_deref)
        .is_some_and(|f| !name.contains(f))
    {
        return Vec::new();
    }
    THREADS
        .iter()
        .map(|&threads| {
            let start = Instant::now();
            let (counts, cpu): (Vec<u64>, Vec<Duration>) =
                run(threads, time, critical).into_iter().unzip();
            let secs = start.elapsed().as_secs_f64();
            let total: u64 = counts.iter().sum();
            let (max, min) = (*counts.iter().max().unwrap(), *counts.iter().min().unwrap());
            let (cpu_max, cpu_min) = (cpu.iter().max().unwrap(), cpu.iter().min().unwrap());
            let p = Point {
                threads,
                mops: total as f64 / secs / 1e6,
                fairness: max as f64 / min.max(1) as f64,
                cpu_fairness: cpu_max.as_secs_f64() / cpu_min.as_secs_f64().max(1e-9),
            };
            println!(
                "{name:<24} {threads:>2} threads {:>9.3} M/s  max/min {:>8.1}  (cpu time max/min {:>4.1})",
                p.mops, p.fairness, p.cpu_fairness
            );
            p
        })
        .collect()
}

fn plot(results: &[(&str, Vec<Point>)], path: &str) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);
    let max_mops = results
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.mops))
        .fold(0.0, f64::max)
        * 1.1;
    let max_fair = results
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.fairness.min(1000.0)))
        .fold(1.0, f64::max)
        * 1.2;
    let mut tput = ChartBuilder::on(&left)
        .caption("throughput (M acquisitions/s)", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(
            (1u32..16u32).log_scale(),
            (0.001f64..max_mops.max(0.01)).log_scale(),
        )?;
    tput.configure_mesh().x_desc("threads").draw()?;
    let mut fair = ChartBuilder::on(&right)
        .caption(
            "fairness (max/min per thread, lower is fairer)",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d((1u32..16u32).log_scale(), (1.0f64..max_fair).log_scale())?;
    fair.configure_mesh().x_desc("threads").draw()?;
    for (i, (name, points)) in results.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        tput.draw_series(LineSeries::new(
            points.iter().map(|p| (p.threads as u32, p.mops.max(0.001))),
            color.stroke_width(2),
        ))?
        .label(*name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        fair.draw_series(LineSeries::new(
            points
                .iter()
                .map(|p| (p.threads as u32, p.fairness.min(1000.0))),
            color.stroke_width(2),
        ))?;
    }
    tput.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs the binary without it.
    let quick = std::env::var_os("ALTPATCH_BENCH_QUICK").is_some()
        || std::env::args().any(|a| a == "--quick")
        || !std::env::args().any(|a| a == "--bench");
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let filter = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    FILTER.get_or_init(|| filter.clone());
    let point_ms = std::env::var("ALTPATCH_BENCH_POINT_MS")
        .ok()
        .and_then(|ms| ms.parse().ok());
    let time = Duration::from_millis(point_ms.unwrap_or(if quick { 10 } else { 1000 }));
    altpatch::apply_patches();
    println!(
        "{} ms per point on {} CPUs",
        time.as_millis(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let mut results = Vec::new();
    let plain = PlainTicketMutex::new();
    results.push((
        "plain ticket",
        measure("plain ticket", time, &|| plain.increment()),
    ));
    let ours = TicketMutex::new(0u64);
    for (variant, name) in [
        (PvLock::Native, "altpatch ticket native"),
        (PvLock::Futex, "altpatch ticket pv futex"),
    ] {
        let report = pv::force(variant);
        assert_eq!(pv::chosen(&report), Some(variant), "{report}");
        results.push((name, measure(name, time, &|| *ours.lock() += 1)));
    }
    let hybrid = PvMutex::new(0u64);
    for (variant, name) in [
        (PvLock::Native, "altpatch hybrid native"),
        (PvLock::Futex, "altpatch hybrid pv futex"),
    ] {
        let report = pv::force(variant);
        assert_eq!(pv::chosen(&report), Some(variant), "{report}");
        results.push((name, measure(name, time, &|| *hybrid.lock() += 1)));
    }
    pv::force(PvLock::Native);
    let std_mutex = std::sync::Mutex::new(0u64);
    results.push((
        "std Mutex",
        measure("std Mutex", time, &|| *std_mutex.lock().unwrap() += 1),
    ));
    let pl = parking_lot::Mutex::new(0u64);
    results.push((
        "parking_lot",
        measure("parking_lot", time, &|| *pl.lock() += 1),
    ));
    let sp = spin::mutex::TicketMutex::<_>::new(0u64);
    results.push((
        "spin TicketMutex",
        measure("spin TicketMutex", time, &|| *sp.lock() += 1),
    ));

    let at8 = |name: &str| {
        results
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, p)| p.iter().find(|p| p.threads == 8))
    };
    if let (Some(pv8), Some(plain8), Some(std8)) = (
        at8("altpatch ticket pv futex"),
        at8("plain ticket"),
        at8("std Mutex"),
    ) {
        println!(
            "\nat 8 threads: pv futex / plain ticket = {:.1}x (target >= 10), max/min {:.1} (target <= 2); pv futex / std Mutex = {:.2}x (bar: >= 0.5)",
            pv8.mops / plain8.mops,
            pv8.fairness,
            pv8.mops / std8.mops
        );
    }
    if let (Some(h8), Some(plain8), Some(std8)) = (
        at8("altpatch hybrid pv futex"),
        at8("plain ticket"),
        at8("std Mutex"),
    ) {
        println!(
            "at 8 threads: hybrid pv futex / plain ticket = {:.1}x (target >= 10), max/min {:.1} (target <= 2); hybrid pv futex / std Mutex = {:.2}x (bar: >= 0.5)",
            h8.mops / plain8.mops,
            h8.fairness,
            h8.mops / std8.mops
        );
    }
    if !quick && filter.is_none() {
        match plot(&results, "benches/contended.svg") {
            Ok(()) => println!("plot: benches/contended.svg"),
            Err(e) => println!("plot failed: {e}"),
        }
    }
}
