//! `apply_patches()` runs once per process: later and concurrent calls get the same report, and
//! a second apply writes nothing.

mod common;

use std::hint::black_box;

use altpatch::Patcher;
use common::*;

fn site_bytes(report: &altpatch::Report) -> Vec<Vec<u8>> {
    // SAFETY: reading this program's own text at the report's sites.
    report
        .sites
        .iter()
        .map(|s| unsafe { std::slice::from_raw_parts(s.addr() as *const u8, s.len()) }.to_vec())
        .collect()
}

#[test]
fn concurrent_callers_share_one_apply_and_a_second_apply_writes_nothing() {
    let _lock = patch_lock();
    let reports: Vec<usize> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let r = altpatch::apply_patches();
                    assert_eq!(
                        mix(black_box(9)),
                        mix_expected(r.site("mix").next().unwrap().chosen(), 9)
                    );
                    r as *const altpatch::Report as usize
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        reports.windows(2).all(|w| w[0] == w[1]),
        "one report for every caller"
    );
    let first = altpatch::apply_patches();
    assert_eq!(first as *const _ as usize, reports[0]);
    assert!(std::ptr::eq(altpatch::applied_report().unwrap(), first));

    let before = site_bytes(first);
    let second = Patcher::from_env().apply();
    assert_eq!(
        site_bytes(&second),
        before,
        "the second apply changed bytes"
    );
    assert!(second.sites.iter().all(|s| !s.written()), "{second}");
    assert_eq!(second.stats.pages, 0);
    assert_eq!(second.stats.serializations, 0);
    for (a, b) in first.sites.iter().zip(&second.sites) {
        assert_eq!(
            (a.addr(), a.chosen(), a.how()),
            (b.addr(), b.chosen(), b.how())
        );
    }
}
