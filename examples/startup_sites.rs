//! A small program with 100 sites (40 inline `popcnt`, 30 direct calls, 20 NOP'd hooks, 10
//! trampolines), patched at load: `benches/patching.rs` spawns it to measure a first apply in a
//! cold process. With `STARTUP_REPORT=1` it prints what the load-time apply took.
//!
//! `cargo run --release --example startup_sites`

#[path = "common/startup_report.rs"]
mod startup_report;

use std::hint::black_box;

fn yes() -> bool {
    true
}

macro_rules! site {
    (inline: $m:ident) => {
        mod $m {
            #[altpatch::alternative(inline, popcnt => asm("popcnt rax, rdi"))]
            pub fn run(x: u64) -> u64 {
                let (mut n, mut v) = (0, x);
                while v != 0 {
                    v &= v - 1;
                    n += 1;
                }
                n
            }
        }
    };
    (call: $m:ident) => {
        mod $m {
            fn fast(x: u64) -> u64 {
                x.count_ones().into()
            }
            #[altpatch::alternative(inline, fast: when = crate::yes => fast)]
            pub fn run(x: u64) -> u64 {
                (0..64).map(|i| x >> i & 1).sum()
            }
        }
    };
    (nop: $m:ident) => {
        mod $m {
            pub static HITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            #[altpatch::alternative(inline, off: when = crate::yes => nop)]
            pub fn hook(x: u64) {
                HITS.fetch_add(x, std::sync::atomic::Ordering::Relaxed);
            }
            pub fn run(x: u64) -> u64 {
                hook(x);
                x.count_ones().into()
            }
        }
    };
    (tramp: $m:ident) => {
        mod $m {
            fn fast(x: u64) -> u64 {
                u64::from(x.count_ones())
            }
            #[altpatch::alternative(fast: when = crate::yes => fast)]
            pub fn run(x: u64) -> u64 {
                (0..64).map(|i| x >> i & 1).sum()
            }
        }
    };
}

macro_rules! sites {
    ($($kind:ident: $m:ident,)*) => {
        $(site!($kind: $m);)*
        /// Runs every site once; each returns the population count of `x`.
        fn run_all(x: u64) -> u64 {
            0 $(+ $m::run(black_box(x)))*
        }
    };
}

sites! {
    inline: m00,
    inline: m01,
    inline: m02,
    inline: m03,
    inline: m04,
    inline: m05,
    inline: m06,
    inline: m07,
    inline: m08,
    inline: m09,
    inline: m10,
    inline: m11,
    inline: m12,
    inline: m13,
    inline: m14,
    inline: m15,
    inline: m16,
    inline: m17,
    inline: m18,
    inline: m19,
    inline: m20,
    inline: m21,
    inline: m22,
    inline: m23,
    inline: m24,
    inline: m25,
    inline: m26,
    inline: m27,
    inline: m28,
    inline: m29,
    inline: m30,
    inline: m31,
    inline: m32,
    inline: m33,
    inline: m34,
    inline: m35,
    inline: m36,
    inline: m37,
    inline: m38,
    inline: m39,
    call: m40,
    call: m41,
    call: m42,
    call: m43,
    call: m44,
    call: m45,
    call: m46,
    call: m47,
    call: m48,
    call: m49,
    call: m50,
    call: m51,
    call: m52,
    call: m53,
    call: m54,
    call: m55,
    call: m56,
    call: m57,
    call: m58,
    call: m59,
    call: m60,
    call: m61,
    call: m62,
    call: m63,
    call: m64,
    call: m65,
    call: m66,
    call: m67,
    call: m68,
    call: m69,
    nop: m70,
    nop: m71,
    nop: m72,
    nop: m73,
    nop: m74,
    nop: m75,
    nop: m76,
    nop: m77,
    nop: m78,
    nop: m79,
    nop: m80,
    nop: m81,
    nop: m82,
    nop: m83,
    nop: m84,
    nop: m85,
    nop: m86,
    nop: m87,
    nop: m88,
    nop: m89,
    tramp: m90,
    tramp: m91,
    tramp: m92,
    tramp: m93,
    tramp: m94,
    tramp: m95,
    tramp: m96,
    tramp: m97,
    tramp: m98,
    tramp: m99,
}

fn main() {
    let total = run_all(black_box(0xff));
    assert_eq!(total, 800);
    startup_report::print_if_asked();
}
