//! Trampoline mode: `#[alternative]` on functions and methods of any signature. Callers make a
//! direct call to a per-function trampoline whose `jmp` is retargeted to the chosen candidate.

mod common;

use std::hint::black_box;

use altpatch::{Feature, How, Patcher};
use common::*;
use iced_x86::Mnemonic;

#[target_feature(enable = "avx2")]
fn sum_avx2(xs: &[u32]) -> u64 {
    xs.iter().map(|&x| u64::from(x)).sum::<u64>() + 2_000_000
}

fn sum_sse42(xs: &[u32]) -> u64 {
    xs.iter().map(|&x| u64::from(x)).sum::<u64>() + 1_000_000
}

/// A slice in, an integer out; the candidates add a marker so the result tells which ran.
#[altpatch::alternative(avx2 => sum_avx2, sse4_2 => sum_sse42)]
pub fn sum(xs: &[u32]) -> u64 {
    xs.iter().map(|&x| u64::from(x)).sum()
}

pub struct Greeter {
    greeting: String,
}

#[altpatch::alternative_impl]
impl Greeter {
    fn greet_loud(&self, name: &str, times: usize) -> String {
        format!("{}, {}!", self.greeting.to_uppercase(), name.repeat(times))
    }

    /// A method with a receiver, a `&str` and an owned `String` returned through memory.
    #[altpatch::alternative(all(avx2, bmi2) => Self::greet_loud)]
    pub fn greet(&self, name: &str, times: usize) -> String {
        format!("{}, {}", self.greeting, name.repeat(times))
    }

    /// An associated function naming `Self` in its signature.
    #[altpatch::alternative(popcnt => Self::new_counted)]
    pub fn new(greeting: &str) -> Self {
        Greeter {
            greeting: greeting.to_string(),
        }
    }

    fn new_counted(greeting: &str) -> Self {
        Greeter {
            greeting: format!("{greeting}#{}", greeting.len()),
        }
    }
}

fn check_site(name: &str, report: &altpatch::Report, chosen: &str) {
    let sites: Vec<_> = report.site(name).collect();
    assert_eq!(
        sites.len(),
        1,
        "a trampoline is one site whatever the callers: {report}"
    );
    let site = sites[0];
    assert_eq!(site.kind(), Some(altpatch::SiteKind::Trampoline));
    assert_eq!(site.chosen(), chosen, "{report}");
    let instrs = decode_site(site);
    assert_eq!(instrs[0].mnemonic(), Mnemonic::Jmp, "{instrs:?}");
    assert_eq!(
        instrs[0].near_branch_target(),
        candidate_branch_target(site, chosen, Mnemonic::Jmp)
    );
    assert!(rest_is_filler(&instrs, 1));
    let expected_how = if chosen == "default" {
        How::Unpatched
    } else {
        How::Jmp
    };
    assert_eq!(site.how(), expected_how, "{report}");
}

#[test]
fn every_candidate_of_a_free_function_runs_through_its_trampoline() {
    let _lock = patch_lock();
    let xs: Vec<u32> = (1..=10).collect();
    for (features, chosen, marker) in [
        (&[Feature::Avx2, Feature::Sse4_2][..], "avx2", 2_000_000),
        (&[Feature::Sse4_2][..], "sse4_2", 1_000_000),
        (&[][..], "default", 0),
    ] {
        let report = Patcher::new().cpu(cpu_with(features)).apply();
        check_site("trampoline::sum", &report, chosen);
        assert_eq!(sum(black_box(&xs)), 55 + marker);
    }
}

#[test]
fn methods_and_associated_functions_are_patched_too() {
    let _lock = patch_lock();
    let report = Patcher::new()
        .cpu(cpu_with(&[Feature::Avx2, Feature::Bmi2, Feature::Popcnt]))
        .apply();
    check_site("greet", &report, "greet_loud");
    check_site("new", &report, "popcnt");
    let g = Greeter::new(black_box("hello"));
    assert_eq!(g.greeting, "hello#5");
    assert_eq!(g.greet(black_box("ab"), 2), "HELLO#5, abab!");

    let report = Patcher::new().cpu(cpu_with(&[])).apply();
    check_site("greet", &report, "default");
    let g = Greeter::new(black_box("hi"));
    assert_eq!(g.greet(black_box("x"), 3), "hi, xxx");
}
