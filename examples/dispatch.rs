//! CPU dispatch the altpatch way: each site below is rewritten at startup to the best variant
//! for this CPU, and the program prints which one each site runs.
//!
//! ```text
//! cargo run --release --example dispatch
//! ALTPATCH=crc32c=default,sum=default cargo run --release --example dispatch
//! ```

use std::hint::black_box;

/// Population count: `popcnt` inline at every call site where the CPU has it.
#[altpatch::alternative(inline, popcnt => asm("popcnt rax, rdi"))]
pub fn popcount(x: u64) -> u64 {
    let (mut n, mut v) = (0, x);
    while v != 0 {
        v &= v - 1;
        n += 1;
    }
    n
}

const CRC32C_POLY: u32 = 0x82f6_3b78;

static CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = (crc >> 1) ^ (CRC32C_POLY & (crc & 1).wrapping_neg());
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

#[target_feature(enable = "sse4.2")]
fn crc32c_sse42(crc: u32, data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u8, _mm_crc32_u64};
    let mut crc = !crc;
    let mut words = data.chunks_exact(8);
    let mut wide = u64::from(crc);
    for w in &mut words {
        wide = _mm_crc32_u64(wide, u64::from_le_bytes(w.try_into().expect("8 bytes")));
    }
    crc = wide as u32;
    for &b in words.remainder() {
        crc = _mm_crc32_u8(crc, b);
    }
    !crc
}

/// CRC-32C (Castagnoli): SSE4.2's `crc32` instruction, or a table.
#[altpatch::alternative(sse4_2 => crc32c_sse42)]
pub fn crc32c(crc: u32, data: &[u8]) -> u32 {
    !data.iter().fold(!crc, |c, &b| {
        (c >> 8) ^ CRC32C_TABLE[usize::from((c as u8) ^ b)]
    })
}

#[target_feature(enable = "avx2")]
fn sum_avx2(xs: &[u32]) -> u64 {
    // The same loop, compiled with AVX2 enabled: LLVM vectorizes it 8 lanes wide.
    xs.iter().map(|&x| u64::from(x)).sum()
}

/// Sum of a slice: the AVX2 build of the loop, or the baseline one.
#[altpatch::alternative(avx2 => sum_avx2)]
pub fn sum(xs: &[u32]) -> u64 {
    xs.iter().map(|&x| u64::from(x)).sum()
}

fn main() {
    let report = altpatch::apply_patches();
    if let Err(e) = altpatch::try_apply_patches() {
        eprintln!("{e}");
    }
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let xs: Vec<u32> = (0..10_000).collect();
    println!("popcount(0xff00ff) = {}", popcount(black_box(0xff00ff)));
    println!("crc32c(4 KiB)      = {:#010x}", crc32c(0, black_box(&data)));
    println!("sum(0..10000)      = {}", sum(black_box(&xs)));
    println!();
    for name in ["popcount", "crc32c", "sum"] {
        for site in report.site(name).take(1) {
            let copies = report.site(name).count();
            println!(
                "{name:<9} runs {:<8} ({}; {} site{})",
                site.chosen(),
                site.how(),
                copies,
                if copies == 1 { "" } else { "s" }
            );
        }
    }
}
