//! A site whose bytes are not what its record says is refused (and keeps running what it ran);
//! the other copies of the same site are patched.

mod common;

use std::hint::black_box;
use std::os::unix::fs::FileExt;

use altpatch::{Feature, How, Patcher};
use common::*;

// Two functions, each holding a copy of the `mix` site. Their bodies differ (`black_box(0)`
// is opaque to the optimizer), so a release build cannot merge them into one function with one
// site (rustc merges identical functions by default).
#[inline(never)]
fn call_a(x: u64) -> u64 {
    mix(x)
}

#[inline(never)]
fn call_b(x: u64) -> u64 {
    mix(x) + black_box(0)
}

/// What the altered copy of the site calls instead: not one of its candidates.
extern "sysv64" fn intruder(x: u64) -> u64 {
    x + 7
}

/// The site copy inside `f` (the closest record after the function's entry).
fn copy_in(f: fn(u64) -> u64) -> usize {
    let entry = f as usize;
    altpatch::__private::records()
        .iter()
        .map(|r| r.site_addr())
        .filter(|&a| a >= entry)
        .min()
        .expect("a site after the function entry")
}

#[test]
fn altered_site_is_refused_and_the_others_are_patched() {
    let _lock = patch_lock();
    let altered = copy_in(call_a);
    let intact = copy_in(call_b);
    assert_ne!(
        call_a as *const () as usize, call_b as *const () as usize,
        "the fixtures were merged into one function"
    );
    assert_ne!(altered, intact, "the two functions share one site copy");

    // Somebody else (a debugger, another patcher) rewrote copy A to call `intruder`.
    let rel = (intruder as *const () as usize as i64 - (altered as i64 + 5)) as i32;
    let mut call = vec![0xe8];
    call.extend_from_slice(&rel.to_le_bytes());
    let mem = std::fs::File::options()
        .write(true)
        .open("/proc/self/mem")
        .unwrap();
    mem.write_all_at(&call, altered as u64).unwrap();
    assert_eq!(call_a(black_box(10)), 17);

    let report = Patcher::new().cpu(cpu_with(&[Feature::Avx2])).apply();
    let a = report.sites.iter().find(|s| s.addr() == altered).unwrap();
    let b = report.sites.iter().find(|s| s.addr() == intact).unwrap();
    // Neither the default nor any candidate: what runs there is not altpatch's to say.
    assert_eq!((a.how(), a.chosen()), (How::Unknown, "?"), "{report}");
    assert!(!a.written());
    assert!(a.why().contains("none of its candidates"), "{}", a.why());
    assert_eq!(b.how(), How::Call, "{report}");
    assert!(b.written());

    // A still runs the intruder (nothing was written over it); B runs the avx2 candidate.
    assert_eq!(call_a(black_box(10)), 17);
    assert_eq!(call_b(black_box(10)), mix_expected("avx2", 10));
    // SAFETY: reading this program's own text.
    let now = unsafe { std::slice::from_raw_parts(altered as *const u8, 5) };
    assert_eq!(now, &call[..]);
}
