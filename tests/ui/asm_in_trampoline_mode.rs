#[altpatch::alternative(popcnt => asm("popcnt rax, rdi"))]
fn count(x: u64) -> u64 {
    x.count_ones() as u64
}

fn main() {}
