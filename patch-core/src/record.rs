//! Site records: what the macros emit for every patchable place in `.text`.
//!
//! A site's `asm!` block emits, next to its instructions:
//!
//! * one [`SiteRecord`] into the retained section [`SITES_SECTION`] (`altpatch_sites_v0_1`). Every
//!   inlined copy of a site gets its own record, because the assembler sees each copy. The section
//!   is iterated through the linker-defined `__start_`/`__stop_` symbols of its name;
//! * a table of [`ReplEntry`] into [`REPL_SECTION`], one per candidate, the default first, each
//!   pointing at that candidate's instructions, assembled in the same section. A call candidate is a
//!   `call sym` there, an inline candidate its instructions, a NOP candidate no bytes at all.
//!
//! Every offset is self-relative (`.long target - .`), so the records need no dynamic relocations
//! and stay read-only in a PIE. The Rust-level facts (names, predicates) live in a
//! [`SiteDescriptor`] the record points at, with the same candidate order as the table.

use crate::select::Predicate;

/// Version of the record layout written in [`SiteRecord::version`].
pub const RECORD_VERSION: u8 = 1;

/// The name of [`SITES_SECTION`], for `asm!` templates and link names (which take literals and
/// `concat!`, not constants): the one place it is written in this crate.
///
/// It carries the crate's semver-compatible version (`v{major}_{minor}`): two semver-incompatible
/// copies of altpatch linked into one program (cargo allows it) put their records in different
/// sections, and each copy walks and patches only its own. `patch-macros` derives the same name
/// from its own version, which moves with this crate's; a test checks this one against it.
#[doc(hidden)]
#[macro_export]
macro_rules! __sites_section {
    () => {
        "altpatch_sites_v0_1"
    };
}

/// The name of [`REPL_SECTION`] (see [`__sites_section!`]).
#[doc(hidden)]
#[macro_export]
macro_rules! __repl_section {
    () => {
        "altpatch_repl_v0_1"
    };
}

/// The linker section holding [`SiteRecord`]s, named after this crate's semver-compatible
/// version so that each copy of altpatch in a program finds only its own records.
pub const SITES_SECTION: &str = __sites_section!();
/// The linker section holding candidate tables and replacement bytes.
pub const REPL_SECTION: &str = __repl_section!();

/// What kind of code a site is, which decides how it is selected and reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "snake_case")
)]
pub enum SiteKind {
    /// A `call` to the default inside a caller, with NOP padding: becomes a direct call, inline
    /// instructions or NOPs.
    CallSite = 1,
    /// A `jmp` to the default at the start of a per-function trampoline: retargeted.
    Trampoline = 2,
    /// Default instructions padded to the longest candidate: replaced by a candidate's block.
    Inline = 3,
    /// A static-key branch: an out-of-line flag check, a NOP or a `jmp`, chosen by its key.
    StaticBranch = 4,
}

impl SiteKind {
    /// Decodes the kind byte of a record.
    pub const fn from_u8(value: u8) -> Option<SiteKind> {
        match value {
            1 => Some(SiteKind::CallSite),
            2 => Some(SiteKind::Trampoline),
            3 => Some(SiteKind::Inline),
            4 => Some(SiteKind::StaticBranch),
            _ => None,
        }
    }

    /// Short name for reports.
    pub const fn name(self) -> &'static str {
        match self {
            SiteKind::CallSite => "call site",
            SiteKind::Trampoline => "trampoline",
            SiteKind::Inline => "inline",
            SiteKind::StaticBranch => "static branch",
        }
    }
}

/// A site's static description, shared by all inlined copies of it.
///
/// `#[repr(C)]` so tools can read it out of a built binary (`altpatch-inspect`).
#[repr(C)]
#[derive(Debug)]
pub struct SiteDescriptor {
    /// Full name: `module::path::function`, or the name given with `name = "..."`.
    pub name: &'static str,
    /// Source file of the site.
    pub file: &'static str,
    /// Source line of the site.
    pub line: u32,
    /// Candidates in preference order, the default first; parallel to the record's table.
    pub candidates: &'static [Candidate],
    /// For a static branch: its key, which selects the candidate instead of predicates.
    pub key: Option<crate::static_key::KeySite>,
}

impl SiteDescriptor {
    /// The candidates' names, the default first.
    pub fn candidate_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.candidates.iter().map(|c| c.name)
    }
}

/// One way to run a site.
///
/// `#[repr(C)]` with the predicate last, so tools can read the names out of a built binary.
#[repr(C)]
#[derive(Debug)]
pub struct Candidate {
    /// The name used in reports and `ALTPATCH=site=name`.
    pub name: &'static str,
    /// The predicate as written in the source (`all(avx2, bmi2)`), for tools and reports.
    pub predicate_text: &'static str,
    /// When this candidate may run; the default's is [`Predicate::Always`].
    pub predicate: Predicate,
}

/// One candidate's replacement bytes, emitted in the [`REPL_SECTION`] section.
#[repr(C)]
#[derive(Debug)]
pub struct ReplEntry {
    /// Self-relative offset of the bytes.
    bytes: i32,
    /// Length of the bytes.
    len: u8,
    _reserved: [u8; 3],
}

/// One patchable place in `.text`, as emitted by a site's `asm!` block.
///
/// Layout (16 bytes, 4-aligned), the same in the macros' assembly:
/// `.long site - .`, `.long descriptor - .`, `.long table - .`, `.byte len, kind, count, version`.
#[repr(C)]
#[derive(Debug)]
pub struct SiteRecord {
    site: i32,
    descriptor: i32,
    table: i32,
    /// Length of the site in bytes (the longest candidate, padded).
    pub len: u8,
    kind: u8,
    /// Number of table entries: the default and the candidates.
    pub count: u8,
    /// Layout version; [`RECORD_VERSION`] for records this crate understands.
    pub version: u8,
}

/// Resolves a self-relative offset stored at `field`.
fn resolve(field: &i32) -> usize {
    (field as *const i32 as usize).wrapping_add_signed(*field as isize)
}

impl SiteRecord {
    /// Address of the site's first byte.
    pub fn site_addr(&self) -> usize {
        resolve(&self.site)
    }

    /// The site's kind, or `None` for a kind byte this version does not know.
    pub fn kind(&self) -> Option<SiteKind> {
        SiteKind::from_u8(self.kind)
    }

    /// The site's descriptor.
    pub fn descriptor(&self) -> &'static SiteDescriptor {
        // SAFETY: records are only produced by this crate's macros, which point `descriptor` at a
        // `static SiteDescriptor`; `records()` only yields records of the current version.
        unsafe { &*(resolve(&self.descriptor) as *const SiteDescriptor) }
    }

    fn table(&self) -> &'static [ReplEntry] {
        // SAFETY: the macros emit `count` consecutive, 4-aligned entries at `table`, in a section
        // that lives as long as the program.
        unsafe {
            core::slice::from_raw_parts(
                resolve(&self.table) as *const ReplEntry,
                usize::from(self.count),
            )
        }
    }

    /// Candidate `index`'s replacement bytes (index 0 is the default) and the address they were
    /// assembled at, which is what their relative operands are relative to.
    pub fn replacement(&self, index: usize) -> Option<(&'static [u8], usize)> {
        let entry = self.table().get(index)?;
        let addr = resolve(&entry.bytes);
        // SAFETY: each entry points at `len` bytes the macro assembled in the repl section.
        let bytes =
            unsafe { core::slice::from_raw_parts(addr as *const u8, usize::from(entry.len)) };
        Some((bytes, addr))
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
unsafe extern "C" {
    // Defined by the linker for the section named like a C identifier.
    #[link_name = concat!("__start_", __sites_section!())]
    static SITES_START: SiteRecord;
    #[link_name = concat!("__stop_", __sites_section!())]
    static SITES_STOP: SiteRecord;
}

/// Every site record linked into the program, in link order.
///
/// This includes records of a version or kind this crate does not understand ([`is_understood`]):
/// apply reports them and never patches them.
pub fn records() -> &'static [SiteRecord] {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        // Guarantee the section exists (so the `__start_`/`__stop_` symbols resolve) in a program
        // without sites, by emitting an empty contribution from this function's own object file.
        // SAFETY: the block emits no instructions; it only opens and closes a section.
        unsafe {
            core::arch::asm!(
                concat!(".pushsection ", __sites_section!(), ",\"aR\""),
                ".balign 4",
                ".popsection",
                options(nomem, nostack, preserves_flags)
            );
        }
        // SAFETY: the linker places every contribution to the section between these symbols;
        // every contribution is a whole number of 16-byte, 4-aligned records.
        unsafe {
            let start = &raw const SITES_START;
            let stop = &raw const SITES_STOP;
            let count = (stop as usize - start as usize) / size_of::<SiteRecord>();
            core::slice::from_raw_parts(start, count)
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        &[]
    }
}

/// Whether this crate can interpret `record` (known version and kind, at least a default).
pub fn is_understood(record: &SiteRecord) -> bool {
    record.version == RECORD_VERSION && record.kind().is_some() && record.count >= 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_names_carry_this_crates_semver_compatible_version() {
        let version = format!(
            "v{}_{}",
            env!("CARGO_PKG_VERSION_MAJOR"),
            env!("CARGO_PKG_VERSION_MINOR")
        );
        assert_eq!(SITES_SECTION, format!("altpatch_sites_{version}"));
        assert_eq!(REPL_SECTION, format!("altpatch_repl_{version}"));
    }

    #[test]
    fn record_layout_matches_the_assembly() {
        assert_eq!(size_of::<SiteRecord>(), 16);
        assert_eq!(align_of::<SiteRecord>(), 4);
        assert_eq!(size_of::<ReplEntry>(), 8);
    }
}
