#[altpatch::alternative(avx2 => sum_avx2)]
fn sum<T: Copy + Into<u64>>(xs: &[T]) -> u64 {
    xs.iter().map(|&x| x.into()).sum()
}

fn main() {}
