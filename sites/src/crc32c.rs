//! CRC-32C (Castagnoli, as in iSCSI, ext4, SSE4.2's `crc32`): SSE4.2 where present, a table
//! otherwise.

/// The CRC-32C of `data`.
///
/// ```
/// altpatch::apply_patches();
/// assert_eq!(altpatch_sites::crc32c(b"123456789"), 0xe306_9283);
/// ```
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_append(0, data)
}

/// Extends `crc`, the CRC-32C of some bytes, to theirs followed by `data`:
/// `crc32c_append(crc32c(a), b) == crc32c(a ++ b)`.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    // SAFETY: `data` is a live slice of `data.len()` bytes.
    !unsafe { crc32c_update(!crc, data.as_ptr(), data.len()) }
}

/// The raw (un-inverted) CRC-32C register after `len` bytes at `data`: a direct call to the
/// SSE4.2 loop where the CPU has it, the table loop otherwise.
///
/// # Safety
/// `data` points to `len` readable bytes.
#[altpatch::alternative(inline, sse4_2 => update_sse42)]
unsafe fn crc32c_update(crc: u32, data: *const u8, len: usize) -> u32 {
    // SAFETY: forwarded from the caller.
    unsafe { update_table(crc, data, len) }
}

/// The reflected Castagnoli polynomial.
const POLY: u32 = 0x82f6_3b78;

const TABLE: [u32; 256] = {
    let mut table = [0; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = (crc >> 1) ^ (POLY & (crc & 1).wrapping_neg());
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// # Safety
/// As [`crc32c_update`].
unsafe fn update_table(mut crc: u32, data: *const u8, len: usize) -> u32 {
    // SAFETY: forwarded from the caller.
    let bytes = unsafe { core::slice::from_raw_parts(data, len) };
    for &byte in bytes {
        crc = TABLE[usize::from(crc as u8 ^ byte)] ^ (crc >> 8);
    }
    crc
}

/// # Safety
/// As [`crc32c_update`]; selected only where SSE4.2 is present.
unsafe fn update_sse42(crc: u32, data: *const u8, len: usize) -> u32 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the site calls this candidate only where `sse4_2` holds, or where an operator
    // forced it with `ALTPATCH` (as with any candidate, on them); the pointer is forwarded.
    return unsafe { update_sse42_inner(crc, data, len) };
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: forwarded from the caller.
    return unsafe { update_table(crc, data, len) };
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn update_sse42_inner(crc: u32, data: *const u8, len: usize) -> u32 {
    use core::arch::x86_64::{_mm_crc32_u8, _mm_crc32_u64};
    // SAFETY: forwarded from the caller.
    let bytes = unsafe { core::slice::from_raw_parts(data, len) };
    let mut words = bytes.chunks_exact(8);
    let mut crc64 = u64::from(crc);
    for word in &mut words {
        crc64 = _mm_crc32_u64(crc64, u64::from_le_bytes(word.try_into().unwrap()));
    }
    let mut crc = crc64 as u32;
    for &byte in words.remainder() {
        crc = _mm_crc32_u8(crc, byte);
    }
    crc
}
