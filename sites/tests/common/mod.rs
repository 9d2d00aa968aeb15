//! Shared by the sites tests: the per-binary patch lock, forcing variants, reading sites back, fake
//! CPUs, and a contended workload with a watchdog.
#![allow(dead_code)]

#[path = "../../../tests/common/fork.rs"]
mod fork;

// These tests drive the engine from the bytes as built: no load-time apply in their binaries
// (tests/load_time_apply.rs and the library-pattern example test the load-time apply itself).
altpatch::manual_apply!();
#[allow(unused_imports)]
pub use fork::in_forked_child;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use altpatch::{Cpu, FakeCpuid, Patcher, Report, SiteReport};
use altpatch_sites::pv::{self, PvLock};
use altpatch_sites::{LockState, RawTicketLock};
use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic};
use lock_api::{Mutex as LockApiMutex, RawMutex};

/// Tests in one binary share the program text: those that patch, or that run locks whose
/// `pv_lock` sites another test could re-patch, take this lock.
pub fn patch_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Forces `pv_lock` to `variant` through the API and checks every copy took it.
pub fn force(variant: PvLock) -> Report {
    let report = pv::force(variant);
    assert!(report.error.is_none(), "{report}");
    assert_eq!(pv::chosen(&report), Some(variant), "{report}");
    report
}

/// Forces one site's candidate (`ALTPATCH` syntax) and checks it was applied everywhere.
pub fn force_site(site: &str, candidate: &str) -> Report {
    let report = Patcher::new()
        .overrides_str(&format!("{site}={candidate}"))
        .apply();
    assert!(report.error.is_none(), "{report}");
    let copies: Vec<_> = report.site(site).collect();
    assert!(
        !copies.is_empty(),
        "no {site} site in this binary:\n{report}"
    );
    for s in copies {
        assert_eq!(s.chosen(), candidate, "{report}");
    }
    report
}

/// The CPUs selection must tell apart.
pub fn bare_metal() -> Cpu {
    Cpu::from_source(&FakeCpuid::new())
}

/// KVM with feature bits (PV_UNHALT, STEAL_TIME) and hints `hints_edx` (bit 0: realtime).
pub fn kvm(hints_edx: u32) -> Cpu {
    Cpu::from_source(&FakeCpuid::new().with_kvm(0x4000_0000, (1 << 7) | (1 << 5), hints_edx))
}

pub fn other_hypervisor(signature: &[u8; 12]) -> Cpu {
    Cpu::from_source(&FakeCpuid::new().with_hypervisor(signature, 0x4000_0000))
}

/// The instructions at a site now, read back from the running program's text.
pub fn decode_site(site: &SiteReport) -> Vec<Instruction> {
    // SAFETY: the report's address and length describe a site in this program's mapped text.
    let bytes = unsafe { std::slice::from_raw_parts(site.addr() as *const u8, site.len()) };
    decode(bytes, site.addr() as u64)
}

pub fn decode(bytes: &[u8], ip: u64) -> Vec<Instruction> {
    let instrs: Vec<Instruction> = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE)
        .iter()
        .collect();
    assert!(
        instrs.iter().all(|i| !i.is_invalid()),
        "decodes: {bytes:02x?}"
    );
    instrs
}

/// The bytes and address of `candidate`'s block in the record of `site`.
pub fn candidate_block(site: &SiteReport, candidate: &str) -> (&'static [u8], u64) {
    let index = site
        .candidates()
        .position(|c| c == candidate)
        .unwrap_or_else(|| panic!("{} has no candidate {candidate}", site.name()));
    let (bytes, ip) = site.record().replacement(index).expect("block exists");
    (bytes, ip as u64)
}

/// Where `candidate`'s block calls, relocated: what a site patched to it must call.
pub fn candidate_call_target(site: &SiteReport, candidate: &str) -> u64 {
    let (bytes, ip) = candidate_block(site, candidate);
    let call = decode(bytes, ip)[0];
    assert_eq!(call.mnemonic(), Mnemonic::Call, "{candidate} is a call");
    call.near_branch_target()
}

/// Everything from instruction `n` on is filler: NOPs, or a `jmp` over `int3`s.
pub fn rest_is_filler(instrs: &[Instruction], n: usize) -> bool {
    for i in &instrs[n..] {
        match i.mnemonic() {
            Mnemonic::Nop => {}
            Mnemonic::Jmp => return true,
            _ => return false,
        }
    }
    true
}

/// The site is a direct call to `candidate`'s target and filler.
pub fn assert_calls(site: &SiteReport, candidate: &str) {
    let instrs = decode_site(site);
    assert_eq!(instrs[0].mnemonic(), Mnemonic::Call, "{instrs:?}");
    assert_eq!(
        instrs[0].near_branch_target(),
        candidate_call_target(site, candidate),
        "{} at {:#x} calls {candidate}",
        site.name(),
        site.addr()
    );
    assert!(rest_is_filler(&instrs, 1), "{instrs:?}");
}

/// The site is NOPs from end to end.
pub fn assert_nops(site: &SiteReport) {
    let instrs = decode_site(site);
    assert!(
        instrs.iter().all(|i| i.mnemonic() == Mnemonic::Nop),
        "{} at {:#x}: {instrs:?}",
        site.name(),
        site.addr()
    );
    assert_eq!(instrs.iter().map(|i| i.len()).sum::<usize>(), site.len());
}

/// Whether the env var asks for the long stress runs.
pub fn long_stress() -> bool {
    std::env::var_os("ALTPATCH_STRESS").is_some_and(|v| v != "0" && !v.is_empty())
}

/// Four threads add 1,000 each to `counter` (a `static` mutex, so const construction works).
pub fn four_threads_count_to_4000<R: RawMutex + Sync>(counter: &'static LockApiMutex<R, u64>) {
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..1000 {
                    *counter.lock() += 1;
                }
            });
        }
    });
    assert_eq!(*counter.lock(), 4000);
}

/// A critical section that notices any overlap and any lost update: `inside` must be 0 on entry,
/// and the plain read-modify-write of `count` loses increments if two threads run it at once.
pub struct Shared {
    pub count: u64,
    pub checksum: u64,
}

/// Runs `threads` threads doing `ops` lock/unlock pairs each on one `Mutex<RawTicketLock<SPINS>>`,
/// all queued behind the caller at the start.
///
/// The watchdog fails the test when `head` has not moved for `stall` while threads are still
/// unfinished (a lost wake-up or a deadlock: nothing is served any more), dumping the lock's
/// words; slow progress (plain spinning with more threads than cores) is not a hang. Returns the
/// elapsed time.
pub fn contended_run<const SPINS: u32>(threads: usize, ops: u64, stall: Duration) -> Duration {
    let lock: &'static LockApiMutex<RawTicketLock<SPINS>, Shared> = leak_shared();
    let Workers {
        done: done_rx,
        overlap,
        go,
        ..
    } = spawn_workers(lock, threads, ops);
    // SAFETY: `raw` is only used to read the two words.
    let raw = unsafe { lock.raw() };
    // Start as a convoy: every worker takes a ticket (and, past its spins, calls
    // `lock_spinning`) behind us before the first handoff.
    let held = lock.lock();
    go.wait();
    let start = Instant::now();
    while raw.state().queued() < threads as u32 + 1 {
        assert!(
            start.elapsed() < stall,
            "workers never queued: {:?}",
            raw.state()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(2));
    drop(held);
    let (mut finished, mut last_head, mut last_move) = (0, raw.state().head, Instant::now());
    while finished < threads {
        match done_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(()) => finished += 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("a worker died: {e}"),
        }
        let state: LockState = raw.state();
        if state.head != last_head {
            (last_head, last_move) = (state.head, Instant::now());
        } else if finished < threads && last_move.elapsed() > stall {
            panic!(
                "watchdog: nothing served for {stall:?}; {finished} of {threads} threads done \
                 after {:?}; lock {state:?} (locked {}, slowpath {}, queued {}); pv stats {:?}",
                start.elapsed(),
                state.is_locked(),
                state.slowpath(),
                state.queued(),
                pv::stats()
            );
        }
    }
    let elapsed = start.elapsed();
    check_sections(lock, overlap, threads, ops);
    let state = raw.state();
    assert!(!state.is_locked(), "{state:?}");
    assert!(
        !state.slowpath(),
        "the flag outlived the contention: {state:?}"
    );
    elapsed
}

/// Runs `threads` threads doing `ops` lock/unlock pairs each on one
/// `Mutex<RawPvLock<SPINS>, Shared>`, all started while the caller holds the lock (a convoy:
/// under `futex` they park behind it).
///
/// The watchdog fails the test when no critical section completes for `stall` while threads are
/// unfinished (a lost wake-up, an unclaimed handoff, a deadlock), dumping the lock word. Checks no
/// overlap, no lost update, and that the word is back to 0 afterwards. Returns the elapsed time.
pub fn pv_mutex_run<const SPINS: u32>(threads: usize, ops: u64, stall: Duration) -> Duration {
    use altpatch_sites::{PvLockState, RawPvLock};

    let lock: &'static LockApiMutex<RawPvLock<SPINS>, Shared> = leak_shared();
    let Workers {
        done: done_rx,
        overlap,
        progress,
        go,
    } = spawn_workers(lock, threads, ops);
    // SAFETY: `raw` is only used to read the word.
    let raw = unsafe { lock.raw() };
    let held = lock.lock();
    go.wait();
    let start = Instant::now();
    // Long enough for the workers to spin out and park (or ask for a handoff) behind us.
    std::thread::sleep(Duration::from_millis(3));
    drop(held);
    let (mut finished, mut last, mut last_move) = (0, 0, Instant::now());
    while finished < threads {
        match done_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(()) => finished += 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("a worker died: {e}"),
        }
        let now = progress.load(Ordering::Relaxed);
        if now != last {
            (last, last_move) = (now, Instant::now());
        } else if finished < threads && last_move.elapsed() > stall {
            let state: PvLockState = raw.state();
            panic!(
                "watchdog: no critical section for {stall:?}; {finished} of {threads} threads \
                 done after {:?}, {now} sections; lock {state:?} (locked {}, parked {}, \
                 want {}, handoff {}); stats {:?}",
                start.elapsed(),
                state.is_locked(),
                state.parked(),
                state.wants_handoff(),
                state.handed_off(),
                altpatch_sites::pvlock::stats()
            );
        }
    }
    let elapsed = start.elapsed();
    check_sections(lock, overlap, threads, ops);
    assert_eq!(
        raw.state(),
        PvLockState(0),
        "quiescent: unlocked, nobody parked, no flag left"
    );
    elapsed
}

/// A `Mutex<R, Shared>` that lives for the rest of the test process (the workers may outlive a
/// failed test).
fn leak_shared<R: RawMutex>() -> &'static LockApiMutex<R, Shared> {
    Box::leak(Box::new(LockApiMutex::new(Shared {
        count: 0,
        checksum: 0,
    })))
}

/// What the workers of [`spawn_workers`] report.
struct Workers {
    /// One message per finished worker.
    done: mpsc::Receiver<()>,
    /// Set if two workers were ever inside the critical section at once.
    overlap: &'static AtomicBool,
    /// Critical sections completed so far, by all workers.
    progress: &'static AtomicU64,
    /// Releases the workers once the caller also waits on it.
    go: &'static Barrier,
}

/// Spawns `threads` workers doing `ops` critical sections each on `lock`, waiting at `go`.
fn spawn_workers<R: RawMutex + Sync + 'static>(
    lock: &'static LockApiMutex<R, Shared>,
    threads: usize,
    ops: u64,
) -> Workers {
    let inside: &'static AtomicU32 = Box::leak(Box::new(AtomicU32::new(0)));
    let overlap: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
    let progress: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
    let (done_tx, done) = mpsc::channel();
    let go: &'static Barrier = Box::leak(Box::new(Barrier::new(threads + 1)));
    for t in 0..threads {
        let done_tx = done_tx.clone();
        std::thread::spawn(move || {
            go.wait();
            for i in 0..ops {
                let mut g = lock.lock();
                if inside.fetch_add(1, Ordering::Relaxed) != 0 {
                    overlap.store(true, Ordering::Relaxed);
                }
                let c = std::hint::black_box(g.count);
                std::hint::spin_loop();
                g.count = c + 1;
                g.checksum = g.checksum.wrapping_add(t as u64 * 1_000_003 + i);
                inside.fetch_sub(1, Ordering::Relaxed);
                progress.fetch_add(1, Ordering::Relaxed);
                drop(g);
                if i % 64 == 0 {
                    std::thread::yield_now();
                }
            }
            done_tx.send(()).unwrap();
        });
    }
    Workers {
        done,
        overlap,
        progress,
        go,
    }
}

/// No overlap, no lost update, every critical section exactly once.
fn check_sections<R: RawMutex>(
    lock: &LockApiMutex<R, Shared>,
    overlap: &AtomicBool,
    threads: usize,
    ops: u64,
) {
    assert!(
        !overlap.load(Ordering::Relaxed),
        "two threads were inside at once"
    );
    let g = lock.lock();
    assert_eq!(g.count, threads as u64 * ops, "lost updates");
    let expected = (0..threads as u64)
        .flat_map(|t| (0..ops).map(move |i| t * 1_000_003 + i))
        .fold(0u64, u64::wrapping_add);
    assert_eq!(g.checksum, expected, "lost or duplicated critical sections");
}
