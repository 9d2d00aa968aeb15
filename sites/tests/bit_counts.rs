//! `popcount`, `leading_zeros` and `trailing_zeros` in every variant: the inline instruction
//! (`popcnt`, `lzcnt`, `tzcnt`) read back after apply, and the same answers as `core` for edge
//! and pseudo-random inputs, zero included (where `bsr`/`bsf` would differ).
#![cfg(not(loom))]

mod common;

use std::hint::black_box;

use altpatch::{Cpu, Feature, How};
use altpatch_sites::{leading_zeros, popcount, trailing_zeros};
use common::*;
use iced_x86::{Mnemonic, Register};

fn inputs() -> Vec<u64> {
    let mut v = vec![
        0,
        1,
        2,
        3,
        1 << 63,
        u64::MAX,
        u64::MAX >> 1,
        0x0123_4567_89ab_cdef,
    ];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..200 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(x);
        v.push(x >> (x % 64));
    }
    v
}

fn check(
    site: &str,
    feature: Feature,
    candidate: &str,
    mnemonic: Mnemonic,
    f: fn(u64) -> u32,
    reference: fn(u64) -> u32,
) {
    let _lock = patch_lock();
    let _ = f(black_box(1)); // the site is in this binary
    for forced in ["default", candidate] {
        let report = force_site(site, forced);
        for s in report.site(site) {
            if forced == "default" {
                assert_calls(s, "default");
            } else {
                assert_eq!(s.how(), How::Inline);
                let instrs = decode_site(s);
                assert_eq!(instrs[0].mnemonic(), mnemonic, "{instrs:?}");
                assert_eq!(instrs[0].op0_register(), Register::RAX);
                assert_eq!(instrs[0].op1_register(), Register::RDI);
                assert!(rest_is_filler(&instrs, 1), "{instrs:?}");
            }
        }
        if forced != "default" && !Cpu::detect().has(feature) {
            eprintln!("{site}: no {feature:?} here; its bytes checked, not run");
            continue;
        }
        for x in inputs() {
            assert_eq!(f(black_box(x)), reference(x), "{site}={forced} of {x:#x}");
        }
    }
}

#[test]
fn popcount_in_every_variant() {
    check(
        "popcount",
        Feature::Popcnt,
        "popcnt",
        Mnemonic::Popcnt,
        popcount,
        u64::count_ones,
    );
}

#[test]
fn leading_zeros_in_every_variant() {
    check(
        "leading_zeros",
        Feature::Lzcnt,
        "lzcnt",
        Mnemonic::Lzcnt,
        leading_zeros,
        u64::leading_zeros,
    );
}

#[test]
fn trailing_zeros_in_every_variant() {
    check(
        "trailing_zeros",
        Feature::Bmi1,
        "bmi1",
        Mnemonic::Tzcnt,
        trailing_zeros,
        u64::trailing_zeros,
    );
}
