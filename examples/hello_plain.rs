//! Hello world without altpatch (nothing here refers to it, so it is not linked): the baseline
//! of `hello_altpatch` in `benches/patching.rs`.

use std::hint::black_box;

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
}
