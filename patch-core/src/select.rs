//! Selection: which candidate each site runs on this machine.
//!
//! Candidates are ordered by preference; the first whose [`Predicate`] holds on the CPU snapshot
//! wins, and the default (first in the table, [`Predicate::Always`]) is what remains. An
//! `ALTPATCH=site=candidate` choice comes before all of that.

use core::fmt;

use crate::cpu::{Cpu, HypervisorKind};
use crate::overrides::Overrides;
use crate::record::SiteDescriptor;
use crate::{Feature, FeatureSet};

/// When a candidate may run. Built in `const` context by the macros.
#[derive(Clone, Copy)]
#[non_exhaustive]
pub enum Predicate {
    /// Always holds (the default).
    Always,
    /// The CPU has the feature, with OS support.
    Feature(Feature),
    /// Running under any hypervisor.
    AnyHypervisor,
    /// Running under this kind of hypervisor.
    Hypervisor(HypervisorKind),
    /// KVM promises its vCPUs are never preempted (`KVM_HINTS_REALTIME`): spinning is safe.
    KvmHintsRealtime,
    /// The inner predicate does not hold.
    Not(&'static Predicate),
    /// Every inner predicate holds.
    All(&'static [Predicate]),
    /// At least one inner predicate holds.
    Any(&'static [Predicate]),
    /// A user function decides (called at each selection); the name is for reports.
    When(&'static str, fn() -> bool),
}

impl Predicate {
    /// Evaluates the predicate on a CPU snapshot.
    pub fn holds(&self, cpu: &Cpu) -> bool {
        match self {
            Predicate::Always => true,
            Predicate::Feature(f) => cpu.has(*f),
            Predicate::AnyHypervisor => cpu.hypervisor().is_some(),
            Predicate::Hypervisor(kind) => cpu.hypervisor().is_some_and(|h| h.kind == *kind),
            Predicate::KvmHintsRealtime => cpu
                .hypervisor()
                .and_then(|h| h.kvm)
                .is_some_and(|kvm| kvm.hints_realtime),
            Predicate::Not(p) => !p.holds(cpu),
            Predicate::All(ps) => ps.iter().all(|p| p.holds(cpu)),
            Predicate::Any(ps) => ps.iter().any(|p| p.holds(cpu)),
            Predicate::When(_, f) => f(),
        }
    }

    /// The CPU features the predicate needs that `cpu` lacks: empty when its feature terms hold.
    ///
    /// Only feature terms count (`hypervisor`, `when` and `not(..)` say where a candidate is
    /// preferred, not what its instructions need): a forced candidate that lacks one of these
    /// would run instructions the CPU faults on. `any(..)` needs nothing when one branch needs
    /// nothing, else it lists what every branch lacks.
    pub fn missing_features(&self, cpu: &Cpu) -> FeatureSet {
        let union = |sets: &mut dyn Iterator<Item = FeatureSet>| {
            sets.fold(FeatureSet::EMPTY, |mut all, set| {
                set.iter().for_each(|f| all.insert(f));
                all
            })
        };
        match self {
            Predicate::Feature(f) if !cpu.has(*f) => FeatureSet::EMPTY.with(*f),
            Predicate::All(ps) => union(&mut ps.iter().map(|p| p.missing_features(cpu))),
            Predicate::Any(ps) => {
                let each: Vec<FeatureSet> = ps.iter().map(|p| p.missing_features(cpu)).collect();
                if each.iter().any(|m| m.is_empty()) {
                    FeatureSet::EMPTY
                } else {
                    union(&mut each.into_iter())
                }
            }
            _ => FeatureSet::EMPTY,
        }
    }
}

/// Written the way the attribute spells it: `avx2`, `all(avx2, bmi2)`, `hypervisor = "kvm"`.
impl fmt::Display for Predicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |f: &mut fmt::Formatter<'_>, name: &str, ps: &[Predicate]| {
            write!(f, "{name}(")?;
            for (i, p) in ps.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{p}")?;
            }
            f.write_str(")")
        };
        match self {
            Predicate::Always => f.write_str("always"),
            Predicate::Feature(feature) => f.write_str(feature.name()),
            Predicate::AnyHypervisor => f.write_str("hypervisor"),
            Predicate::Hypervisor(kind) => write!(f, "hypervisor = \"{}\"", kind.name()),
            Predicate::KvmHintsRealtime => f.write_str("kvm_hints_realtime"),
            Predicate::Not(p) => write!(f, "not({p})"),
            Predicate::All(ps) => list(f, "all", ps),
            Predicate::Any(ps) => list(f, "any", ps),
            Predicate::When(name, _) => write!(f, "when = {name}"),
        }
    }
}

impl fmt::Debug for Predicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The outcome of selection for one site, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// Index into the site's candidates (0 = default).
    pub index: usize,
    /// Why this candidate.
    pub reason: Reason,
}

/// Why a candidate was selected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// `ALTPATCH=off` or the `force-unpatched` feature: defaults everywhere.
    Off,
    /// `ALTPATCH=site=candidate`.
    Forced,
    /// The first candidate whose predicate holds.
    PredicateHolds,
    /// No candidate's predicate holds.
    NoCandidateHolds,
    /// A static branch follows its key (enabled or not).
    Key(bool),
}

impl Reason {
    /// The reason in words.
    pub fn text(&self) -> &'static str {
        match self {
            Reason::Off => "patching is off",
            Reason::Forced => "forced by ALTPATCH",
            Reason::PredicateHolds => "first candidate whose predicate holds",
            Reason::NoCandidateHolds => "no candidate's predicate holds",
            Reason::Key(true) => "its key is enabled",
            Reason::Key(false) => "its key is disabled",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text())
    }
}

/// Selects the candidate of `site` for `cpu` under `overrides`.
///
/// `overrides` must be resolved ([`Overrides::resolve`]): a forced choice names a site by its
/// full name and a candidate it has.
pub fn select(site: &SiteDescriptor, cpu: &Cpu, overrides: &Overrides) -> Selection {
    if overrides.off {
        return Selection {
            index: 0,
            reason: Reason::Off,
        };
    }
    if let Some(key) = &site.key {
        return Selection {
            index: key.wanted(),
            reason: Reason::Key(key.key.is_enabled()),
        };
    }
    let forced = overrides.choice_for(site.name);
    if let Some(index) = forced.and_then(|name| site.candidates.iter().position(|c| c.name == name))
    {
        return Selection {
            index,
            reason: Reason::Forced,
        };
    }
    match site
        .candidates
        .iter()
        .skip(1)
        .position(|c| c.predicate.holds(cpu))
    {
        Some(i) => Selection {
            index: i + 1,
            reason: Reason::PredicateHolds,
        },
        None => Selection {
            index: 0,
            reason: Reason::NoCandidateHolds,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Candidate;

    static SUM: SiteDescriptor = SiteDescriptor {
        name: "demo::sum",
        file: "demo.rs",
        line: 1,
        candidates: &[
            Candidate {
                name: "default",
                predicate_text: "always",
                predicate: Predicate::Always,
            },
            Candidate {
                name: "avx2",
                predicate_text: "all(avx2, bmi2)",
                predicate: Predicate::All(&[
                    Predicate::Feature(Feature::Avx2),
                    Predicate::Feature(Feature::Bmi2),
                ]),
            },
            Candidate {
                name: "sse4_2",
                predicate_text: "sse4_2",
                predicate: Predicate::Feature(Feature::Sse4_2),
            },
        ],
        key: None,
    };

    fn cpu(features: &[Feature]) -> Cpu {
        Cpu::synthetic(features.iter().copied().collect::<FeatureSet>(), None)
    }

    #[test]
    fn first_candidate_that_holds_wins() {
        let all = cpu(&[Feature::Avx2, Feature::Bmi2, Feature::Sse4_2]);
        let none = Overrides::default();
        assert_eq!(select(&SUM, &all, &none).index, 1);
        assert_eq!(
            select(&SUM, &cpu(&[Feature::Avx2, Feature::Sse4_2]), &none).index,
            2
        );
        let bare = select(&SUM, &cpu(&[]), &none);
        assert_eq!((bare.index, bare.reason), (0, Reason::NoCandidateHolds));
    }

    #[test]
    fn overrides_come_first() {
        let all = cpu(&[Feature::Avx2, Feature::Bmi2, Feature::Sse4_2]);
        let mut forced = Overrides::parse("sum=sse4_2").unwrap();
        forced.resolve([&SUM], &all).unwrap();
        assert_eq!(
            select(&SUM, &all, &forced),
            Selection {
                index: 2,
                reason: Reason::Forced
            }
        );
        let off = Overrides::parse("off").unwrap();
        assert_eq!(
            select(&SUM, &all, &off),
            Selection {
                index: 0,
                reason: Reason::Off
            }
        );
    }

    #[test]
    fn hypervisor_predicates_on_a_faked_kvm_guest() {
        use crate::cpu::FakeCpuid;
        const KVM_HINTS_REALTIME: u32 = 1;
        let kvm = Cpu::from_source(&FakeCpuid::new().with_kvm(0x4000_0000, 0, 0));
        let realtime =
            Cpu::from_source(&FakeCpuid::new().with_kvm(0x4000_0000, 0, KVM_HINTS_REALTIME));
        let xen = Cpu::from_source(&FakeCpuid::new().with_hypervisor(b"XenVMMXenVMM", 0x4000_0000));
        let bare = cpu(&[]);
        let is_kvm = Predicate::Hypervisor(HypervisorKind::Kvm);
        assert_eq!(
            [&kvm, &realtime, &xen, &bare].map(|c| is_kvm.holds(c)),
            [true, true, false, false]
        );
        let any = Predicate::AnyHypervisor;
        assert_eq!(
            [&kvm, &realtime, &xen, &bare].map(|c| any.holds(c)),
            [true, true, true, false]
        );
        let rt = Predicate::KvmHintsRealtime;
        assert_eq!(
            [&kvm, &realtime, &xen, &bare].map(|c| rt.holds(c)),
            [false, true, false, false]
        );
        assert_eq!(rt.to_string(), "kvm_hints_realtime");
    }

    #[test]
    fn combinators_and_display() {
        static NOT_AVX: Predicate = Predicate::Not(&Predicate::Feature(Feature::Avx));
        assert!(NOT_AVX.holds(&cpu(&[])));
        assert!(!NOT_AVX.holds(&cpu(&[Feature::Avx])));
        assert!(
            Predicate::Any(&[Predicate::Feature(Feature::Avx), Predicate::AnyHypervisor])
                .holds(&cpu(&[Feature::Avx]))
        );
        assert!(!Predicate::Hypervisor(HypervisorKind::Kvm).holds(&cpu(&[])));
        assert_eq!(
            HypervisorKind::from_name_const("kvm"),
            Some(HypervisorKind::Kvm)
        );
        assert_eq!(HypervisorKind::from_name_const("kvmm"), None);
        assert!(Predicate::When("yes", || true).holds(&cpu(&[])));
        assert_eq!(Predicate::When("yes", || true).to_string(), "when = yes");
        for c in SUM.candidates {
            assert_eq!(c.predicate.to_string(), c.predicate_text);
        }
        assert_eq!(NOT_AVX.to_string(), "not(avx)");
    }

    #[test]
    fn missing_features_count_feature_terms_only() {
        let missing = |p: &Predicate, features: &[Feature]| -> Vec<Feature> {
            p.missing_features(&cpu(features)).iter().collect()
        };
        let avx2_bmi2 = &SUM.candidates[1].predicate;
        assert_eq!(missing(avx2_bmi2, &[Feature::Avx2]), [Feature::Bmi2]);
        assert_eq!(missing(avx2_bmi2, &[Feature::Avx2, Feature::Bmi2]), []);
        static EITHER: Predicate = Predicate::Any(&[
            Predicate::Feature(Feature::Avx2),
            Predicate::All(&[
                Predicate::Feature(Feature::Sse4_2),
                Predicate::AnyHypervisor,
            ]),
        ]);
        assert_eq!(missing(&EITHER, &[Feature::Sse4_2]), []);
        assert_eq!(missing(&EITHER, &[]), [Feature::Sse4_2, Feature::Avx2]);
        static NOT: Predicate = Predicate::Not(&Predicate::Feature(Feature::Avx2));
        assert_eq!(missing(&NOT, &[]), []);
        assert_eq!(missing(&Predicate::When("x", || false), &[]), []);
    }
}
