//! After apply, each site's bytes, read back and decoded, are the chosen candidate: a direct
//! `call` to it, its inline instructions, or NOPs; and the function returns that candidate's
//! result.

mod common;

use altpatch::{Feature, How, Patcher};
use common::*;
use iced_x86::Mnemonic;
use std::hint::black_box;

#[test]
fn every_candidate_of_a_three_way_site_through_a_faked_cpu() {
    let _lock = patch_lock();
    let cases: [(&[Feature], &str); 4] = [
        (&[Feature::Avx2, Feature::Bmi2], "avx2"), // first that holds wins
        (&[Feature::Bmi2], "bmi2"),
        (&[], "default"),
        (&[Feature::Avx2], "avx2"),
    ];
    for (features, expected) in cases {
        let report = Patcher::new().cpu(cpu_with(features)).apply();
        let x = black_box(41);
        assert_eq!(mix(x), mix_expected(expected, x), "{features:?}");
        let copies: Vec<_> = report.site("mix").collect();
        assert!(!copies.is_empty(), "{report}");
        for site in copies {
            assert_eq!(site.chosen(), expected, "{report}");
            let instrs = decode_site(site);
            match expected {
                "avx2" | "default" => {
                    assert_eq!(instrs[0].mnemonic(), Mnemonic::Call);
                    assert_eq!(
                        instrs[0].near_branch_target(),
                        candidate_call_target(site, expected)
                    );
                    assert!(rest_is_filler(&instrs, 1), "{instrs:?}");
                }
                "bmi2" => {
                    assert_eq!(site.how(), How::Inline);
                    assert_eq!(instrs[0].mnemonic(), Mnemonic::Lea);
                    assert!(rest_is_filler(&instrs, 1), "{instrs:?}");
                }
                _ => unreachable!(),
            }
        }
    }
}

#[test]
fn a_nop_candidate_leaves_only_nops() {
    let _lock = patch_lock();
    let report = Patcher::new().cpu(cpu_with(&[Feature::Avx2])).apply();
    let before = HOOK_TOTAL.load(std::sync::atomic::Ordering::SeqCst);
    hook(black_box(5));
    assert_eq!(
        HOOK_TOTAL.load(std::sync::atomic::Ordering::SeqCst),
        before,
        "the hook ran after being NOP'd"
    );
    for site in report.site("hook") {
        assert_eq!(site.how(), How::Nop);
        let instrs = decode_site(site);
        assert!(
            instrs.iter().all(|i| i.mnemonic() == Mnemonic::Nop),
            "{instrs:?}"
        );
        assert_eq!(instrs.iter().map(|i| i.len()).sum::<usize>(), site.len());
        assert_eq!(instrs.len(), 1, "a 5-byte site is one 5-byte NOP");
    }
    // And back: the default call is restored.
    let report = Patcher::new().cpu(cpu_with(&[])).apply();
    hook(black_box(5));
    assert_eq!(
        HOOK_TOTAL.load(std::sync::atomic::Ordering::SeqCst),
        before + 5
    );
    for site in report.site("hook") {
        let instrs = decode_site(site);
        assert_eq!(
            instrs[0].near_branch_target(),
            candidate_call_target(site, "default")
        );
    }
}

#[test]
fn sites_sharing_a_name_take_one_choice_and_keep_their_predicate_text() {
    let _lock = patch_lock();
    // `loud` needs avx2 to be forced (its instructions could use it); `quiet` holds here, so the
    // choice is what makes both copies `loud`.
    let report = Patcher::new()
        .cpu(cpu_with(&[Feature::Avx2]))
        .overrides_str("shared_hook=loud")
        .apply();
    let shared: Vec<_> = report.site("shared_hook").collect();
    assert_eq!(shared.len(), 2, "{report}");
    assert!(
        shared
            .iter()
            .all(|s| s.chosen() == "loud" && s.how() == How::Nop),
        "{report}"
    );
    let before = HOOK_TOTAL.load(std::sync::atomic::Ordering::SeqCst);
    shared_hook_a(black_box(1));
    shared_hook_b(black_box(1));
    assert_eq!(
        HOOK_TOTAL.load(std::sync::atomic::Ordering::SeqCst),
        before,
        "both are NOPs"
    );
    let record = altpatch::__private::records()
        .iter()
        .find(|r| r.site_addr() == shared[0].addr())
        .unwrap();
    let texts: Vec<_> = record
        .descriptor()
        .candidates
        .iter()
        .map(|c| c.predicate_text)
        .collect();
    assert_eq!(
        texts,
        ["always", "not(hypervisor)", "all(avx2, not(avx512f))"]
    );
    for c in record.descriptor().candidates {
        assert_eq!(
            c.predicate.to_string(),
            c.predicate_text,
            "Display and source text agree"
        );
    }
}

#[test]
fn slices_and_references_pass_through_a_call_site() {
    let _lock = patch_lock();
    let xs = [1u32, 2, 3, 4];
    for (features, extra) in [(&[Feature::Avx2][..], 1), (&[][..], 0)] {
        let report = Patcher::new().cpu(cpu_with(features)).apply();
        assert!(report.site("weigh").count() > 0, "{report}");
        let mut len = 0;
        assert_eq!(weigh(black_box(&xs), black_box(&10), &mut len), 100 + extra);
        assert_eq!(len, 4);
    }
}

#[test]
fn a_bare_hypervisor_predicate_selects_in_a_vm_only() {
    let _lock = patch_lock();
    let kvm = altpatch::Cpu::from_source(&altpatch::FakeCpuid::new().with_kvm(0x4000_0000, 0, 0));
    let report = Patcher::new().cpu(kvm).apply();
    assert!(
        report
            .site("bare_metal_only_hook")
            .all(|s| s.chosen() == "in_vm" && s.how() == How::Nop),
        "{report}"
    );
    let report = Patcher::new().cpu(cpu_with(&[])).apply();
    assert!(
        report
            .site("bare_metal_only_hook")
            .all(|s| s.chosen() == "default"),
        "{report}"
    );
    bare_metal_only_hook(black_box(0));
}

#[test]
fn a_call_candidate_after_an_inline_one_calls_its_own_target() {
    let _lock = patch_lock();
    // In a child of one thread: back from the 4-byte `lea` to the 5-byte `call` is refused
    // while threads run (one stopped after the `lea` would resume inside the `call`).
    in_forked_child(|| {
        for (features, expected) in [
            (&[Feature::Avx2][..], 7),
            (&[Feature::Bmi2][..], 6),
            (&[][..], 5),
        ] {
            let report = Patcher::new().cpu(cpu_with(features)).apply();
            assert!(!report.stats.live, "{report}");
            assert_eq!(inc_after_asm(black_box(5)), expected, "{features:?}");
        }
    });
}
