//! A binary without an `altpatch_sites` section (here the tool itself, which never links the
//! records) lists no sites, says so, and is not an error.

mod common;

use common::*;

#[test]
fn a_binary_without_sites_lists_none_and_succeeds() {
    let (out, json) = inspect_json(TOOL.as_ref());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(json["sites"], serde_json::json!([]));
    assert_eq!(json["sites_section"], serde_json::Value::Null);
    let text = stdout(&tool(&[TOOL]));
    let expected = format!("no {} section", patch_core::record::SITES_SECTION);
    assert!(text.contains(&expected), "{text}");
}
