//! The lock before (or without) any apply: the `pv_lock` sites still call their defaults (yield
//! in `lock_spinning`, the flag-reading unlock), and that is a correct lock on its own, under
//! contention at 2 to 16 threads. Nothing in this binary ever patches.
#![cfg(not(loom))]

mod common;

use std::time::Duration;

use altpatch_sites::pv;
use common::*;
use iced_x86::Mnemonic;

#[test]
fn the_unpatched_lock_is_a_correct_lock() {
    let stats = pv::stats();
    for threads in [2, 4, 8, 16] {
        contended_run::<16>(threads, 2_400 / threads as u64, Duration::from_secs(20));
    }
    assert!(altpatch::applied_report().is_none(), "nothing here applies");
    assert_eq!(pv::stats().waits, stats.waits, "the default never sleeps");

    // Every `pv_lock` site is still the call to its default, as built.
    let mut sites = 0;
    for record in altpatch::__private::records() {
        if record.descriptor().name != pv::SITE {
            continue;
        }
        sites += 1;
        let len = usize::from(record.len);
        // SAFETY: a record's site lies in this program's mapped text.
        let bytes = unsafe { std::slice::from_raw_parts(record.site_addr() as *const u8, len) };
        let instrs = decode(bytes, record.site_addr() as u64);
        let (default, ip) = record.replacement(0).unwrap();
        let call = decode(default, ip as u64)[0];
        assert_eq!(instrs[0].mnemonic(), Mnemonic::Call);
        assert_eq!(instrs[0].near_branch_target(), call.near_branch_target());
        assert!(rest_is_filler(&instrs, 1), "{instrs:?}");
    }
    assert!(
        sites >= 3,
        "lock_spinning, unlock_kick and the unlock are here"
    );
}
