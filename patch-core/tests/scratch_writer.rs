//! The writer on scratch executable memory (not the program's own text): a planned rewrite of a
//! tiny function, its result before and after, and the page's protection restored exactly.

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use patch_core::os::linux::MprotectWriter;
use patch_core::plan::{Block, plan_site};
use patch_core::write::{SiteWrite, write_batch};

#[test]
fn a_scratch_function_is_rewritten_and_its_page_protection_restored() {
    // mov eax, 1; nop x3 (padding); ret
    let original = [0xb8, 0x01, 0x00, 0x00, 0x00, 0x90, 0x90, 0x90, 0xc3];
    let mut map = memmap2::MmapMut::map_anon(4096).unwrap();
    map[..original.len()].copy_from_slice(&original);
    let map = map.make_exec().unwrap();
    let addr = map.as_ptr() as usize;
    // SAFETY: the page holds a complete function with the C ABI and no arguments.
    let call = || unsafe { std::mem::transmute::<usize, extern "C" fn() -> u32>(addr)() };
    assert_eq!(call(), 1);

    // The site is the 8 bytes before `ret`; candidates: `mov eax, 1` and `xor eax, eax;
    // mov al, 3` (no longer than the `mov`: the harness's threads make this write live, and a
    // thread may be stopped after the `mov`).
    let default = [0xb8, 0x01, 0x00, 0x00, 0x00];
    let three = [0x31, 0xc0, 0xb0, 0x03];
    let blocks = [
        Block {
            bytes: &default,
            ip: 0x1000,
        },
        Block {
            bytes: &three,
            ip: 0x2000,
        },
    ];
    let current = map[..8].to_vec();
    let plan = plan_site(addr as u64, &current, &blocks, &["default", "three"], 1).unwrap();

    let before = region::query(addr as *const u8).unwrap().protection();
    let (results, stats) = write_batch(&[SiteWrite::new(&plan)], &mut MprotectWriter::default());
    assert_eq!(results, vec![Ok(())]);
    assert_eq!(stats.pages, 1);
    assert_eq!(call(), 3);
    assert_eq!(
        region::query(addr as *const u8).unwrap().protection(),
        before
    );
}
