//! Operating-system concerns, one file per OS.

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
    /// (range, readable, executable), sorted by address.
    regions: Vec<(Range<usize>, bool, bool)>,
    /// The regions the last lookups of code ([`is_executable`](Self::is_executable)) and of
    /// data ([`is_readable`](Self::is_readable)) found: sites come in link order and their
    /// replacement blocks sit together, so most lookups hit them.
    last: [AtomicUsize; 2],
}

impl MemoryMap {
    fn find(
        &self,
        addr: usize,
        len: usize,
        hint: &AtomicUsize,
    ) -> Option<&(Range<usize>, bool, bool)> {
        let end = addr.checked_add(len)?;
        let covers = |(r, _, _): &&(Range<usize>, bool, bool)| r.start <= addr && end <= r.end;
        if let Some(hit) = self.regions.get(hint.load(Relaxed)).filter(covers) {
            return Some(hit);
        }
        let i = self.regions.partition_point(|(r, _, _)| r.end <= addr);
        let found = self.regions.get(i).filter(covers);
        if found.is_some() {
            hint.store(i, Relaxed);
        }
        found
    }

    /// Whether `addr..addr + len` lies in one readable mapping.
    pub fn is_readable(&self, addr: usize, len: usize) -> bool {
        self.find(addr, len, &self.last[1])
            .is_some_and(|&(_, r, _)| r)
    }

    /// Whether `addr..addr + len` lies in one readable, executable mapping.
    pub fn is_executable(&self, addr: usize, len: usize) -> bool {
        self.find(addr, len, &self.last[0])
            .is_some_and(|&(_, r, x)| r && x)
    }
}

/// Reads `/proc/self/maps` (empty where there is none: nothing then counts as mapped).
pub fn memory_map() -> MemoryMap {
    let text = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut regions: Vec<_> = text.lines().filter_map(parse_maps_line).collect();
    regions.sort_by_key(|(r, _, _)| r.start);
    MemoryMap {
        regions,
        last: [AtomicUsize::new(0), AtomicUsize::new(0)],
    }
}

/// `start-end perms ...` → (start..end, readable, executable).
fn parse_maps_line(line: &str) -> Option<(Range<usize>, bool, bool)> {
    let mut fields = line.split_ascii_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?.as_bytes();
    let range = usize::from_str_radix(start, 16).ok()?..usize::from_str_radix(end, 16).ok()?;
    Some((
        range,
        perms.first() == Some(&b'r'),
        perms.get(2) == Some(&b'x'),
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
            Some((0x55d0c6a00000..0x55d0c6a21000, true, true))
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
    }
}
