//! `rdtsc_ordered` in every variant: `rdtscp` or `lfence; rdtsc` inline (read back after apply),
//! or the default call; each returns the TSC, ordered after what came before it, so reads on one
//! thread never go backwards and bracket a sleep. The two-instruction variant cannot replace
//! another while other threads run (one may be stopped between them), so the variants are
//! forced in a child of one thread, as at a program's start.
#![cfg(not(loom))]

mod common;

use std::time::Duration;

use altpatch::{Cpu, Feature, How};
use altpatch_sites::rdtsc_ordered;
use common::*;
use iced_x86::Mnemonic;

#[test]
fn rdtsc_ordered_in_every_variant() {
    let _lock = patch_lock();
    let _ = rdtsc_ordered(); // the site is in this binary
    in_forked_child(every_variant);
}

fn every_variant() {
    let cases = [
        ("default", None),
        ("lfence", Some(vec![Mnemonic::Lfence, Mnemonic::Rdtsc])),
        ("rdtscp", Some(vec![Mnemonic::Rdtscp])),
    ];
    for (candidate, inline) in cases {
        let report = force_site("rdtsc_ordered", candidate);
        for s in report.site("rdtsc_ordered") {
            match &inline {
                None => assert_calls(s, "default"),
                Some(expected) => {
                    assert_eq!(s.how(), How::Inline);
                    let instrs = decode_site(s);
                    let n = expected.len();
                    let got: Vec<_> = instrs[..n].iter().map(|i| i.mnemonic()).collect();
                    assert_eq!(&got, expected);
                    // The 64-bit value is assembled from edx:eax.
                    assert_eq!(instrs[n].mnemonic(), Mnemonic::Shl);
                    assert_eq!(instrs[n + 1].mnemonic(), Mnemonic::Or);
                    assert!(rest_is_filler(&instrs, n + 2), "{instrs:?}");
                }
            }
        }
        if candidate == "rdtscp" && !Cpu::detect().has(Feature::Rdtscp) {
            eprintln!("no RDTSCP here: its bytes checked, not run");
            continue;
        }
        let mut last = rdtsc_ordered();
        assert_ne!(last, 0);
        for _ in 0..10_000 {
            let now = rdtsc_ordered();
            assert!(now >= last, "{candidate}: {now} after {last}");
            last = now;
        }
        std::thread::sleep(Duration::from_millis(2));
        let after = rdtsc_ordered();
        // At least 1 MHz: the high half (edx) is in place, not just a 32-bit wrap.
        assert!(after - last > 2_000, "{candidate}: {last} .. {after}");
        // SAFETY: RDTSC is part of every x86_64 CPU.
        let plain = unsafe { core::arch::x86_64::_rdtsc() };
        assert!(plain >> 32 == after >> 32 || plain >> 32 == (after >> 32) + 1);
    }
}
