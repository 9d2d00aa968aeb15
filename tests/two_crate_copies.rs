//! Two semver-incompatible copies of altpatch in one program: each walks and patches only the
//! records of its own version's section, and both find the same lock for page protections.
//!
//! Shown at the level of the mechanism, without building a second copy of the crate: this test
//! emits what another copy (version 0.2) would, a site with its record in `altpatch_sites_v0_2`
//! and its own definition of the shared lock word, and checks that this copy (0.1) never reads
//! that record or touches that site, and shares the lock word with it.

mod common;

use std::time::Duration;

use altpatch::StaticKey;

// "Another copy": a 5-byte NOP site returning 7, with a record this copy's layout would
// understand (version 1, a static branch of 5 bytes, 3 candidates) whose descriptor offsets are
// zero: read by this copy, it would be garbage.
core::arch::global_asm!(
    ".pushsection .text.altpatch_test_other_copy,\"ax\",@progbits",
    ".globl altpatch_test_other_copy_site",
    "altpatch_test_other_copy_site:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "mov eax, 7",
    "ret",
    ".popsection",
    ".pushsection altpatch_sites_v0_2,\"aR\"",
    ".balign 4",
    ".long altpatch_test_other_copy_site - .",
    ".long 0",
    ".long 0",
    ".byte 5, 4, 3, 1",
    ".popsection",
    // The other copy's definition of the lock word shared by all copies.
    ".pushsection .bss.altpatch_text_lock,\"awG\",@nobits,altpatch_text_lock,comdat",
    ".weak altpatch_text_lock",
    ".hidden altpatch_text_lock",
    ".balign 4",
    "altpatch_text_lock:",
    ".zero 4",
    ".popsection",
);

unsafe extern "C" {
    fn altpatch_test_other_copy_site() -> u32;
    #[link_name = "__start_altpatch_sites_v0_2"]
    static OTHER_START: [u8; 0];
    #[link_name = "__stop_altpatch_sites_v0_2"]
    static OTHER_STOP: [u8; 0];
    static altpatch_text_lock: u32;
}

static KEY: StaticKey = StaticKey::new(false);

#[inline(never)]
fn branch() -> bool {
    altpatch::static_branch_unlikely!(KEY)
}

fn other_site() -> usize {
    altpatch_test_other_copy_site as *const () as usize
}

fn other_site_bytes() -> [u8; 5] {
    // SAFETY: the function's first 5 bytes, in mapped text.
    unsafe { *(other_site() as *const [u8; 5]) }
}

#[test]
fn each_copy_walks_only_its_own_section() {
    let _lock = common::patch_lock();
    // The other copy finds its record through its own section's bounds.
    let other = (&raw const OTHER_STOP as usize) - (&raw const OTHER_START as usize);
    assert_eq!(other, 16, "one record in the other copy's section");

    let ours = altpatch::__private::records();
    assert!(!ours.is_empty());
    assert!(
        ours.iter().all(|r| r.site_addr() != other_site()),
        "this copy lists the other copy's site"
    );
    let report = altpatch::Patcher::new().apply();
    assert!(
        report.sites.iter().all(|s| s.addr() != other_site()),
        "{report}"
    );
    // Toggles (live: the harness runs other threads) leave the other copy's site alone.
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::black_box(branch());
            }
        });
        for on in [true, false, true, false] {
            let update = KEY.set(on).expect("toggled");
            assert_eq!(
                (update.written, &update.unpatched),
                (1, &None),
                "{update:?}"
            );
            assert_eq!(branch(), on);
            std::thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(other_site_bytes(), [0x0f, 0x1f, 0x44, 0x00, 0x00]);
    // SAFETY: calls the function emitted above (nop; mov eax, 7; ret).
    assert_eq!(unsafe { altpatch_test_other_copy_site() }, 7);
}

#[test]
fn both_copies_share_one_lock_for_page_protections() {
    let theirs = &raw const altpatch_text_lock as usize;
    assert_eq!(altpatch::__private::text_lock_addr(), theirs);
}
