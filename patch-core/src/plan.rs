//! Plan: decide, for one site, the exact bytes to write, after checking that the bytes there now are
//! what the record promises.
//!
//! Everything here works on byte slices and addresses, never on live memory, so it is tested (and
//! fuzzed) on arbitrary input.
//!
//! * **Verify.** The site must decode to one of its candidates' blocks, relocated to the site
//!   address (the default when the program starts, another candidate after a patch), followed by
//!   NOP filler. Anything else (a linker or LTO mangling, a debugger's breakpoint, another patcher)
//!   refuses the site.
//! * **Build.** The chosen block is decoded at the address it was assembled at and re-encoded at the
//!   site with iced-x86's `BlockEncoder`, which fixes relative branches, calls and RIP-relative
//!   operands; the tail is filled with the longest recommended NOP (or a short `jmp` over `int3`
//!   filler when the tail is longer than any NOP); the result is decoded once more and must equal
//!   the intended instructions.

use core::fmt;

use crate::scan::{self, Kind, Scan};
use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, Instruction,
    InstructionBlock, Mnemonic, OpKind,
};

/// A block of machine code and the address it was assembled for.
#[derive(Clone, Copy, Debug)]
pub struct Block<'a> {
    /// The instructions' bytes (may be empty: a NOP candidate).
    pub bytes: &'a [u8],
    /// The address the bytes' relative operands are relative to.
    pub ip: u64,
}

/// How a site runs once its new bytes are in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// A direct `call` to `target`, then NOP filler.
    Call {
        /// Absolute target.
        target: u64,
    },
    /// A direct `jmp` to `target` (the rest is never reached).
    Jump {
        /// Absolute target.
        target: u64,
    },
    /// Only NOP filler.
    Nop,
    /// Some other instructions, then NOP filler.
    Inline {
        /// Length of the instructions, before the filler.
        len: usize,
    },
}

impl Shape {
    /// Short name for reports.
    pub fn how(&self) -> &'static str {
        match self {
            Shape::Call { .. } => "call",
            Shape::Jump { .. } => "jmp",
            Shape::Nop => "nop",
            Shape::Inline { .. } => "inline",
        }
    }
}

/// Whether new bytes may replace a site's bytes while other threads run.
///
/// A thread can stop anywhere an instruction of the old bytes ends (preempted there, or returning
/// from a `call` in them) and resume later in whatever the site holds by then. The int3 protocol
/// covers threads arriving at byte 0; these places must be covered by the bytes themselves: each
/// must start filler in the new bytes, byte for byte the filler that is there now. The kernel's
/// live patching (`text_poke_bp`) meets this by replacing one instruction with one of the same
/// length; its multi-instruction alternatives are applied before other CPUs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LiveWrite {
    /// Every place a thread may resume in the old bytes starts the same filler in the new ones.
    Safe,
    /// The old bytes hold several instructions; a thread may be stopped between them.
    OldSequence,
    /// A thread stopped after the old instruction (or returning from the old `call`) resumes at
    /// byte `at`, inside the new instructions.
    InsideNew {
        /// The resume offset (sites are at most 255 bytes long).
        at: u8,
    },
}

impl LiveWrite {
    /// Whether the write is safe with other threads running.
    pub fn is_safe(&self) -> bool {
        *self == LiveWrite::Safe
    }
}

impl fmt::Display for LiveWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LiveWrite::Safe => f.write_str("safe with threads running"),
            LiveWrite::OldSequence => f.write_str(
                "the site holds several instructions now and a thread may be stopped between them",
            ),
            LiveWrite::InsideNew { at } => write!(
                f,
                "a thread stopped after the old instruction (or returning from its call) would \
                 resume at byte {at}, inside the new instructions"
            ),
        }
    }
}

/// What [`plan_site_into`] planned, besides the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Planned {
    /// What the new bytes do, for the trap handler and the report.
    pub shape: Shape,
    /// Whether they may be written while other threads run.
    pub live: LiveWrite,
    /// The candidate the site holds now, recognised before planning: what it runs until the new
    /// bytes are written, and after, if they are not (an index into the candidates given).
    pub held: usize,
    /// The length of the held candidate's instructions at the site, before their filler: with
    /// the site's bytes, [`held_shape`] tells what they do (asked only when they stay).
    pub held_len: usize,
}

/// The bytes to write at one site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Site address.
    pub ip: u64,
    /// The new bytes; exactly as long as the site.
    pub bytes: Vec<u8>,
    /// What the new bytes do, for the trap handler and the report.
    pub shape: Shape,
    /// Whether they may be written while other threads run.
    pub live: LiveWrite,
}

/// Why a site was not planned.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The site's current bytes are none of its candidates.
    UnexpectedBytes {
        /// The bytes found (hex in the message).
        found: Vec<u8>,
    },
    /// A replacement block does not decode.
    Undecodable {
        /// Which block: `"default"`, a candidate name, or `"result"`.
        block: String,
        /// The decoder's or encoder's complaint.
        detail: String,
    },
    /// A relocated replacement is longer than the site.
    TooLong {
        /// The candidate.
        block: String,
        /// Its length once relocated.
        len: usize,
        /// The site's length.
        site_len: usize,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::UnexpectedBytes { found } => {
                f.write_str("site bytes are none of its candidates (found")?;
                for b in found {
                    write!(f, " {b:02x}")?;
                }
                f.write_str(")")
            }
            Refusal::Undecodable { block, detail } => {
                write!(f, "{block} does not decode: {detail}")
            }
            Refusal::TooLong {
                block,
                len,
                site_len,
            } => {
                write!(
                    f,
                    "{block} is {len} bytes once relocated, the site only {site_len}"
                )
            }
        }
    }
}

/// Longest single NOP used for filler; the same set the kernel uses on x86_64 (`BYTES_NOP1..8`).
pub const MAX_NOP: usize = 8;

/// The recommended NOP of each length 1..=8 (Intel SDM, "Recommended Multi-Byte Sequence of NOP").
const NOPS: [&[u8]; MAX_NOP + 1] = [
    &[],
    &[0x90],
    &[0x66, 0x90],
    &[0x0f, 0x1f, 0x00],
    &[0x0f, 0x1f, 0x40, 0x00],
    &[0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
    &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
];

const INT3: u8 = 0xcc;
const JMP_REL8: u8 = 0xeb;

/// Appends `len` bytes of filler that does nothing: one NOP when `len <= MAX_NOP`, otherwise a
/// `jmp rel8` over `int3` bytes (never executed), repeated if the tail is longer than a rel8 reaches.
pub fn fill_nops(out: &mut Vec<u8>, mut len: usize) {
    while len > MAX_NOP {
        let skip = (len - 2).min(i8::MAX as usize);
        out.push(JMP_REL8);
        out.push(skip as u8);
        out.extend(core::iter::repeat_n(INT3, skip));
        len -= 2 + skip;
    }
    out.extend_from_slice(NOPS[len]);
}

/// Decodes all of `block`; fails on the first invalid or truncated instruction.
pub fn decode(block: Block<'_>) -> Result<Vec<Instruction>, String> {
    if block.bytes.is_empty() {
        return Ok(Vec::new());
    }
    let mut decoder = Decoder::with_ip(64, block.bytes, block.ip, DecoderOptions::NONE);
    let mut out = Vec::new();
    while decoder.can_decode() {
        let instr = decoder.decode();
        if instr.is_invalid() {
            return Err(format!(
                "invalid instruction at offset {}",
                instr.ip().wrapping_sub(block.ip)
            ));
        }
        out.push(instr);
    }
    Ok(out)
}

/// A lone `call rel32` or `jmp rel32` moved to `new_ip` (the `jmp` in its short form when it
/// reaches), without a block encoder: the common blocks of call sites, trampolines and branches.
/// Returns the bytes in a 5-byte buffer and their length.
fn relocate_lone_branch(block: Block<'_>, new_ip: u64) -> Option<([u8; 5], usize)> {
    let [op @ (0xe8 | 0xe9), rel @ ..] = block.bytes else {
        return None;
    };
    let rel = i32::from_le_bytes(rel.try_into().ok()?);
    let target = block.ip.wrapping_add(5).wrapping_add_signed(i64::from(rel));
    let short = i8::try_from(target.wrapping_sub(new_ip.wrapping_add(2)) as i64);
    if let (0xe9, Ok(short)) = (*op, short) {
        return Some(([JMP_REL8, short as u8, 0, 0, 0], 2));
    }
    let rel = i32::try_from(target.wrapping_sub(new_ip.wrapping_add(5)) as i64).ok()?;
    let [a, b, c, d] = rel.to_le_bytes();
    Some(([*op, a, b, c, d], 5))
}

/// A block relocated to a site: most blocks need no heap (empty, a lone branch, or nothing
/// relative), so planning a site usually allocates only the bytes it will write.
enum Relocated<'a> {
    /// The block's own bytes: nothing relative in them.
    Same(&'a [u8]),
    /// A lone branch, re-encoded.
    Branch([u8; 5], usize),
    /// Re-encoded by the block encoder.
    Encoded(Vec<u8>),
}

impl Relocated<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Relocated::Same(bytes) => bytes,
            Relocated::Branch(buf, len) => &buf[..*len],
            Relocated::Encoded(bytes) => bytes,
        }
    }
}

/// Re-encodes `block` at `new_ip`, relocating relative branches, calls and RIP-relative operands.
pub fn relocate(block: Block<'_>, new_ip: u64) -> Result<Vec<u8>, String> {
    relocated(block, new_ip).map(|r| r.bytes().to_vec())
}

fn relocated(block: Block<'_>, new_ip: u64) -> Result<Relocated<'_>, String> {
    if let Some((buf, len)) = relocate_lone_branch(block, new_ip) {
        return Ok(Relocated::Branch(buf, len));
    }
    // Known plain instructions (the usual inline candidates): no decoder tables needed.
    if scan::position_independent(block.bytes).is_some() {
        return Ok(Relocated::Same(block.bytes));
    }
    let mut instrs = decode(block)?;
    // Nothing relative (or nothing at all): the bytes mean the same anywhere.
    if instrs
        .iter()
        .all(|i| !is_near_branch(i) && !i.is_ip_rel_memory_operand())
    {
        return Ok(Relocated::Same(block.bytes));
    }
    encode_at(block, &mut instrs, new_ip).map(Relocated::Encoded)
}

/// The general relocation: iced-x86's `BlockEncoder` over the decoded block.
fn encode_at(
    block: Block<'_>,
    instrs: &mut Vec<Instruction>,
    new_ip: u64,
) -> Result<Vec<u8>, String> {
    // A branch to the block's own end would otherwise keep pointing after the original block.
    // Anchor it on a NOP placed there, so BlockEncoder moves it with the block; the NOP becomes
    // the first byte of the filler.
    let end = block.ip + block.bytes.len() as u64;
    let anchors_end = instrs
        .iter()
        .any(|i| is_near_branch(i) && i.near_branch_target() == end);
    if anchors_end {
        let mut nop = Instruction::with(Code::Nopd);
        nop.set_ip(end);
        instrs.push(nop);
    }
    let encoded = BlockEncoder::encode(
        64,
        InstructionBlock::new(instrs, new_ip),
        BlockEncoderOptions::NONE,
    )
    .map_err(|e| e.to_string())?;
    Ok(encoded.code_buffer)
}

fn is_near_branch(instr: &Instruction) -> bool {
    instr.op_count() == 1 && instr.op0_kind() == OpKind::NearBranch64
}

/// Whether two instructions do the same thing: equal, or branches of the same mnemonic to the same
/// target (the encoder may pick a rel8 form where the assembler picked rel32, or back).
fn same_instruction(a: &Instruction, b: &Instruction) -> bool {
    if is_near_branch(a) && is_near_branch(b) {
        a.mnemonic() == b.mnemonic() && a.near_branch_target() == b.near_branch_target()
    } else {
        a == b
    }
}

/// Checks that `code` decodes as `expected` (same instructions) followed by filler only, and
/// returns the length of the instructions before the filler.
fn matches_block(code: Block<'_>, expected: &[Instruction]) -> Option<usize> {
    let mut decoder = Decoder::with_ip(64, code.bytes, code.ip, DecoderOptions::NONE);
    for want in expected {
        if !decoder.can_decode() {
            return None;
        }
        let got = decoder.decode();
        if got.is_invalid() || !same_instruction(&got, want) {
            return None;
        }
    }
    let body = decoder.position();
    is_filler(&code.bytes[body..]).then_some(body)
}

/// Whether `bytes` is only NOPs, or `jmp rel8` over `int3`s, as [`fill_nops`] writes (build-time
/// padding is single-byte `0x90`s; other NOP forms are accepted too).
pub fn is_filler(bytes: &[u8]) -> bool {
    is_known_filler(bytes) || is_decoded_filler(bytes)
}

/// The filler this crate writes (or the assembler's `0x90` padding), recognised byte for byte:
/// no decoder for the common case.
fn is_known_filler(mut bytes: &[u8]) -> bool {
    loop {
        match bytes {
            [] => return true,
            [JMP_REL8, skip, rest @ ..]
                if usize::from(*skip) <= rest.len() && *skip <= i8::MAX as u8 =>
            {
                let (int3s, after) = rest.split_at(usize::from(*skip));
                if int3s.iter().any(|&b| b != INT3) {
                    return false;
                }
                bytes = after;
            }
            _ => match known_nop(bytes) {
                Some(len) => bytes = &bytes[len..],
                None => return false,
            },
        }
    }
}

/// The length of the recommended NOP ([`NOPS`]) `bytes` starts with, if any: chosen by its
/// first bytes (no two of them start alike), then compared whole.
fn known_nop(bytes: &[u8]) -> Option<usize> {
    let len = match bytes {
        [0x90, ..] => return Some(1),
        [0x66, 0x90, ..] => return Some(2),
        [0x0f, 0x1f, 0x00, ..] => 3,
        [0x0f, 0x1f, 0x40, ..] => 4,
        [0x0f, 0x1f, 0x44, ..] => 5,
        [0x66, 0x0f, 0x1f, ..] => 6,
        [0x0f, 0x1f, 0x80, ..] => 7,
        [0x0f, 0x1f, 0x84, ..] => 8,
        _ => return None,
    };
    (bytes.get(..len)? == NOPS[len]).then_some(len)
}

fn is_decoded_filler(bytes: &[u8]) -> bool {
    let mut decoder = Decoder::new(64, bytes, DecoderOptions::NONE);
    while decoder.can_decode() {
        let at = decoder.position();
        let instr = decoder.decode();
        if instr.is_invalid() {
            return false;
        }
        if instr.mnemonic() == Mnemonic::Nop {
            continue;
        }
        if instr.code() == Code::Jmp_rel8_64 {
            let skip_to = at + 2 + usize::from(bytes[at + 1]);
            if (bytes[at + 1] as i8) < 0
                || skip_to > bytes.len()
                || bytes[at + 2..skip_to].iter().any(|&b| b != INT3)
            {
                return false;
            }
            decoder
                .set_position(skip_to)
                .expect("within bounds: checked above");
            continue;
        }
        return false;
    }
    true
}

/// Plans one site: checks that `current` (the site's bytes, at `site_ip`) is one of `candidates`
/// relocated to the site, then builds the bytes for `candidates[chosen]`.
///
/// `names` label the candidates in refusals. Returns the plan even when it writes the same bytes
/// as now; the caller skips those.
pub fn plan_site(
    site_ip: u64,
    current: &[u8],
    candidates: &[Block<'_>],
    names: &[&str],
    chosen: usize,
) -> Result<Plan, Refusal> {
    let mut bytes = Vec::with_capacity(current.len());
    let Planned { shape, live, .. } =
        plan_site_into(site_ip, current, candidates, names, chosen, &mut bytes)?;
    Ok(Plan {
        ip: site_ip,
        bytes,
        shape,
        live,
    })
}

/// [`plan_site`] into a buffer the caller reuses from site to site: `bytes` is replaced by the
/// new bytes, and their shape is returned. A site found already in place then costs no
/// allocation.
pub fn plan_site_into(
    site_ip: u64,
    current: &[u8],
    candidates: &[Block<'_>],
    names: &[&str],
    chosen: usize,
    bytes: &mut Vec<u8>,
) -> Result<Planned, Refusal> {
    bytes.clear();
    let site = Block {
        bytes: current,
        ip: site_ip,
    };
    let name = |i: usize| names.get(i).copied().unwrap_or("candidate").to_string();
    let undecodable = |block: String, detail: String| Refusal::Undecodable { block, detail };

    // The chosen block first (it is also what an already-patched site holds), then the others
    // until the site's current bytes are recognised: byte for byte first (the common case: what
    // the assembler or this planner wrote), then by decoding (the assembler and the encoder may
    // pick different encodings of one instruction, or other NOP forms).
    let order = core::iter::once(chosen).chain((0..candidates.len()).filter(|&i| i != chosen));
    let relocate_at_site = |i: usize| {
        let block = candidates
            .get(i)
            .ok_or_else(|| undecodable(name(i), "no such candidate".into()))?;
        let relocated = relocated(*block, site_ip).map_err(|d| undecodable(name(i), d))?;
        let len = relocated.bytes().len();
        if len > current.len() {
            return Err(Refusal::TooLong {
                block: name(i),
                len,
                site_len: current.len(),
            });
        }
        Ok(relocated)
    };
    // The candidate the site holds now, and the length of its instructions before their filler.
    let mut old = None;
    for i in order.clone() {
        let relocated = relocate_at_site(i)?;
        let body = relocated.bytes();
        if i == chosen {
            bytes.extend_from_slice(body);
        }
        if current.starts_with(body) && is_known_filler(&current[body.len()..]) {
            old = Some((i, body.len()));
            break;
        }
    }
    if old.is_none() {
        for i in order {
            let relocated = relocate_at_site(i)?;
            let instrs = decode(Block {
                bytes: relocated.bytes(),
                ip: site_ip,
            })
            .map_err(|d| undecodable(name(i), d))?;
            old = matches_block(site, &instrs).map(|len| (i, len));
            if old.is_some() {
                break;
            }
        }
    }
    let Some((held, old_body)) = old else {
        return Err(Refusal::UnexpectedBytes {
            found: current.to_vec(),
        });
    };
    let body_len = bytes.len();
    // Fill so that where a thread may resume in the old bytes, the new ones hold the same filler;
    // a site already holding the chosen block keeps its filler too (nothing to write).
    let in_place = old_body == body_len && current.starts_with(bytes);
    let live = if in_place {
        bytes.extend_from_slice(&current[body_len..]);
        LiveWrite::Safe
    } else {
        match first_stop(site, old_body) {
            Stop::Nowhere => {
                fill_nops(bytes, current.len() - body_len);
                LiveWrite::Safe
            }
            Stop::At(at) if body_len <= at => {
                fill_nops(bytes, at - body_len);
                bytes.extend_from_slice(&current[at..]);
                LiveWrite::Safe
            }
            Stop::At(at) => {
                fill_nops(bytes, current.len() - body_len);
                LiveWrite::InsideNew {
                    at: u8::try_from(at).unwrap_or(u8::MAX),
                }
            }
            Stop::Between => {
                fill_nops(bytes, current.len() - body_len);
                LiveWrite::OldSequence
            }
        }
    };
    let shape = match simple_shape(&bytes[..body_len], site_ip) {
        Some(shape) if bytes[..] == *current => shape, // already in place: nothing will be written
        // Decode what will be written, once more: it must be the intended instructions and
        // filler. One instruction (or none) needs no instruction list.
        Some(shape) if redecodes_as(bytes, site_ip, shape, body_len) => shape,
        Some(_) => return Err(mismatch()),
        // Known plain instructions: their boundaries, read without the decoder, end exactly at
        // the filler (what decoding them again would check).
        None if scanned_plain(&bytes[..body_len]) && is_known_filler(&bytes[body_len..]) => {
            Shape::Inline { len: body_len }
        }
        None => {
            let instrs = decode(Block {
                bytes: &bytes[..body_len],
                ip: site_ip,
            })
            .map_err(|d| undecodable(name(chosen), d))?;
            let written = Block { bytes, ip: site_ip };
            if matches_block(written, &instrs) != Some(body_len) {
                return Err(mismatch());
            }
            shape_of(&instrs, body_len)
        }
    };
    Ok(Planned {
        shape,
        live,
        held,
        held_len: old_body,
    })
}

/// What a site's first `held_len` bytes do: the candidate [`Planned::held`] names, as the planner
/// recognised it (a trampoline's copy of a candidate's body is `Inline`).
pub fn held_shape(current: &[u8], site_ip: u64, held_len: usize) -> Shape {
    let held = &current[..held_len.min(current.len())];
    simple_shape(held, site_ip).unwrap_or_else(|| {
        let block = Block {
            bytes: held,
            ip: site_ip,
        };
        decode(block).map_or(Shape::Inline { len: held.len() }, |instrs| {
            shape_of(&instrs, held.len())
        })
    })
}

/// The first place past byte 0 where a thread may stop in a site's bytes and resume later.
enum Stop {
    /// None: the site is one instruction that never falls through (`jmp`, `ret`), or it is
    /// one instruction long.
    Nowhere,
    /// At this offset: after the site's one instruction (where a `call` returns), or after its
    /// first filler instruction when it has none.
    At(usize),
    /// Between the site's own instructions: it holds several.
    Between,
}

/// Where a thread may stop in `site`, whose instructions take `body_len` bytes before filler.
fn first_stop(site: Block<'_>, body_len: usize) -> Stop {
    let bytes = site.bytes;
    let end = match simple_shape(&bytes[..body_len], site.ip) {
        Some(Shape::Jump { .. }) => return Stop::Nowhere,
        Some(Shape::Call { .. }) => body_len,
        // Only filler: a thread may stop after its first instruction (a `jmp rel8` lands past
        // the `int3`s it skips).
        Some(Shape::Nop) => match bytes {
            [] => return Stop::Nowhere,
            [JMP_REL8, skip, ..] => 2 + usize::from(*skip),
            _ => match known_nop(bytes) {
                Some(len) => len,
                None => first_instruction(site).len(),
            },
        },
        _ => {
            let (len, leaves) = match scan::scan_one(bytes) {
                Scan::Insn {
                    len,
                    kind: kind @ (Kind::Plain | Kind::RipRelative | Kind::Ret),
                } => (len, kind == Kind::Ret),
                _ => {
                    let first = first_instruction(site);
                    let leaves = matches!(first.mnemonic(), Mnemonic::Jmp | Mnemonic::Ret);
                    (first.len(), leaves)
                }
            };
            if len < body_len {
                return Stop::Between;
            }
            if leaves {
                return Stop::Nowhere;
            }
            body_len
        }
    };
    if end < bytes.len() {
        Stop::At(end)
    } else {
        Stop::Nowhere
    }
}

/// Whether `bytes` are whole known instructions that fall through (plain, RIP-relative or `ret`
/// — no branch, which [`shape_of`] would read as a `call` or `jmp` shape).
fn scanned_plain(bytes: &[u8]) -> bool {
    let mut at = 0;
    while at < bytes.len() {
        match scan::scan_one(&bytes[at..]) {
            Scan::Insn {
                len,
                kind: Kind::Plain | Kind::RipRelative | Kind::Ret,
            } => at += len,
            _ => return false,
        }
    }
    !bytes.is_empty()
}

fn first_instruction(site: Block<'_>) -> Instruction {
    Decoder::with_ip(64, site.bytes, site.ip, DecoderOptions::NONE).decode()
}

/// [`plan_site_into`] for a trampoline, whose candidates are each a `jmp` to a function:
/// `bodies[k]`, where given, is candidate k's function when [`straight_line_body`] accepts it.
/// With `inline_body`, the chosen candidate's body, when it fits, is written in place of its
/// `jmp`: a call through the trampoline then runs exactly what a direct call runs. (The kernel's
/// `static_call` writes a bare `ret` into its trampolines for an empty function the same way.)
/// Either form of any candidate is recognised as the site's current bytes.
#[allow(clippy::too_many_arguments)]
pub fn plan_trampoline_into(
    site_ip: u64,
    current: &[u8],
    candidates: &[Block<'_>],
    bodies: &[Option<Block<'_>>],
    inline_body: bool,
    names: &[&str],
    chosen: usize,
    bytes: &mut Vec<u8>,
) -> Result<Planned, Refusal> {
    let mut forms = candidates.to_vec();
    let mut form_names: Vec<&str> = (0..candidates.len())
        .map(|i| names.get(i).copied().unwrap_or("candidate"))
        .collect();
    let mut chosen_form = chosen;
    // The candidate of each body form, after the candidates' own forms.
    let mut body_of = Vec::new();
    for (k, body) in bodies.iter().enumerate() {
        let Some(body) = body else { continue };
        if !relocated(*body, site_ip).is_ok_and(|r| r.bytes().len() <= current.len()) {
            continue;
        }
        if k == chosen && inline_body {
            chosen_form = forms.len();
        }
        forms.push(*body);
        form_names.push(form_names.get(k).copied().unwrap_or("candidate"));
        body_of.push(k);
    }
    let mut planned = plan_site_into(site_ip, current, &forms, &form_names, chosen_form, bytes)?;
    if let Some(&k) = planned
        .held
        .checked_sub(candidates.len())
        .and_then(|b| body_of.get(b))
    {
        planned.held = k;
    }
    Ok(planned)
}

/// The length of `code`'s straight-line start through its first `ret`: instructions that
/// neither branch, call nor trap, then a plain `ret`. Such code runs the same from any address
/// once its RIP-relative operands are relocated, so a trampoline may hold a copy of it. `None`
/// when `code` holds anything else before a `ret`, or no `ret` at all.
pub fn straight_line_body(code: Block<'_>) -> Option<usize> {
    // Known instructions first: most function starts need no decoder tables.
    let mut at = 0;
    while at < code.bytes.len() {
        match scan::scan_one(&code.bytes[at..]) {
            Scan::Insn {
                len,
                kind: Kind::Plain | Kind::RipRelative,
            } => at += len,
            Scan::Insn {
                len,
                kind: Kind::Ret,
            } => return Some(at + len),
            Scan::Insn {
                kind: Kind::Branch, ..
            }
            | Scan::Truncated => return None,
            Scan::Unknown => return decoded_straight_line_body(code),
        }
    }
    None
}

fn decoded_straight_line_body(code: Block<'_>) -> Option<usize> {
    let mut decoder = Decoder::with_ip(64, code.bytes, code.ip, DecoderOptions::NONE);
    while decoder.can_decode() {
        let instr = decoder.decode();
        if instr.is_invalid() {
            return None;
        }
        if instr.code() == Code::Retnq {
            return Some(decoder.position());
        }
        if leaves_straight_line(&instr) {
            return None;
        }
    }
    None
}

/// Whether `instr` branches, calls, returns or traps: it ends a straight-line body.
pub(crate) fn leaves_straight_line(instr: &Instruction) -> bool {
    is_near_branch(instr)
        || matches!(
            instr.mnemonic(),
            Mnemonic::Jmp
                | Mnemonic::Call
                | Mnemonic::Ret
                | Mnemonic::Retf
                | Mnemonic::Int3
                | Mnemonic::Int
                | Mnemonic::Int1
                | Mnemonic::Into
                | Mnemonic::Ud0
                | Mnemonic::Ud1
                | Mnemonic::Ud2
                | Mnemonic::Iret
                | Mnemonic::Iretd
                | Mnemonic::Iretq
                | Mnemonic::Syscall
                | Mnemonic::Sysenter
                | Mnemonic::Hlt
        )
}

fn mismatch() -> Refusal {
    Refusal::Undecodable {
        block: "result".into(),
        detail: "re-decoding the new bytes gave other instructions".into(),
    }
}

/// Whether `bytes` (at `ip`) decode as `shape`'s single branch of `body_len` bytes, or nothing,
/// followed by filler only.
fn redecodes_as(bytes: &[u8], ip: u64, shape: Shape, body_len: usize) -> bool {
    // `e8`/`e9` rel32 and `eb` rel8 decode as exactly the branch `simple_shape` read off them.
    if matches!(shape, Shape::Call { .. } | Shape::Jump { .. })
        && simple_shape(&bytes[..body_len], ip) == Some(shape)
        && is_known_filler(&bytes[body_len..])
    {
        return true;
    }
    let body_ok = match shape {
        Shape::Nop => body_len == 0,
        Shape::Call { target } | Shape::Jump { target } => {
            let mut decoder = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
            let instr = decoder.decode();
            let mnemonic = match shape {
                Shape::Call { .. } => Mnemonic::Call,
                _ => Mnemonic::Jmp,
            };
            !instr.is_invalid()
                && instr.len() == body_len
                && is_near_branch(&instr)
                && instr.mnemonic() == mnemonic
                && instr.near_branch_target() == target
        }
        Shape::Inline { .. } => false,
    };
    body_ok && is_filler(&bytes[body_len..])
}

/// The shape of a block that is empty or one `call`/`jmp` encoded at `ip`, read off its bytes.
fn simple_shape(bytes: &[u8], ip: u64) -> Option<Shape> {
    let end = ip + bytes.len() as u64;
    match bytes {
        [] => Some(Shape::Nop),
        [0xe8, rel @ ..] if rel.len() == 4 => Some(Shape::Call {
            target: end.wrapping_add_signed(i64::from(i32::from_le_bytes(rel.try_into().ok()?))),
        }),
        [0xe9, rel @ ..] if rel.len() == 4 => Some(Shape::Jump {
            target: end.wrapping_add_signed(i64::from(i32::from_le_bytes(rel.try_into().ok()?))),
        }),
        [JMP_REL8, rel] => Some(Shape::Jump {
            target: end.wrapping_add_signed(i64::from(*rel as i8)),
        }),
        _ => None,
    }
}

fn shape_of(instrs: &[Instruction], body_len: usize) -> Shape {
    match instrs {
        [] => Shape::Nop,
        [only] if is_near_branch(only) && only.mnemonic() == Mnemonic::Call => Shape::Call {
            target: only.near_branch_target(),
        },
        [first, ..] if is_near_branch(first) && first.mnemonic() == Mnemonic::Jmp => Shape::Jump {
            target: first.near_branch_target(),
        },
        _ => Shape::Inline { len: body_len },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SITE: u64 = 0x40_1000;
    const REPL: u64 = 0x60_2000;

    fn call_at(ip: u64, target: u64) -> Vec<u8> {
        let rel = (target as i64 - (ip as i64 + 5)) as i32;
        let mut v = vec![0xe8];
        v.extend_from_slice(&rel.to_le_bytes());
        v
    }

    #[test]
    fn known_nops_are_the_recommended_ones() {
        let find = |bytes: &[u8]| {
            NOPS[1..]
                .iter()
                .find(|nop| bytes.starts_with(nop))
                .map(|n| n.len())
        };
        for (len, nop) in NOPS.iter().enumerate().skip(1) {
            assert_eq!(known_nop(nop), Some(len));
            let mut longer = nop.to_vec();
            longer.push(0xcc);
            assert_eq!(known_nop(&longer), Some(len));
            for cut in 0..len {
                assert_eq!(
                    known_nop(&nop[..cut]),
                    find(&nop[..cut]),
                    "{len} cut to {cut}"
                );
            }
            for at in 0..len {
                let mut changed = nop.to_vec();
                changed[at] ^= 0x01;
                assert_eq!(known_nop(&changed), find(&changed), "{changed:02x?}");
            }
        }
    }

    #[test]
    fn every_fill_length_is_filler_and_the_right_size() {
        for len in 0..=300 {
            let mut out = Vec::new();
            fill_nops(&mut out, len);
            assert_eq!(out.len(), len, "len {len}");
            assert!(is_filler(&out), "len {len}: {out:02x?}");
        }
        let mut one = Vec::new();
        fill_nops(&mut one, 8);
        let instrs = decode(Block { bytes: &one, ip: 0 }).unwrap();
        assert_eq!(instrs.len(), 1, "a tail of 8 is a single NOP");
    }

    #[test]
    fn byte_level_filler_is_never_looser_than_decoding() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = [
            0x90, 0x66, 0x0f, 0x1f, 0x00, 0x40, 0x44, 0x80, 0x84, 0xeb, 0xcc, 0x02, 0x7f,
        ];
        for _ in 0..20_000 {
            let len = (next() % 16) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            if is_known_filler(&bytes) {
                assert!(is_decoded_filler(&bytes), "{bytes:02x?}");
            }
        }
        for len in 0..=200 {
            let mut out = Vec::new();
            fill_nops(&mut out, len);
            assert!(
                is_known_filler(&out) && is_decoded_filler(&out),
                "len {len}"
            );
            assert!(is_known_filler(&vec![0x90; len]));
        }
    }

    #[test]
    fn call_site_is_retargeted_and_padded() {
        let default = call_at(REPL, 0x50_0000);
        let avx2 = call_at(REPL + 16, 0x50_1000);
        let mut site = call_at(SITE, 0x50_0000);
        site.extend([0x90; 3]);
        let blocks = [
            Block {
                bytes: &default,
                ip: REPL,
            },
            Block {
                bytes: &avx2,
                ip: REPL + 16,
            },
        ];
        let plan = plan_site(SITE, &site, &blocks, &["default", "avx2"], 1).unwrap();
        assert_eq!(plan.shape, Shape::Call { target: 0x50_1000 });
        assert_eq!(plan.bytes.len(), 8);
        let instrs = decode(Block {
            bytes: &plan.bytes,
            ip: SITE,
        })
        .unwrap();
        assert!(
            instrs[0].mnemonic() == Mnemonic::Call && instrs[0].near_branch_target() == 0x50_1000
        );
        // The old call returns to byte 5: the padding from there on is left as it is.
        assert_eq!(plan.bytes[5..], site[5..]);
        assert_eq!(plan.live, LiveWrite::Safe);
    }

    #[test]
    fn nop_candidate_fills_the_whole_site() {
        let default = call_at(REPL, 0x50_0000);
        let site = call_at(SITE, 0x50_0000);
        let blocks = [
            Block {
                bytes: &default,
                ip: REPL,
            },
            Block {
                bytes: &[],
                ip: REPL + 8,
            },
        ];
        let plan = plan_site(SITE, &site, &blocks, &["default", "nop"], 1).unwrap();
        assert_eq!(plan.shape, Shape::Nop);
        assert_eq!(plan.bytes, NOPS[5]);
    }

    #[test]
    fn rip_relative_lea_and_inner_call_are_relocated() {
        // lea rax, [rip + 0x100]; call +0x200 (both relative to REPL).
        let repl: &[u8] = &[
            0x48, 0x8d, 0x05, 0x00, 0x01, 0x00, 0x00, 0xe8, 0x00, 0x02, 0x00, 0x00,
        ];
        let lea_target = REPL + 7 + 0x100;
        let call_target = REPL + 12 + 0x200;
        let default = call_at(REPL + 32, 0x50_0000);
        let mut site = call_at(SITE, 0x50_0000);
        site.extend([0x90; 7]);
        let blocks = [
            Block {
                bytes: &default,
                ip: REPL + 32,
            },
            Block {
                bytes: repl,
                ip: REPL,
            },
        ];
        let plan = plan_site(SITE, &site, &blocks, &["default", "inline"], 1).unwrap();
        assert_eq!(plan.shape, Shape::Inline { len: 12 });
        let instrs = decode(Block {
            bytes: &plan.bytes,
            ip: SITE,
        })
        .unwrap();
        assert_eq!(instrs[0].ip_rel_memory_address(), lea_target);
        assert!(
            instrs[1].mnemonic() == Mnemonic::Call && instrs[1].near_branch_target() == call_target
        );
    }

    #[test]
    fn branch_to_the_end_of_a_block_moves_with_it() {
        // test rdi, rdi; jz end; inc rax; end:
        let repl: &[u8] = &[0x48, 0x85, 0xff, 0x74, 0x03, 0x48, 0xff, 0xc0];
        let default = call_at(REPL + 32, 0x50_0000);
        let mut site = call_at(SITE, 0x50_0000);
        site.extend([0x90; 5]);
        let blocks = [
            Block {
                bytes: &default,
                ip: REPL + 32,
            },
            Block {
                bytes: repl,
                ip: REPL,
            },
        ];
        let plan = plan_site(SITE, &site, &blocks, &["default", "inline"], 1).unwrap();
        let instrs = decode(Block {
            bytes: &plan.bytes,
            ip: SITE,
        })
        .unwrap();
        assert_eq!(instrs[1].near_branch_target(), SITE + 8);
    }

    #[test]
    fn lone_branches_relocate_like_the_block_encoder() {
        for (op, target, new_ip) in [
            (0xe8u8, 0x50_0000u64, SITE),
            (0xe9, 0x50_0000, SITE),
            (0xe9, SITE + 40, SITE), // in rel8 reach: the short form
            (0xe9, SITE - 100, SITE),
            (0xe8, SITE + 40, SITE),
        ] {
            let rel = (target as i64 - (REPL as i64 + 5)) as i32;
            let mut bytes = vec![op];
            bytes.extend_from_slice(&rel.to_le_bytes());
            let block = Block {
                bytes: &bytes,
                ip: REPL,
            };
            let (fast, len) = relocate_lone_branch(block, new_ip).unwrap();
            let mut instrs = decode(block).unwrap();
            let slow = encode_at(block, &mut instrs, new_ip).unwrap();
            assert_eq!(fast[..len], slow, "op {op:#x} to {target:#x}");
        }
    }

    #[test]
    fn unexpected_bytes_are_refused() {
        let default = call_at(REPL, 0x50_0000);
        let mut site = call_at(SITE, 0x50_0004); // another target
        site.extend([0x90; 3]);
        let blocks = [Block {
            bytes: &default,
            ip: REPL,
        }];
        let err = plan_site(SITE, &site, &blocks, &["default"], 0).unwrap_err();
        assert!(matches!(err, Refusal::UnexpectedBytes { .. }));
        assert!(err.to_string().contains("e8"), "{err}");
        // A breakpoint over the padding is not filler either.
        let mut site = call_at(SITE, 0x50_0000);
        site.extend([0x90, 0xcc, 0x90]);
        assert!(plan_site(SITE, &site, &blocks, &["default"], 0).is_err());
    }

    #[test]
    fn a_site_holding_a_candidate_is_recognised_and_can_go_back() {
        let default = call_at(REPL, 0x50_0000);
        let mut site = vec![0xf3, 0x48, 0x0f, 0xb8, 0xc7]; // popcnt rax, rdi
        let popcnt = site.clone();
        site.extend([0x90; 2]);
        let blocks = [
            Block {
                bytes: &default,
                ip: REPL,
            },
            Block {
                bytes: &popcnt,
                ip: REPL + 8,
            },
        ];
        let plan = plan_site(SITE, &site, &blocks, &["default", "popcnt"], 0).unwrap();
        assert_eq!(plan.shape, Shape::Call { target: 0x50_0000 });
        assert_eq!(plan.bytes[5..], [0x90; 2]);
        assert_eq!(plan.live, LiveWrite::Safe);
    }

    /// A call site of 10 bytes as built (`call`, then `0x90` padding) and its blocks: the
    /// default, a 3-byte `lea eax, [rdi + 1]`, a 10-byte `movabs`, and `inc edi; mov eax, edi`.
    fn ten_byte_site() -> (Vec<u8>, [Vec<u8>; 4]) {
        let default = call_at(REPL, 0x50_0000);
        let mut site = call_at(SITE, 0x50_0000);
        site.resize(10, 0x90);
        let short = vec![0x8d, 0x47, 0x01];
        let long = vec![0x48, 0xb8, 1, 2, 3, 4, 5, 6, 7, 8];
        let pair = vec![0xff, 0xc7, 0x89, 0xf8];
        (site, [default, short, long, pair])
    }

    fn blocks_of(blocks: &[Vec<u8>]) -> Vec<Block<'_>> {
        (0..blocks.len())
            .map(|i| Block {
                bytes: &blocks[i],
                ip: REPL + 16 * i as u64,
            })
            .collect()
    }

    #[test]
    fn where_a_call_returns_the_new_bytes_hold_the_old_filler() {
        let (site, blocks) = ten_byte_site();
        let blocks = blocks_of(&blocks);
        let names = ["default", "short", "long", "pair"];
        let short = plan_site(SITE, &site, &blocks, &names, 1).unwrap();
        assert_eq!(short.live, LiveWrite::Safe);
        assert_eq!(short.bytes[..3], [0x8d, 0x47, 0x01]);
        assert_eq!(short.bytes[3..5], *NOPS[2]);
        assert_eq!(short.bytes[5..], site[5..]);
        // Longer than the call: a thread returning to byte 5 would land inside it.
        let long = plan_site(SITE, &site, &blocks, &names, 2).unwrap();
        assert_eq!(long.live, LiveWrite::InsideNew { at: 5 });
        assert!(long.live.to_string().contains("resume at byte 5"));
        // From the 3-byte lea, back to the 5-byte call: byte 3 is where a thread may stop.
        let back = plan_site(SITE, &short.bytes, &blocks, &names, 0).unwrap();
        assert_eq!(back.live, LiveWrite::InsideNew { at: 3 });
        // Two instructions: a thread may be stopped between them, whatever comes next.
        let pair = plan_site(SITE, &site, &blocks, &names, 3).unwrap();
        assert_eq!(pair.live, LiveWrite::Safe);
        let from_pair = plan_site(SITE, &pair.bytes, &blocks, &names, 1).unwrap();
        assert_eq!(from_pair.live, LiveWrite::OldSequence);
    }

    #[test]
    fn a_site_that_never_falls_through_or_is_one_instruction_long_is_safe_live() {
        // A branch site: `jmp` over padding, to NOPs and back.
        let jmp = {
            let mut v = vec![0xe9];
            v.extend_from_slice(&(0x1000i32 - 5).to_le_bytes());
            v
        };
        let mut site = jmp.clone();
        site.extend([0x90; 3]);
        let blocks = [
            Block {
                bytes: &jmp,
                ip: SITE,
            },
            Block {
                bytes: &[],
                ip: REPL,
            },
        ];
        let nop = plan_site(SITE, &site, &blocks, &["default", "nop"], 1).unwrap();
        assert_eq!(nop.live, LiveWrite::Safe);
        assert_eq!(nop.bytes, NOPS[8]);
        // One 8-byte NOP: nowhere to stop inside it.
        let back = plan_site(SITE, &nop.bytes, &blocks, &["default", "nop"], 0).unwrap();
        assert_eq!(back.live, LiveWrite::Safe);
    }

    #[test]
    fn straight_line_bodies_end_at_their_ret_and_nothing_else_is_one() {
        static POPCNT_RET: [u8; 8] = [0xf3, 0x48, 0x0f, 0xb8, 0xc7, 0xc3, 0xcc, 0xcc];
        let at = |bytes: &'static [u8]| Block { bytes, ip: REPL };
        assert_eq!(straight_line_body(at(&POPCNT_RET)), Some(6));
        assert_eq!(straight_line_body(at(&[0xc3])), Some(1));
        // lea rax, [rip + 0x10]; ret: RIP-relative is fine (relocated).
        assert_eq!(
            straight_line_body(at(&[0x48, 0x8d, 0x05, 0x10, 0, 0, 0, 0xc3])),
            Some(8)
        );
        assert_eq!(straight_line_body(at(&[0x74, 0x01, 0xc3])), None, "jz");
        assert_eq!(
            straight_line_body(at(&[0xe8, 0, 0, 0, 0, 0xc3])),
            None,
            "call"
        );
        assert_eq!(straight_line_body(at(&[0xff, 0xe0])), None, "jmp rax");
        assert_eq!(straight_line_body(at(&[0xcc, 0xc3])), None, "int3");
        assert_eq!(straight_line_body(at(&[0xc2, 0x08, 0x00])), None, "ret 8");
        assert_eq!(straight_line_body(at(&[0x90, 0x90])), None, "no ret");
    }

    #[test]
    fn a_trampoline_holds_the_chosen_body_and_is_recognised_in_either_form() {
        let jmp_to = |from: u64, to: u64| {
            let mut v = vec![0xe9];
            v.extend_from_slice(&((to as i64 - (from as i64 + 5)) as i32).to_le_bytes());
            v
        };
        let (default_fn, popcnt_fn) = (0x50_0000u64, 0x50_1000u64);
        let blocks = [jmp_to(REPL, default_fn), jmp_to(REPL + 8, popcnt_fn)];
        let blocks = [
            Block {
                bytes: &blocks[0],
                ip: REPL,
            },
            Block {
                bytes: &blocks[1],
                ip: REPL + 8,
            },
        ];
        let popcnt_ret = [0xf3, 0x48, 0x0f, 0xb8, 0xc7, 0xc3];
        let bodies = [
            None,
            Some(Block {
                bytes: &popcnt_ret,
                ip: popcnt_fn,
            }),
        ];
        let mut site = jmp_to(SITE, default_fn);
        site.resize(16, 0x90);
        let names = ["default", "popcnt"];
        let mut bytes = Vec::new();
        let plan = |current: &[u8], inline: bool, chosen: usize, bytes: &mut Vec<u8>| {
            plan_trampoline_into(
                SITE, current, &blocks, &bodies, inline, &names, chosen, bytes,
            )
        };
        let planned = plan(&site, true, 1, &mut bytes).unwrap();
        assert_eq!(planned.shape, Shape::Inline { len: 6 });
        assert_eq!(bytes[..6], popcnt_ret);
        assert!(is_filler(&bytes[6..]));
        assert_eq!(planned.live, LiveWrite::Safe, "from a jmp: nowhere to stop");
        // Not wanted: the jmp.
        let planned = plan(&site, false, 1, &mut Vec::new()).unwrap();
        assert_eq!(planned.shape, Shape::Jump { target: popcnt_fn });
        // From the body back to the default's jmp: recognised, not while threads run.
        let inlined = bytes.clone();
        let back = plan(&inlined, false, 0, &mut bytes).unwrap();
        assert_eq!(back.shape, Shape::Jump { target: default_fn });
        assert_eq!(back.live, LiveWrite::OldSequence);
    }

    #[test]
    fn oversized_and_undecodable_replacements_are_refused() {
        let default = call_at(REPL, 0x50_0000);
        let site = call_at(SITE, 0x50_0000);
        let long = [0x90u8; 9];
        let blocks = [
            Block {
                bytes: &default,
                ip: REPL,
            },
            Block {
                bytes: &long,
                ip: REPL + 8,
            },
        ];
        assert!(matches!(
            plan_site(SITE, &site, &blocks, &["default", "long"], 1),
            Err(Refusal::TooLong {
                len: 9,
                site_len: 5,
                ..
            })
        ));
        let junk = [0x0f, 0xff];
        let blocks = [
            Block {
                bytes: &default,
                ip: REPL,
            },
            Block {
                bytes: &junk,
                ip: REPL + 8,
            },
        ];
        assert!(matches!(
            plan_site(SITE, &site, &blocks, &["default", "junk"], 1),
            Err(Refusal::Undecodable { .. })
        ));
    }
}
