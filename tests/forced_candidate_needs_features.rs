//! A forced candidate (`ALTPATCH=site=candidate`) skips its predicate, so one whose predicate
//! needs a CPU feature the CPU lacks, or that `cpu=-` hides, is refused with an error naming the
//! missing features (as `cpu=+` is): forced, it would run instructions the CPU faults on.

mod common;

use altpatch::{Cpu, FakeCpuid, Feature, FeatureSet, OverrideError, Patcher};
use common::*;

/// A CPU from faked CPUID leaves with these features (and the OS state AVX needs).
fn fake_cpu(features: &[Feature]) -> Cpu {
    let set: FeatureSet = features.iter().copied().collect();
    Cpu::from_source(&FakeCpuid::new().with_features(set))
}

#[test]
fn masked_or_absent_features_refuse_a_forced_candidate() {
    let _lock = patch_lock();
    // `mix` is a call site: it exists where it is called (only read back below, never run
    // while a candidate this machine may lack is in place).
    assert_eq!(mix(std::hint::black_box(1)), mix_expected("default", 1));
    let cpu = fake_cpu(&[Feature::Avx, Feature::Avx2, Feature::Bmi2]);
    assert!(cpu.has(Feature::Avx2));

    // Hidden by `cpu=-avx2`: refused, naming the feature; nothing is selected or written.
    let report = Patcher::new()
        .cpu(cpu.clone())
        .overrides_str("cpu=-avx2,mix=avx2")
        .apply();
    let Some(OverrideError::MissingFeatures {
        site,
        candidate,
        missing,
    }) = &report.error
    else {
        panic!("{report}")
    };
    assert_eq!((site.as_str(), candidate.as_str()), (mix_name(), "avx2"));
    assert_eq!(missing, &["avx2"]);
    let message = report.error.as_ref().unwrap().to_string();
    let want = format!(
        "ALTPATCH: {}=avx2 is refused: candidate \"avx2\" needs avx2, which this CPU lacks (or \
         cpu=- hides); forced, it would make the CPU fault on its instructions",
        mix_name()
    );
    assert_eq!(message, want);
    assert!(report.sites.iter().all(|s| !s.written()), "{report}");
    assert_report_matches_bytes(&report);

    // Hiding avx hides avx2 with it.
    let report = Patcher::new()
        .cpu(cpu.clone())
        .overrides_str("cpu=-avx,mix=avx2")
        .apply();
    assert!(
        matches!(&report.error, Some(OverrideError::MissingFeatures { missing, .. }) if missing == &["avx2"]),
        "{report}"
    );

    // A CPU without the feature at all.
    let report = Patcher::new()
        .cpu(fake_cpu(&[Feature::Bmi2]))
        .overrides_str("mix=avx2")
        .apply();
    assert!(
        matches!(&report.error, Some(OverrideError::MissingFeatures { .. })),
        "{report}"
    );

    // With the feature present the same choice is made and written.
    let report = Patcher::new()
        .cpu(cpu)
        .overrides_str("cpu=-bmi2,mix=avx2")
        .apply();
    assert!(report.error.is_none(), "{report}");
    assert!(report.site("mix").all(|s| s.chosen() == "avx2"), "{report}");
    assert_report_matches_bytes(&report);
}

fn mix_name() -> &'static str {
    "forced_candidate_needs_features::common::mix"
}
