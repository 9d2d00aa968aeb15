//! Operating-system concerns, one file per OS.

/// The address of the symbol `$name` through a weak reference in the GOT: 0 when nothing in the
/// process defines it, so the binary links and loads on any C library either way.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
macro_rules! weak_symbol_address {
    ($name:literal) => {{
        let address: usize;
        // SAFETY: loads the GOT entry of a weak symbol (its address, or 0 when undefined); no
        // memory is written and nothing is called.
        unsafe {
            core::arch::asm!(
                concat!(".weak ", $name),
                concat!("mov {}, qword ptr [rip + ", $name, "@GOTPCREL]"),
                out(reg) address,
                options(nostack, preserves_flags, readonly, pure),
            );
        }
        address
    }};
}
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(crate) use weak_symbol_address;

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub mod glibc_cpuid;
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub mod linux;
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub mod valgrind;

use std::ops::Range;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;

/// The process's mappings with their permissions, read once per apply, so a record that points
/// outside mapped code is refused instead of read.
pub struct MemoryMap {
    /// Sorted by address.
    regions: Vec<(Range<usize>, Perms)>,
    /// Whether each page's permissions are its region's (false when two loaded segments share a
    /// page: the one mapped last decides it, so [`permissions`](Self::permissions) answers
    /// nothing and a writer asks the kernel).
    page_exact: bool,
    /// The regions the last lookups of code ([`is_executable`](Self::is_executable)) and of
    /// data ([`is_readable`](Self::is_readable)) found: sites come in link order and their
    /// replacement blocks sit together, so most lookups hit them.
    last: [AtomicUsize; 2],
}

impl MemoryMap {
    /// Whether mappings with permissions `ok` cover `addr..addr + len` without a gap. A range
    /// may span several: an earlier write's `mprotect` splits a text mapping at page boundaries
    /// (`/proc/self/maps` then lists the written pages apart), and a site may cross one.
    fn covered(&self, addr: usize, len: usize, hint: &AtomicUsize, ok: fn(&Perms) -> bool) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        if let Some((r, p)) = self.regions.get(hint.load(Relaxed))
            && r.start <= addr
            && end <= r.end
        {
            return ok(p);
        }
        let first = self.regions.partition_point(|(r, _)| r.end <= addr);
        let mut at = addr;
        for (r, p) in &self.regions[first..] {
            if r.start > at || !ok(p) {
                return false;
            }
            at = at.max(r.end);
            if at >= end {
                hint.store(first, Relaxed);
                return true;
            }
        }
        false
    }

    /// Whether `addr..addr + len` lies in readable mappings.
    pub fn is_readable(&self, addr: usize, len: usize) -> bool {
        self.covered(addr, len, &self.last[1], |p| p.read)
    }

    /// Whether `addr..addr + len` lies in readable, executable mappings.
    pub fn is_executable(&self, addr: usize, len: usize) -> bool {
        self.covered(addr, len, &self.last[0], |p| p.read && p.exec)
    }

    /// The mappings covering `range` and their permissions, clipped to it; `None` unless they
    /// cover all of it. A writer restores these after a batch without reading the maps again.
    pub fn permissions(&self, range: Range<usize>) -> Option<Vec<(Range<usize>, Perms)>> {
        if !self.page_exact {
            return None;
        }
        let mut out = Vec::new();
        let mut at = range.start;
        let first = self.regions.partition_point(|(r, _)| r.end <= at);
        for (r, perms) in &self.regions[first..] {
            if at >= range.end {
                break;
            }
            if r.start > at {
                return None;
            }
            let end = r.end.min(range.end);
            out.push((at..end, *perms));
            at = end;
        }
        (at >= range.end).then_some(out)
    }
}

/// A mapping's permissions, as `/proc/self/maps` shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perms {
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Executable.
    pub exec: bool,
}

/// Reads `/proc/self/maps` (empty where there is none: nothing then counts as mapped).
pub fn memory_map() -> MemoryMap {
    let text = read_proc_file("/proc/self/maps", 16 << 10).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let mut regions: Vec<_> = text.lines().filter_map(parse_maps_line).collect();
    regions.sort_by_key(|(r, _)| r.start);
    MemoryMap {
        regions,
        page_exact: true,
        last: [AtomicUsize::new(0), AtomicUsize::new(0)],
    }
}

/// The segments of every loaded object (`dl_iterate_phdr`, no system call), as the dynamic
/// linker mapped them: what `/proc/self/maps` shows at load time, before anything else could
/// change a protection, for about a microsecond instead of 40-50 µs. The load-time apply uses it.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub fn loaded_segments() -> MemoryMap {
    unsafe extern "C" fn each(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        out: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: glibc passes a valid info for the duration of the call, and `out` is the Vec
        // passed to dl_iterate_phdr below.
        let (info, out) = unsafe { (&*info, &mut *(out as *mut Vec<(Range<usize>, Perms)>)) };
        let headers: &[libc::Elf64_Phdr] = if info.dlpi_phdr.is_null() {
            &[]
        } else {
            // SAFETY: dlpi_phdr points at dlpi_phnum program headers.
            unsafe { core::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
        };
        let page = 4096;
        for ph in headers.iter().filter(|ph| ph.p_type == libc::PT_LOAD) {
            let start = (info.dlpi_addr as usize).wrapping_add(ph.p_vaddr as usize);
            let end = start.wrapping_add(ph.p_memsz as usize);
            let perms = Perms {
                read: ph.p_flags & libc::PF_R != 0,
                write: ph.p_flags & libc::PF_W != 0,
                exec: ph.p_flags & libc::PF_X != 0,
            };
            out.push((start & !(page - 1)..end.next_multiple_of(page), perms));
        }
        0
    }
    let mut regions: Vec<(Range<usize>, Perms)> = Vec::with_capacity(32);
    // SAFETY: the callback only reads what glibc hands it and appends to `regions`.
    unsafe { libc::dl_iterate_phdr(Some(each), &mut regions as *mut _ as *mut libc::c_void) };
    regions.sort_by_key(|(r, _)| r.start);
    let page_exact = regions.windows(2).all(|w| w[0].0.end <= w[1].0.start);
    MemoryMap {
        regions,
        page_exact,
        last: [AtomicUsize::new(0), AtomicUsize::new(0)],
    }
}

/// A `/proc` file read with as few `read` calls as its size allows: `read_to_string` starts from
/// a 32-byte probe and doubles (procfs reports size 0), 9 reads for the maps of a small program,
/// each a system call the first apply of every process pays.
pub(crate) fn read_proc_file(path: &str, capacity: usize) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).ok()?;
    let mut data = vec![0; capacity];
    let mut len = 0;
    loop {
        if len == data.len() {
            data.resize(len * 2, 0);
        }
        match file.read(&mut data[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    data.truncate(len);
    Some(data)
}

/// `start-end perms ...` → (start..end, permissions).
fn parse_maps_line(line: &str) -> Option<(Range<usize>, Perms)> {
    let mut fields = line.split_ascii_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?.as_bytes();
    let range = usize::from_str_radix(start, 16).ok()?..usize::from_str_radix(end, 16).ok()?;
    Some((
        range,
        Perms {
            read: perms.first() == Some(&b'r'),
            write: perms.get(1) == Some(&b'w'),
            exec: perms.get(2) == Some(&b'x'),
        },
    ))
}

/// The writer off x86_64 Linux: refuses everything (nothing is ever planned there anyway).
#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
pub struct NoWriter;

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
impl crate::write::TextWriter for NoWriter {
    fn name(&self) -> &'static str {
        "none"
    }
    fn prepare(&mut self, _pages: Range<usize>) -> Result<(), String> {
        Err("no writer on this platform".into())
    }
    fn write(&mut self, _addr: usize, _bytes: &[u8]) -> Result<(), String> {
        Err("no writer on this platform".into())
    }
    fn finish(&mut self) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_are_parsed() {
        let line = "55d0c6a00000-55d0c6a21000 r-xp 00002000 fd:01 123 /usr/bin/x";
        assert_eq!(
            parse_maps_line(line),
            Some((
                0x55d0c6a00000..0x55d0c6a21000,
                Perms {
                    read: true,
                    write: false,
                    exec: true
                }
            ))
        );
        assert_eq!(parse_maps_line("garbage"), None);
    }

    #[test]
    fn this_function_is_executable_and_not_past_its_mapping() {
        let map = memory_map();
        let here = maps_lines_are_parsed as *const () as usize;
        assert!(map.is_executable(here, 16));
        assert!(!map.is_executable(0, 16));
        assert!(!map.is_readable(usize::MAX - 4, 16));
        let page = here & !0xfff;
        let perms = map.permissions(page..page + 0x1000).unwrap();
        assert_eq!(perms.len(), 1);
        assert!(perms[0].1.exec && !perms[0].1.write, "{perms:?}");
        assert_eq!(map.permissions(0..0x1000), None);
    }

    #[test]
    fn a_range_may_span_adjacent_mappings_that_all_allow_it() {
        let rx = Perms {
            read: true,
            write: false,
            exec: true,
        };
        let r = Perms { exec: false, ..rx };
        // A text mapping split at a written page, then read-only data after a gap.
        let map = MemoryMap {
            regions: vec![
                (0x1000..0x3000, rx),
                (0x3000..0x4000, rx),
                (0x4000..0x6000, rx),
                (0x6000..0x7000, r),
                (0x8000..0x9000, rx),
            ],
            page_exact: true,
            last: [AtomicUsize::new(0), AtomicUsize::new(0)],
        };
        assert!(map.is_executable(0x2ffc, 16));
        assert!(map.is_executable(0x2ffc, 0x1010));
        assert!(map.is_executable(0x1000, 0x5000));
        assert!(map.is_executable(0x3ff0, 0x10));
        assert!(!map.is_executable(0x5ffc, 16), "into data");
        assert!(map.is_readable(0x5ffc, 16));
        assert!(!map.is_readable(0x6ffc, 16), "into a gap");
        assert!(!map.is_executable(0x0ffc, 16), "from a gap");
        assert!(!map.is_executable(0x8ffc, 16), "past the end");
        assert!(!map.is_readable(usize::MAX - 4, 16));
        assert!(map.is_executable(0x8000, 0));
    }

    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn loaded_segments_agree_with_the_maps_on_this_code() {
        let (segments, maps) = (loaded_segments(), memory_map());
        let here = maps_lines_are_parsed as *const () as usize;
        assert!(segments.is_executable(here, 16));
        assert!(!segments.is_executable(0, 16));
        let page = here & !0xfff;
        if let Some(perms) = segments.permissions(page..page + 0x1000) {
            assert_eq!(Some(perms), maps.permissions(page..page + 0x1000));
        }
    }
}
