fn a(x: u64) -> u64 {
    x
}

#[altpatch::alternative(inline, avx2 => a, avx2 => a)]
fn f(x: u64) -> u64 {
    x
}

fn main() {}
