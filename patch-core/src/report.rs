//! Report: what `apply_patches()` found and did, site by site.

use core::fmt;
use std::borrow::Cow;
use std::time::Duration;

use crate::cpu::Cpu;
use crate::overrides::OverrideError;
use crate::plan::Shape;
use crate::record::{self, SiteDescriptor, SiteKind, SiteRecord};
use crate::write::BatchStats;

/// How a site runs after apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "lowercase")
)]
pub enum How {
    /// A direct `call` to the chosen candidate.
    Call,
    /// A direct `jmp` to the chosen candidate.
    Jmp,
    /// The chosen candidate's instructions, inline.
    Inline,
    /// NOPs only.
    Nop,
    /// The site holds its build-time bytes: it runs its default.
    Unpatched,
    /// The site was left alone without being recognised (its bytes are none of its candidates,
    /// or could not be read; its record is not understood): what it runs is not known.
    Unknown,
}

impl How {
    /// How a site holding candidate `index`, whose bytes do `shape`, runs: `Unpatched` for the
    /// default as built (a trampoline's default as built is its `jmp`; a copy of the default's
    /// body is `Inline`).
    pub(crate) fn running(index: usize, shape: Shape, site: &SiteRecord) -> How {
        let trampoline = site.kind() == Some(SiteKind::Trampoline);
        match shape {
            Shape::Jump { .. } if index == 0 => How::Unpatched,
            _ if index == 0 && !trampoline => How::Unpatched,
            _ => How::of(shape),
        }
    }

    pub(crate) fn of(shape: Shape) -> How {
        match shape {
            Shape::Call { .. } => How::Call,
            Shape::Jump { .. } => How::Jmp,
            Shape::Nop => How::Nop,
            Shape::Inline { .. } => How::Inline,
        }
    }

    /// Short name (`call`, `jmp`, `inline`, `nop`, `unpatched`, `unknown`).
    pub fn name(self) -> &'static str {
        match self {
            How::Call => "call",
            How::Jmp => "jmp",
            How::Inline => "inline",
            How::Nop => "nop",
            How::Unpatched => "unpatched",
            How::Unknown => "unknown",
        }
    }
}

impl fmt::Display for How {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// One site (one inlined copy of it) in the report.
///
/// An entry holds only what apply decided (40 bytes); the site's names, source location and
/// address are read from its record when asked. A first apply touches every entry of a report of
/// thousands, and each fresh page costs about a microsecond in a VM guest.
#[derive(Clone)]
pub struct SiteReport {
    pub(crate) record: &'static SiteRecord,
    pub(crate) why: Cow<'static, str>,
    /// Index of the selected candidate in the site's table.
    pub(crate) chosen: u8,
    pub(crate) how: How,
    pub(crate) written: bool,
}

impl SiteReport {
    pub(crate) fn new(record: &'static SiteRecord, why: Cow<'static, str>) -> SiteReport {
        SiteReport {
            record,
            why,
            chosen: 0,
            how: How::Unpatched,
            written: false,
        }
    }

    /// A site left alone without being recognised: [`How::Unknown`].
    pub(crate) fn unknown(record: &'static SiteRecord, why: Cow<'static, str>) -> SiteReport {
        SiteReport {
            how: How::Unknown,
            ..SiteReport::new(record, why)
        }
    }

    fn descriptor(&self) -> Option<&'static SiteDescriptor> {
        record::is_understood(self.record).then(|| self.record.descriptor())
    }

    /// Full name, `module::function` (`?` for a record this version does not understand).
    pub fn name(&self) -> &'static str {
        self.descriptor().map_or("?", |d| d.name)
    }

    /// Source file.
    pub fn file(&self) -> &'static str {
        self.descriptor().map_or("?", |d| d.file)
    }

    /// Source line.
    pub fn line(&self) -> u32 {
        self.descriptor().map_or(0, |d| d.line)
    }

    /// Address of the site's first byte.
    pub fn addr(&self) -> usize {
        self.record.site_addr()
    }

    /// Length of the site in bytes.
    #[allow(clippy::len_without_is_empty, reason = "a site is never empty")]
    pub fn len(&self) -> usize {
        usize::from(self.record.len)
    }

    /// Kind of site (`None` for a record this version does not understand).
    pub fn kind(&self) -> Option<SiteKind> {
        self.record.kind()
    }

    /// The site's record: its candidates' bytes, for tools and tests that decode them.
    pub fn record(&self) -> &'static SiteRecord {
        self.record
    }

    /// Candidate names, the default first.
    pub fn candidates(&self) -> impl ExactSizeIterator<Item = &'static str> + Clone + use<> {
        self.descriptor()
            .map_or(&[][..], |d| d.candidates)
            .iter()
            .map(|c| c.name)
    }

    /// The candidate the site's bytes hold after the apply: the selected one where it was
    /// written or found in place, else the one the site already held (a write that failed or
    /// must wait for no other thread to run; a configuration error). `?` for a site left
    /// alone without being recognised ([`How::Unknown`]).
    pub fn chosen(&self) -> &'static str {
        if self.how == How::Unknown {
            return "?";
        }
        self.descriptor()
            .and_then(|d| d.candidates.get(usize::from(self.chosen)))
            .map_or("default", |c| c.name)
    }

    /// How the site runs now: what [`chosen`](Self::chosen)'s bytes at the site do
    /// (`Unpatched`: the default, as built).
    pub fn how(&self) -> How {
        self.how
    }

    /// Whether this apply wrote the site.
    pub fn written(&self) -> bool {
        self.written
    }

    /// Why: the selection's reason, or why the site was left alone (and what was selected, when
    /// it could not be written).
    pub fn why(&self) -> &str {
        &self.why
    }
}

impl fmt::Debug for SiteReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SiteReport")
            .field("name", &self.name())
            .field("file", &self.file())
            .field("line", &self.line())
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len())
            .field("kind", &self.kind())
            .field("candidates", &self.candidates().collect::<Vec<_>>())
            .field("chosen", &self.chosen())
            .field("how", &self.how)
            .field("written", &self.written)
            .field("why", &self.why)
            .finish()
    }
}

/// The entry as data: the same fields its methods return.
#[cfg(feature = "serde")]
impl serde::Serialize for SiteReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Entry<'a> {
            name: &'a str,
            file: &'a str,
            line: u32,
            addr: usize,
            len: usize,
            kind: Option<SiteKind>,
            candidates: Vec<&'a str>,
            chosen: &'a str,
            how: How,
            written: bool,
            why: &'a str,
        }
        serde::Serialize::serialize(
            &Entry {
                name: self.name(),
                file: self.file(),
                line: self.line(),
                addr: self.addr(),
                len: self.len(),
                kind: self.kind(),
                candidates: self.candidates().collect(),
                chosen: self.chosen(),
                how: self.how,
                written: self.written,
                why: &self.why,
            },
            s,
        )
    }
}

/// The result of `apply_patches()`.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Report {
    /// Every site record in the program, in link order.
    pub sites: Vec<SiteReport>,
    /// The CPU snapshot selection used (after `ALTPATCH` `cpu=` masking).
    pub cpu: Cpu,
    /// Why no candidate was selected (platform, `ALTPATCH=off`, a configuration error), if so.
    /// Nothing is written then, except that `off` puts back the defaults an earlier apply
    /// replaced.
    pub disabled: Option<String>,
    /// A malformed `ALTPATCH` value or an unknown name in it.
    #[cfg_attr(
        feature = "serde",
        serde(serialize_with = "crate::report::display_opt")
    )]
    pub error: Option<OverrideError>,
    /// The writer used.
    pub writer: &'static str,
    /// Pages written, serializations, live protocol.
    pub stats: BatchStats,
    /// Time spent in apply.
    pub elapsed: Duration,
}

impl Report {
    /// The report of an apply called on a thread already patching (a signal handler that
    /// interrupted an apply or a key toggle): it examined nothing, so it lists no site.
    pub(crate) fn reentered() -> Report {
        Report {
            sites: Vec::new(),
            cpu: Cpu::synthetic(Default::default(), None),
            disabled: Some(
                "apply re-entered on a thread already patching (from a signal handler?); \
                 nothing examined or written"
                    .into(),
            ),
            error: None,
            writer: "none",
            stats: BatchStats::default(),
            elapsed: Duration::ZERO,
        }
    }

    /// Sites written or already holding a non-default candidate.
    pub fn patched(&self) -> usize {
        self.sites
            .iter()
            .filter(|s| !matches!(s.how, How::Unpatched | How::Unknown))
            .count()
    }

    /// Sites left alone without being recognised ([`How::Unknown`]).
    pub fn unknown(&self) -> usize {
        self.sites.iter().filter(|s| s.how == How::Unknown).count()
    }

    /// The reports of every site `name` names: a full name, or a `::`-suffix (unlike `ALTPATCH`,
    /// a suffix several site names end with yields all of them), every inlined copy of each.
    pub fn site<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a SiteReport> + 'a {
        self.sites
            .iter()
            .filter(move |s| crate::overrides::Overrides::site_matches(name, s.name()))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let written = self.sites.iter().filter(|s| s.written).count();
        write!(
            f,
            "altpatch: {} sites, {} patched ({} written now), {} unpatched{}; {} pages, {} serializations{}, writer {}, {:.1?}",
            self.sites.len(),
            self.patched(),
            written,
            self.sites.len() - self.patched() - self.unknown(),
            match self.unknown() {
                0 => String::new(),
                n => format!(", {n} unknown (refused)"),
            },
            self.stats.pages,
            self.stats.serializations,
            if self.stats.live {
                " (live: other threads running)"
            } else {
                ""
            },
            self.writer,
            self.elapsed,
        )?;
        writeln!(f)?;
        writeln!(f, "cpu: {}", self.cpu)?;
        match &self.disabled {
            Some(why) if written == 0 => writeln!(f, "nothing written: {why}")?,
            Some(why) => writeln!(f, "{why}: {written} sites restored to their defaults")?,
            None => {}
        }
        if let Some(warning) = &self.stats.warning {
            writeln!(f, "warning: {warning}")?;
        }
        let location = |s: &SiteReport| format!("{}:{}", s.file(), s.line());
        let candidates = |s: &SiteReport| s.candidates().collect::<Vec<_>>().join(",");
        let w_name = self
            .sites
            .iter()
            .map(|s| s.name().len())
            .max()
            .unwrap_or(0)
            .max(4);
        let w_loc = self
            .sites
            .iter()
            .map(|s| location(s).len())
            .max()
            .unwrap_or(0)
            .max(8);
        let w_cand = self
            .sites
            .iter()
            .map(|s| candidates(s).len())
            .max()
            .unwrap_or(0)
            .max(10);
        let w_chosen = self
            .sites
            .iter()
            .map(|s| s.chosen().len())
            .max()
            .unwrap_or(0)
            .max(6);
        writeln!(
            f,
            "{:w_name$}  {:w_loc$}  {:>14}  {:w_cand$}  {:w_chosen$}  {:9}  why",
            "site", "location", "address", "candidates", "chosen", "how"
        )?;
        for s in &self.sites {
            writeln!(
                f,
                "{:w_name$}  {:w_loc$}  {:>#14x}  {:w_cand$}  {:w_chosen$}  {:9}  {}",
                s.name(),
                location(s),
                s.addr(),
                candidates(s),
                s.chosen(),
                s.how,
                s.why
            )?;
        }
        Ok(())
    }
}

/// Serializes an optional error as its message.
#[cfg(feature = "serde")]
fn display_opt<T: fmt::Display, S: serde::Serializer>(
    value: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A first apply faults in a page per ~100 entries; 112-byte entries cost it 0.2 ms at 11,000
    /// sites.
    #[test]
    fn report_entries_stay_small() {
        assert!(size_of::<SiteReport>() <= 40, "{}", size_of::<SiteReport>());
    }
}
