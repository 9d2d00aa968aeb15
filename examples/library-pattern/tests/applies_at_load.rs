//! The library's sites are patched with no call to `apply_patches()` anywhere: in this test
//! binary (the library's own `cargo test`), in the program, and not with `ALTPATCH=off`.
#![cfg(not(feature = "manual-apply"))]

use std::hint::black_box;
use std::process::Command;

#[test]
fn the_library_runs_patched_in_its_own_tests() {
    // Nothing in this binary calls apply_patches(): the report is the load-time apply's.
    let report = altpatch::applied_report().expect("the sites applied themselves at load");
    assert_eq!(bytestats::which(), 2, "{report}");
    let haystack = [0u8, 1, 0, 2];
    assert_eq!(
        bytestats::count_byte(black_box(&haystack), 0),
        1_000_002,
        "{report}"
    );
    for name in ["which", "count_byte"] {
        let sites: Vec<_> = report.site(name).collect();
        assert!(!sites.is_empty(), "{name}: {report}");
        assert!(sites.iter().all(|s| s.chosen() == "patched"), "{report}");
        assert!(
            sites.iter().all(|s| s.how() != altpatch::How::Unpatched),
            "{report}"
        );
    }
    // The report is what apply_patches() returns, now or later.
    assert!(std::ptr::eq(altpatch::apply_patches(), report));
}

fn run_program(env: &[(&str, &str)]) -> (String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_library-pattern"));
    command.env_remove("ALTPATCH").env_remove("ALTPATCH_LOG");
    for (key, value) in env {
        command.env(key, value);
    }
    let out = command.output().expect("run the program");
    assert!(out.status.success(), "{out:?}");
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn a_program_that_never_applies_runs_the_library_patched() {
    let (stdout, stderr) = run_program(&[]);
    assert!(stdout.contains("which = 2,"), "{stdout}");
    assert!(
        stdout.contains(&format!("count_byte = {}", 1_000_000 + 4096 / 256)),
        "{stdout}"
    );
    assert!(
        stderr.is_empty(),
        "the initializer prints nothing unasked: {stderr}"
    );
    // ALTPATCH_LOG=1 prints the load-time report on stderr, before main prints anything.
    let (_, log) = run_program(&[("ALTPATCH_LOG", "1")]);
    assert!(log.contains("which"), "{log}");
    assert!(log.contains("count_byte"), "{log}");
}

#[test]
fn altpatch_off_leaves_every_site_on_its_default() {
    let (stdout, _) = run_program(&[("ALTPATCH", "off")]);
    assert!(stdout.contains("which = 1,"), "{stdout}");
    assert!(
        stdout.contains(&format!("count_byte = {}\n", 4096 / 256)),
        "{stdout}"
    );
    assert!(stdout.contains("ALTPATCH=off"), "{stdout}");
}
