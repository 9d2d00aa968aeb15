//! Uncontended lock+unlock pairs, side by side: the plain ticket lock (no pv support: the native
//! baseline), the altpatch ticket lock patched native, unpatched, and patched pv (futex), and the
//! altpatch hybrid lock (`PvMutex`) in the same three states, and the peers: std's Mutex,
//! parking_lot, spin's TicketMutex.

#[path = "plain_ticket.rs"]
mod plain_ticket;
#[path = "ratios.rs"]
mod ratios;

use std::hint::black_box;

use altpatch_sites::pv::{self, PvLock};
use altpatch_sites::{PvMutex, TicketMutex};
use criterion::Criterion;
use plain_ticket::PlainTicketMutex;

const PAIRS: u64 = 1000;

fn main() {
    let mut c = Criterion::default().configure_from_args();
    altpatch::apply_patches();
    let mut g = c.benchmark_group("locks_uncontended");

    let plain = PlainTicketMutex::new();
    g.bench_function("plain_ticket", |b| {
        b.iter(|| (0..PAIRS).for_each(|_| black_box(&plain).increment()))
    });
    let ours = TicketMutex::new(0u64);
    for (variant, id) in [
        (PvLock::Native, "altpatch_ticket_patched_native"),
        (PvLock::Default, "altpatch_ticket_unpatched"),
        (PvLock::Futex, "altpatch_ticket_patched_pv_futex"),
    ] {
        let report = pv::force(variant);
        assert_eq!(pv::chosen(&report), Some(variant), "{report}");
        g.bench_function(id, |b| {
            b.iter(|| (0..PAIRS).for_each(|_| *ours.lock() += 1))
        });
    }
    let hybrid = PvMutex::new(0u64);
    for (variant, id) in [
        (PvLock::Native, "altpatch_hybrid_patched_native"),
        (PvLock::Default, "altpatch_hybrid_unpatched"),
        (PvLock::Futex, "altpatch_hybrid_patched_pv_futex"),
    ] {
        let report = pv::force(variant);
        assert_eq!(pv::chosen(&report), Some(variant), "{report}");
        g.bench_function(id, |b| {
            b.iter(|| (0..PAIRS).for_each(|_| *hybrid.lock() += 1))
        });
    }
    pv::force(PvLock::Native);
    let std_mutex = std::sync::Mutex::new(0u64);
    g.bench_function("std_mutex", |b| {
        b.iter(|| (0..PAIRS).for_each(|_| *std_mutex.lock().unwrap() += 1))
    });
    let pl = parking_lot::Mutex::new(0u64);
    g.bench_function("parking_lot", |b| {
        b.iter(|| (0..PAIRS).for_each(|_| *pl.lock() += 1))
    });
    let sp = spin::mutex::TicketMutex::<_>::new(0u64);
    g.bench_function("spin_ticket", |b| {
        b.iter(|| (0..PAIRS).for_each(|_| *sp.lock() += 1))
    });
    g.finish();
    c.final_summary();

    ratios::print_table(
        "locks_uncontended",
        PAIRS as f64,
        "lock+unlock",
        "plain_ticket",
        &[
            ("altpatch_ticket_patched_native", Some(1.02)),
            ("altpatch_ticket_unpatched", None),
            ("altpatch_ticket_patched_pv_futex", None),
            ("altpatch_hybrid_patched_native", None),
            ("altpatch_hybrid_unpatched", None),
            ("altpatch_hybrid_patched_pv_futex", None),
            ("std_mutex", None),
            ("parking_lot", None),
            ("spin_ticket", None),
        ],
    );
    ratios::print_table(
        "locks_uncontended",
        PAIRS as f64,
        "lock+unlock",
        "std_mutex",
        &[
            ("altpatch_ticket_patched_native", None),
            ("altpatch_hybrid_patched_native", None),
            ("altpatch_hybrid_patched_pv_futex", None),
        ],
    );
}
