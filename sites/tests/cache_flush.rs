//! `flush_line` and `flush` in every variant: `clflushopt` or `clflush` inline on `[rdi]` (read
//! back after apply), or the default call. A flush keeps the data, and needs only read access: it
//! works on a read-only page and on a slice straddling lines.
#![cfg(not(loom))]

mod common;

use altpatch::{Cpu, Feature, How};
use altpatch_sites::cache::{self, CACHE_LINE};
use common::*;
use iced_x86::{Mnemonic, Register};

fn check_flushes() {
    let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
    cache::flush(&data[3..900]);
    cache::flush(&data[..1]);
    cache::flush(&[]);
    assert!(data.iter().enumerate().all(|(i, &b)| b == i as u8));

    // SAFETY: a fresh private anonymous page, unmapped below.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(page, libc::MAP_FAILED);
    // SAFETY: the page is ours, 4096 bytes, and stays mapped until the munmap.
    unsafe {
        std::ptr::write_bytes(page.cast::<u8>(), 0x5a, 4096);
        assert_eq!(libc::mprotect(page, 4096, libc::PROT_READ), 0);
        let bytes = std::slice::from_raw_parts(page.cast::<u8>(), 4096);
        cache::flush(bytes);
        for line in (0..4096).step_by(CACHE_LINE) {
            cache::flush_line(bytes.as_ptr().add(line));
        }
        assert!(bytes.iter().all(|&b| b == 0x5a));
        assert_eq!(libc::munmap(page, 4096), 0);
    }
}

#[test]
fn flush_in_every_variant() {
    let _lock = patch_lock();
    cache::flush(&[0; 8]); // the site is in this binary
    let cases = [
        ("default", None, None),
        (
            "clflushopt",
            Some(Mnemonic::Clflushopt),
            Some(Feature::Clflushopt),
        ),
        ("clflush", Some(Mnemonic::Clflush), None),
    ];
    for (candidate, mnemonic, feature) in cases {
        let report = force_site("flush_line", candidate);
        for s in report.site("flush_line") {
            match mnemonic {
                None => assert_calls(s, "default"),
                Some(m) => {
                    assert_eq!(s.how(), How::Inline);
                    let instrs = decode_site(s);
                    assert_eq!(instrs[0].mnemonic(), m, "{instrs:?}");
                    assert_eq!(instrs[0].memory_base(), Register::RDI);
                    assert!(rest_is_filler(&instrs, 1), "{instrs:?}");
                }
            }
        }
        if feature.is_some_and(|f| !Cpu::detect().has(f)) {
            eprintln!("{candidate}: not on this CPU; its bytes checked, not run");
            continue;
        }
        check_flushes();
    }
}
