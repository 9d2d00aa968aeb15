//! Under a seccomp filter that refuses `mprotect(PROT_WRITE|PROT_EXEC)` (a W^X policy), altpatch
//! writes through `/proc/self/mem` instead; when opening files for writing is refused too, every
//! site runs its default, the report says why, and the program goes on. Each case runs in a child
//! process, since a seccomp filter cannot be removed.

mod common;

use std::hint::black_box;

use altpatch::{Feature, How, Patcher};
use common::*;

const DENY_WX: &str = "wx";
const DENY_WX_AND_WRITABLE_OPEN: &str = "wx+open";

/// Installs the filter on the calling thread (the one that then patches).
fn deny(policy: &str) {
    let mut rules = vec![seccomp::wx_mprotect()];
    if policy == DENY_WX_AND_WRITABLE_OPEN {
        rules.extend(seccomp::writable_opens());
    }
    seccomp::refuse(rules, libc::EACCES);
}

#[test]
#[ignore = "entry point of the child processes the other tests start"]
fn child_entry() {
    let Ok(policy) = std::env::var("ALTPATCH_TEST_DENY") else {
        return;
    };
    deny(&policy);
    // The policy holds: making a page writable and executable is refused.
    let wx_allowed = !seccomp::wx_refused();
    println!("WX_MPROTECT_ALLOWED={wx_allowed}");
    let report = Patcher::new().cpu(cpu_with(&[Feature::Avx2])).apply();
    for site in report.site("mix") {
        println!(
            "SITE how={} writer={} why={}",
            site.how(),
            report.writer,
            site.why()
        );
    }
    let running = if report.site("mix").all(|s| s.how() == How::Call) {
        "avx2"
    } else {
        "default"
    };
    assert_eq!(mix(black_box(7)), mix_expected(running, 7));
    println!("MIX_RUNS={running}");
}

fn run_child(policy: &str) -> String {
    run_child_entry(&[("ALTPATCH_TEST_DENY", policy)]).0
}

#[test]
fn wx_denied_patches_through_proc_self_mem() {
    let out = run_child(DENY_WX);
    assert!(out.contains("WX_MPROTECT_ALLOWED=false"), "{out}");
    assert!(out.contains("MIX_RUNS=avx2"), "{out}");
    assert!(
        out.lines()
            .filter(|l| l.contains("SITE "))
            .all(|l| l.contains("how=call") && l.contains("writer=/proc/self/mem")),
        "{out}"
    );
}

#[test]
fn wx_and_proc_self_mem_denied_leave_defaults_and_say_why() {
    let out = run_child(DENY_WX_AND_WRITABLE_OPEN);
    assert!(out.contains("MIX_RUNS=default"), "{out}");
    let sites: Vec<&str> = out.lines().filter(|l| l.contains("SITE ")).collect();
    assert!(!sites.is_empty(), "{out}");
    for line in sites {
        assert!(line.contains("how=unpatched"), "{line}");
        assert!(
            line.contains("mprotect(PROT_READ|PROT_WRITE|PROT_EXEC) refused"),
            "{line}"
        );
        assert!(
            line.contains("cannot open /proc/self/mem for writing"),
            "{line}"
        );
    }
}
