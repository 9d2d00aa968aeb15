//! Selection of the `pv_lock` sites: native on bare metal and under KVM with
//! `KVM_HINTS_REALTIME`, futex under any other hypervisor, and overrides (`ALTPATCH`, the API)
//! above both. The three op sites share one name and one candidate list, so one choice covers
//! them all.
#![cfg(not(loom))]

mod common;

use std::process::Command;

use altpatch::{Cpu, Patcher};
use altpatch_sites::TicketMutex;
use altpatch_sites::pv::{self, PvLock};
use common::*;

/// Uses the lock, so this binary contains the `pv_lock` sites.
fn use_the_lock() -> u64 {
    let m = TicketMutex::new(1u64);
    *m.lock() += 1;
    m.into_inner()
}

fn selected(cpu: Cpu) -> (Option<PvLock>, Vec<String>) {
    assert_eq!(use_the_lock(), 2);
    let report = Patcher::new().cpu(cpu).apply();
    assert!(report.error.is_none(), "{report}");
    let whys = report.site(pv::SITE).map(|s| s.why().to_string()).collect();
    (pv::chosen(&report), whys)
}

#[test]
fn bare_metal_selects_native() {
    let _lock = patch_lock();
    let (chosen, whys) = selected(bare_metal());
    assert_eq!(chosen, Some(PvLock::Native));
    assert!(
        whys.iter()
            .all(|w| w.starts_with("any(not(hypervisor), kvm_hints_realtime) holds")),
        "{whys:?}"
    );
}

#[test]
fn kvm_promising_realtime_vcpus_selects_native() {
    let _lock = patch_lock();
    assert_eq!(selected(kvm(1)).0, Some(PvLock::Native));
    // Other hint bits alone do not count.
    assert_eq!(selected(kvm(0b10)).0, Some(PvLock::Futex));
}

#[test]
fn any_other_hypervisor_selects_futex() {
    let _lock = patch_lock();
    let (chosen, whys) = selected(kvm(0));
    assert_eq!(chosen, Some(PvLock::Futex));
    assert!(
        whys.iter()
            .all(|w| w.starts_with("all(hypervisor, not(kvm_hints_realtime)) holds")),
        "{whys:?}"
    );
    for signature in [
        b"XenVMMXenVMM",
        b"Microsoft Hv",
        b"VMwareVMware",
        b"SomethingNew",
    ] {
        assert_eq!(
            selected(other_hypervisor(signature)).0,
            Some(PvLock::Futex),
            "{signature:?}"
        );
    }
}

#[test]
fn overrides_beat_selection_and_sched_yield_needs_one() {
    let _lock = patch_lock();
    use_the_lock();
    for cpu in [bare_metal(), kvm(0), kvm(1)] {
        assert_ne!(selected(cpu.clone()).0, Some(PvLock::SchedYield));
        for variant in PvLock::ALL {
            let report = Patcher::new()
                .cpu(cpu.clone())
                .overrides_str(&format!("pv_lock={}", variant.name()))
                .apply();
            assert_eq!(pv::chosen(&report), Some(variant), "{report}");
            assert!(
                report
                    .site(pv::SITE)
                    .all(|s| s.why().starts_with("forced by ALTPATCH")),
                "{report}"
            );
        }
    }
}

#[test]
fn force_applies_each_variant_and_reports_it() {
    let _lock = patch_lock();
    use_the_lock();
    for variant in PvLock::ALL {
        let report = force(variant);
        assert!(report.site(pv::SITE).count() >= 3, "{report}");
        assert_eq!(use_the_lock(), 2, "the lock works under {variant}");
    }
}

#[test]
fn the_three_op_sites_share_one_candidate_table() {
    let _lock = patch_lock();
    use_the_lock();
    let descriptors: Vec<_> = altpatch::__private::records()
        .iter()
        .map(|r| r.descriptor())
        .filter(|d| d.name == pv::SITE)
        .collect();
    let table = |d: &altpatch::__private::SiteDescriptor| -> Vec<(&str, &str)> {
        d.candidates
            .iter()
            .map(|c| (c.name, c.predicate_text))
            .collect()
    };
    let first = table(descriptors[0]);
    assert_eq!(
        first,
        [
            ("default", "always"),
            ("futex", "all(hypervisor, not(kvm_hints_realtime))"),
            ("sched_yield", "when = only_if_forced"),
            ("native", "any(not(hypervisor), kvm_hints_realtime)"),
        ]
    );
    for d in &descriptors {
        assert_eq!(table(d), first, "{}:{}", d.file, d.line);
    }
    // The ticket lock's lock_spinning, unlock_kick and unlock are all in this binary (the
    // hybrid lock's sites, in `pvlock.rs`, may be too where the build keeps them).
    let lines: std::collections::BTreeSet<u32> = descriptors
        .iter()
        .filter(|d| d.file.ends_with("/pv.rs"))
        .map(|d| d.line)
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
}

/// `ALTPATCH` in the environment: read once per process, so each value runs in a child.
fn child(value: &str) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_entry",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("ALTPATCH", value)
        .env("ALTPATCH_SITES_CHILD", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "entry point of the child processes started by altpatch_env_var_forces_the_variant"]
fn child_entry() {
    if std::env::var_os("ALTPATCH_SITES_CHILD").is_none() {
        return;
    }
    assert_eq!(use_the_lock(), 2);
    let report = altpatch::apply_patches();
    match &report.error {
        Some(e) => println!("ERROR={e}"),
        None => println!("CHOSEN={:?}", pv::chosen(report)),
    }
    assert_eq!(use_the_lock(), 2);
}

#[test]
fn altpatch_env_var_forces_the_variant() {
    for variant in PvLock::ALL {
        let out = child(&format!("pv_lock={}", variant.name()));
        assert!(out.contains(&format!("CHOSEN=Some({variant:?})")), "{out}");
    }
    let out = child("pv_lock=spin_forever");
    assert!(out.contains("ERROR="), "{out}");
    for name in ["default", "futex", "sched_yield", "native"] {
        assert!(out.contains(name), "the error names {name}: {out}");
    }
}
