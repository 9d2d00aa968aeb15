//! With the `serde` feature, the report is data: every site with its choice and reason, the CPU,
//! the statistics (`cargo test --features serde --test report_serde`).

#![cfg(feature = "serde")]

mod common;

use altpatch::{Feature, Patcher};
use common::*;

#[test]
fn the_report_serializes_every_site() {
    let _lock = patch_lock();
    let report = Patcher::new().cpu(cpu_with(&[Feature::Avx2])).apply();
    assert_eq!(mix(std::hint::black_box(1)), mix_expected("avx2", 1));
    let json = serde_json::to_value(&report).unwrap();
    let sites = json["sites"].as_array().unwrap();
    assert_eq!(sites.len(), report.sites.len());
    let mix = sites
        .iter()
        .find(|s| s["name"].as_str().unwrap().ends_with("::mix"))
        .unwrap();
    assert_eq!(mix["chosen"], "avx2");
    assert_eq!(mix["how"], "call");
    assert_eq!(mix["kind"], "call_site");
    assert_eq!(
        mix["candidates"],
        serde_json::json!(["default", "avx2", "bmi2"])
    );
    assert_eq!(json["cpu"]["features"], serde_json::json!(["avx2"]));
    assert_eq!(json["error"], serde_json::Value::Null);
    let broken = Patcher::new().overrides_str("mix=nope").apply();
    let json = serde_json::to_value(&broken).unwrap();
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("has no candidate \"nope\""),
        "{json}"
    );
}
