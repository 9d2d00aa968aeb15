//! A wrong `ALTPATCH` in a program whose only sites are static branches: the error names them and
//! says they follow their keys, not `ALTPATCH` (it said "this program has no sites").

use altpatch::{OverrideError, Patcher, StaticKey};

static VERBOSE: StaticKey = StaticKey::new(false);

#[inline(never)]
fn verbose() -> bool {
    altpatch::static_branch_unlikely!(VERBOSE)
}

const BRANCH: &str = "static_branch_only_program::VERBOSE";

#[test]
fn the_error_names_the_static_branches() {
    assert!(!verbose());
    let report = Patcher::new().overrides_str("pv_lock=natve").apply();
    assert!(
        report
            .sites
            .iter()
            .all(|s| s.kind() == Some(altpatch::SiteKind::StaticBranch)),
        "this program has static branches only: {report}"
    );
    let Some(
        e @ OverrideError::UnknownSite {
            known, branches, ..
        },
    ) = &report.error
    else {
        panic!("{report}")
    };
    assert!(known.is_empty());
    assert_eq!(branches, &[BRANCH]);
    let want = format!(
        "ALTPATCH: unknown site \"pv_lock\"; this program has no sites ALTPATCH can choose for, \
         only static branches, which follow their keys (StaticKey::enable/disable): {BRANCH}"
    );
    assert_eq!(e.to_string(), want);

    // Naming the branch itself says why it cannot be chosen.
    let report = Patcher::new().overrides_str("VERBOSE=jmp").apply();
    let Some(e @ OverrideError::StaticBranch { site, branches }) = &report.error else {
        panic!("{report}")
    };
    assert_eq!(
        (site.as_str(), branches.as_slice()),
        ("VERBOSE", &[BRANCH.to_owned()][..])
    );
    let want = format!(
        "ALTPATCH: site \"VERBOSE\" is a static branch ({BRANCH}): it follows its key \
         (StaticKey::enable/disable), not ALTPATCH"
    );
    assert_eq!(e.to_string(), want);
    assert!(!verbose(), "the branch still follows its key");
    VERBOSE.enable().expect("the key toggles");
    assert!(verbose());
}
