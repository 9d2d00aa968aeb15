//! altpatch quickstart: a few sites, patched at startup, the report, and proof that the running
//! program's code differs from its file at those sites.
//!
//! ```text
//! cargo run --release --example quickstart
//! ALTPATCH=off cargo run --release --example quickstart            # nothing patched
//! ALTPATCH=popcount=default cargo run --release --example quickstart
//! ```

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

/// Population count: the `popcnt` instruction inline where the CPU has it.
#[altpatch::alternative(inline, popcnt => asm("popcnt rax, rdi"))]
fn popcount(x: u64) -> u64 {
    let (mut n, mut v) = (0, x);
    while v != 0 {
        v &= v - 1;
        n += 1;
    }
    n
}

/// One CRC-32C (Castagnoli) step over 8 bytes: SSE4.2's `crc32` inline, or bit by bit.
#[altpatch::alternative(inline, sse4_2 => asm("mov rax, rdi", "crc32 rax, rsi"))]
fn crc32c_u64(crc: u64, data: u64) -> u64 {
    let mut crc = crc as u32;
    for byte in data.to_le_bytes() {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82f6_3b78 & (crc & 1).wrapping_neg());
        }
    }
    u64::from(crc)
}

fn checksum(words: &[u64]) -> u32 {
    !words
        .iter()
        .fold(u64::from(u32::MAX), |crc, &w| crc32c_u64(crc, w)) as u32
}

/// High half of a 64x64-bit product: one `mul` (or `mulx`) where BMI2 is present, reached by a
/// direct call; the default is a portable shift-and-add.
fn mul_high_bmi2(x: u64, y: u64) -> u64 {
    ((u128::from(x) * u128::from(y)) >> 64) as u64
}

#[altpatch::alternative(inline, bmi2 => mul_high_bmi2)]
fn mul_high(x: u64, y: u64) -> u64 {
    // Shift-and-add over a 128-bit accumulator kept in two halves.
    let (mut lo, mut hi) = (0u64, 0u64);
    for bit in 0..64 {
        if y >> bit & 1 == 1 {
            let (add_lo, add_hi) = (x << bit, if bit == 0 { 0 } else { x >> (64 - bit) });
            let (sum, carry) = lo.overflowing_add(add_lo);
            lo = sum;
            hi = hi.wrapping_add(add_hi).wrapping_add(u64::from(carry));
        }
    }
    hi
}

static TRACED: AtomicU64 = AtomicU64::new(0);

fn tracing_disabled() -> bool {
    std::env::var_os("QUICKSTART_TRACE").is_none()
}

/// A trace hook: NOPs unless `QUICKSTART_TRACE` is set.
#[altpatch::alternative(inline, off: when = tracing_disabled => nop)]
fn trace(value: u64) {
    TRACED.fetch_add(value, Ordering::Relaxed);
}

fn main() {
    let report = altpatch::apply_patches();
    println!("{report}");

    // The results are the same whichever candidate runs.
    let x = black_box(0xf0f0_1234_5678_9abc_u64);
    assert_eq!(popcount(x), u64::from(x.count_ones()));
    let words: Vec<u64> = (0..1000u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    let sum = checksum(black_box(&words));
    assert_eq!(sum, crc32c_reference(&words));
    let (a, b) = (
        black_box(u64::MAX - 12345),
        black_box(0x1234_5678_9abc_def0),
    );
    assert_eq!(mul_high(a, b), mul_high_bmi2(a, b));
    trace(black_box(1));
    let traced = TRACED.load(Ordering::Relaxed);
    println!(
        "results: popcount = {}, crc32c = {sum:#010x}, mul_high = {:#x}, trace hook ran {traced} time(s)",
        popcount(x),
        mul_high(a, b)
    );

    // Proof: the bytes of the running text against the same bytes in the executable file.
    let file = ExecutableFile::open();
    let mut differ = 0;
    println!("\nsite bytes, file -> running:");
    for site in &report.sites {
        // SAFETY: the report's address and length are a site in this program's mapped text.
        let running = unsafe { std::slice::from_raw_parts(site.addr() as *const u8, site.len()) };
        let Some(on_disk) = file.bytes_at(site.addr(), site.len()) else {
            continue;
        };
        let changed = on_disk != running;
        differ += usize::from(changed);
        // The report says what runs: at startup a site differs from the file exactly when this
        // apply wrote it, and then it runs a candidate other than the default as built.
        assert_eq!(changed, site.written(), "{}", site.name());
        assert_eq!(
            changed,
            site.how() != altpatch::How::Unpatched,
            "{}",
            site.name()
        );
        println!(
            "  {:<24} {:<38} -> {}{}",
            site.name().rsplit("::").next().unwrap_or(site.name()),
            disassemble(on_disk, site.addr()),
            disassemble(running, site.addr()),
            if changed { "" } else { "   (unchanged)" }
        );
    }
    println!(
        "\n{differ} of {} sites differ from the executable file",
        report.sites.len()
    );
    assert_eq!(differ, report.sites.iter().filter(|s| s.written()).count());
}

fn crc32c_reference(words: &[u64]) -> u32 {
    let mut crc = u32::MAX;
    for byte in words.iter().flat_map(|w| w.to_le_bytes()) {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82f6_3b78 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

fn disassemble(bytes: &[u8], ip: usize) -> String {
    let mut formatter = IntelFormatter::new();
    formatter
        .options_mut()
        .set_space_after_operand_separator(true);
    let mut out = Vec::new();
    for instr in Decoder::with_ip(64, bytes, ip as u64, DecoderOptions::NONE).iter() {
        let mut text = String::new();
        formatter.format(&instr, &mut text);
        out.push(text);
    }
    out.join("; ")
}

/// The running executable, mapped from its file, to read a site's pristine bytes.
struct ExecutableFile {
    map: memmap2::Mmap,
    /// (start..end, file offset) of the executable's mappings.
    segments: Vec<(std::ops::Range<usize>, usize)>,
}

impl ExecutableFile {
    fn open() -> ExecutableFile {
        let path = std::fs::read_link("/proc/self/exe").expect("/proc/self/exe");
        let file = std::fs::File::open(&path).expect("open the executable");
        // SAFETY: the executable is not modified while it runs (the kernel refuses writes to it).
        let map = unsafe { memmap2::Mmap::map(&file) }.expect("map the executable");
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        let segments = maps
            .lines()
            .filter(|l| l.ends_with(path.to_str().unwrap_or("\0")))
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (start, end) = f.next()?.split_once('-')?;
                let offset = usize::from_str_radix(f.nth(1)?, 16).ok()?;
                Some((
                    usize::from_str_radix(start, 16).ok()?..usize::from_str_radix(end, 16).ok()?,
                    offset,
                ))
            })
            .collect();
        ExecutableFile { map, segments }
    }

    fn bytes_at(&self, addr: usize, len: usize) -> Option<&[u8]> {
        let (range, offset) = self.segments.iter().find(|(r, _)| r.contains(&addr))?;
        let at = offset + (addr - range.start);
        self.map.get(at..at + len)
    }
}
