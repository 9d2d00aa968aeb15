//! A mistake in `ALTPATCH` is printed to stderr once, at apply, even without `ALTPATCH_LOG`
//! (nobody sets `ALTPATCH` by accident); `ALTPATCH_LOG` takes the usual words for off. Each case
//! runs in a child process, since `apply_patches()` reads the environment once per process.

mod common;

use common::*;

#[test]
#[ignore = "entry point of the child processes the other tests start"]
fn child_entry() {
    if std::env::var_os("ALTPATCH_TEST_CHILD").is_none() {
        return;
    }
    assert_eq!(mix(std::hint::black_box(2)), 6);
    let report = altpatch::apply_patches();
    altpatch::apply_patches();
    let _ = altpatch::try_apply_patches();
    println!("ERROR={}", report.error.is_some());
}

/// The child's stderr with `ALTPATCH=altpatch` and `ALTPATCH_LOG=log` (unset if `None`).
fn stderr_of(altpatch: &str, log: Option<&str>) -> String {
    let mut env = vec![("ALTPATCH_TEST_CHILD", "1"), ("ALTPATCH", altpatch)];
    env.extend(log.map(|log| ("ALTPATCH_LOG", log)));
    run_child_entry(&env).1
}

const TYPO: &str = "mix=natve";

fn error_line() -> String {
    "ALTPATCH: site \"override_error_on_stderr::common::mix\" has no candidate \"natve\"; its \
     candidates: default, avx2, bmi2; nothing patched"
        .to_owned()
}

#[test]
fn an_error_is_printed_once_without_the_log() {
    for log in [
        None,
        Some(""),
        Some("0"),
        Some("false"),
        Some("no"),
        Some("off"),
        Some("OFF"),
    ] {
        let stderr = stderr_of(TYPO, log);
        let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("ALTPATCH")).collect();
        assert_eq!(lines, [error_line()], "ALTPATCH_LOG={log:?}: {stderr}");
        assert!(
            !stderr.contains("altpatch: "),
            "no report with the log off: {stderr}"
        );
    }
}

#[test]
fn with_the_log_the_report_carries_the_error_once() {
    let stderr = stderr_of(TYPO, Some("1"));
    assert!(stderr.starts_with("altpatch: "), "{stderr}");
    let says = "has no candidate \"natve\"";
    assert_eq!(stderr.matches(says).count(), 1, "{stderr}");
}

#[test]
fn a_valid_value_prints_nothing() {
    for value in ["", "mix=bmi2", "off"] {
        let stderr = stderr_of(value, None);
        assert!(!stderr.contains("ALTPATCH"), "ALTPATCH={value:?}: {stderr}");
    }
}
