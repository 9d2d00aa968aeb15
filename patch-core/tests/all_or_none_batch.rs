//! `write_batch_all_or_none` on scratch executable memory: a write that fails half-way through a
//! batch puts back every site already written, with threads running (the int3 protocol) and
//! without (direct writes, in a forked child of one thread), so the text is as it was and every
//! result says why.

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use std::ops::Range;

use patch_core::os::linux::MprotectWriter;
use patch_core::plan::{Block, plan_site};
use patch_core::write::{SiteWrite, TextWriter, write_batch_all_or_none};

/// Fails its `fail_at`-th write (counting from 1); otherwise writes through mprotect.
struct FailingWriter {
    inner: MprotectWriter,
    writes: usize,
    fail_at: usize,
}

impl TextWriter for FailingWriter {
    fn name(&self) -> &'static str {
        "failing"
    }
    fn prepare(&mut self, pages: Range<usize>) -> Result<(), String> {
        self.inner.prepare(pages)
    }
    fn write(&mut self, addr: usize, bytes: &[u8]) -> Result<(), String> {
        self.writes += 1;
        if self.writes == self.fail_at {
            return Err(format!("write {} refused by the test", self.writes));
        }
        self.inner.write(addr, bytes)
    }
    fn finish(&mut self) -> Result<(), String> {
        self.inner.finish()
    }
}

// mov eax, 1; nop x3 (padding); ret
const ORIGINAL: [u8; 9] = [0xb8, 0x01, 0x00, 0x00, 0x00, 0x90, 0x90, 0x90, 0xc3];

/// Two one-site functions on a scratch page; each returns 1, or 3 once rewritten.
struct Scratch {
    map: memmap2::Mmap,
    sites: [usize; 2],
}

impl Scratch {
    fn new() -> Scratch {
        let mut map = memmap2::MmapMut::map_anon(4096).unwrap();
        map[..9].copy_from_slice(&ORIGINAL);
        map[64..73].copy_from_slice(&ORIGINAL);
        let map = map.make_exec().unwrap();
        let base = map.as_ptr() as usize;
        Scratch {
            map,
            sites: [base, base + 64],
        }
    }

    fn call(&self, i: usize) -> u32 {
        // SAFETY: each site starts a complete function with the C ABI and no arguments.
        unsafe { std::mem::transmute::<usize, extern "C" fn() -> u32>(self.sites[i])() }
    }

    fn writes(&self) -> Vec<SiteWrite> {
        let default = [0xb8, 0x01, 0x00, 0x00, 0x00];
        let three = [0x31, 0xc0, 0xb0, 0x03];
        let blocks = [
            Block {
                bytes: &default,
                ip: 0x1000,
            },
            Block {
                bytes: &three,
                ip: 0x2000,
            },
        ];
        self.sites
            .iter()
            .map(|&addr| {
                let offset = addr - self.map.as_ptr() as usize;
                let current = self.map[offset..offset + 8].to_vec();
                let plan =
                    plan_site(addr as u64, &current, &blocks, &["default", "three"], 1).unwrap();
                SiteWrite::new(&plan)
            })
            .collect()
    }

    fn untouched(&self) -> bool {
        self.map[..9] == ORIGINAL && self.map[64..73] == ORIGINAL
    }
}

/// Every write position of the batch fails in turn: the batch is put back whole each time.
fn each_failure_puts_the_batch_back(writes_per_batch: usize) {
    for fail_at in 1..=writes_per_batch {
        let scratch = Scratch::new();
        let mut writer = FailingWriter {
            inner: MprotectWriter::default(),
            writes: 0,
            fail_at,
        };
        let (results, _) = write_batch_all_or_none(&scratch.writes(), &mut writer);
        assert!(
            results
                .iter()
                .all(|r| r.as_ref().is_err_and(|e| e.contains("refused by the test"))),
            "failure at write {fail_at}: {results:?}"
        );
        assert!(scratch.untouched(), "failure at write {fail_at}");
        assert_eq!((scratch.call(0), scratch.call(1)), (1, 1));
    }
    // And with no failure, both are written.
    let scratch = Scratch::new();
    let (results, _) = write_batch_all_or_none(&scratch.writes(), &mut MprotectWriter::default());
    assert_eq!(results, vec![Ok(()), Ok(())]);
    assert_eq!((scratch.call(0), scratch.call(1)), (3, 3));
}

#[test]
fn a_failed_write_puts_back_the_whole_live_batch() {
    // The harness's threads make the batch live: int3, rest, first byte, for two sites.
    assert_ne!(patch_core::os::linux::thread_count(), Some(1));
    each_failure_puts_the_batch_back(6);
}

#[test]
fn a_failed_write_puts_back_the_whole_direct_batch() {
    // The decoder's tables are built once per process, under a lock: built here first, so the
    // fork cannot copy that lock held by the other test's thread (the child would wait forever).
    let _ = patch_core::plan::decode(patch_core::plan::Block {
        bytes: &[0x90],
        ip: 0,
    });
    // SAFETY: the child runs the check on its own copy of memory, then `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let ok = std::panic::catch_unwind(|| {
            assert_eq!(patch_core::os::linux::thread_count(), Some(1));
            each_failure_puts_the_batch_back(2);
        })
        .is_ok();
        // SAFETY: ends the child without returning into the harness.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{status:#x}"
    );
}
