//! A tracing toggle as a static key, flipped at run time while worker threads run its branch.
//! Disabled, the branch is one 5-byte NOP in each worker's loop; enabled, one `jmp`.
//!
//! ```text
//! cargo run --release --example static_keys
//! ```

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

static TRACE: altpatch::StaticKey = altpatch::StaticKey::new(false);
static TRACED: AtomicU64 = AtomicU64::new(0);

/// The hot function: a branch to the tracing code that costs nothing while tracing is off.
#[inline(never)]
pub fn process(x: u64) -> u64 {
    if altpatch::static_branch_unlikely!(TRACE) {
        TRACED.fetch_add(1, Ordering::Relaxed);
    }
    x.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17)
}

fn branch_bytes(report: &altpatch::Report) -> String {
    let Some(site) = report.site("TRACE").next() else {
        return "no site".into();
    };
    // SAFETY: the report's address and length are a site in this program's text.
    let bytes = unsafe { std::slice::from_raw_parts(site.addr() as *const u8, site.len()) };
    let mut formatter = IntelFormatter::new();
    let mut text = Vec::new();
    for instr in Decoder::with_ip(64, bytes, site.addr() as u64, DecoderOptions::NONE).iter() {
        let mut s = String::new();
        formatter.format(&instr, &mut s);
        text.push(s);
    }
    format!("{bytes:02x?} = {}", text.join("; "))
}

fn main() {
    let report = altpatch::apply_patches();
    let stop = AtomicBool::new(false);
    let calls = AtomicU64::new(0);
    // Calls each worker has finished: a call already past the branch when `set` returns finishes
    // its trace after; waiting for two more calls of every worker waits for it.
    let finished = [AtomicU64::new(0), AtomicU64::new(0)];
    std::thread::scope(|s| {
        for (t, finished) in finished.iter().enumerate() {
            let (stop, calls) = (&stop, &calls);
            s.spawn(move || {
                let (mut n, mut acc) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    acc ^= process(black_box(n + t as u64));
                    n += 1;
                    finished.store(n, Ordering::Release);
                }
                calls.fetch_add(n, Ordering::Relaxed);
                black_box(acc);
            });
        }
        for phase in 0..4 {
            let on = phase % 2 == 1;
            let update = TRACE.set(on).expect("the trace key toggles");
            let seen = finished.each_ref().map(|f| f.load(Ordering::Acquire));
            while finished
                .iter()
                .zip(seen)
                .any(|(f, n)| f.load(Ordering::Acquire) < n + 2)
            {
                std::thread::yield_now();
            }
            let before = TRACED.load(Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(100));
            let traced = TRACED.load(Ordering::Relaxed) - before;
            println!(
                "trace {:<3}: {:>9} traced calls in 100 ms; {} site(s) rewritten; branch: {}",
                if on { "on" } else { "off" },
                traced,
                update.written,
                branch_bytes(report)
            );
            if !on {
                // Disabled: no call that reaches the branch after `set` returned is traced.
                assert_eq!(traced, 0);
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    println!("{} calls in all", calls.load(Ordering::Relaxed));
}
