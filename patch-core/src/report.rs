//! Report: what `apply_patches()` found and did, site by site.

use core::fmt;
use std::borrow::Cow;
use std::time::Duration;

use crate::cpu::Cpu;
use crate::overrides::OverrideError;
use crate::plan::Shape;
use crate::record::SiteKind;
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
    /// The site was left as built: it runs its default.
    Unpatched,
}

impl How {
    pub(crate) fn of(shape: Shape) -> How {
        match shape {
            Shape::Call { .. } => How::Call,
            Shape::Jump { .. } => How::Jmp,
            Shape::Nop => How::Nop,
            Shape::Inline { .. } => How::Inline,
        }
    }

    /// Short name (`call`, `jmp`, `inline`, `nop`, `unpatched`).
    pub fn name(self) -> &'static str {
        match self {
            How::Call => "call",
            How::Jmp => "jmp",
            How::Inline => "inline",
            How::Nop => "nop",
            How::Unpatched => "unpatched",
        }
    }
}

impl fmt::Display for How {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// One site (one inlined copy of it) in the report.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct SiteReport {
    /// Full name, `module::function`.
    pub name: &'static str,
    /// Source file.
    pub file: &'static str,
    /// Source line.
    pub line: u32,
    /// Address of the site's first byte.
    pub addr: usize,
    /// Length of the site in bytes.
    pub len: usize,
    /// Kind of site (`None` for a record this version does not understand).
    pub kind: Option<SiteKind>,
    /// Candidate names, the default first.
    pub candidates: &'static [&'static str],
    /// The selected candidate (what runs, unless `how` is `Unpatched`).
    pub chosen: &'static str,
    /// How the site runs now.
    pub how: How,
    /// Whether this apply wrote the site.
    pub written: bool,
    /// Why: the selection's reason, or why the site was left alone.
    pub why: Cow<'static, str>,
}

/// The result of `apply_patches()`.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Report {
    /// Every site record in the program, in link order.
    pub sites: Vec<SiteReport>,
    /// The CPU snapshot selection used (after `ALTPATCH` `cpu=` masking).
    pub cpu: Cpu,
    /// Why nothing was written at all (platform, `ALTPATCH=off`, a configuration error), if so.
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
    /// Sites written or already holding a non-default candidate.
    pub fn patched(&self) -> usize {
        self.sites
            .iter()
            .filter(|s| s.how != How::Unpatched)
            .count()
    }

    /// The reports of every inlined copy of the site named `name` (full name or last segment).
    pub fn site<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a SiteReport> + 'a {
        self.sites
            .iter()
            .filter(move |s| crate::overrides::Overrides::site_matches(name, s.name))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let written = self.sites.iter().filter(|s| s.written).count();
        write!(
            f,
            "altpatch: {} sites, {} patched ({} written now), {} unpatched; {} pages, {} serializations{}, writer {}, {:.1?}",
            self.sites.len(),
            self.patched(),
            written,
            self.sites.len() - self.patched(),
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
        if let Some(why) = &self.disabled {
            writeln!(f, "nothing written: {why}")?;
        }
        if let Some(warning) = &self.stats.warning {
            writeln!(f, "warning: {warning}")?;
        }
        let location = |s: &SiteReport| format!("{}:{}", s.file, s.line);
        let candidates = |s: &SiteReport| s.candidates.join(",");
        let w_name = self
            .sites
            .iter()
            .map(|s| s.name.len())
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
            .map(|s| s.chosen.len())
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
                s.name,
                location(s),
                s.addr,
                candidates(s),
                s.chosen,
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
