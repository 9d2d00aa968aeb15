fn fast(x: u64) -> u64 {
    x
}

#[altpatch::alternative(inline, avx3 => fast)]
fn slow(x: u64) -> u64 {
    x
}

fn main() {
    slow(1);
}
