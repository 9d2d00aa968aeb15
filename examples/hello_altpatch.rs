//! Hello world with one altpatch site (an inline `popcnt`), patched at load: the bench compares
//! this process's CPU time with `hello_plain`'s (`benches/patching.rs`). With `STARTUP_REPORT=1`
//! it prints what the load-time apply took.

#[path = "common/startup_report.rs"]
mod startup_report;

use std::hint::black_box;

#[altpatch::alternative(inline, popcnt => asm("popcnt rax, rdi"))]
fn popcount(x: u64) -> u64 {
    let (mut n, mut v) = (0, x);
    while v != 0 {
        v &= v - 1;
        n += 1;
    }
    n
}

fn main() {
    println!("hello, {} bits", popcount(black_box(0b1011)));
    startup_report::print_if_asked();
}
