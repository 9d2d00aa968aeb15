//! Every candidate of every site in the examples, forced once through the API, gives the right
//! result.

mod common;

#[allow(dead_code)]
#[path = "../examples/dispatch.rs"]
mod dispatch;

use std::hint::black_box;

use altpatch::Patcher;
use common::patch_lock;

#[test]
fn every_dispatch_candidate_gives_the_same_answers() {
    let _lock = patch_lock();
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 13 + 5) as u8).collect();
    let xs: Vec<u32> = (0..5000).collect();
    // CRC-32C of "123456789" is the standard check value 0xe3069283.
    let check = b"123456789";
    for choice in [
        "popcount=default,crc32c=default,sum=default",
        "popcount=popcnt,crc32c=sse4_2,sum=avx2",
    ] {
        let report = Patcher::new().overrides_str(choice).apply();
        assert!(report.error.is_none(), "{report}");
        for name in ["popcount", "crc32c", "sum"] {
            let forced = choice
                .split(',')
                .find_map(|c| c.strip_prefix(&format!("{name}=")))
                .unwrap();
            assert!(report.site(name).count() > 0, "{name}: {report}");
            assert!(report.site(name).all(|s| s.chosen() == forced), "{report}");
        }
        assert_eq!(
            dispatch::popcount(black_box(0xff00_ff00_f0f0)),
            24,
            "{choice}"
        );
        assert_eq!(
            dispatch::crc32c(0, black_box(check)),
            0xe306_9283,
            "{choice}"
        );
        let reference = !data.iter().fold(!0u32, |c, &b| {
            (0..8).fold(c ^ u32::from(b), |c, _| {
                (c >> 1) ^ (0x82f6_3b78 & (c & 1).wrapping_neg())
            })
        });
        assert_eq!(dispatch::crc32c(0, black_box(&data)), reference, "{choice}");
        assert_eq!(dispatch::sum(black_box(&xs)), 5000 * 4999 / 2, "{choice}");
    }
}
