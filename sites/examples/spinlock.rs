//! The paravirt locks: which `pv_lock` variant this machine selects and why, then a short
//! contended workload under each variant (forced through the API) for the ticket spinlock
//! (`TicketMutex`) and the hybrid lock (`PvMutex`), side by side with `std::sync::Mutex`:
//! throughput, and fairness between the threads.
//!
//! ```text
//! cargo run --release -p altpatch-sites --example spinlock
//! ALTPATCH=pv_lock=native cargo run --release -p altpatch-sites --example spinlock
//! ```
//!
//! Numbers are printed, never asserted; the example asserts only that no update was lost.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use altpatch_sites::pv::{self, PvLock};
use altpatch_sites::{PvMutex, TicketMutex, pvlock};

const RUN: Duration = Duration::from_millis(300);
/// Work inside the lock and between acquisitions, in `black_box` steps (about 1 ns each).
const INSIDE: u32 = 50;
const OUTSIDE: u32 = 200;

/// What a run measured: lock/unlock pairs per thread, and the slow-path counters.
struct Run {
    per_thread: Vec<u64>,
    elapsed: Duration,
    /// CPU time the whole process used (user + system), noise threads included.
    cpu: Duration,
    /// Waiters put to sleep and wake-ups by unlockers, where the lock counts them.
    sleeps_wakes: Option<(u64, u64)>,
}

/// The ticket lock's slow-path counters: futex waits, kicks.
fn ticket_counters() -> Option<(u64, u64)> {
    let s = pv::stats();
    Some((s.waits, s.kicks))
}

/// The hybrid lock's: parks, wakes.
fn hybrid_counters() -> Option<(u64, u64)> {
    let s = pvlock::stats();
    Some((s.parks, s.wakes))
}

impl Run {
    fn total(&self) -> u64 {
        self.per_thread.iter().sum()
    }

    /// Jain's fairness index: 1 when every thread got the same share, 1/n when one got all.
    fn jain(&self) -> f64 {
        let xs: Vec<f64> = self.per_thread.iter().map(|&x| x as f64).collect();
        let sum: f64 = xs.iter().sum();
        let squares: f64 = xs.iter().map(|x| x * x).sum();
        if squares == 0.0 {
            return 0.0;
        }
        sum * sum / (xs.len() as f64 * squares)
    }

    fn print(&self, name: &str, threads: usize) {
        let total = self.total().max(1) as f64;
        let (min, max) = (
            self.per_thread.iter().min().unwrap(),
            self.per_thread.iter().max().unwrap(),
        );
        let per_op = |n: u64| format!("{:.3}", n as f64 / total);
        let (sleeps, wakes) = self
            .sleeps_wakes
            .map_or(("-".into(), "-".into()), |(s, w)| (per_op(s), per_op(w)));
        println!(
            "{name:<17} {threads:>7}  {:>9.0}  {:>7} .. {:<7}  {:>5.2}  {:>6.0}%  {sleeps:>8}  {wakes:>8}",
            total / self.elapsed.as_secs_f64() / 1000.0,
            min,
            max,
            self.jain(),
            100.0 * self.cpu.as_secs_f64() / self.elapsed.as_secs_f64(),
        );
    }
}

/// `threads` threads take the lock for `RUN`: increment a plain counter and do `INSIDE` steps,
/// release, do `OUTSIDE` steps, again.
fn run_with<L: Sync>(
    threads: usize,
    lock: &L,
    with_lock: impl Fn(&L, &mut dyn FnMut(&mut u64)) + Sync,
    counters: fn() -> Option<(u64, u64)>,
) -> Run {
    let stop = AtomicBool::new(false);
    let counts: Vec<AtomicU64> = (0..threads).map(|_| AtomicU64::new(0)).collect();
    let before = counters();
    let cpu_before = cpu_time();
    let start = Instant::now();
    std::thread::scope(|s| {
        for count in &counts {
            let (stop, with_lock) = (&stop, &with_lock);
            s.spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    with_lock(lock, &mut |c| {
                        *c += 1;
                        for i in 0..INSIDE {
                            black_box(i);
                        }
                    });
                    for i in 0..OUTSIDE {
                        black_box(i);
                    }
                    n += 1;
                }
                count.store(n, Ordering::Relaxed);
            });
        }
        std::thread::sleep(RUN);
        stop.store(true, Ordering::Relaxed);
    });
    let elapsed = start.elapsed();
    let cpu = cpu_time() - cpu_before;
    let sleeps_wakes = before
        .zip(counters())
        .map(|((s0, w0), (s1, w1))| (s1 - s0, w1 - w0));
    Run {
        per_thread: counts.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
        elapsed,
        cpu,
        sleeps_wakes,
    }
}

fn ticket_run(threads: usize) -> Run {
    let lock = TicketMutex::new(0u64);
    let run = run_with(threads, &lock, |l, f| f(&mut l.lock()), ticket_counters);
    assert_eq!(*lock.lock(), run.total(), "lost updates");
    run
}

fn hybrid_run(threads: usize) -> Run {
    let lock = PvMutex::new(0u64);
    let run = run_with(threads, &lock, |l, f| f(&mut l.lock()), hybrid_counters);
    assert_eq!(*lock.lock(), run.total(), "lost updates");
    run
}

fn std_run(threads: usize) -> Run {
    let lock = std::sync::Mutex::new(0u64);
    let run = run_with(threads, &lock, |l, f| f(&mut l.lock().unwrap()), || None);
    assert_eq!(*lock.lock().unwrap(), run.total(), "lost updates");
    run
}

fn main() {
    let report = altpatch::apply_patches();
    // The sites exist in this program once the lock is used; the first apply saw them.
    let selected = pv::chosen(report);
    let site = report
        .site(pv::SITE)
        .next()
        .expect("this program uses the lock, so it has pv_lock sites");
    println!(
        "pv_lock selected: {} ({})",
        selected.map_or("mixed", PvLock::name),
        site.why()
    );
    match report.cpu.hypervisor() {
        None => println!("  no hypervisor: bare metal, nothing preempts a lock holder but the OS"),
        Some(hv) => {
            println!(
                "  hypervisor: {} (signature \"{}\" at {:#x})",
                hv.kind,
                hv.signature_str(),
                hv.base_leaf
            );
            if let Some(kvm) = hv.kvm {
                println!(
                    "  KVM features {:#x}: PV_UNHALT {}, STEAL_TIME {}; hints {:#x}: \
                     KVM_HINTS_REALTIME {}",
                    kvm.raw_features,
                    yes(kvm.pv_unhalt),
                    yes(kvm.steal_time),
                    kvm.raw_hints,
                    yes(kvm.hints_realtime)
                );
            }
        }
    }
    for s in report.site(pv::SITE) {
        println!(
            "  {}:{} at {:#x}: {} ({})",
            s.file(),
            s.line(),
            s.addr(),
            s.chosen(),
            s.how()
        );
    }
    println!(
        "  spin threshold: {} pauses, then lock_spinning",
        altpatch_sites::SPIN_THRESHOLD
    );

    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!();
    println!(
        "Contended workload: each thread locks, increments, works ~{INSIDE} ns, unlocks, works \
         ~{OUTSIDE} ns; {RUN:?} per run, {cores} cores. Fairness: each thread's pairs (min .. \
         max) and Jain's index (1.00 = equal shares); cpu: the process's CPU time over the run; \
         sleeps and wakes per pair: futex waits and kicks (ticket), parks and wakes (hybrid)."
    );
    let scenarios = [
        (cores, 0, "threads = cores"),
        (
            cores,
            cores,
            "threads = cores, plus as many CPU-bound threads (holders get preempted)",
        ),
        (4 * cores, 0, "threads = 4 x cores"),
    ];
    let variants = [PvLock::Native, PvLock::Futex, PvLock::SchedYield];
    for (threads, noise, title) in scenarios {
        println!();
        println!("{title}:");
        println!(
            "{:<17} {:>7}  {:>9}  {:^17}  {:>5}  {:>7}  {:>8}  {:>8}",
            "lock", "threads", "pairs/ms", "per thread", "Jain", "cpu", "sleeps", "wakes"
        );
        let _noise = Noise::new(noise);
        for variant in variants {
            // Runs are sequential: no lock has waiters while the sites change.
            let forced = pv::force(variant);
            assert_eq!(pv::chosen(&forced), Some(variant), "{forced}");
            ticket_run(threads).print(&format!("ticket/{}", variant.name()), threads);
            hybrid_run(threads).print(&format!("hybrid/{}", variant.name()), threads);
        }
        std_run(threads).print("std::sync::Mutex", threads);
    }

    // Back to what this machine selects (and ALTPATCH asked for).
    let restored = altpatch::Patcher::from_env().apply();
    println!();
    println!(
        "pv_lock back to {}",
        pv::chosen(&restored).map_or("mixed", PvLock::name)
    );
}

/// User plus system CPU time of this process so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut usage), 0);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// `n` threads that burn CPU until dropped: the steal time of a busy host, in miniature.
struct Noise(Arc<AtomicBool>, Vec<std::thread::JoinHandle<()>>);

impl Noise {
    fn new(n: usize) -> Noise {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        black_box(0);
                    }
                })
            })
            .collect();
        Noise(stop, threads)
    }
}

impl Drop for Noise {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        for t in self.1.drain(..) {
            t.join().unwrap();
        }
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}
