#[altpatch::alternative(popcnt => count_fast)]
const fn count(x: u64) -> u64 {
    x.count_ones() as u64
}

fn main() {}
