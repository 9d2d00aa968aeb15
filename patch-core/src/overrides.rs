//! User overrides of the patcher, read from the `ALTPATCH` environment variable (in the spirit of
//! the kernel's `clearcpuid=` and `debug-alternative`).
//!
//! The value is a `,`-separated list of items; whitespace around items and around `=` is ignored:
//! - `off`: select every site's default;
//! - `cpu=-FEAT[-FEAT...]`: hide features from the CPU snapshot (repeatable, accumulates);
//! - `SITE=CANDIDATE`: force a site's candidate; `SITE` is a full site name or a `::`-suffix that
//!   only one site name ends with (checked by [`Overrides::resolve`]).
//!
//! Empty items (`off,`, `a=b,,c=d`) are rejected: a stray `,` usually means a value went missing.
//! Every mistake is an [`OverrideError`] naming the valid choices. The user-facing grammar is in
//! the `altpatch` crate docs.

use core::fmt;
use core::str::FromStr;
use std::ffi::OsString;

use crate::cpu::Cpu;
use crate::record::SiteDescriptor;
use crate::{Feature, FeatureSet};

/// The environment variable [`Overrides::from_env`] reads.
pub const ENV_VAR: &str = "ALTPATCH";

const EXPECTED: &str = "expected `off`, `cpu=-FEATURE` or `SITE=CANDIDATE`";
const CPU_FORM: &str = "expected `cpu=-FEATURE[-FEATURE...]`";
const IDENT: &str = "an identifier (ASCII letters, digits, `_`; no leading digit)";
const IDENTS: &str = "identifiers (ASCII letters, digits, `_`; no leading digit) joined by `::`";

/// Parsed overrides. The default value overrides nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `off`: do not patch at all.
    pub off: bool,
    /// Features hidden from the CPU snapshot by `cpu=-FEAT` (see `Cpu::without`).
    pub cleared: FeatureSet,
    /// Forced candidates, in the order written; at most one per distinct `site` string.
    pub choices: Vec<SiteChoice>,
}

/// One `SITE=CANDIDATE` item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteChoice {
    /// The site as written: a full site name or a `::`-suffix of one.
    pub site: String,
    /// The candidate to force.
    pub candidate: String,
}

impl Overrides {
    /// Parses an `ALTPATCH` value; an empty or all-whitespace `text` overrides nothing.
    pub fn parse(text: &str) -> Result<Overrides, OverrideError> {
        let mut out = Overrides::default();
        if text.trim().is_empty() {
            return Ok(out);
        }
        for (index, item) in text.split(',').map(str::trim).enumerate() {
            out.parse_item(item).map_err(|e| match e {
                OverrideError::Malformed { reason, .. } => OverrideError::Malformed {
                    item: item.to_owned(),
                    position: index + 1,
                    reason,
                },
                e => e,
            })?;
        }
        Ok(out)
    }

    /// Applies one trimmed item; `Malformed` errors leave `item` and `position` for the caller.
    fn parse_item(&mut self, item: &str) -> Result<(), OverrideError> {
        let Some((key, value)) = item.split_once('=') else {
            return match item {
                "off" => {
                    self.off = true;
                    Ok(())
                }
                "" => Err(malformed(format!("empty item (stray `,`); {EXPECTED}"))),
                _ => Err(malformed(EXPECTED.to_owned())),
            };
        };
        let (key, value) = (key.trim(), value.trim());
        let why = match key {
            _ if value.contains('=') => "more than one `=`".to_owned(),
            "off" => "`off` takes no value".to_owned(),
            "cpu" => return parse_cpu(value, &mut self.cleared),
            "" => "empty site name".to_owned(),
            _ if value.is_empty() => "empty candidate name".to_owned(),
            _ if !key.split("::").all(is_ident) => format!("site {key:?} is not {IDENTS}"),
            _ if !is_ident(value) => format!("candidate {value:?} is not {IDENT}"),
            _ => {
                self.choices.retain(|c| c.site != key);
                let (site, candidate) = (key.to_owned(), value.to_owned());
                self.choices.push(SiteChoice { site, candidate });
                return Ok(());
            }
        };
        Err(malformed(format!("{why}; {EXPECTED}")))
    }

    /// Reads and parses [`ENV_VAR`]: unset overrides nothing, a non-UTF-8 value is an error.
    pub fn from_env() -> Result<Overrides, OverrideError> {
        Self::from_var(std::env::var_os(ENV_VAR))
    }

    fn from_var(value: Option<OsString>) -> Result<Overrides, OverrideError> {
        match value {
            None => Ok(Overrides::default()),
            Some(value) => {
                Self::parse(&value.into_string().map_err(|_| OverrideError::NotUnicode)?)
            }
        }
    }

    /// Whether nothing is overridden.
    pub fn is_empty(&self) -> bool {
        *self == Overrides::default()
    }

    /// Whether `choice_site` names `site_name`: equal, or equal to a suffix of it that starts right
    /// after a `::`.
    pub fn site_matches(choice_site: &str, site_name: &str) -> bool {
        !choice_site.is_empty()
            && site_name
                .strip_suffix(choice_site)
                .is_some_and(|prefix| prefix.is_empty() || prefix.ends_with("::"))
    }

    /// The candidate forced for the site with this full name, if any.
    ///
    /// Choices name sites as written until [`resolve`](Overrides::resolve) replaces each with the
    /// full name it matches; only a resolved choice (or one written as a full name) is found
    /// here. Does not look at [`off`](Overrides::off); callers check it first.
    pub fn choice_for(&self, site_name: &str) -> Option<&str> {
        self.choices
            .iter()
            .rev()
            .find(|c| c.site == site_name)
            .map(|c| c.candidate.as_str())
    }

    /// Resolves every choice against the program's sites (`sites`: their descriptors, repeats
    /// allowed) and the CPU snapshot selection will use, in place: each choice's `site` becomes
    /// the full name it names, and of several choices for one site the last is kept.
    ///
    /// A choice names a site by its full name or by a suffix starting after a `::` that only one
    /// site name ends with; it must name one of that site's candidates (every site sharing the
    /// name must have it), and the candidate's predicate must not need a CPU feature `cpu` lacks
    /// (a forced candidate skips its predicate; its instructions would fault). Static branches
    /// follow their keys and cannot be chosen. Every failure is an error naming the valid
    /// choices.
    pub fn resolve<'a>(
        &mut self,
        sites: impl IntoIterator<Item = &'a SiteDescriptor> + Clone,
        cpu: &Cpu,
    ) -> Result<(), OverrideError> {
        if self.choices.is_empty() {
            return Ok(());
        }
        let names = |branches: bool| {
            let mut names: Vec<&str> = (sites.clone().into_iter())
                .filter(|d| d.key.is_some() == branches)
                .map(|d| d.name)
                .collect();
            names.sort_unstable();
            names.dedup();
            names
        };
        // Static branches only matter to an error: their names are gathered then.
        let choosable = names(false);
        let owned = |list: &[&str]| list.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        for choice in &mut self.choices {
            let matching = |list: &[&'a str]| -> Vec<&'a str> {
                (list.iter().copied())
                    .filter(|name| Self::site_matches(&choice.site, name))
                    .collect()
            };
            let matches = matching(&choosable);
            let exact = matches.iter().copied().find(|name| *name == choice.site);
            let full: &'a str = match (exact, &matches[..]) {
                (Some(full), _) | (None, &[full]) => full,
                (None, []) => {
                    let site = choice.site.clone();
                    let branches = names(true);
                    let hit = matching(&branches);
                    return Err(if hit.is_empty() {
                        OverrideError::UnknownSite {
                            site,
                            known: owned(&choosable),
                            branches: owned(&branches),
                        }
                    } else {
                        OverrideError::StaticBranch {
                            site,
                            branches: owned(&hit),
                        }
                    });
                }
                (None, _) => {
                    return Err(OverrideError::AmbiguousSite {
                        site: choice.site.clone(),
                        matches: owned(&matches),
                    });
                }
            };
            for desc in sites.clone() {
                if desc.key.is_some() || desc.name != full {
                    continue;
                }
                let Some(candidate) = desc.candidates.iter().find(|c| c.name == choice.candidate)
                else {
                    return Err(OverrideError::UnknownCandidate {
                        site: full.to_owned(),
                        candidate: choice.candidate.clone(),
                        known: desc.candidate_names().map(str::to_owned).collect(),
                    });
                };
                let missing = candidate.predicate.missing_features(cpu);
                if !missing.is_empty() {
                    return Err(OverrideError::MissingFeatures {
                        site: full.to_owned(),
                        candidate: choice.candidate.clone(),
                        missing: missing.iter().map(Feature::name).collect(),
                    });
                }
            }
            choice.site = full.to_owned();
        }
        // The last choice for a site wins: keep only it.
        let mut seen = std::collections::HashSet::new();
        let mut kept: Vec<SiteChoice> = (self.choices.drain(..).rev())
            .filter(|c| seen.insert(c.site.clone()))
            .collect();
        kept.reverse();
        self.choices = kept;
        Ok(())
    }
}

/// A `Malformed` error whose `item` and `position` [`Overrides::parse`] fills in.
fn malformed(reason: String) -> OverrideError {
    let (item, position) = (String::new(), 0);
    OverrideError::Malformed {
        item,
        position,
        reason,
    }
}

/// Parses the value of a `cpu=` item into `cleared`.
fn parse_cpu(value: &str, cleared: &mut FeatureSet) -> Result<(), OverrideError> {
    if value.is_empty() {
        return Err(malformed(format!("no features after `cpu=`; {CPU_FORM}")));
    }
    let mut rest = value;
    while let Some(sign) = rest.chars().next() {
        if sign != '-' && sign != '+' {
            let why = format!("each feature must be preceded by `-`, as in `cpu=-{value}`");
            return Err(malformed(format!("{why}; {CPU_FORM}")));
        }
        let body = &rest[1..];
        let (name, tail) = body.split_at(body.find(['-', '+']).unwrap_or(body.len()));
        rest = tail;
        if name.is_empty() {
            let why = format!("empty feature name after `{sign}`");
            return Err(malformed(format!("{why}; {CPU_FORM}")));
        }
        let name = name.to_owned();
        if sign == '+' {
            return Err(OverrideError::ForcedFeature { name });
        }
        // `from_name` trims; whitespace inside `cpu=` values is not ignored.
        match Feature::from_name(&name).filter(|_| name.trim() == name) {
            Some(feature) => cleared.insert(feature),
            None => {
                let known = Feature::ALL.iter().map(|f| f.name()).collect();
                return Err(OverrideError::UnknownFeature { name, known });
            }
        }
    }
    Ok(())
}

fn is_ident(s: &str) -> bool {
    s.bytes().next().is_some_and(|b| !b.is_ascii_digit())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl FromStr for Overrides {
    type Err = OverrideError;

    fn from_str(text: &str) -> Result<Overrides, OverrideError> {
        Overrides::parse(text)
    }
}

/// Renders the canonical text: `off`, then one `cpu=` item, then the choices in order.
/// For any value produced by [`Overrides::parse`], parsing the rendering gives it back.
impl fmt::Display for Overrides {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        if self.off {
            f.write_str("off")?;
            sep = ",";
        }
        if !self.cleared.is_empty() {
            write!(f, "{sep}cpu=")?;
            for feature in self.cleared.iter() {
                write!(f, "-{feature}")?;
            }
            sep = ",";
        }
        for choice in &self.choices {
            write!(f, "{sep}{}={}", choice.site, choice.candidate)?;
            sep = ",";
        }
        Ok(())
    }
}

/// A malformed or unknown override; its message names the valid choices.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OverrideError {
    /// An item breaking the grammar: the trimmed item, its 1-based index, what is wrong.
    Malformed {
        item: String,
        position: usize,
        reason: String,
    },
    /// `cpu=-NAME` with an unknown feature name; `known` holds every canonical name.
    UnknownFeature {
        name: String,
        known: Vec<&'static str>,
    },
    /// `cpu=+NAME`: features can only be hidden, never forced on.
    ForcedFeature { name: String },
    /// A `SITE=` matching no site; `known` holds every full site name `ALTPATCH` can choose for,
    /// `branches` every static branch's (which follow their keys), each sorted and deduplicated.
    UnknownSite {
        site: String,
        known: Vec<String>,
        branches: Vec<String>,
    },
    /// A `SITE=` that is a suffix of several site names (listed, sorted) and the full name of none.
    AmbiguousSite { site: String, matches: Vec<String> },
    /// A `SITE=` naming only static branches (listed): they follow their keys, not `ALTPATCH`.
    StaticBranch { site: String, branches: Vec<String> },
    /// A forced candidate whose predicate needs CPU features this CPU (after `cpu=-` masking)
    /// lacks: forced, it would run instructions the CPU faults on.
    MissingFeatures {
        site: String,
        candidate: String,
        missing: Vec<&'static str>,
    },
    /// A choice whose matching site (full name) lacks the candidate; `known` holds its candidates.
    UnknownCandidate {
        site: String,
        candidate: String,
        known: Vec<String>,
    },
    /// The variable's value is not valid UTF-8.
    NotUnicode,
}

impl fmt::Display for OverrideError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ALTPATCH: ")?;
        match self {
            Self::Malformed {
                item,
                position,
                reason,
            } => {
                write!(f, "item {position} {item:?} is malformed: {reason}")
            }
            Self::UnknownFeature { name, known } => write!(
                f,
                "unknown feature {name:?} in cpu=; known features: {}",
                known.join(", ")
            ),
            Self::ForcedFeature { name } => write!(
                f,
                "cpu=+{name} is not supported: forcing a feature on would make the CPU fault on \
                 its instructions; features can only be hidden, as in cpu=-{name}"
            ),
            Self::UnknownSite {
                site,
                known,
                branches,
            } => {
                write!(f, "unknown site {site:?}; ")?;
                match (known.is_empty(), branches.is_empty()) {
                    (true, true) => f.write_str("this program has no sites"),
                    (true, false) => write!(
                        f,
                        "this program has no sites ALTPATCH can choose for, only static \
                         branches, which follow their keys (StaticKey::enable/disable): {}",
                        branches.join(", ")
                    ),
                    (false, true) => write!(f, "sites in this program: {}", known.join(", ")),
                    (false, false) => write!(
                        f,
                        "sites in this program: {}; and static branches, which follow their \
                         keys (StaticKey::enable/disable), not ALTPATCH: {}",
                        known.join(", "),
                        branches.join(", ")
                    ),
                }
            }
            Self::AmbiguousSite { site, matches } => write!(
                f,
                "site {site:?} is ambiguous: it ends {} site names ({}); write more of the path",
                matches.len(),
                matches.join(", ")
            ),
            Self::StaticBranch { site, branches } => write!(
                f,
                "site {site:?} is a static branch ({}): it follows its key \
                 (StaticKey::enable/disable), not ALTPATCH",
                branches.join(", ")
            ),
            Self::MissingFeatures {
                site,
                candidate,
                missing,
            } => write!(
                f,
                "{site}={candidate} is refused: candidate {candidate:?} needs {}, which this CPU \
                 lacks (or cpu=- hides); forced, it would make the CPU fault on its instructions",
                missing.join(", ")
            ),
            Self::UnknownCandidate {
                site,
                candidate,
                known,
            } => write!(
                f,
                "site {site:?} has no candidate {candidate:?}; its candidates: {}",
                known.join(", ")
            ),
            Self::NotUnicode => write!(f, "the value is not valid UTF-8; {EXPECTED} items"),
        }
    }
}

impl std::error::Error for OverrideError {}

#[cfg(test)]
mod tests {
    use super::*;
    use OverrideError as E;

    fn parse(text: &str) -> Overrides {
        Overrides::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    fn choices<'a>(o: &'a Overrides) -> Vec<(&'a str, &'a str)> {
        let pair = |c: &'a SiteChoice| (c.site.as_str(), c.candidate.as_str());
        o.choices.iter().map(pair).collect()
    }

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }
    /// The error and its message, checked to be one line starting with `ALTPATCH: `.
    fn err<T: fmt::Debug>(result: Result<T, OverrideError>) -> (OverrideError, String) {
        let e = result.unwrap_err();
        let m = e.to_string();
        assert!(m.starts_with("ALTPATCH: ") && !m.contains('\n'), "{m}");
        (e, m)
    }

    #[test]
    fn every_item_form() {
        assert!(parse("").is_empty() && parse(" \t ").is_empty());
        let off = parse("off");
        assert!(off.off && off.cleared.is_empty() && off.choices.is_empty());
        let cpu = parse("cpu=-avx2-sse4.2-ABM");
        let hidden = FeatureSet::EMPTY.with(Feature::Avx2).with(Feature::Sse4_2);
        let hidden = hidden.with(Feature::Lzcnt);
        assert_eq!(cpu.cleared, hidden);
        assert!(!cpu.off && cpu.choices.is_empty());
        assert_eq!(choices(&parse("popcount=popcnt")), [("popcount", "popcnt")]);
        assert_eq!(choices(&parse("q::popcount=_x1")), [("q::popcount", "_x1")]);
        assert_eq!(choices(&parse("a::cpu=default")), [("a::cpu", "default")]);
        assert_eq!("off".parse::<Overrides>(), Ok(off));
    }

    #[test]
    fn whitespace_repeat_accumulate_replace() {
        let o = parse(" off ,cpu = -avx2,\tcpu=-bmi2 , a = x, q::a=y , a=z, off ");
        assert!(o.off);
        let hidden = FeatureSet::EMPTY.with(Feature::Avx2).with(Feature::Bmi2);
        assert_eq!(o.cleared, hidden);
        assert_eq!(choices(&o), [("q::a", "y"), ("a", "z")]);
        // Until resolved, a choice is found by the name as written.
        assert_eq!(o.choice_for("a"), Some("z"));
        assert_eq!(o.choice_for("r::a"), None);
    }

    #[test]
    fn malformed_items() {
        for (text, position, item, says) in [
            ("avx2", 1, "avx2", EXPECTED),
            ("off, =x", 2, "=x", "empty site name"),
            ("x=", 1, "x=", "empty candidate name"),
            ("a=b=c", 1, "a=b=c", "more than one `=`"),
            ("off=1", 1, "off=1", "`off` takes no value"),
            ("cpu=", 1, "cpu=", "no features after `cpu=`"),
            ("cpu=avx2", 1, "cpu=avx2", "as in `cpu=-avx2`"),
            ("cpu=default", 1, "cpu=default", "preceded by `-`"),
            ("cpu=-", 1, "cpu=-", "empty feature name"),
            ("cpu=--avx2", 1, "cpu=--avx2", "empty feature name"),
            ("pop count=x", 1, "pop count=x", "site \"pop count\""),
            ("1abc=x", 1, "1abc=x", "site \"1abc\" is not"),
            ("a::=x", 1, "a::=x", "site \"a::\" is not"),
            ("a :: b=x", 1, "a :: b=x", "site \"a :: b\""),
            ("a=1x", 1, "a=1x", "candidate \"1x\" is not"),
            ("a=b-c", 1, "a=b-c", "candidate \"b-c\""),
            ("off,", 2, "", "stray `,`"),
            ("a=b,,c=d", 2, "", "stray `,`"),
            (",off", 1, "", "stray `,`"),
        ] {
            let (e, m) = err(Overrides::parse(text));
            let at = |i: &str, p: usize| i == item && p == position;
            assert!(matches!(&e, E::Malformed { item, position, .. } if at(item, *position)));
            let head = format!("ALTPATCH: item {position} {item:?} is malformed: ");
            let grammar = m.contains(EXPECTED) || m.contains(CPU_FORM);
            assert!(m.starts_with(&head) && m.contains(says) && grammar, "{m}");
        }
        let (_, m) = err(Overrides::parse(" off , avx2"));
        let want =
            "item 2 \"avx2\" is malformed: expected `off`, `cpu=-FEATURE` or `SITE=CANDIDATE`";
        assert_eq!(m, format!("ALTPATCH: {want}"));
    }

    #[test]
    fn feature_errors() {
        let (e, m) = err(Overrides::parse("cpu=+avx2"));
        assert!(matches!(&e, E::ForcedFeature { name } if name == "avx2"));
        let want = "cpu=+avx2 is not supported: forcing a feature on would make the CPU fault on \
                    its instructions; features can only be hidden, as in cpu=-avx2";
        assert_eq!(m, format!("ALTPATCH: {want}"));
        let (e, _) = err(Overrides::parse("cpu=-bmi2+avx2"));
        assert!(matches!(&e, E::ForcedFeature { name } if name == "avx2"));
        let (e, m) = err(Overrides::parse("off,cpu=-avx2-avx3"));
        let all = Feature::ALL.len();
        assert!(
            matches!(&e, E::UnknownFeature { name, known } if name == "avx3" && known.len() == all)
        );
        let start =
            "ALTPATCH: unknown feature \"avx3\" in cpu=; known features: sse3, ssse3, sse4_1,";
        assert!(m.starts_with(start) && m.contains(", avx2, ") && m.ends_with(", cmpxchg16b"));
        let (e, _) = err(Overrides::parse("cpu=-avx2 -bmi2"));
        assert!(matches!(e, E::UnknownFeature { name, .. } if name == "avx2 "));
    }

    #[test]
    fn display_round_trips() {
        for (text, canonical) in [
            ("", ""),
            ("off", "off"),
            (" a=x, cpu=-bmi2, off, cpu=-avx2", "off,cpu=-bmi2-avx2,a=x"),
            ("q::p=y,p=z,q::p=w", "p=z,q::p=w"),
            ("cpu=-ABM,cpu=-lzcnt", "cpu=-lzcnt"),
        ] {
            let o = parse(text);
            assert_eq!(o.to_string(), canonical);
            assert_eq!(parse(canonical), o);
        }
    }

    #[test]
    fn site_matching() {
        let matches = Overrides::site_matches;
        assert!(matches("popcount", "q::popcount") && matches("q::popcount", "q::popcount"));
        assert!(matches("b::popcount", "a::b::popcount"));
        assert!(!matches("popcount", "q::mypopcount") && !matches("b::popcount", "ab::popcount"));
        assert!(!matches("q::popcount", "popcount") && !matches("", "popcount"));
    }

    use crate::record::Candidate;
    use crate::select::Predicate;
    use crate::static_key::{BRANCH_CANDIDATES, KeySite, StaticKey};

    const fn candidate(name: &'static str, predicate: Predicate) -> Candidate {
        let predicate_text = "";
        Candidate {
            name,
            predicate_text,
            predicate,
        }
    }

    const fn descriptor(name: &'static str, candidates: &'static [Candidate]) -> SiteDescriptor {
        let (file, line, key) = ("t.rs", 1, None);
        SiteDescriptor {
            name,
            file,
            line,
            candidates,
            key,
        }
    }

    const DEFAULT: Candidate = candidate("default", Predicate::Always);
    static POPCOUNT: SiteDescriptor = descriptor(
        "a::popcount",
        &[
            DEFAULT,
            candidate("popcnt", Predicate::Feature(Feature::Popcnt)),
        ],
    );
    static SUM: SiteDescriptor = descriptor(
        "b::sum",
        &[
            DEFAULT,
            candidate(
                "avx2",
                Predicate::All(&[
                    Predicate::Feature(Feature::Avx2),
                    Predicate::Feature(Feature::Bmi2),
                ]),
            ),
            candidate("vm", Predicate::AnyHypervisor),
        ],
    );
    static HIST_ADD: SiteDescriptor = descriptor("ck::Histogram::add", &[DEFAULT]);
    static COUNTER_ADD: SiteDescriptor = descriptor("ck::Counter::add", &[DEFAULT]);
    static TRACE: StaticKey = StaticKey::new(false);
    static BRANCH: SiteDescriptor = SiteDescriptor {
        key: Some(KeySite {
            key: &TRACE,
            jump_when_enabled: true,
        }),
        ..descriptor("a::TRACE", &BRANCH_CANDIDATES)
    };

    fn all_features() -> Cpu {
        Cpu::synthetic(Feature::ALL.iter().copied().collect(), None)
    }

    /// Resolves `text` against `sites` on `cpu`.
    fn resolve(
        text: &str,
        sites: &[&SiteDescriptor],
        cpu: &Cpu,
    ) -> Result<Overrides, OverrideError> {
        let mut o = parse(text);
        o.resolve(sites.iter().copied(), cpu).map(|()| o)
    }

    #[test]
    fn choices_resolve_to_full_names() {
        let sites = [&SUM, &POPCOUNT, &POPCOUNT, &HIST_ADD, &COUNTER_ADD, &BRANCH];
        let cpu = all_features();
        let o = resolve(
            "popcount=popcnt,b::sum=avx2,Histogram::add=default,off",
            &sites,
            &cpu,
        );
        let o = o.unwrap();
        let want = [
            ("a::popcount", "popcnt"),
            ("b::sum", "avx2"),
            ("ck::Histogram::add", "default"),
        ];
        assert_eq!(choices(&o), want);
        assert_eq!(o.choice_for("a::popcount"), Some("popcnt"));
        assert_eq!(o.choice_for("popcount"), None);
        // The last choice for a site wins, however each was written.
        let o = resolve("a::popcount=default,popcount=popcnt", &sites, &cpu).unwrap();
        assert_eq!(choices(&o), [("a::popcount", "popcnt")]);
        let o = resolve("popcount=popcnt,a::popcount=default", &sites, &cpu).unwrap();
        assert_eq!(choices(&o), [("a::popcount", "default")]);
        assert_eq!(resolve("", &sites, &cpu), Ok(Overrides::default()));
        // A full name wins over the longer names it is a suffix of.
        static NESTED: SiteDescriptor = descriptor("x::a::popcount", &[DEFAULT]);
        let o = resolve("a::popcount=popcnt", &[&POPCOUNT, &NESTED], &cpu).unwrap();
        assert_eq!(o.choice_for("a::popcount"), Some("popcnt"));
        assert_eq!(o.choice_for("x::a::popcount"), None);
    }

    #[test]
    fn unknown_ambiguous_and_branch_sites() {
        let sites = [&SUM, &POPCOUNT, &HIST_ADD, &COUNTER_ADD, &BRANCH];
        let cpu = all_features();
        let (e, m) = err(resolve("a::popcount=default,foo=x", &sites, &cpu));
        let E::UnknownSite {
            site,
            known,
            branches,
        } = e
        else {
            panic!("{e:?}")
        };
        assert_eq!(site, "foo");
        let names = [
            "a::popcount",
            "b::sum",
            "ck::Counter::add",
            "ck::Histogram::add",
        ];
        assert_eq!((known, branches), (strings(&names), strings(&["a::TRACE"])));
        let want = "unknown site \"foo\"; sites in this program: a::popcount, b::sum, \
                    ck::Counter::add, ck::Histogram::add; and static branches, which follow their \
                    keys (StaticKey::enable/disable), not ALTPATCH: a::TRACE";
        assert_eq!(m, format!("ALTPATCH: {want}"));
        // A suffix only matches at `::`.
        let (e, _) = err(resolve("count=default", &sites, &cpu));
        assert!(matches!(e, E::UnknownSite { .. }));

        let (e, m) = err(resolve("add=default", &sites, &cpu));
        let matches = strings(&["ck::Counter::add", "ck::Histogram::add"]);
        assert_eq!(
            e,
            E::AmbiguousSite {
                site: "add".into(),
                matches
            }
        );
        let want = "site \"add\" is ambiguous: it ends 2 site names (ck::Counter::add, \
                    ck::Histogram::add); write more of the path";
        assert_eq!(m, format!("ALTPATCH: {want}"));

        let (e, m) = err(resolve("TRACE=default", &sites, &cpu));
        let branches = strings(&["a::TRACE"]);
        assert_eq!(
            e,
            E::StaticBranch {
                site: "TRACE".into(),
                branches
            }
        );
        assert!(
            m.contains("is a static branch (a::TRACE): it follows its key"),
            "{m}"
        );

        // A program whose only sites are static branches says so.
        let (_, m) = err(resolve("x=y", &[&BRANCH], &cpu));
        let want = "unknown site \"x\"; this program has no sites ALTPATCH can choose for, \
                    only static branches, which follow their keys (StaticKey::enable/disable): \
                    a::TRACE";
        assert_eq!(m, format!("ALTPATCH: {want}"));
        let (_, m) = err(resolve("x=y", &[], &cpu));
        assert_eq!(m, "ALTPATCH: unknown site \"x\"; this program has no sites");
    }

    #[test]
    fn unknown_candidates() {
        let cpu = all_features();
        let (e, m) = err(resolve("popcount=avx9", &[&POPCOUNT, &SUM], &cpu));
        let E::UnknownCandidate {
            site,
            candidate,
            known,
        } = e
        else {
            panic!("{e:?}")
        };
        assert_eq!((&*site, &*candidate), ("a::popcount", "avx9"));
        assert_eq!(known, ["default", "popcnt"]);
        let want =
            "site \"a::popcount\" has no candidate \"avx9\"; its candidates: default, popcnt";
        assert_eq!(m, format!("ALTPATCH: {want}"));
        // Every site sharing the name must have the candidate.
        static OTHER: SiteDescriptor = descriptor("a::popcount", &[DEFAULT]);
        let (e, _) = err(resolve("popcount=popcnt", &[&POPCOUNT, &OTHER], &cpu));
        assert!(matches!(e, E::UnknownCandidate { known, .. } if known == ["default"]));
    }

    #[test]
    fn forced_candidates_need_their_features() {
        let (masked, _) = (
            all_features().without(FeatureSet::EMPTY.with(Feature::Bmi2)),
            (),
        );
        let (e, m) = err(resolve("sum=avx2", &[&SUM], &masked));
        let want = E::MissingFeatures {
            site: "b::sum".into(),
            candidate: "avx2".into(),
            missing: vec!["bmi2"],
        };
        assert_eq!(e, want);
        let want = "b::sum=avx2 is refused: candidate \"avx2\" needs bmi2, which this CPU lacks \
                    (or cpu=- hides); forced, it would make the CPU fault on its instructions";
        assert_eq!(m, format!("ALTPATCH: {want}"));
        let bare = Cpu::synthetic(FeatureSet::EMPTY, None);
        let (e, _) = err(resolve("sum=avx2", &[&SUM], &bare));
        assert!(matches!(e, E::MissingFeatures { missing, .. } if missing == ["bmi2", "avx2"]));
        // The default and candidates whose predicates need no feature can always be forced.
        assert!(resolve("sum=vm,popcount=default", &[&SUM, &POPCOUNT], &bare).is_ok());
        assert!(resolve("sum=avx2", &[&SUM], &all_features()).is_ok());
    }

    #[test]
    fn environment_value() {
        let var = |text: &str| Overrides::from_var(Some(text.into()));
        assert_eq!(Overrides::from_var(None), Ok(Overrides::default()));
        assert_eq!(var(" "), Ok(Overrides::default()));
        assert_eq!(var("off"), Ok(parse("off")));
        let (e, _) = err(var("x"));
        assert!(matches!(e, E::Malformed { position: 1, .. }));
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt;
            let bytes = OsString::from_vec(vec![b'o', 0xff]);
            let (e, m) = err(Overrides::from_var(Some(bytes)));
            assert_eq!(e, E::NotUnicode);
            assert!(m.starts_with("ALTPATCH: the value is not valid UTF-8; expected `off`"));
        }
        // The real variable is only read, never set: tests run in parallel threads.
        assert_eq!(ENV_VAR, "ALTPATCH");
        let _ = Overrides::from_env();
    }
}
