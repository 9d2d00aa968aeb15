//! The loaded image of an ELF file as the program will see it: what is mapped where with which
//! permissions, the bytes behind each address, and pointers as the dynamic loader will fill them.

use std::collections::HashMap;

use object::elf;
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
use object::{Endianness, Object, ObjectSection, ObjectSymbol, RelocationFlags, SymbolKind};

/// Granularity of the kernel's mappings: a segment is mapped from the page holding its first byte
/// to the end of the page holding its last, as `/proc/self/maps` shows it to the runtime.
const PAGE: u64 = 4096;

/// One `PT_LOAD` segment.
struct Segment {
    vaddr: u64,
    memsz: u64,
    offset: u64,
    filesz: u64,
    readable: bool,
    executable: bool,
}

impl Segment {
    /// The range the kernel maps for it, page-rounded.
    fn mapped(&self) -> (u64, u64) {
        let start = self.vaddr & !(PAGE - 1);
        let end = self
            .vaddr
            .saturating_add(self.memsz)
            .saturating_add(PAGE - 1)
            & !(PAGE - 1);
        (start, end)
    }
}

/// A section's name and address range, to say where an address is.
pub struct SectionInfo {
    pub name: String,
    pub addr: u64,
    pub size: u64,
}

/// An ELF file as the program will see it once loaded.
pub struct Image<'a> {
    data: &'a [u8],
    segments: Vec<Segment>,
    sections: Vec<SectionInfo>,
    /// `R_X86_64_RELATIVE` addends by the address they are applied at.
    relative: HashMap<u64, u64>,
    /// Other dynamic relocations' types by address: a pointer field under one is not knowable.
    other_relocs: HashMap<u64, u32>,
    /// Function and data symbols (`.symtab` and `.dynsym`), sorted: (address, size, name).
    symbols: Vec<(u64, u64, String)>,
    /// `ET_DYN`: loaded at a base chosen at run time, addresses here are offsets from it.
    pub pie: bool,
}

impl<'a> Image<'a> {
    /// Parses `data`, which must be a 64-bit little-endian x86-64 ELF file.
    pub fn parse(data: &'a [u8]) -> Result<Image<'a>, String> {
        if data.get(..4) != Some(b"\x7fELF".as_slice()) {
            return Err("not an ELF file (no \\x7fELF magic)".into());
        }
        let file = ElfFile64::<Endianness>::parse(data)
            .map_err(|e| format!("not a readable 64-bit ELF file: {e}"))?;
        let endian = file.endian();
        let header = file.elf_header();
        if header.e_machine(endian) != elf::EM_X86_64 || endian != Endianness::Little {
            return Err(format!(
                "not an x86-64 ELF file (machine {:#x}); altpatch sites exist only on x86-64",
                header.e_machine(endian).0
            ));
        }
        let pie = match header.e_type(endian) {
            elf::ET_DYN => true,
            elf::ET_EXEC => false,
            elf::ET_REL => {
                return Err(
                    "a relocatable object file: its sites are resolved only when it is \
                            linked; inspect the linked binary"
                        .into(),
                );
            }
            other => return Err(format!("not an executable ELF file (type {})", other.0)),
        };

        let segments = file
            .elf_program_headers()
            .iter()
            .filter(|p| p.p_type(endian) == elf::PT_LOAD)
            .map(|p| {
                let flags = p.p_flags(endian).0;
                Segment {
                    vaddr: p.p_vaddr(endian),
                    memsz: p.p_memsz(endian),
                    offset: p.p_offset(endian),
                    filesz: p.p_filesz(endian),
                    readable: flags & elf::PF_R.0 != 0,
                    executable: flags & elf::PF_X.0 != 0,
                }
            })
            .collect();

        let sections = file
            .sections()
            .filter(|s| s.address() != 0 && s.size() != 0)
            .map(|s| SectionInfo {
                name: s.name().unwrap_or("?").to_string(),
                addr: s.address(),
                size: s.size(),
            })
            .collect();

        // `.rela.dyn` (and CREL): lld leaves 0 in place and puts the value in the addend.
        // RELR (`-z pack-relative-relocs`) is not listed here; it keeps the value in place, which
        // is what `pointer_at` falls back to.
        let mut relative = HashMap::new();
        let mut other_relocs = HashMap::new();
        for (at, reloc) in file.dynamic_relocations().into_iter().flatten() {
            match reloc.flags() {
                RelocationFlags::Elf { r_type } if r_type == elf::R_X86_64_RELATIVE => {
                    relative.insert(at, reloc.addend() as u64);
                }
                RelocationFlags::Elf { r_type } => {
                    other_relocs.insert(at, r_type.0);
                }
                _ => {}
            }
        }
        let mut symbols: Vec<(u64, u64, String)> = file
            .symbols()
            .chain(file.dynamic_symbols())
            .filter(|s| matches!(s.kind(), SymbolKind::Text | SymbolKind::Data) && s.size() > 0)
            .filter_map(|s| {
                let name = s.name().ok()?;
                Some((
                    s.address(),
                    s.size(),
                    format!("{:#}", rustc_demangle::demangle(name)),
                ))
            })
            .collect();
        symbols.sort();
        symbols.dedup_by_key(|s| s.0);

        Ok(Image {
            data,
            symbols,
            segments,
            sections,
            relative,
            other_relocs,
            pie,
        })
    }

    /// The mapped segment holding all of `vaddr..vaddr + len`, as the runtime's `MemoryMap::find`
    /// looks it up (a zero-length range at the very end of a mapping is outside it). Where two
    /// segments share a page, the later one's mapping replaces the earlier's, as in the kernel.
    fn mapping(&self, vaddr: u64, len: u64) -> Option<&Segment> {
        let end = vaddr.checked_add(len)?;
        self.segments.iter().rev().find(|s| {
            let (start, stop) = s.mapped();
            start <= vaddr && vaddr < stop && end <= stop
        })
    }

    /// Whether the runtime will find `vaddr..vaddr + len` readable and executable.
    pub fn is_executable(&self, vaddr: u64, len: u64) -> bool {
        self.mapping(vaddr, len)
            .is_some_and(|s| s.readable && s.executable)
    }

    /// Whether the runtime will find `vaddr..vaddr + len` readable.
    pub fn is_readable(&self, vaddr: u64, len: u64) -> bool {
        self.mapping(vaddr, len).is_some_and(|s| s.readable)
    }

    /// File offset of `vaddr`, when a segment loads it from the file.
    pub fn file_offset(&self, vaddr: u64) -> Option<u64> {
        self.segments.iter().find_map(|s| {
            let within = vaddr.checked_sub(s.vaddr)?;
            (within < s.filesz).then(|| s.offset.checked_add(within))?
        })
    }

    /// The file's bytes at `vaddr..vaddr + len`, all from one segment.
    pub fn bytes(&self, vaddr: u64, len: usize) -> Result<&'a [u8], String> {
        let not_in_file = || format!("{len} bytes at {vaddr:#x} are not in the file");
        let segment = self
            .segments
            .iter()
            .find(|s| s.vaddr <= vaddr && vaddr - s.vaddr <= s.filesz)
            .ok_or_else(not_in_file)?;
        let within = vaddr - segment.vaddr;
        if within
            .checked_add(len as u64)
            .is_none_or(|end| end > segment.filesz)
        {
            return Err(not_in_file());
        }
        let start = segment
            .offset
            .checked_add(within)
            .and_then(|start| usize::try_from(start).ok())
            .ok_or_else(not_in_file)?;
        self.data
            .get(start..start.checked_add(len).ok_or_else(not_in_file)?)
            .ok_or_else(not_in_file)
    }

    fn array<const N: usize>(&self, vaddr: u64) -> Result<[u8; N], String> {
        let bytes = self.bytes(vaddr, N)?;
        Ok(bytes.try_into().expect("`bytes` returns exactly N bytes"))
    }

    pub fn u8_at(&self, vaddr: u64) -> Result<u8, String> {
        Ok(self.array::<1>(vaddr)?[0])
    }

    pub fn i32_at(&self, vaddr: u64) -> Result<i32, String> {
        Ok(i32::from_le_bytes(self.array(vaddr)?))
    }

    pub fn u32_at(&self, vaddr: u64) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(vaddr)?))
    }

    pub fn u64_at(&self, vaddr: u64) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(vaddr)?))
    }

    /// A self-relative `.long target - .` at `vaddr`, resolved.
    pub fn self_relative(&self, vaddr: u64) -> Result<u64, String> {
        Ok(vaddr.wrapping_add_signed(i64::from(self.i32_at(vaddr)?)))
    }

    /// The pointer stored at `vaddr` once the dynamic loader has run: a PIE's pointers are
    /// `R_X86_64_RELATIVE` relocations (value = addend, as a link-time address); a non-PIE's, or
    /// a RELR-packed one's, are the value in place.
    pub fn pointer_at(&self, vaddr: u64) -> Result<u64, String> {
        if let Some(&addend) = self.relative.get(&vaddr) {
            return Ok(addend);
        }
        if let Some(r_type) = self.other_relocs.get(&vaddr) {
            return Err(format!(
                "pointer at {vaddr:#x} has dynamic relocation type {r_type}, not R_X86_64_RELATIVE"
            ));
        }
        self.u64_at(vaddr)
    }

    /// A `&'static str` stored at `vaddr`: (data pointer, length), the order rustc lays a `&str`
    /// out in (checked by the tests against names the runtime reports).
    pub fn str_at(&self, vaddr: u64) -> Result<String, String> {
        let ptr = self.pointer_at(vaddr)?;
        let len = self.u64_at(vaddr.wrapping_add(8))?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= 1 << 20)
            .ok_or_else(|| format!("string at {vaddr:#x} has an implausible length {len}"))?;
        let bytes = self.bytes(ptr, len)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| format!("string at {vaddr:#x} (data at {ptr:#x}) is not UTF-8"))
    }

    /// The section holding `vaddr`, by name.
    pub fn section_of(&self, vaddr: u64) -> Option<&str> {
        self.sections
            .iter()
            .find(|s| s.addr <= vaddr && vaddr - s.addr < s.size)
            .map(|s| s.name.as_str())
    }

    /// `name` or `name+0x10` for the symbol holding `vaddr`.
    pub fn symbol_for(&self, vaddr: u64) -> Option<String> {
        let i = self
            .symbols
            .partition_point(|s| s.0 <= vaddr)
            .checked_sub(1)?;
        let (start, size, name) = &self.symbols[i];
        match vaddr - start {
            0 => Some(name.clone()),
            off if off < *size => Some(format!("{name}+{off:#x}")),
            _ => None,
        }
    }

    /// The allocated section named `name`.
    pub fn section(&self, name: &str) -> Option<&SectionInfo> {
        self.sections.iter().find(|s| s.name == name)
    }
}
