//! `ALTPATCH` names a site by its full path or by any suffix (starting after a `::`) that only one
//! site name of the program ends with; a suffix several names end with is an error listing them.

use std::hint::black_box;

use altpatch::{Cpu, Feature, OverrideError, Patcher, Report};

// The sites start as built (no load-time apply in this binary): the first assertion reads the
// defaults' results.
altpatch::manual_apply!();

// Each candidate is one 5-byte instruction (a `ds` prefix pads the 4-byte `lea`), so sites switch
// while the harness's other threads run.

mod ring {
    #[altpatch::alternative(inline, bmi2 => asm("ds lea rax, [rdi + 1]"))]
    pub fn add(x: u64) -> u64 {
        x
    }
}

mod tree {
    #[altpatch::alternative(inline, bmi2 => asm("ds lea rax, [rdi + 2]"), popcnt => asm("ds lea rax, [rdi + 3]"))]
    pub fn add(x: u64) -> u64 {
        x
    }
}

mod deep {
    pub mod ring {
        #[altpatch::alternative(inline, bmi2 => asm("ds lea rax, [rdi + 4]"))]
        pub fn add(x: u64) -> u64 {
            x
        }
    }
}

/// Methods are named with their type: `Histogram::add` and `Counter::add` are two sites.
mod ck {
    pub struct Histogram;
    pub struct Counter;

    #[altpatch::alternative_impl]
    impl Histogram {
        #[altpatch::alternative(inline, bmi2 => asm("ds lea rax, [rsi + 5]"))]
        pub fn add(&self, x: u64) -> u64 {
            x
        }
    }

    #[altpatch::alternative_impl]
    impl Counter {
        #[altpatch::alternative(inline, popcnt => asm("ds lea rax, [rsi + 6]"))]
        pub fn add(&self, x: u64) -> u64 {
            x
        }
    }
}

const HISTOGRAM: &str = "site_name_suffixes::ck::Histogram::add";
const COUNTER: &str = "site_name_suffixes::ck::Counter::add";
const RING: &str = "site_name_suffixes::ring::add";
const TREE: &str = "site_name_suffixes::tree::add";
const DEEP: &str = "site_name_suffixes::deep::ring::add";

fn apply(overrides: &str) -> Report {
    let cpu = Cpu::synthetic(Feature::ALL.iter().copied().collect(), None);
    Patcher::new().cpu(cpu).overrides_str(overrides).apply()
}

fn chosen<'a>(report: &'a Report, name: &str) -> &'a str {
    let mut sites = report.sites.iter().filter(|s| s.name() == name);
    let first = sites
        .next()
        .unwrap_or_else(|| panic!("no {name} in\n{report}"));
    first.chosen()
}

#[test]
fn full_paths_and_unique_suffixes_name_one_site() {
    // The sites exist where they are called; their results are those of the defaults until the
    // first apply.
    let x = black_box(10);
    assert_eq!(
        (ring::add(x), tree::add(x), deep::ring::add(x)),
        (10, 10, 10)
    );
    assert_eq!((ck::Histogram.add(x), ck::Counter.add(x)), (10, 10));

    for (value, site, candidate) in [
        ("tree::add=popcnt", TREE, "popcnt"),
        ("site_name_suffixes::tree::add=default", TREE, "default"),
        // A full name, though it is also a suffix of a longer one.
        ("site_name_suffixes::ring::add=default", RING, "default"),
        ("deep::ring::add=default", DEEP, "default"),
        // Of two choices for one site, however spelled, the last wins.
        (
            "tree::add=popcnt,site_name_suffixes::tree::add=bmi2",
            TREE,
            "bmi2",
        ),
        // A method by its type and name.
        ("Histogram::add=default", HISTOGRAM, "default"),
        ("ck::Counter::add=default", COUNTER, "default"),
    ] {
        let report = apply(value);
        assert!(report.error.is_none(), "{value}: {report}");
        assert_eq!(chosen(&report, site), candidate, "{value}: {report}");
    }
    let report = apply("tree::add=popcnt");
    assert_eq!(
        chosen(&report, RING),
        "bmi2",
        "the other sites keep their selection"
    );
    assert_eq!(
        tree::add(black_box(10)),
        13,
        "tree::add runs popcnt's `lea`"
    );
    let report = apply("Histogram::add=bmi2");
    assert_eq!(chosen(&report, HISTOGRAM), "bmi2", "{report}");
    assert_eq!(
        ck::Histogram.add(black_box(10)),
        15,
        "Histogram::add runs its `lea`"
    );
    // A candidate only the other method has is no concern of this one.
    let report = apply("Counter::add=popcnt");
    assert!(report.error.is_none(), "{report}");
    assert_eq!(ck::Counter.add(black_box(10)), 16);
}

#[test]
fn an_ambiguous_suffix_lists_its_matches() {
    for (value, matches) in [
        ("add=bmi2", vec![COUNTER, HISTOGRAM, DEEP, RING, TREE]),
        ("ring::add=bmi2", vec![DEEP, RING]),
    ] {
        let report = apply(value);
        let Some(OverrideError::AmbiguousSite {
            site,
            matches: found,
        }) = &report.error
        else {
            panic!("{value}: {report}")
        };
        assert_eq!(site, value.split('=').next().unwrap());
        assert_eq!(found, &matches);
        let message = report.error.as_ref().unwrap().to_string();
        let want = format!(
            "ALTPATCH: site {site:?} is ambiguous: it ends {} site names ({}); write more of the path",
            matches.len(),
            matches.join(", ")
        );
        assert_eq!(message, want);
        assert!(report.sites.iter().all(|s| !s.written()), "{report}");
    }
    // A suffix starts after a `::`.
    let report = apply("ng::add=bmi2");
    assert!(
        matches!(&report.error, Some(OverrideError::UnknownSite { site, .. }) if site == "ng::add"),
        "{report}"
    );
}
