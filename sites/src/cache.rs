//! Cache-line flush: `clflushopt` where the CPU has it, `clflush` otherwise.

/// The line size `flush` steps by (CPUID leaf 1 reports 64 on every x86_64 in use).
pub const CACHE_LINE: usize = 64;

/// Writes back and evicts the cache line holding `p`: `clflushopt` inline with CLFLUSHOPT, else
/// `clflush` inline (also the default, through a call).
///
/// `clflushopt` is ordered only by fences (and locked instructions); [`flush`] fences around its
/// lines.
///
/// # Safety
/// `p` is mapped (a flush of an unmapped address faults).
#[altpatch::alternative(
    inline,
    clflushopt => asm("clflushopt byte ptr [rdi]"),
    clflush: not(clflushopt) => asm("clflush byte ptr [rdi]"),
)]
pub unsafe fn flush_line(p: *const u8) {
    // SAFETY: CLFLUSH is part of every x86_64 CPU (SSE2); `p` is mapped per the caller.
    unsafe { core::arch::x86_64::_mm_clflush(p) }
}

/// Writes back and evicts every cache line `data` touches, with full fences before and after
/// (like the kernel's `clflush_cache_range`), so the flushes are ordered with the accesses around.
pub fn flush(data: &[u8]) {
    use core::arch::x86_64::_mm_mfence;
    if data.is_empty() {
        return;
    }
    let start = data.as_ptr() as usize & !(CACHE_LINE - 1);
    let end = data.as_ptr() as usize + data.len();
    // SAFETY: MFENCE is part of every x86_64 CPU.
    unsafe { _mm_mfence() };
    for line in (start..end).step_by(CACHE_LINE) {
        // SAFETY: every line in `start..end` holds a byte of `data`, so it is mapped (the first
        // line's start may lie below `data`, on the same page).
        unsafe { flush_line(line as *const u8) };
    }
    // SAFETY: as above.
    unsafe { _mm_mfence() };
}
