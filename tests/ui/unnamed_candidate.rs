#[altpatch::alternative(inline, all(avx2, bmi2) => asm("lea rax, [rdi + 1]"))]
fn next(x: u64) -> u64 {
    x + 1
}

fn main() {}
