//! The assembly a site emits: the site itself, its record in `altpatch_sites` and its candidate
//! table and blocks in `altpatch_repl`. The layout must match `patch_core::record`.
//!
//! Numeric local labels keep every inlined copy of the site distinct:
//!
//! | label            | where           | marks                                     |
//! |------------------|-----------------|-------------------------------------------|
//! | 6500 / 6599      | `.text`         | site start / end                          |
//! | 6600 + k         | `.text`         | after the padding that fits candidate k   |
//! | 6700             | `altpatch_repl` | the candidate table                       |
//! | 7000+2k, 7001+2k | `altpatch_repl` | candidate k's block start / end (0 = default) |

/// `SiteKind::CallSite` in patch-core.
pub const KIND_CALL_SITE: u8 = 1;
/// `SiteKind::Trampoline` in patch-core.
pub const KIND_TRAMPOLINE: u8 = 2;
/// `SiteKind::Inline` in patch-core.
pub const KIND_INLINE: u8 = 3;
/// `RECORD_VERSION` in patch-core.
const RECORD_VERSION: u8 = 1;

/// One candidate's instructions.
pub enum Block {
    /// `call` to the `sym` operand with this name.
    Call(String),
    /// `jmp` to the `sym` operand with this name.
    Jump(String),
    /// Instructions, one per line.
    Asm(Vec<String>),
    /// No instructions.
    Nop,
}

impl Block {
    fn lines(&self) -> Vec<String> {
        match self {
            Block::Call(operand) => vec![format!("call {{{operand}}}")],
            Block::Jump(operand) => vec![format!("jmp {{{operand}}}")],
            Block::Asm(lines) => lines.clone(),
            Block::Nop => Vec::new(),
        }
    }
}

fn start(k: usize) -> usize {
    7000 + 2 * k
}

/// The template of a site whose default is `blocks[0]`, padded to the longest block; `{desc}` and
/// `{kind}` are operands. Used by call sites and by `alternative!` inline sequences.
pub fn padded_site(blocks: &[Block]) -> String {
    let mut s = Vec::new();
    s.push("6500:".to_string());
    s.extend(blocks[0].lines());
    // Pad, at build time, to the longest candidate (the kernel's `.skip -(x > 0) * x` trick: the
    // assembler's `>` yields -1 for true).
    s.push("6600:".to_string());
    for k in 1..blocks.len() {
        let want = format!("({}f - {}f)", start(k) + 1, start(k));
        let have = format!("({}b - 6500b)", 6600 + k - 1);
        s.push(format!(
            ".skip -(({want} - {have}) > 0) * ({want} - {have}), 0x90"
        ));
        s.push(format!("{}:", 6600 + k));
    }
    s.push("6599:".to_string());
    s.extend(record_and_table("6500b", "6599b - 6500b", blocks));
    s.join("\n")
}

/// The section `altpatch_{what}_v{major}_{minor}` (`sites` or `repl`), named after this crate's
/// semver-compatible version, as `patch_core::record::SITES_SECTION` is after patch-core's (the
/// workspace's crates share one version): each copy of altpatch in a program finds only its own.
fn section(what: &str) -> String {
    format!(
        "altpatch_{what}_v{}_{}",
        env!("CARGO_PKG_VERSION_MAJOR"),
        env!("CARGO_PKG_VERSION_MINOR")
    )
}

/// The record of a site starting at `site` (an expression: a label or an operand) of `len` bytes,
/// and its candidate table and blocks; emits nothing in the current section.
fn record_and_table(site: &str, len: &str, blocks: &[Block]) -> Vec<String> {
    let mut s = vec![
        format!(".pushsection {},\"aR\"", section("sites")),
        ".balign 4".into(),
        format!(".long {site} - ."),
        ".long {desc} - .".into(),
        ".long 6700f - .".into(),
        format!(".byte {len}, {{kind}}, {}, {RECORD_VERSION}", blocks.len()),
        ".popsection".into(),
        format!(".pushsection {},\"aR\"", section("repl")),
        ".balign 4".into(),
        "6700:".into(),
    ];
    for k in 0..blocks.len() {
        s.push(format!(".long {}f - .", start(k)));
        s.push(format!(".byte {}f - {}f, 0, 0, 0", start(k) + 1, start(k)));
    }
    for (k, block) in blocks.iter().enumerate() {
        s.push(format!("{}:", start(k)));
        s.extend(block.lines());
        s.push(format!("{}:", start(k) + 1));
    }
    s.push(".popsection".into());
    s
}

/// Length of a trampoline: one `jmp rel32`, padded to 16 bytes (the slot a 16-byte-aligned
/// function takes anyway), so that a short candidate's body fits in place of the `jmp`.
const TRAMPOLINE_LEN: usize = 16;

/// The body of a naked trampoline: `jmp` to the default (operand `d0`), then `0x90` padding.
pub const TRAMPOLINE_BODY: &str = "6500:\njmp {d0}\n6501:\n.skip 16 - (6501b - 6500b), 0x90";

/// The record and table of the trampoline `{tramp}`, whose candidates jump to `d0`, `d1`, ...;
/// emitted from an `asm!` block elsewhere, since a naked function may hold only its instructions.
pub fn trampoline_record(candidates: usize) -> String {
    let blocks: Vec<Block> = (0..candidates)
        .map(|k| Block::Jump(format!("d{k}")))
        .collect();
    record_and_table("{tramp}", &TRAMPOLINE_LEN.to_string(), &blocks).join("\n")
}
