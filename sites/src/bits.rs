//! Bit counts: `popcnt`, `lzcnt` and `tzcnt` inline where the CPU has them.
//!
//! The predicates must be exact: without LZCNT (ABM) or BMI1 the same bytes decode as `bsr` or
//! `bsf` (the `rep` prefix is ignored), which give other answers, and none for zero.

/// The number of one bits in `x`: `popcnt rax, rdi` inline with POPCNT.
#[altpatch::alternative(inline, popcnt => asm("popcnt rax, rdi"))]
pub fn popcount(x: u64) -> u32 {
    x.count_ones()
}

/// The number of leading zero bits in `x` (64 for zero): `lzcnt rax, rdi` inline with LZCNT.
#[altpatch::alternative(inline, lzcnt => asm("lzcnt rax, rdi"))]
pub fn leading_zeros(x: u64) -> u32 {
    x.leading_zeros()
}

/// The number of trailing zero bits in `x` (64 for zero): `tzcnt rax, rdi` inline with BMI1.
#[altpatch::alternative(inline, bmi1 => asm("tzcnt rax, rdi"))]
pub fn trailing_zeros(x: u64) -> u32 {
    x.trailing_zeros()
}
