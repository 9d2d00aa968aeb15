//! Contended throughput and fairness at 1, 2, 4, 8 and 16 threads on this machine, for every lock:
//! each thread takes the lock, bumps a shared counter, releases, for a fixed time. Fairness is
//! max/min acquisitions per thread, printed next to max/min CPU time per thread (the part of the
//! spread the scheduler decided). Writes `benches/contended.svg`.
//!
//! Each line also gives the CPU time the lock's threads got per second of the point ("CPUs"): on
//! a shared machine other load takes a varying share, so throughput per CPU-second is printed
//! next to throughput in the ratio lines.
//!
//! Then two workloads nearer to real use, each for the hybrid lock (pv futex) and the peers: a
//! critical section of about 100 ns with about 1 µs of work outside it (1-16 threads; the work
//! is calibrated at start-up), and a reader-heavy map (a `HashMap` of 4,096 keys behind one lock,
//! 8 threads, 90 % lookups and 10 % updates). After each table, per lock and thread count: the
//! ratio to the better of std's Mutex and parking_lot in this run.
//!
//! `cargo bench --bench locks_contended` (1 s per point: at 8 threads on 2 cores a thread runs
//! only about 20 time slices in 300 ms, and their count alone spreads max/min); `ALTPATCH_BENCH_QUICK=1` or
//! `cargo test --benches` (a short run that only checks it works). `ALTPATCH_BENCH_POINT_MS=n`
//! sets the time per point; `cargo bench --bench locks_contended -- hybrid std parking` measures
//! only the locks whose name contains one of the words (and writes no plot). Built with
//! `RUSTFLAGS="--cfg pvlock_trace"`, it prints where the hybrid lock's time went
//! (`altpatch_sites::pvlock::trace`).

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
                    let r = (n, thread_cpu_time() - cpu);
                    altpatch_sites::pvlock::trace::flush();
                    r
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
    /// CPU time all threads ran, per second of the point: on a shared machine other load takes
    /// a varying share, and throughput per CPU-second is the part of `mops` the lock decided.
    cpus: f64,
}

/// The name filters given on the command line (a lock runs when its name contains any of them).
static FILTER: OnceLock<Vec<String>> = OnceLock::new();

fn measure(name: &str, time: Duration, critical: &(dyn Fn() + Sync)) -> Vec<Point> {
    measure_at(name, &THREADS, time, critical)
}

fn measure_at(
    name: &str,
    thread_counts: &[usize],
    time: Duration,
    critical: &(dyn Fn() + Sync),
) -> Vec<Point> {
    if FILTER
        .get()
        .is_some_and(|f| !f.is_empty() && !f.iter().any(|f| name.contains(f.as_str())))
    {
        return Vec::new();
    }
    thread_counts
        .iter()
        .map(|&threads| {
            let stats0 = altpatch_sites::pvlock::stats();
            let tr0 = altpatch_sites::pvlock::trace::snapshot();
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
                cpus: cpu.iter().map(Duration::as_secs_f64).sum::<f64>() / secs,
            };
            println!(
                "{name:<24} {threads:>2} threads {:>9.3} M/s  max/min {:>8.1}  (cpu time max/min {:>4.1}, {:.2} CPUs)",
                p.mops,
                p.fairness,
                p.cpu_fairness,
                p.cpus
            );
            let st = altpatch_sites::pvlock::stats();
            if name.contains("hybrid") {
                println!(
                    "{:<24} {:>10} parks/s {:>10} wakes/s {:>8} handoffs/s",
                    "",
                    ((st.parks - stats0.parks) as f64 / secs) as u64,
                    ((st.wakes - stats0.wakes) as f64 / secs) as u64,
                    ((st.handoffs - stats0.handoffs) as f64 / secs) as u64,
                );
                let tr = altpatch_sites::pvlock::trace::snapshot();
                if tr == tr0 {
                    return p;
                }
                let line: Vec<String> = (0..tr.len())
                    .map(|i| {
                        format!(
                            "{}={}",
                            altpatch_sites::pvlock::trace::NAMES[i],
                            ((tr[i] - tr0[i]) as f64 / secs) as u64
                        )
                    })
                    .collect();
                println!("    per s: {}", line.join(" "));
            }
            p
        })
        .collect()
}

/// The peers a lock is compared with: the better of them at each thread count is the bar.
const PEERS: [&str; 2] = ["std Mutex", "parking_lot"];

/// Prints, per lock and thread count, throughput as a ratio to the best peer in the same run.
fn print_ratios(title: &str, results: &[(&str, Vec<Point>)]) {
    let best = |threads: usize, of: fn(&Point) -> f64| {
        results
            .iter()
            .filter(|(n, _)| PEERS.iter().any(|p| n.ends_with(p)))
            .flat_map(|(_, points)| points.iter().filter(|p| p.threads == threads))
            .map(of)
            .fold(None, |b: Option<f64>, m| Some(b.map_or(m, |b| b.max(m))))
    };
    let per_cpu = |p: &Point| p.mops / p.cpus.max(1e-3);
    println!(
        "\n{title}: throughput / best of std Mutex and parking_lot at the same thread count \
         [the same per CPU-second of the lock's threads]"
    );
    for (name, points) in results {
        if points.is_empty() {
            continue;
        }
        let cells: Vec<String> = points
            .iter()
            .map(
                |p| match (best(p.threads, |p| p.mops), best(p.threads, per_cpu)) {
                    (Some(b), Some(c)) => format!(
                        "{:>2}: {:.2}x [{:.2}x] (max/min {:.1})",
                        p.threads,
                        p.mops / b,
                        per_cpu(p) / c,
                        p.fairness
                    ),
                    _ => format!("{:>2}: -", p.threads),
                },
            )
            .collect();
        println!("  {name:<34} {}", cells.join("  "));
    }
}

/// `iters` rounds of a multiply-xorshift: CPU work that the compiler cannot remove or shorten.
#[inline(never)]
fn work(iters: u32, seed: u64) -> u64 {
    let mut x = seed;
    for _ in 0..iters {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x ^= x >> 29;
    }
    std::hint::black_box(x)
}

/// Rounds of [`work`] per nanosecond on this machine: the best of 20 timings of 1 ms of work
/// (the best, because other load only ever makes a timing longer).
fn work_per_ns() -> f64 {
    const ROUNDS: u32 = 200_000;
    (0..20)
        .map(|i| {
            let t = Instant::now();
            work(ROUNDS, i);
            ROUNDS as f64 / t.elapsed().as_nanos().max(1) as f64
        })
        .fold(0.0, f64::max)
}

/// A per-thread xorshift generator for the map workload.
fn next_random() -> u64 {
    std::thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new({
            let here = 0u8;
            (&here as *const u8 as u64) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

/// Keys in the map workload's map.
const MAP_KEYS: u64 = 4096;

/// One operation of the map workload on a locked map: nine in ten look a key up, one in ten
/// updates one.
fn map_op(map: &mut std::collections::HashMap<u64, u64>) {
    let r = next_random();
    let key = r % MAP_KEYS;
    if r.is_multiple_of(10) {
        map.insert(key, r);
    } else {
        std::hint::black_box(map.get(&key));
    }
}

fn full_map() -> std::collections::HashMap<u64, u64> {
    (0..MAP_KEYS).map(|k| (k, k)).collect()
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
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
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

    print_ratios("counter (the table above)", &results);

    // Nearer to real use: a critical section of about 100 ns with about 1 us of work outside it.
    let per_ns = work_per_ns();
    let (inside, outside) = ((100.0 * per_ns) as u32, (1000.0 * per_ns) as u32);
    println!(
        "\nworkload \"cs 100 ns + 1 us outside\": {inside} rounds of work inside the lock, {outside} outside ({per_ns:.2} rounds/ns)"
    );
    let mut cs = Vec::new();
    let report = pv::force(PvLock::Futex);
    assert_eq!(pv::chosen(&report), Some(PvLock::Futex), "{report}");
    let hybrid_cs = PvMutex::new(0u64);
    cs.push((
        "cs100: altpatch hybrid pv futex",
        measure("cs100: altpatch hybrid pv futex", time, &|| {
            let x = work(outside, 1);
            let mut g = hybrid_cs.lock();
            *g = work(inside, *g ^ x);
        }),
    ));
    pv::force(PvLock::Native);
    let std_cs = std::sync::Mutex::new(0u64);
    cs.push((
        "cs100: std Mutex",
        measure("cs100: std Mutex", time, &|| {
            let x = work(outside, 1);
            let mut g = std_cs.lock().unwrap();
            *g = work(inside, *g ^ x);
        }),
    ));
    let pl_cs = parking_lot::Mutex::new(0u64);
    cs.push((
        "cs100: parking_lot",
        measure("cs100: parking_lot", time, &|| {
            let x = work(outside, 1);
            let mut g = pl_cs.lock();
            *g = work(inside, *g ^ x);
        }),
    ));
    print_ratios("cs 100 ns + 1 us outside", &cs);

    // A reader-heavy map behind one lock, 8 threads: nine lookups in ten, one update.
    println!(
        "\nworkload \"map\": a HashMap of {MAP_KEYS} keys behind one lock, 8 threads, 90 % lookups, 10 % updates"
    );
    let mut map = Vec::new();
    let report = pv::force(PvLock::Futex);
    assert_eq!(pv::chosen(&report), Some(PvLock::Futex), "{report}");
    let hybrid_map = PvMutex::new(full_map());
    map.push((
        "map: altpatch hybrid pv futex",
        measure_at("map: altpatch hybrid pv futex", &[8], time, &|| {
            map_op(&mut hybrid_map.lock())
        }),
    ));
    pv::force(PvLock::Native);
    let std_map = std::sync::Mutex::new(full_map());
    map.push((
        "map: std Mutex",
        measure_at("map: std Mutex", &[8], time, &|| {
            map_op(&mut std_map.lock().unwrap())
        }),
    ));
    let pl_map = parking_lot::Mutex::new(full_map());
    map.push((
        "map: parking_lot",
        measure_at("map: parking_lot", &[8], time, &|| {
            map_op(&mut pl_map.lock())
        }),
    ));
    print_ratios("map, 8 threads", &map);

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
    if !quick && filter.is_empty() {
        match plot(&results, "benches/contended.svg") {
            Ok(()) => println!("plot: benches/contended.svg"),
            Err(e) => println!("plot failed: {e}"),
        }
    }
}
