#[altpatch::alternative(inline, popcnt => asm("popcnt rax, rdi"))]
#[inline]
#[inline(never)]
fn count(x: u64) -> u64 {
    u64::from(x.count_ones())
}

fn main() {}
