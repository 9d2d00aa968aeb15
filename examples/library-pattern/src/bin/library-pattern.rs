//! A program using a library with sites, and never calling `apply_patches()`: the sites patched
//! themselves when the program was loaded, before `main`.
//!
//! ```text
//! cargo run --release -p altpatch-library-pattern
//! ALTPATCH=off cargo run --release -p altpatch-library-pattern   # every site on its default
//! ```

use std::hint::black_box;

fn main() {
    // No `altpatch::apply_patches()` here: the report is the load-time apply's.
    match altpatch::applied_report() {
        Some(report) => print!("{report}"),
        None => println!("no apply has run (built with the `manual-apply` feature)"),
    }
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 37) as u8).collect();
    println!(
        "which = {}, count_ones = {}, count_byte = {}",
        bytestats::which(),
        bytestats::count_ones(black_box(&data)),
        bytestats::count_byte(black_box(&data), 0),
    );
}
