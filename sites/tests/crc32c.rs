//! CRC-32C in both variants: the site is a direct call to the SSE4.2 loop or to the table loop,
//! and both give the RFC 3720 check values and agree with a bitwise reference on every length
//! and alignment, `crc32c_append` included.
#![cfg(not(loom))]

mod common;

use altpatch::{Cpu, Feature, How};
use altpatch_sites::{crc32c, crc32c_append};
use common::*;

/// Bit by bit, from the definition.
fn reference(data: &[u8]) -> u32 {
    let mut crc = u32::MAX;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82f6_3b78 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

fn check_values() {
    assert_eq!(crc32c(b""), 0);
    assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    // RFC 3720, B.4.
    assert_eq!(crc32c(&[0; 32]), 0x8a91_36aa);
    assert_eq!(crc32c(&[0xff; 32]), 0x62a8_ab43);
    let ascending: Vec<u8> = (0..32).collect();
    assert_eq!(crc32c(&ascending), 0x46dd_794e);
    let descending: Vec<u8> = (0..32).rev().collect();
    assert_eq!(crc32c(&descending), 0x113f_db5c);
    let data: Vec<u8> = (0..300u32).map(|i| (i * 131 + 7) as u8).collect();
    for start in 0..8 {
        for len in 0..data.len() - start {
            let slice = &data[start..start + len];
            assert_eq!(crc32c(slice), reference(slice), "{start}+{len}");
        }
    }
    let (a, b) = data.split_at(77);
    assert_eq!(crc32c_append(crc32c(a), b), crc32c(&data));
}

#[test]
fn crc32c_in_every_variant() {
    let _lock = patch_lock();
    let _ = crc32c(b"x"); // the site is in this binary
    for candidate in ["default", "sse4_2"] {
        let report = force_site("crc32c_update", candidate);
        for s in report.site("crc32c_update") {
            assert_calls(s, candidate);
            if candidate != "default" {
                assert_eq!(s.how(), How::Call);
            }
        }
        if candidate == "sse4_2" && !Cpu::detect().has(Feature::Sse4_2) {
            eprintln!("no SSE4.2 here: the call is checked, not run");
            continue;
        }
        check_values();
    }
}
