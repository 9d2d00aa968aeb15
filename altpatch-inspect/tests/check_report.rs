//! `--check-report`: the sites listed from the file must be those of the report the same binary
//! printed at run time, by name and file:line with multiplicity, all shifted by one load base.

mod common;

use std::ffi::OsStr;

use common::*;

/// This binary's report (as `ALTPATCH_LOG=1` prints it) in a temp file, with `edit` applied to
/// its lines.
fn report_file(name: &str, edit: impl FnOnce(&mut Vec<String>)) -> TempPath {
    exercise();
    let mut lines: Vec<String> = altpatch::apply_patches()
        .to_string()
        .lines()
        .map(str::to_string)
        .collect();
    edit(&mut lines);
    let path = TempPath::new(name);
    std::fs::write(&path.0, lines.join("\n") + "\n").unwrap();
    path
}

/// Index of the report line of the first `popcount` site.
fn popcount_line(lines: &[String]) -> usize {
    lines
        .iter()
        .position(|l| l.starts_with("check_report::common::popcount "))
        .expect("a popcount line in the report")
}

fn check(report: &TempPath, json: bool) -> std::process::Output {
    let mut args = vec![OsStr::new("--check-report"), report.0.as_os_str()];
    if json {
        args.push(OsStr::new("--json"));
    }
    let binary = this_binary();
    args.push(binary.as_os_str());
    tool(&args)
}

#[test]
fn the_report_of_the_same_binary_matches() {
    let report = report_file("same", |_| {});
    let out = check(&report, true);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{json:#}");
    let c = &json["check"];
    assert_eq!(c["ok"], true, "{c:#}");
    assert!(c["report_sites"].as_u64().unwrap() >= 5, "{c:#}");
    assert_eq!(c["report_sites"], c["listed_sites"]);
    assert_eq!(c["load_base"], load_base(), "{c:#}");

    let text = stdout(&check(&report, false));
    assert!(text.contains("they match"), "{text}");
}

#[test]
fn a_site_missing_from_the_report_is_a_mismatch() {
    let report = report_file("dropped", |lines| {
        lines.remove(popcount_line(lines));
    });
    let out = check(&report, true);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{json:#}");
    let c = &json["check"];
    assert_eq!(c["ok"], false);
    let missing = c["missing_from_report"].as_array().unwrap();
    assert_eq!(missing.len(), 1, "{c:#}");
    let key = missing[0].as_str().unwrap();
    assert!(
        key.starts_with("check_report::common::popcount altpatch-inspect/tests/common/mod.rs:"),
        "{key}"
    );
    assert_eq!(c["missing_here"], serde_json::json!([]));

    let text = stdout(&check(&report, false));
    assert!(text.contains("MISMATCH"), "{text}");
    assert!(
        text.contains(&format!("listed here but not in the report: {key}")),
        "{text}"
    );
}

#[test]
fn a_site_the_report_has_once_more_is_a_mismatch() {
    let report = report_file("duplicated", |lines| {
        let i = popcount_line(lines);
        lines.insert(i, lines[i].clone());
    });
    let out = check(&report, true);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{json:#}");
    let c = &json["check"];
    assert_eq!(c["missing_from_report"], serde_json::json!([]), "{c:#}");
    assert_eq!(c["missing_here"].as_array().unwrap().len(), 1, "{c:#}");
}

#[test]
fn a_site_at_another_load_offset_is_a_mismatch() {
    // Same names and places, but one site 16 bytes off: not the sites of this binary.
    let report = report_file("moved", |lines| {
        let i = popcount_line(lines);
        let moved: Vec<String> = lines[i]
            .split("  ")
            .map(|col| match col.trim().strip_prefix("0x") {
                Some(hex) => {
                    let addr = u64::from_str_radix(hex, 16).unwrap() + 16;
                    format!("{:>width$}", format!("{addr:#x}"), width = col.len())
                }
                None => col.to_string(),
            })
            .collect();
        lines[i] = moved.join("  ");
    });
    let out = check(&report, true);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{json:#}");
    let c = &json["check"];
    assert_eq!(c["load_base"], serde_json::Value::Null, "{c:#}");
    assert!(
        c["load_base_note"]
            .as_str()
            .unwrap()
            .contains("not all shifted"),
        "{c:#}"
    );
}

#[test]
fn a_file_without_a_site_table_is_a_usage_error() {
    let report = report_file("no-table", |lines| {
        lines.retain(|l| !l.starts_with("site "));
    });
    let out = check(&report, false);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("no site table found"),
        "{}",
        stderr(&out)
    );
}
