#[altpatch::alternative(inline, popcnt => asm("popcnt rax, rdi"))]
fn count(xs: Vec<u64>) -> u64 {
    xs.len() as u64
}

fn main() {}
