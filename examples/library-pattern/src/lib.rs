//! `bytestats`: a library whose hot functions are altpatch sites, written the way a library
//! author writes them. Nobody calls `apply_patches()`: every program (or shared library) that
//! links this crate patches these sites at load (see `src/bin/library-pattern.rs`).

/// The population count of `x`: the `popcnt` instruction inline where the CPU has it.
#[altpatch::alternative(inline, popcnt => asm("popcnt rax, rdi"))]
pub fn popcount(x: u64) -> u64 {
    let (mut n, mut v) = (0, x);
    while v != 0 {
        v &= v - 1;
        n += 1;
    }
    n
}

/// Set bits in `bytes`.
pub fn count_ones(bytes: &[u8]) -> u64 {
    bytes
        .chunks(8)
        .map(|c| {
            let mut word = [0u8; 8];
            word[..c.len()].copy_from_slice(c);
            popcount(u64::from_le_bytes(word))
        })
        .sum()
}

fn always() -> bool {
    true
}

fn which_patched() -> u32 {
    2
}

/// Which implementation a call-site runs: 1 for the default (the library left unpatched),
/// 2 once its site is patched (its candidate's predicate always holds).
#[altpatch::alternative(inline, patched: when = always => which_patched)]
pub fn which() -> u32 {
    1
}

fn count_byte_patched(haystack: &[u8], needle: u8) -> usize {
    haystack.iter().filter(|&&b| b == needle).count() + 1_000_000
}

/// Occurrences of `needle`, through a trampoline; patched, it adds a million, so a caller can
/// tell the candidate ran.
#[altpatch::alternative(patched: when = always => count_byte_patched)]
pub fn count_byte(haystack: &[u8], needle: u8) -> usize {
    haystack.iter().filter(|&&b| b == needle).count()
}

/// For a program that opened this crate as a shared library: [`which`] from the library's own
/// copy of its sites.
#[unsafe(no_mangle)]
pub extern "C" fn bytestats_which() -> u32 {
    which()
}

/// For a program that opened this crate as a shared library: how many of the library's own
/// sites its load-time apply left running a candidate other than the default (-1 when it did
/// not apply).
#[unsafe(no_mangle)]
pub extern "C" fn bytestats_patched_sites() -> i64 {
    altpatch::applied_report().map_or(-1, |report| {
        report
            .sites
            .iter()
            .filter(|s| s.how() != altpatch::How::Unpatched)
            .count() as i64
    })
}
