fn sum_avx2(xs: &[u32]) -> u32 {
    xs.len() as u32
}

#[altpatch::alternative(avx2 => sum_avx2)]
fn sum(xs: &[u32]) -> u64 {
    xs.len() as u64
}

fn main() {}
