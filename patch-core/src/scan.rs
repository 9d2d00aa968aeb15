//! A conservative x86-64 instruction scanner for the blocks apply meets at startup.
//!
//! The first time a process decodes anything, iced-x86 builds its decoder tables: about 3 M
//! instructions (95 % of a small program's first apply). The candidate blocks and sites apply
//! plans at startup are mostly a handful of shapes (`call`/`jmp`, NOPs, a few plain instructions
//! such as `popcnt`, `crc32`, `lfence`, a store), so the planner asks this scanner first.
//!
//! It knows a whitelist of legacy (non-VEX) encodings, with their exact lengths and whether an
//! operand is relative to RIP. Anything else is [`Scan::Unknown`] and the planner decodes with
//! iced-x86 as before. A verdict given here is always iced-x86's verdict: the tests check every
//! answer against iced-x86 over whitelisted shapes and arbitrary bytes
//! (`scan_agrees_with_iced`), so the planner is exactly as strict either way.

/// What one instruction is, as far as planning cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Falls through, nothing relative: runs the same at any address.
    Plain,
    /// Falls through with a RIP-relative memory operand: needs relocating.
    RipRelative,
    /// A plain `ret` (`c3`, no prefix).
    Ret,
    /// A relative `call`, `jmp` or `jcc` without prefixes.
    Branch,
}

/// The scanner's answer for the instruction at the start of some bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scan {
    /// A valid instruction of `len` bytes.
    Insn {
        /// Its length.
        len: usize,
        /// What it does.
        kind: Kind,
    },
    /// The bytes end inside an instruction whose start this scanner knows: no decoder can read
    /// a valid instruction there.
    Truncated,
    /// Not in the whitelist: ask the decoder.
    Unknown,
}

const MAX_LEN: usize = 15;

/// Scans the instruction at the start of `bytes` (non-empty).
pub(crate) fn scan_one(bytes: &[u8]) -> Scan {
    match scan_inner(bytes) {
        Ok(Some((len, _))) if len > MAX_LEN => Scan::Unknown,
        Ok(Some((len, kind))) => Scan::Insn { len, kind },
        Ok(None) => Scan::Unknown,
        Err(Truncated) => Scan::Truncated,
    }
}

/// Whether `bytes` are whole whitelisted instructions none of which is relative (so they run
/// the same at any address): `None` when the scanner cannot tell.
pub(crate) fn position_independent(bytes: &[u8]) -> Option<()> {
    let mut at = 0;
    while at < bytes.len() {
        match scan_one(&bytes[at..]) {
            Scan::Insn {
                len,
                kind: Kind::Plain | Kind::Ret,
            } => at += len,
            _ => return None,
        }
    }
    Some(())
}

struct Truncated;

/// `Ok(Some((len, kind)))` for a whitelisted instruction, `Ok(None)` for anything else.
fn scan_inner(bytes: &[u8]) -> Result<Option<(usize, Kind)>, Truncated> {
    let byte = |i: usize| bytes.get(i).copied().ok_or(Truncated);
    let mut at = 0;
    let mut opsize16 = false;
    let mut rep = None;
    let mut prefixed = false;
    loop {
        match byte(at)? {
            0x66 => opsize16 = true,
            0x67 | 0x2e | 0x3e | 0x26 | 0x36 | 0x64 | 0x65 => {}
            b @ (0xf2 | 0xf3) => {
                if rep.is_some_and(|r| r != b) {
                    return Ok(None);
                }
                rep = Some(b);
            }
            _ => break,
        }
        prefixed = true;
        at += 1;
    }
    let mut rex_w = false;
    if byte(at)? & 0xf0 == 0x40 {
        rex_w = byte(at)? & 0x08 != 0;
        prefixed = true;
        at += 1;
    }
    let op = byte(at)?;
    at += 1;
    // An immediate of the operand size: 16 bits with `66` (unless REX.W), else 32.
    let imm_z = if opsize16 && !rex_w { 2 } else { 4 };
    let modrm = |at: usize| -> Result<(usize, Kind, u8), Truncated> {
        let (len, kind) = modrm_len(bytes, at)?;
        Ok((len, kind, (byte(at)? >> 3) & 7))
    };
    let plain = |len: usize| Ok(Some((len, Kind::Plain)));
    let with_modrm = |at: usize, imm: usize| -> Result<Option<(usize, Kind)>, Truncated> {
        let (len, kind, _) = modrm(at)?;
        let end = at + len + imm;
        if end > bytes.len() {
            return Err(Truncated);
        }
        Ok(Some((end, kind)))
    };
    let branch = |len: usize| -> Result<Option<(usize, Kind)>, Truncated> {
        if prefixed {
            return Ok(None);
        }
        if len > bytes.len() {
            return Err(Truncated);
        }
        Ok(Some((len, Kind::Branch)))
    };
    let immediate = |len: usize| -> Result<Option<(usize, Kind)>, Truncated> {
        if len > bytes.len() {
            return Err(Truncated);
        }
        plain(len)
    };
    match op {
        // A REX before a legacy prefix or another REX is ignored; leave that to the decoder.
        0x40..=0x4f | 0x66 | 0x67 | 0xf2 | 0xf3 | 0x2e | 0x3e | 0x26 | 0x36 | 0x64 | 0x65 => {
            Ok(None)
        }
        // ALU r/m forms, then AL/eAX immediates (06, 07, 0e ... are invalid in 64-bit mode).
        _ if op < 0x40 && op & 7 < 4 => with_modrm(at, 0),
        _ if op < 0x40 && op & 7 == 4 => immediate(at + 1),
        _ if op < 0x40 && op & 7 == 5 => immediate(at + imm_z),
        0x50..=0x5f | 0x90..=0x99 => plain(at),
        0x63 | 0x84..=0x8b => with_modrm(at, 0),
        0x8d if byte(at)? >> 6 == 3 => Ok(None), // lea needs a memory operand
        0x8d => with_modrm(at, 0),
        0x68 => immediate(at + imm_z),
        0x6a => immediate(at + 1),
        0x69 => with_modrm(at, imm_z),
        0x6b | 0x80 | 0x83 | 0xc0 | 0xc1 => with_modrm(at, 1),
        0x81 => with_modrm(at, imm_z),
        0xa8 => immediate(at + 1),
        0xa9 => immediate(at + imm_z),
        0xb0..=0xb7 => immediate(at + 1),
        0xb8..=0xbf => immediate(at + if rex_w { 8 } else { imm_z }),
        0xd0..=0xd3 => with_modrm(at, 0),
        0xc3 if !prefixed => plain(at).map(|r| r.map(|(len, _)| (len, Kind::Ret))),
        0xc6 => match modrm(at)?.2 {
            0 => with_modrm(at, 1),
            _ => Ok(None),
        },
        0xc7 => match modrm(at)?.2 {
            0 => with_modrm(at, imm_z),
            _ => Ok(None),
        },
        0xf6 | 0xf7 => match modrm(at)?.2 {
            0 => with_modrm(at, if op == 0xf6 { 1 } else { imm_z }),
            2..=7 => with_modrm(at, 0),
            _ => Ok(None),
        },
        0xfe => match modrm(at)?.2 {
            0 | 1 => with_modrm(at, 0),
            _ => Ok(None),
        },
        0xff => match modrm(at)?.2 {
            0 | 1 | 6 => with_modrm(at, 0),
            _ => Ok(None),
        },
        0xe8 | 0xe9 => branch(5),
        0xeb | 0x70..=0x7f => branch(2),
        0x0f => scan_0f(bytes, at, rep, opsize16, prefixed),
        _ => Ok(None),
    }
}

/// The two- and three-byte opcodes of the whitelist; `at` is just past the `0f`.
fn scan_0f(
    bytes: &[u8],
    at: usize,
    rep: Option<u8>,
    opsize16: bool,
    prefixed: bool,
) -> Result<Option<(usize, Kind)>, Truncated> {
    let byte = |i: usize| bytes.get(i).copied().ok_or(Truncated);
    let op = byte(at)?;
    let at = at + 1;
    let with_modrm = |at: usize, imm: usize| -> Result<Option<(usize, Kind)>, Truncated> {
        let (len, kind) = modrm_len(bytes, at)?;
        let end = at + len + imm;
        if end > bytes.len() {
            return Err(Truncated);
        }
        Ok(Some((end, kind)))
    };
    let is_register = |at: usize| byte(at).map(|m| m >> 6 == 3);
    let reg = |at: usize| byte(at).map(|m| (m >> 3) & 7);
    match (op, rep) {
        (0x80..=0x8f, _) if !prefixed => {
            if at + 4 > bytes.len() {
                return Err(Truncated);
            }
            Ok(Some((at + 4, Kind::Branch)))
        }
        (0x1f | 0x40..=0x4f | 0xaf | 0xb6 | 0xb7 | 0xbe | 0xbf, None) => with_modrm(at, 0),
        (0xa3 | 0xab | 0xb3 | 0xbb | 0xa5 | 0xad, None) => with_modrm(at, 0),
        (0xa4 | 0xac, None) => with_modrm(at, 1),
        (0xba, None) if reg(at)? >= 4 => with_modrm(at, 1),
        (0xbc | 0xbd, None | Some(0xf3)) => with_modrm(at, 0),
        (0xb8, Some(0xf3)) => with_modrm(at, 0),
        (0xc8..=0xcf, None) if !opsize16 => Ok(Some((at, Kind::Plain))),
        (0x31 | 0xa2, None) if !prefixed => Ok(Some((at, Kind::Plain))),
        (0x01, None) if !prefixed => match byte(at)? {
            0xf9 => Ok(Some((at + 1, Kind::Plain))), // rdtscp
            _ => Ok(None),
        },
        (0xae, None) => match (byte(at)?, opsize16) {
            (0xe8 | 0xf0 | 0xf8, false) if !prefixed => Ok(Some((at + 1, Kind::Plain))), // fences
            _ if is_register(at)? => Ok(None),
            // clflush (/7), and with 66: clflushopt (/7), clwb (/6).
            _ if reg(at)? == 7 || (opsize16 && reg(at)? == 6) => with_modrm(at, 0),
            _ => Ok(None),
        },
        (0x38, _) => {
            let op3 = byte(at)?;
            let at = at + 1;
            match (op3, rep) {
                (0xf0 | 0xf1, Some(0xf2)) => with_modrm(at, 0), // crc32
                (0xf0 | 0xf1, None) if !is_register(at)? => with_modrm(at, 0), // movbe
                _ => Ok(None),
            }
        }
        _ => Ok(None),
    }
}

/// The length of a ModRM byte with its SIB and displacement at `at`, and whether it addresses
/// memory relative to RIP (or EIP with `67`).
fn modrm_len(bytes: &[u8], at: usize) -> Result<(usize, Kind), Truncated> {
    let modrm = bytes.get(at).copied().ok_or(Truncated)?;
    let (md, rm) = (modrm >> 6, modrm & 7);
    let mut len = 1;
    let mut kind = Kind::Plain;
    if md != 3 && rm == 4 {
        let sib = bytes.get(at + 1).copied().ok_or(Truncated)?;
        len += 1;
        if md == 0 && sib & 7 == 5 {
            len += 4;
        }
    }
    match md {
        0 if rm == 5 => {
            len += 4;
            kind = Kind::RipRelative;
        }
        1 => len += 1,
        2 => len += 4,
        _ => {}
    }
    if at + len > bytes.len() {
        return Err(Truncated);
    }
    Ok((len, kind))
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Code, Decoder, DecoderOptions, OpKind};

    /// iced-x86's verdict on the first instruction of `bytes`, as this scanner states it.
    fn iced(bytes: &[u8]) -> Scan {
        let mut decoder = Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE);
        let instr = decoder.decode();
        if instr.is_invalid() {
            return Scan::Truncated; // compared only against Truncated or a refusal to answer
        }
        let branch = instr.op_count() == 1 && instr.op0_kind() == OpKind::NearBranch64;
        let kind = if branch {
            Kind::Branch
        } else if instr.code() == Code::Retnq && instr.len() == 1 {
            Kind::Ret
        } else if instr.is_ip_rel_memory_operand() {
            Kind::RipRelative
        } else {
            Kind::Plain
        };
        Scan::Insn {
            len: instr.len(),
            kind,
        }
    }

    fn check(bytes: &[u8]) {
        let ours = scan_one(bytes);
        if ours == Scan::Unknown {
            return;
        }
        let theirs = iced(bytes);
        assert_eq!(ours, theirs, "bytes {bytes:02x?}");
        if let Scan::Insn { kind, .. } = ours {
            // What straight-line bodies and relocation rely on: a plain instruction neither
            // branches, calls, returns nor traps.
            let instr = Decoder::new(64, bytes, DecoderOptions::NONE).decode();
            if kind == Kind::Plain || kind == Kind::RipRelative {
                assert!(
                    !crate::plan::leaves_straight_line(&instr),
                    "bytes {bytes:02x?}: {instr:?}"
                );
            }
        }
    }

    /// A small deterministic generator (no dependency needed for a test of this size).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u8 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 24) as u8
        }
    }

    #[test]
    fn scan_agrees_with_iced() {
        const PREFIXES: &[u8] = &[0x66, 0x67, 0xf2, 0xf3, 0x2e, 0x3e, 0x64, 0xf0, 0x48, 0x41];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut checked = 0;
        for first in 0..=0xffu16 {
            for second in 0..=0xffu16 {
                for round in 0..3 {
                    let mut bytes = Vec::new();
                    for _ in 0..(rng.next() % 3) {
                        bytes.push(PREFIXES[usize::from(rng.next()) % PREFIXES.len()]);
                    }
                    bytes.push(first as u8);
                    bytes.push(second as u8);
                    if first == 0x0f && round % 2 == 0 {
                        bytes.push(0x38);
                        bytes.push([0xf0, 0xf1][usize::from(rng.next() & 1)]);
                    }
                    for _ in 0..14 {
                        bytes.push(rng.next());
                    }
                    check(&bytes);
                    // A truncation of it too.
                    let end = 1 + usize::from(rng.next()) % 10;
                    check(&bytes[..end]);
                    checked += 1;
                }
            }
        }
        assert!(checked > 190_000);
    }

    #[test]
    fn the_common_candidates_are_known() {
        let known: &[(&[u8], Kind)] = &[
            (&[0xf3, 0x48, 0x0f, 0xb8, 0xc7], Kind::Plain), // popcnt rax, rdi
            (&[0xf2, 0x48, 0x0f, 0x38, 0xf1, 0xc6], Kind::Plain), // crc32 rax, rsi
            (&[0x3e, 0x3e, 0x83, 0x07, 0x02], Kind::Plain), // ds ds add dword [rdi], 2
            (&[0x0f, 0xae, 0xe8], Kind::Plain),             // lfence
            (&[0x0f, 0x01, 0xf9], Kind::Plain),             // rdtscp
            (&[0x66, 0x0f, 0xae, 0x3f], Kind::Plain),       // clflushopt [rdi]
            (&[0x48, 0x8b, 0x05, 0, 0, 0, 0], Kind::RipRelative), // mov rax, [rip]
            (&[0xc3], Kind::Ret),
            (&[0xe8, 0, 0, 0, 0], Kind::Branch),
        ];
        for (bytes, kind) in known {
            assert_eq!(
                scan_one(bytes),
                Scan::Insn {
                    len: bytes.len(),
                    kind: *kind
                },
                "{bytes:02x?}"
            );
            check(bytes);
        }
        assert_eq!(scan_one(&[0xc5, 0xf8, 0x77]), Scan::Unknown); // vzeroupper: VEX
        assert_eq!(scan_one(&[0xf3, 0x48, 0x0f]), Scan::Truncated);
    }
}
