//! A small-copy routine: `rep movsb` inline where the CPU makes it fast, a word loop otherwise.

/// Copies `src` into `dst` (same length): `rep movsb` inline with FSRM (fast for short copies)
/// or ERMS, an 8-bytes-at-a-time loop otherwise.
///
/// # Panics
/// If the lengths differ.
#[inline]
pub fn copy_small(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy_small: lengths differ");
    // SAFETY: both slices are live for `len` bytes and cannot overlap (one is `&mut`).
    unsafe { copy_raw(dst.as_mut_ptr(), src.as_ptr(), src.len()) }
}

/// # Safety
/// `dst` and `src` are valid for `len` bytes and do not overlap.
#[altpatch::alternative(inline, rep_movsb: any(fsrm, erms) => asm("mov rcx, rdx", "rep movsb"))]
pub unsafe fn copy_raw(dst: *mut u8, src: *const u8, len: usize) {
    let mut i = 0;
    while i + 8 <= len {
        // SAFETY: `i + 8 <= len`, inside both buffers; unaligned accesses are allowed.
        unsafe {
            let word = src.add(i).cast::<u64>().read_unaligned();
            dst.add(i).cast::<u64>().write_unaligned(word);
        }
        i += 8;
    }
    while i < len {
        // SAFETY: `i < len`, inside both buffers.
        unsafe { *dst.add(i) = *src.add(i) };
        i += 1;
    }
}
