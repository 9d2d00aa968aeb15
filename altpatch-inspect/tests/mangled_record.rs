//! A record whose site, or the record itself, is not what was built (a linker or LTO mangling, a
//! breakpoint left in the file) is flagged with the runtime's reason, and only that record.

mod common;

use std::os::unix::fs::FileExt;

use common::*;

/// A copy of this test binary with `bytes` written at the file offset `offset_of` picks from the
/// tool's JSON of the intact binary; returns the copy and the mangled site's index.
fn mangled_copy(
    name: &str,
    short: &str,
    offset_of: impl Fn(&serde_json::Value) -> u64,
    bytes: impl Fn(&serde_json::Value) -> Vec<u8>,
) -> (TempPath, u64) {
    exercise();
    let (out, json) = inspect_json(&this_binary());
    assert_eq!(
        out.status.code(),
        Some(0),
        "the intact binary is fine: {json:#}"
    );
    let target = site(&json, short);
    let copy = TempPath::new(name);
    std::fs::copy(this_binary(), &copy.0).expect("copy the test binary");
    let file = std::fs::File::options()
        .write(true)
        .open(&copy.0)
        .expect("open the copy");
    file.write_all_at(&bytes(target), offset_of(target))
        .expect("write the copy");
    (copy, target["index"].as_u64().unwrap())
}

/// Runs the tool on `copy`: it must fail with status 1, refuse site `index` with a reason
/// containing `reason`, and find every other site fine.
fn expect_only_refused(copy: &TempPath, index: u64, reason: &str) -> serde_json::Value {
    let (out, json) = inspect_json(&copy.0);
    assert_eq!(out.status.code(), Some(1), "{json:#}");
    for s in sites(&json) {
        if s["index"] == index {
            assert_eq!(s["status"], "refused", "{s:#}");
            let why = s["reason"].as_str().unwrap();
            assert!(why.contains(reason), "{why}");
        } else {
            assert_eq!(s["status"], "ok", "{s:#}");
        }
    }
    json
}

#[test]
fn a_site_overwritten_in_the_file_is_refused() {
    // A breakpoint over the first byte of one copy of `popcount`.
    let (copy, index) = mangled_copy(
        "int3",
        "popcount",
        |s| s["file_offset"].as_u64().unwrap(),
        |_| vec![0xcc],
    );
    let json = expect_only_refused(&copy, index, "none of its candidates");
    let mangled = &sites(&json)[index as usize];
    assert!(
        mangled["bytes"].as_str().unwrap().starts_with("cc "),
        "{mangled:#}"
    );

    // The table says it too, on the site's line.
    let out = tool(&[&copy.0]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("1 would be REFUSED at run time"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("mangled_record::common::popcount ")
                && l.contains("REFUSED: site bytes are none of its candidates (found cc")),
        "{text}"
    );
}

#[test]
fn a_record_of_another_layout_version_is_not_understood() {
    let (copy, index) = mangled_copy(
        "version",
        "double",
        |s| s["record_file_offset"].as_u64().unwrap() + 15,
        |_| vec![9],
    );
    let json = expect_only_refused(&copy, index, "record not understood (version 9");
    let mangled = &sites(&json)[index as usize];
    // Like the runtime, the tool does not read the descriptor of a record it does not understand.
    assert_eq!(mangled["name"], serde_json::Value::Null, "{mangled:#}");
}

#[test]
fn a_record_whose_count_disagrees_with_its_descriptor_is_refused() {
    let (copy, index) = mangled_copy(
        "count",
        "hook",
        |s| s["record_file_offset"].as_u64().unwrap() + 14,
        |s| vec![s["count"].as_u64().unwrap() as u8 + 1],
    );
    expect_only_refused(
        &copy,
        index,
        "record has 3 candidate blocks but its descriptor names 2",
    );
}

#[test]
fn a_site_pointing_outside_executable_code_is_refused() {
    // Move the site offset by -0x10000000: far outside any segment.
    let (copy, index) = mangled_copy(
        "outside",
        "sum",
        |s| s["record_file_offset"].as_u64().unwrap() + 3,
        |_| vec![0xf0],
    );
    expect_only_refused(&copy, index, "is not in executable memory");
}
