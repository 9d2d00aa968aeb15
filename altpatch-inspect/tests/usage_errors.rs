//! Bad command lines and files that are not x86-64 ELF binaries exit with status 2 and a clear
//! message on stderr, never a panic.

mod common;

use std::os::unix::ffi::OsStrExt;
use std::process::Output;

use common::*;

/// Status 2, `message` on stderr, nothing on stdout, no panic.
fn expect_usage_error(out: &Output, message: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(err.contains(message), "stderr lacks {message:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.stdout.is_empty(), "{}", stdout(out));
}

#[test]
fn a_missing_file_is_a_usage_error() {
    let missing = TempPath::new("does-not-exist");
    let out = tool(&[&missing.0]);
    expect_usage_error(&out, "cannot read");
    expect_usage_error(&out, &missing.0.display().to_string());
    // A path that is not UTF-8 is still just a path.
    let odd = std::ffi::OsStr::from_bytes(b"/nonexistent/\xff\xfe");
    expect_usage_error(&tool(&[odd]), "cannot read /nonexistent/");
}

#[test]
fn a_file_that_is_not_elf_is_a_usage_error() {
    let text = TempPath::new("not-elf.txt");
    std::fs::write(&text.0, "#!/bin/sh\necho hello\n").unwrap();
    expect_usage_error(&tool(&[&text.0]), "not an ELF file");
    let empty = TempPath::new("empty");
    std::fs::write(&empty.0, b"").unwrap();
    expect_usage_error(&tool(&[&empty.0]), "not an ELF file");
}

#[test]
fn a_truncated_elf_is_a_usage_error() {
    let bytes = std::fs::read(this_binary()).unwrap();
    let truncated = TempPath::new("truncated");
    std::fs::write(&truncated.0, &bytes[..100]).unwrap();
    expect_usage_error(&tool(&[&truncated.0]), "not a readable 64-bit ELF file");
}

#[test]
fn an_elf_for_another_machine_is_a_usage_error() {
    let mut bytes = std::fs::read(this_binary()).unwrap();
    // e_machine (offset 18, little-endian) = EM_AARCH64.
    bytes[18..20].copy_from_slice(&183u16.to_le_bytes());
    let arm = TempPath::new("aarch64");
    std::fs::write(&arm.0, &bytes).unwrap();
    expect_usage_error(&tool(&[&arm.0]), "not an x86-64 ELF file (machine 0xb7)");
}

#[test]
fn a_bad_command_line_prints_the_usage() {
    let no_args: [&str; 0] = [];
    expect_usage_error(&tool(&no_args), "no BINARY given");
    expect_usage_error(&tool(&["--frobnicate", "x"]), "unknown option --frobnicate");
    expect_usage_error(&tool(&["a", "b"]), "more than one BINARY");
    expect_usage_error(&tool(&["x", "--check-report"]), "usage: altpatch-inspect");
}

#[test]
fn a_missing_report_is_a_usage_error() {
    exercise();
    let missing = TempPath::new("no-report.txt");
    let out = tool(&[
        "--check-report".as_ref(),
        missing.0.as_os_str(),
        this_binary().as_os_str(),
    ]);
    expect_usage_error(&out, "cannot read");
}

#[test]
fn a_relocatable_object_is_a_usage_error() {
    let mut bytes = std::fs::read(this_binary()).unwrap();
    // e_type (offset 16) = ET_REL: records in a `.o` are still relocations, not addresses.
    bytes[16..18].copy_from_slice(&1u16.to_le_bytes());
    let object = TempPath::new("object.o");
    std::fs::write(&object.0, &bytes).unwrap();
    expect_usage_error(&tool(&[&object.0]), "a relocatable object file");
}
