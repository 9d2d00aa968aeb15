//! `ALTPATCH` in the environment: each candidate forced, `off`, `cpu=` masking, and a clear error
//! for every malformed value. Each value runs in a child process, since `apply_patches()` reads
//! the environment once per process.

mod common;

use std::hint::black_box;

use common::*;

/// Runs `child_entry` in a child process with `ALTPATCH=value`; returns its stdout.
fn run_child(value: &str) -> String {
    run_child_with(value, &[]).0
}

/// `run_child` with more environment variables; returns stdout and stderr.
fn run_child_with(value: &str, env: &[(&str, &str)]) -> (String, String) {
    let mut all = vec![("ALTPATCH", value), ("ALTPATCH_TEST_CHILD", "1")];
    all.extend_from_slice(env);
    run_child_entry(&all)
}

fn line<'a>(stdout: &'a str, key: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.split_once(key).map(|(_, v)| v))
        .unwrap_or_else(|| panic!("no {key} line in:\n{stdout}"))
}

#[test]
#[ignore = "entry point of the child processes the other tests start"]
fn child_entry() {
    if std::env::var_os("ALTPATCH_TEST_CHILD").is_none() {
        return;
    }
    let result = altpatch::try_apply_patches();
    let report = altpatch::apply_patches();
    match result {
        Ok(_) => println!("ERROR=none"),
        Err(e) => println!("ERROR={e}"),
    }
    let chosen: Vec<_> = report.site("mix").map(|s| (s.chosen(), s.how())).collect();
    let (name, how) = chosen[0];
    assert!(
        chosen.iter().all(|c| *c == (name, how)),
        "every copy agrees"
    );
    println!("CHOSEN={name}");
    println!("HOW={how}");
    println!("PATCHED={}", report.patched());
    println!("DISABLED={}", report.disabled.as_deref().unwrap_or("no"));
    let x = black_box(100);
    let running = if how == altpatch::How::Unpatched {
        "default"
    } else {
        name
    };
    assert_eq!(mix(x), mix_expected(running, x), "mix runs {running}");
    println!("CPU_HAS_AVX2={}", report.cpu.has(altpatch::Feature::Avx2));
}

#[test]
fn each_candidate_forced_through_the_environment() {
    for (value, chosen, how) in [
        ("mix=avx2", "avx2", "call"),
        ("mix=bmi2", "bmi2", "inline"),
        ("mix=default", "default", "unpatched"),
        ("common::mix=bmi2", "bmi2", "inline"),
    ] {
        let out = run_child(value);
        assert_eq!(line(&out, "ERROR="), "none");
        assert_eq!(line(&out, "CHOSEN="), chosen, "{value}");
        assert_eq!(line(&out, "HOW="), how, "{value}");
    }
}

#[test]
fn off_patches_nothing() {
    let out = run_child("off");
    assert_eq!(line(&out, "PATCHED="), "0");
    assert_eq!(line(&out, "HOW="), "unpatched");
    assert_eq!(line(&out, "DISABLED="), "ALTPATCH=off");
}

#[test]
fn cpu_masking_hides_features_from_selection() {
    let out = run_child("cpu=-avx2");
    assert_eq!(line(&out, "CPU_HAS_AVX2="), "false");
    assert_ne!(line(&out, "CHOSEN="), "avx2");
}

#[test]
fn malformed_values_are_clear_errors_and_patch_nothing() {
    for (value, expect) in [
        ("avx2", "expected `off`, `cpu=-FEATURE` or `SITE=CANDIDATE`"),
        ("mix=", "malformed"),
        ("cpu=-avx3", "unknown feature \"avx3\""),
        ("cpu=+avx2", "forcing"),
        ("nosuchsite=avx2", "unknown site \"nosuchsite\""),
        (
            "mix=avx9",
            "has no candidate \"avx9\"; its candidates: default, avx2, bmi2",
        ),
    ] {
        let out = run_child(value);
        let error = line(&out, "ERROR=");
        assert!(error.starts_with("ALTPATCH: "), "{value}: {error}");
        assert!(error.contains(expect), "ALTPATCH={value}: {error}");
        assert_eq!(line(&out, "PATCHED="), "0", "{value}");
        assert!(
            line(&out, "DISABLED=").contains("configuration error"),
            "{value}"
        );
    }
    // The site list names the program's sites.
    let out = run_child("nosuchsite=x");
    assert!(line(&out, "ERROR=").contains("env_overrides::common::mix"));
}

#[test]
fn altpatch_log_prints_the_report_at_apply() {
    let (_, quiet) = run_child_with("mix=bmi2", &[]);
    assert!(!quiet.contains("altpatch:"), "{quiet}");
    let (_, logged) = run_child_with("mix=bmi2", &[("ALTPATCH_LOG", "1")]);
    assert!(logged.starts_with("altpatch: "), "{logged}");
    assert!(logged.contains("env_overrides::common::mix"), "{logged}");
    assert!(logged.contains("forced by ALTPATCH"), "{logged}");
}
