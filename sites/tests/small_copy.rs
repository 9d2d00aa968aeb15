//! `copy_small` in both variants: `rep movsb` inline (read back after apply) or the default word
//! loop; every length from 0 to 300 and a page, at every alignment, copies exactly and writes
//! nothing outside the destination.
#![cfg(not(loom))]

mod common;

use altpatch::{Cpu, Feature, How};
use altpatch_sites::copy_small;
use common::*;
use iced_x86::{Mnemonic, Register};

fn check_copies() {
    let src: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 1) as u8).collect();
    let lengths = (0..=300).chain([4096, 4099]);
    for len in lengths {
        for offset in 0..8 {
            let mut buf = vec![0xeeu8; len + 32];
            copy_small(
                &mut buf[16 + offset..16 + offset + len],
                &src[offset..offset + len],
            );
            assert_eq!(
                &buf[16 + offset..16 + offset + len],
                &src[offset..offset + len]
            );
            assert!(
                buf[..16 + offset].iter().all(|&b| b == 0xee),
                "{len}+{offset}"
            );
            assert!(
                buf[16 + offset + len..].iter().all(|&b| b == 0xee),
                "{len}+{offset}"
            );
        }
    }
}

#[test]
fn copy_small_in_every_variant() {
    let _lock = patch_lock();
    copy_small(&mut [0; 4], &[1; 4]); // the site is in this binary
    for candidate in ["default", "rep_movsb"] {
        let report = force_site("copy_raw", candidate);
        for s in report.site("copy_raw") {
            if candidate == "default" {
                assert_calls(s, "default");
                continue;
            }
            assert_eq!(s.how(), How::Inline);
            let instrs = decode_site(s);
            assert_eq!(instrs[0].mnemonic(), Mnemonic::Mov);
            assert_eq!(instrs[0].op0_register(), Register::RCX);
            assert_eq!(instrs[0].op1_register(), Register::RDX);
            assert_eq!(instrs[1].mnemonic(), Mnemonic::Movsb);
            assert!(instrs[1].has_rep_prefix());
            assert!(rest_is_filler(&instrs, 2), "{instrs:?}");
        }
        let cpu = Cpu::detect();
        if candidate == "rep_movsb" && !(cpu.has(Feature::Fsrm) || cpu.has(Feature::Erms)) {
            // `rep movsb` is correct everywhere; only its speed depends on FSRM/ERMS.
            eprintln!("no FSRM or ERMS here: rep movsb runs, just not fast");
        }
        check_copies();
    }
}
