//! An ordered timestamp: the TSC read after every earlier instruction has completed (the kernel's
//! `rdtsc_ordered`).

/// The time-stamp counter, read only once all earlier instructions have executed: `rdtscp`
/// inline where the CPU has it, else `lfence; rdtsc` inline; the default is `lfence; rdtsc`
/// through a call.
#[altpatch::alternative(
    inline,
    rdtscp => asm("rdtscp", "shl rdx, 32", "or rax, rdx"),
    lfence: not(rdtscp) => asm("lfence", "rdtsc", "shl rdx, 32", "or rax, rdx"),
)]
pub fn rdtsc_ordered() -> u64 {
    use core::arch::x86_64::{_mm_lfence, _rdtsc};
    // SAFETY: LFENCE (SSE2) and RDTSC are part of every x86_64 CPU.
    unsafe {
        _mm_lfence();
        _rdtsc()
    }
}
