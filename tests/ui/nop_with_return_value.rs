#[altpatch::alternative(inline, avx2 => nop)]
fn value(x: u64) -> u64 {
    x
}

fn main() {}
