//! The tool lists exactly the sites the runtime finds in the same binary: this test binary, which
//! holds sites of every shape (tests/common).

mod common;

use common::*;

#[test]
fn lists_the_same_sites_as_the_runtime_report() {
    exercise();
    let report = altpatch::apply_patches();
    let (out, json) = inspect_json(&this_binary());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(json["pie"], true, "test binaries are PIEs");
    let base = load_base();

    let listed = sites(&json);
    // popcount twice, double, hook, sum's trampoline, the TRACE branch.
    assert!(report.sites.len() >= 6, "{report}");
    assert_eq!(listed.len(), report.sites.len(), "{report}\n{json:#}");
    for (r, s) in report.sites.iter().zip(listed) {
        assert_eq!(s["name"], r.name(), "{s:#}");
        assert_eq!(s["file"], r.file(), "{s:#}");
        assert_eq!(s["line"], r.line(), "{s:#}");
        assert_eq!(s["len"], r.len(), "{s:#}");
        assert_eq!(
            s["kind"],
            r.kind().map(|k| k.name()).unwrap_or("?"),
            "{s:#}"
        );
        assert_eq!(
            s["vaddr"].as_u64().unwrap() + base,
            r.addr() as u64,
            "{} at {:#x}, load base {base:#x}",
            r.name(),
            r.addr()
        );
        let names: Vec<&str> = s["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, r.candidates().collect::<Vec<_>>(), "{s:#}");
        assert_eq!(s["status"], "ok", "{s:#}");
    }
}

#[test]
fn names_predicates_and_blocks_come_out_as_written() {
    exercise();
    let (out, json) = inspect_json(&this_binary());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let popcount = site(&json, "popcount");
    assert_eq!(popcount["name"], "self_inspection::common::popcount");
    assert_eq!(popcount["file"], "altpatch-inspect/tests/common/mod.rs");
    assert_eq!(popcount["kind"], "call site");
    let popcnt = &popcount["candidates"][1];
    assert_eq!(popcnt["name"], "popcnt");
    assert_eq!(popcnt["predicate"], "popcnt");
    assert_eq!(popcnt["bytes"], "f3 48 0f b8 c7");
    assert_eq!(
        popcnt["disassembly"],
        serde_json::json!(["popcnt rax, rdi"])
    );
    let default = &popcount["candidates"][0];
    assert_eq!(default["predicate"], "always");
    assert!(
        default["disassembly"][0]
            .as_str()
            .unwrap()
            .starts_with("call "),
        "{default:#}"
    );
    // As built, the site runs its default: the same call, relocated to the site.
    assert_eq!(popcount["disassembly"][0], default["disassembly"][0]);
    // Branch targets are named after the symbol holding them (from `.symtab`, demangled).
    let call = default["disassembly"][0].as_str().unwrap();
    assert!(
        call.ends_with(" <self_inspection::common::popcount::__altpatch_default_popcount>"),
        "{call}"
    );

    let double = site(&json, "double");
    assert_eq!(double["candidates"][1]["predicate"], "all(avx2, bmi2)");

    let off = &site(&json, "hook")["candidates"][1];
    assert_eq!(off["name"], "off");
    assert_eq!(off["predicate"], "when = hook_off");
    assert_eq!(off["bytes"], "", "a nop candidate has no bytes");

    let trace = site(&json, "TRACE");
    assert_eq!(trace["kind"], "static branch");
    assert_eq!(trace["status"], "ok", "{trace:#}");

    let sum = site(&json, "sum");
    assert_eq!(sum["kind"], "trampoline");
    assert!(
        sum["disassembly"][0].as_str().unwrap().starts_with("jmp "),
        "{sum:#}"
    );
}

#[test]
fn table_has_a_line_per_site_and_every_block() {
    exercise();
    let out = tool(&[this_binary()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("none refused"), "{text}");
    let popcount_lines = text
        .lines()
        .filter(|l| {
            l.starts_with("self_inspection::common::popcount ")
                && l.contains("altpatch-inspect/tests/common/mod.rs:")
                && l.trim_end().ends_with("  ok")
        })
        .count();
    assert_eq!(popcount_lines, 2, "two copies of popcount:\n{text}");
    assert!(
        text.lines().any(|l| l.trim_start().starts_with("popcnt")
            && l.contains("f3 48 0f b8 c7")
            && l.ends_with("popcnt rax, rdi")),
        "{text}"
    );
}
