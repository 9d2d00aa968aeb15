//! Regression: a live rewrite must not move the places a thread may stand in a site. A thread
//! inside the default's `call` returns to the byte after it; if the new bytes put the middle of
//! an instruction there, it runs garbage (here, `add [rax], al` with `rax` = the result: a crash).
//! Where the new instructions end by that byte, the filler from it on stays as it was; where they
//! do not, the live write is refused and the site keeps its call.

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};

use altpatch::Patcher;
use common::*;
use iced_x86::{Decoder, DecoderOptions, Mnemonic};

static INSIDE: AtomicBool = AtomicBool::new(false);
static RELEASE: AtomicBool = AtomicBool::new(false);

/// Call site of 10 bytes: `call` (5) and padding; `short` is 3 bytes, `long` 10.
#[altpatch::alternative(inline,
    short: bmi2 => asm("lea eax, [rdi + 1]"),
    long: avx2 => asm("movabs rax, 0x1122334455667788"))]
fn parked(x: u64) -> u64 {
    INSIDE.store(true, Ordering::SeqCst);
    while !RELEASE.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    x
}

/// Runs `parked(41)` on a thread, calls `patch` while that thread waits inside the default's
/// call, then lets it return; returns what it returned.
fn with_a_thread_inside(patch: impl FnOnce()) -> u64 {
    INSIDE.store(false, Ordering::SeqCst);
    RELEASE.store(false, Ordering::SeqCst);
    std::thread::scope(|s| {
        let inside = s.spawn(|| parked(black_box(41)));
        while !INSIDE.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        patch();
        RELEASE.store(true, Ordering::SeqCst);
        inside.join().expect("the thread inside the site returned")
    })
}

fn site_bytes(report: &altpatch::Report) -> (usize, Vec<u8>) {
    let site = report.site("parked").next().expect("parked has a site");
    // SAFETY: the report's address and length describe a site in this program's mapped text.
    let bytes = unsafe { std::slice::from_raw_parts(site.addr() as *const u8, site.len()) };
    (site.addr(), bytes.to_vec())
}

#[test]
fn a_thread_returning_into_a_rewritten_site_lands_on_filler() {
    let _lock = patch_lock();

    // Longer than the call: refused while a thread may return into it.
    let mut refused = None;
    let got = with_a_thread_inside(|| {
        refused = Some(Patcher::new().overrides_str("parked=long").apply());
    });
    let refused = refused.unwrap();
    assert_eq!(got, 41, "the default ran to its end");
    assert!(refused.stats.live || refused.site("parked").all(|s| !s.written()));
    let site = refused.site("parked").next().unwrap();
    assert!(!site.written(), "{refused}");
    assert!(site.why().contains("resume at byte 5"), "{}", site.why());
    let (addr, bytes) = site_bytes(&refused);
    let call = Decoder::with_ip(64, &bytes, addr as u64, DecoderOptions::NONE).decode();
    assert_eq!(call.mnemonic(), Mnemonic::Call, "{bytes:02x?}");

    // Shorter than the call: written, and the thread returns onto the filler it left.
    let mut written = None;
    let got = with_a_thread_inside(|| {
        written = Some(Patcher::new().overrides_str("parked=short").apply());
    });
    let written = written.unwrap();
    assert!(written.stats.live, "the harness and the parked thread run");
    assert!(written.site("parked").all(|s| s.written()), "{written}");
    assert_eq!(got, 41, "returned from the default's call onto filler");
    assert_eq!(parked(41), 42, "new callers run the 3-byte `lea`");
    let (addr, bytes) = site_bytes(&written);
    let instrs: Vec<_> = Decoder::with_ip(64, &bytes, addr as u64, DecoderOptions::NONE)
        .into_iter()
        .collect();
    assert_eq!(instrs[0].mnemonic(), Mnemonic::Lea, "{bytes:02x?}");
    let boundaries: Vec<u64> = instrs.iter().map(|i| i.ip() - addr as u64).collect();
    assert!(
        boundaries.contains(&5),
        "an instruction starts at byte 5: {bytes:02x?}"
    );
    assert!(
        instrs[1..].iter().all(|i| i.mnemonic() == Mnemonic::Nop),
        "filler after the lea: {bytes:02x?}"
    );
}
