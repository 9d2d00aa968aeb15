//! Reads every site record out of an image and judges it by the runtime's own rules.
//!
//! The record (`SiteRecord`, `ReplEntry`) is read field by field at the offsets of its documented
//! layout; the descriptor (`SiteDescriptor`, `Candidate`) at the offsets of patch-core's
//! `#[repr(C)]` structs, through `offset_of!`/`size_of`. Those are the layouts of the patch-core
//! this tool is built with: the tool must be built from the same altpatch version as the binary it
//! reads (the record's version byte catches a changed record, not a changed descriptor).

use std::mem::{offset_of, size_of};

use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter, OpKind};
use patch_core::plan::{self, Block};
use patch_core::record::{
    Candidate, RECORD_VERSION, ReplEntry, SITES_SECTION, SiteDescriptor, SiteKind, SiteRecord,
};
use serde::Serialize;

use crate::image::Image;

/// Size of one record: `.long site, descriptor, table - .`, `.byte len, kind, count, version`.
const RECORD_SIZE: usize = 16;
/// Size of one candidate table entry: `.long bytes - .`, `.byte len, 0, 0, 0`.
const ENTRY_SIZE: u64 = 8;
// The layout read below is the one patch-core's structs have.
const _: () = assert!(size_of::<SiteRecord>() == RECORD_SIZE);
const _: () = assert!(size_of::<ReplEntry>() as u64 == ENTRY_SIZE);
// A `&str` or a slice reference is a (pointer, length) pair of words.
const _: () = assert!(size_of::<&str>() == 16 && size_of::<&[Candidate]>() == 16);

/// Everything the tool found in one file.
#[derive(Serialize)]
pub struct Inspection {
    /// The file inspected.
    pub binary: String,
    /// `ET_DYN`: addresses are offsets from a load base chosen at run time.
    pub pie: bool,
    /// The record layout version this tool understands.
    pub record_version: u8,
    /// Link-time address and size of `altpatch_sites`; `None` when the file has no such section
    /// (a program without sites, or one whose sites the linker dropped).
    pub sites_section: Option<SectionRange>,
    /// Every record in `altpatch_sites`, in link order (the runtime report's order).
    pub sites: Vec<Site>,
    /// Problems with the file as a whole (they make the exit status 1).
    pub problems: Vec<String>,
    /// Set by `--check-report`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<crate::check::CheckResult>,
}

impl Inspection {
    /// How many records the runtime would refuse.
    pub fn refused(&self) -> usize {
        self.sites
            .iter()
            .filter(|s| s.status == Status::Refused)
            .count()
    }
}

/// Where a section is loaded.
#[derive(Serialize)]
pub struct SectionRange {
    pub vaddr: u64,
    pub size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The runtime would verify and plan this site.
    Ok,
    /// The runtime would leave this site as built; `reason` says why.
    Refused,
}

/// One record (one inlined copy of a site).
#[derive(Serialize)]
pub struct Site {
    /// Position in `altpatch_sites`.
    pub index: usize,
    /// Site name; `None` when the record is not understood or its descriptor is unreadable (the
    /// runtime reports `?` then).
    pub name: Option<String>,
    /// Source file.
    pub file: Option<String>,
    /// Source line.
    pub line: Option<u32>,
    /// Link-time address of the record itself.
    pub record_vaddr: u64,
    /// Where the record is in the file.
    pub record_file_offset: Option<u64>,
    /// Link-time address of the site's first byte (add the load base for a PIE).
    pub vaddr: u64,
    /// Where the site's bytes are in the file, if they are in it.
    pub file_offset: Option<u64>,
    /// The section holding the site.
    pub section: Option<String>,
    /// Length of the site in bytes.
    pub len: u8,
    /// Kind name (`call site`, ...), or `None` for a kind this version does not know.
    pub kind: Option<&'static str>,
    /// The raw kind byte.
    pub kind_byte: u8,
    /// Record layout version.
    pub version: u8,
    /// Number of candidate table entries, the default first.
    pub count: u8,
    pub status: Status,
    /// Why it would be refused, in the runtime report's words.
    pub reason: Option<String>,
    /// The site's bytes as built, in hex.
    pub bytes: Option<String>,
    /// The site's bytes as built, disassembled at the site's address.
    pub disassembly: Vec<String>,
    /// The candidate blocks, the default first.
    pub candidates: Vec<CandidateBlock>,
}

impl Site {
    /// `file:line` as the report prints it (`?:0` when the descriptor is not read).
    pub fn location(&self) -> String {
        format!(
            "{}:{}",
            self.file.as_deref().unwrap_or("?"),
            self.line.unwrap_or(0)
        )
    }

    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or("?")
    }
}

/// One candidate: its descriptor entry and its block in `altpatch_repl`.
#[derive(Serialize)]
pub struct CandidateBlock {
    pub name: Option<String>,
    /// The predicate as written in the source (`always` for the default).
    pub predicate: Option<String>,
    /// Where the block was assembled (its relative operands are relative to this).
    pub vaddr: Option<u64>,
    /// The block in hex (empty for a `nop` candidate).
    pub bytes: Option<String>,
    /// The block disassembled where it was assembled.
    pub disassembly: Vec<String>,
}

/// Reads and judges every record of `image`.
pub fn inspect(binary: &str, image: &Image<'_>) -> Inspection {
    let mut inspection = Inspection {
        binary: binary.to_string(),
        pie: image.pie,
        record_version: RECORD_VERSION,
        sites_section: None,
        sites: Vec::new(),
        problems: Vec::new(),
        check: None,
    };
    let Some(section) = image.section(SITES_SECTION) else {
        // A program built without sites (or without altpatch) has none; not an error by itself.
        return inspection;
    };
    let (addr, size) = (section.addr, section.size);
    inspection.sites_section = Some(SectionRange { vaddr: addr, size });
    // The runtime walks the section as loaded; here it must be in the file (which also bounds
    // the walk when the section header is garbage).
    if let Err(e) = usize::try_from(size)
        .map_err(|e| e.to_string())
        .and_then(|size| image.bytes(addr, size))
    {
        inspection
            .problems
            .push(format!("{SITES_SECTION} cannot be read: {e}"));
        return inspection;
    }
    if size % RECORD_SIZE as u64 != 0 {
        inspection.problems.push(format!(
            "{SITES_SECTION} is {size} bytes, not a whole number of {RECORD_SIZE}-byte records: \
             the runtime would misread it"
        ));
    }
    for index in 0..size / RECORD_SIZE as u64 {
        let at = addr + index * RECORD_SIZE as u64;
        match read_site(image, index as usize, at) {
            Ok(site) => inspection.sites.push(site),
            Err(e) => inspection
                .problems
                .push(format!("record {index} at {at:#x} is unreadable: {e}")),
        }
    }
    inspection
}

/// The raw record at `at`; errors only when the record itself is not in the file.
fn read_site(image: &Image<'_>, index: usize, at: u64) -> Result<Site, String> {
    let vaddr = image.self_relative(at)?;
    let descriptor = image.self_relative(at.wrapping_add(4))?;
    let table = image.self_relative(at.wrapping_add(8))?;
    let [len, kind_byte, count, version] = image.u32_at(at.wrapping_add(12))?.to_le_bytes();
    let kind = SiteKind::from_u8(kind_byte);
    let site_bytes = image.bytes(vaddr, usize::from(len)).ok();
    let mut site = Site {
        index,
        name: None,
        file: None,
        line: None,
        record_vaddr: at,
        record_file_offset: image.file_offset(at),
        vaddr,
        file_offset: image.file_offset(vaddr),
        section: image.section_of(vaddr).map(str::to_string),
        len,
        kind: kind.map(SiteKind::name),
        kind_byte,
        version,
        count,
        status: Status::Ok,
        reason: None,
        bytes: site_bytes.map(hex),
        disassembly: site_bytes.map_or_else(Vec::new, |b| disassemble(image, b, vaddr)),
        candidates: Vec::new(),
    };
    if let Err(reason) = judge(image, &mut site, descriptor, table) {
        site.status = Status::Refused;
        site.reason = Some(reason);
    }
    Ok(site)
}

/// Fills in the descriptor and candidates and applies the runtime's checks, in its order
/// (`plan_record` in patch-core's apply.rs); the error is the reason the runtime would give.
fn judge(image: &Image<'_>, site: &mut Site, descriptor: u64, table: u64) -> Result<(), String> {
    // `record::is_understood`, on the raw fields (its argument type cannot be built from a file).
    if site.version != RECORD_VERSION || site.kind.is_none() || site.count < 1 {
        return Err(format!(
            "record not understood (version {}, kind {}, {} entries; this tool reads version \
             {RECORD_VERSION}); left as built",
            site.version, site.kind_byte, site.count
        ));
    }
    let unreadable = |e: String| format!("descriptor at {descriptor:#x} is unreadable: {e}");
    let name = image
        .str_at(descriptor.wrapping_add(offset_of!(SiteDescriptor, name) as u64))
        .map_err(unreadable)?;
    let file = image
        .str_at(descriptor.wrapping_add(offset_of!(SiteDescriptor, file) as u64))
        .map_err(unreadable)?;
    let line = image
        .u32_at(descriptor.wrapping_add(offset_of!(SiteDescriptor, line) as u64))
        .map_err(unreadable)?;
    let list_at = descriptor.wrapping_add(offset_of!(SiteDescriptor, candidates) as u64);
    let list = image.pointer_at(list_at).map_err(unreadable)?;
    let n = image.u64_at(list_at.wrapping_add(8)).map_err(unreadable)?;
    site.name = Some(name);
    site.file = Some(file);
    site.line = Some(line);

    // Read as many candidates as both lists have, so a mismatch still shows what is there.
    let stride = size_of::<Candidate>() as u64;
    for i in 0..n.min(u64::from(site.count)) {
        let entry = list.wrapping_add(i * stride);
        let text = |offset: usize| image.str_at(entry.wrapping_add(offset as u64)).ok();
        let block = read_block(image, table.wrapping_add(i * ENTRY_SIZE));
        site.candidates.push(CandidateBlock {
            name: text(offset_of!(Candidate, name)),
            predicate: text(offset_of!(Candidate, predicate_text)),
            vaddr: block.as_ref().ok().map(|b| b.1),
            bytes: block.as_ref().ok().map(|b| hex(b.0)),
            disassembly: block
                .as_ref()
                .map_or_else(|e| vec![format!("({e})")], |b| disassemble(image, b.0, b.1)),
        });
    }
    if n != u64::from(site.count) {
        return Err(format!(
            "record has {} candidate blocks but its descriptor names {n}; left as built",
            site.count
        ));
    }
    for (i, c) in site.candidates.iter().enumerate() {
        if c.name.is_none() || c.predicate.is_none() {
            return Err(unreadable(format!("candidate {i}'s name or predicate")));
        }
    }

    let len = usize::from(site.len);
    if !image.is_executable(site.vaddr, u64::from(site.len)) {
        return Err(format!(
            "site {:#x}+{len} is not in executable memory; left alone",
            site.vaddr
        ));
    }
    let names: Vec<&str> = site
        .candidates
        .iter()
        .map(|c| c.name.as_deref().unwrap_or("?"))
        .collect();
    let mut blocks = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let (bytes, ip) = read_block(image, table.wrapping_add(i as u64 * ENTRY_SIZE))
            .map_err(|e| format!("candidate {name}'s table entry is unreadable: {e}"))?;
        if !image.is_readable(ip, bytes.len() as u64) {
            return Err(format!(
                "candidate {name} bytes at {ip:#x} are not readable; left alone"
            ));
        }
        blocks.push(Block { bytes, ip });
    }
    let current = image
        .bytes(site.vaddr, len)
        .map_err(|e| format!("site bytes are not in the file: {e}"))?;
    // The runtime plans for whichever candidate the CPU selects; try them all, so a refusal that
    // depends on the choice is found whatever the machine. Addresses are link-time ones: a PIE's
    // load base shifts the site and every block alike, which relative operands do not see.
    for chosen in 0..blocks.len() {
        plan::plan_site(site.vaddr, current, &blocks, &names, chosen)
            .map_err(|refusal| format!("refused: {refusal}; runs what it ran before"))?;
    }
    Ok(())
}

/// A `ReplEntry` at `at`: the block's bytes and the address they were assembled at.
fn read_block<'a>(image: &Image<'a>, at: u64) -> Result<(&'a [u8], u64), String> {
    let ip = image.self_relative(at)?;
    let len = image.u8_at(at.wrapping_add(4))?;
    Ok((image.bytes(ip, usize::from(len))?, ip))
}

/// `e8 12 34 56 78`.
pub fn hex(bytes: &[u8]) -> String {
    let parts: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(" ")
}

/// One line per instruction, Intel syntax, addresses link-time ones; a branch target or
/// RIP-relative operand is followed by the symbol holding it: `call 0x589a0 <quickstart::f>`.
pub fn disassemble(image: &Image<'_>, bytes: &[u8], ip: u64) -> Vec<String> {
    let mut formatter = IntelFormatter::new();
    let options = formatter.options_mut();
    options.set_space_after_operand_separator(true);
    options.set_hex_prefix("0x");
    options.set_hex_suffix("");
    options.set_uppercase_hex(false);
    options.set_branch_leading_zeros(false);
    options.set_rip_relative_addresses(true);
    let mut out = Vec::new();
    for instr in Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE).iter() {
        if instr.is_invalid() {
            out.push(format!("(bad) at +{}", instr.ip() - ip));
            break;
        }
        let mut text = String::new();
        formatter.format(&instr, &mut text);
        let target = if instr.op_count() == 1 && instr.op0_kind() == OpKind::NearBranch64 {
            Some(instr.near_branch_target())
        } else if instr.is_ip_rel_memory_operand() {
            Some(instr.ip_rel_memory_address())
        } else {
            None
        };
        if let Some(name) = target.and_then(|t| image.symbol_for(t)) {
            text.push_str(&format!(" <{name}>"));
        }
        out.push(text);
    }
    out
}
