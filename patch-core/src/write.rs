//! Write: put planned bytes into live text, safely while other threads may execute it.
//!
//! With other threads running, a batch follows the kernel's `text_poke_bp` protocol, for all its
//! sites at once:
//!
//! | step | write                          | then                 | a thread arriving at the site |
//! |------|--------------------------------|----------------------|-------------------------------|
//! | 1    | `int3` over byte 0 of each site | serialize all cores | traps; the handler emulates   |
//! | 2    | bytes 1..n of each site         | serialize all cores | traps; the handler emulates   |
//! | 3    | the new byte 0 of each site     | serialize all cores | runs the new bytes            |
//!
//! A thread never sees a half-written instruction: until step 3 the first byte is `int3`, and the
//! SIGTRAP handler moves it to where the new bytes would take it (call, jump, past NOPs) or, for
//! several inline instructions, waits for step 3 and runs them. A batch costs three serializations
//! whatever its size. With no other thread, the bytes are written directly.
//!
//! The int3 covers threads arriving at byte 0. A thread may also be stopped further in, where an
//! old instruction ends (preempted there, or returning from an old `call`); the planner keeps the
//! filler there byte for byte (see [`LiveWrite`]). Where it cannot (the new instructions are
//! longer than the old call, or the site holds several instructions now), the site is not written
//! while other threads run, nor are the other sites of its name (see [`SiteWrite::group`]).

use std::ops::Range;

use smallvec::SmallVec;

use crate::plan::{LiveWrite, Plan, Shape};

/// A way to write the program's text: page-protection flipping, `/proc/self/mem`, or a test double.
pub trait TextWriter: Send {
    /// Name for the report.
    fn name(&self) -> &'static str;
    /// Gets the page range (page-aligned) ready for writes; called once per range, before any write.
    fn prepare(&mut self, pages: Range<usize>) -> Result<(), String>;
    /// Writes `bytes` at `addr`, inside a prepared range.
    fn write(&mut self, addr: usize, bytes: &[u8]) -> Result<(), String>;
    /// Ends the batch (restores page protection).
    fn finish(&mut self) -> Result<(), String>;
}

/// A site of the batch being written, as the SIGTRAP handler sees it.
#[derive(Clone, Copy, Debug)]
pub struct ActiveSite {
    /// Site address.
    pub addr: usize,
    /// Site length.
    pub len: usize,
    /// What the new bytes do.
    pub shape: Shape,
}

/// A site's bytes: inline up to 16 (almost every site), so a batch of thousands of sites does
/// not make two heap allocations per site.
pub type SiteBytes = SmallVec<[u8; 16]>;

/// One site to write: its new bytes and what they do.
#[derive(Clone, Debug)]
pub struct SiteWrite {
    /// Site address: mapped, readable program text (a live batch reads the bytes there before
    /// writing, to put them back if the write fails half-way).
    pub ip: u64,
    /// New bytes, as planned.
    pub new: SiteBytes,
    /// What the new bytes do, for the trap handler.
    pub shape: Shape,
    /// Whether the new bytes may be written while other threads run.
    pub live: LiveWrite,
    /// Sites of one group (apply: the site's name) move together: with threads running, a site
    /// that cannot be written holds back the others, so a protocol spread over several sites (a
    /// lock's slow path and its unlock) never runs half one variant, half another. `None`: a
    /// group of its own.
    pub group: Option<&'static &'static str>,
}

impl SiteWrite {
    /// Writes `plan` at its site, as a group of its own.
    pub fn new(plan: &Plan) -> SiteWrite {
        SiteWrite {
            ip: plan.ip,
            new: SiteBytes::from_slice(&plan.bytes),
            shape: plan.shape,
            live: plan.live,
            group: None,
        }
    }
}

/// What a batch did, for the report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct BatchStats {
    /// Pages written.
    pub pages: usize,
    /// Cross-core serializations issued.
    pub serializations: usize,
    /// Whether the int3 protocol was used (other threads were running).
    pub live: bool,
    /// A problem after the writes (page protection not restored), if any.
    pub warning: Option<String>,
}

/// Tries `primary` per page range and falls back to `fallback` where `primary` cannot prepare it.
pub struct FallbackWriter<A, B> {
    primary: A,
    fallback: B,
    /// Ranges of the current batch that the fallback prepared.
    via_fallback: Vec<Range<usize>>,
    /// Whether the fallback wrote anything since this writer was made (for the report's name).
    fallback_used: bool,
}

impl<A: TextWriter, B: TextWriter> FallbackWriter<A, B> {
    /// Combines two writers.
    pub fn new(primary: A, fallback: B) -> Self {
        FallbackWriter {
            primary,
            fallback,
            via_fallback: Vec::new(),
            fallback_used: false,
        }
    }
}

impl<A: TextWriter, B: TextWriter> TextWriter for FallbackWriter<A, B> {
    fn name(&self) -> &'static str {
        if !self.fallback_used {
            self.primary.name()
        } else {
            self.fallback.name()
        }
    }

    fn prepare(&mut self, pages: Range<usize>) -> Result<(), String> {
        let first = match self.primary.prepare(pages.clone()) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        self.fallback
            .prepare(pages.clone())
            .map(|()| {
                self.fallback_used = true;
                self.via_fallback.push(pages);
            })
            .map_err(|second| format!("{first}; {second}"))
    }

    fn write(&mut self, addr: usize, bytes: &[u8]) -> Result<(), String> {
        if self.via_fallback.iter().any(|r| r.contains(&addr)) {
            self.fallback.write(addr, bytes)
        } else {
            self.primary.write(addr, bytes)
        }
    }

    fn finish(&mut self) -> Result<(), String> {
        self.via_fallback.clear();
        let a = self.primary.finish();
        let b = self.fallback.finish();
        a.and(b)
    }
}

/// The page-aligned ranges covering `sites`, merged where they touch, each with the indices of
/// the sites inside it.
fn page_ranges(sites: &[SiteWrite], page: usize) -> Vec<(Range<usize>, Vec<usize>)> {
    let mut order: Vec<usize> = (0..sites.len()).collect();
    order.sort_by_key(|&i| sites[i].ip);
    let mut out: Vec<(Range<usize>, Vec<usize>)> = Vec::new();
    for i in order {
        let ip = sites[i].ip as usize;
        let start = ip & !(page - 1);
        let end = (ip + sites[i].new.len()).next_multiple_of(page);
        match out.last_mut() {
            Some((range, members)) if start <= range.end => {
                range.end = range.end.max(end);
                members.push(i);
            }
            _ => out.push((start..end, vec![i])),
        }
    }
    out
}

/// Writes a batch; returns one result per site (in order) and the batch's statistics.
///
/// The caller holds the patcher lock, so only one batch runs at a time.
pub fn write_batch(
    sites: &[SiteWrite],
    writer: &mut dyn TextWriter,
) -> (Vec<Result<(), String>>, BatchStats) {
    write_batch_with(sites, writer, false)
}

/// Writes a batch all or none (a static key's sites): if any site is refused before writing,
/// none is written; if a write fails half-way, every site written so far is put back. Either all
/// results are `Ok`, or all are `Err` and the text is as it was.
pub fn write_batch_all_or_none(
    sites: &[SiteWrite],
    writer: &mut dyn TextWriter,
) -> (Vec<Result<(), String>>, BatchStats) {
    write_batch_with(sites, writer, true)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn write_batch_with(
    sites: &[SiteWrite],
    writer: &mut dyn TextWriter,
    all_or_none: bool,
) -> (Vec<Result<(), String>>, BatchStats) {
    use crate::arch::x86_64::{INT3, serialize_local};
    use crate::os::linux as os;

    let mut results: Vec<Result<(), String>> = vec![Ok(()); sites.len()];
    let mut stats = BatchStats::default();
    for (pages, members) in page_ranges(sites, region::page::size()) {
        match writer.prepare(pages.clone()) {
            Ok(()) => stats.pages += pages.len() / region::page::size(),
            Err(e) => members.iter().for_each(|&i| results[i] = Err(e.clone())),
        }
    }

    stats.live = os::thread_count() != Some(1);
    // Under valgrind, threads run valgrind's translations of the code: it is told which ranges
    // changed (instead of serializing cores) at each step, and after direct writes.
    let valgrind = crate::os::valgrind::running();
    if stats.live {
        if let Err(e) = live_protocol_usable(valgrind) {
            let why = format!("other threads are running and live patching is unavailable: {e}");
            results
                .iter_mut()
                .filter(|r| r.is_ok())
                .for_each(|r| *r = Err(why.clone()));
        }
        // A thread may be stopped inside these sites' old bytes, where the new bytes would not
        // take it back (see `LiveWrite`); they, and their groups, keep what they run until no
        // other thread runs.
        let held: Vec<&str> = sites
            .iter()
            .filter(|s| !s.live.is_safe())
            .filter_map(|s| s.group.copied())
            .collect();
        for (result, site) in results.iter_mut().zip(sites) {
            if result.is_err() {
                continue;
            }
            if !site.live.is_safe() {
                *result = Err(format!("other threads are running and {}", site.live));
            } else if site.group.is_some_and(|g| held.contains(g)) {
                *result = Err(
                    "other threads are running and another site of its name cannot \
                     be rewritten now (sites of one name move together)"
                        .into(),
                );
            }
        }
    }
    if all_or_none && let Some(Err(why)) = results.iter().find(|r| r.is_err()) {
        let why = why.clone();
        refuse_all(&mut results, &why);
    }
    let pending: Vec<usize> = (0..sites.len()).filter(|&i| results[i].is_ok()).collect();
    // The bytes there now, put back if a write fails half-way: only a live or an all-or-none
    // batch puts bytes back, so a plain direct batch (the load-time apply) copies none.
    let keep_olds = stats.live || all_or_none;
    let olds: Vec<SiteBytes> = pending
        .iter()
        .filter(|_| keep_olds)
        .map(|&i| {
            let site = &sites[i];
            // SAFETY: the caller hands sites in mapped text (apply checks each is executable,
            // so readable on x86_64), which only this batch writes (patcher lock).
            SiteBytes::from_slice(unsafe {
                core::slice::from_raw_parts(site.ip as usize as *const u8, site.new.len())
            })
        })
        .collect();

    let discard = |indices: &[usize]| {
        for &i in indices {
            crate::os::valgrind::discard_translations(sites[i].ip as usize, sites[i].new.len());
        }
    };
    if !stats.live {
        let mut failed = None;
        for &i in &pending {
            let site = &sites[i];
            results[i] = writer.write(site.ip as usize, &site.new);
            if let Err(e) = &results[i] {
                failed.get_or_insert_with(|| e.clone());
                if all_or_none {
                    break;
                }
            }
        }
        if let (true, Some(why)) = (all_or_none, failed) {
            // Put back every site written (a failed write may have written part of its site).
            for (&i, old) in pending.iter().zip(&olds) {
                results[i] = Err(why.clone());
                if read_site(&sites[i])[..] != old[..]
                    && let Err(e) = writer.write(sites[i].ip as usize, old)
                {
                    results[i] = Err(format!("{why}; putting back its old bytes failed: {e}"));
                }
            }
        }
        if valgrind {
            discard(&pending);
        }
        serialize_local();
    } else if !pending.is_empty() {
        let _signals = os::SignalsBlocked::block();
        let remembered = os::remember_patched(pending.iter().map(|&i| sites[i].ip as usize));
        if let Err(e) = remembered {
            pending.iter().for_each(|&i| results[i] = Err(e.clone()));
            stats.warning = writer.finish().err();
            return (results, stats);
        }
        let mut active: Vec<ActiveSite> = pending
            .iter()
            .map(|&i| ActiveSite {
                addr: sites[i].ip as usize,
                len: sites[i].new.len(),
                shape: sites[i].shape,
            })
            .collect();
        active.sort_by_key(|s| s.addr);
        os::publish(&mut active);
        // Other cores must execute a serializing instruction between the steps. A sandbox may
        // refuse `membarrier` after registration: the steps after a failed one are not made.
        let sync = |stats: &mut BatchStats| {
            stats.serializations += 1;
            if valgrind {
                // Valgrind runs one thread at a time, each between translated blocks: a block
                // translated after this sees the bytes written so far.
                discard(&pending);
                serialize_local();
                return Ok(());
            }
            os::sync_all_cores()
                .map_err(|e| format!("cannot serialize the other threads' cores: {e}"))
        };
        // Why the whole batch is put back, if it is.
        let mut abort: Option<String> = None;

        // Step 1: int3 over byte 0. A failure leaves that site untouched.
        for &i in &pending {
            results[i] = writer.write(sites[i].ip as usize, &[INT3]);
        }
        let trapped: Vec<bool> = pending.iter().map(|&i| results[i].is_ok()).collect();
        if all_or_none {
            abort = pending.iter().find_map(|&i| results[i].clone().err());
        }
        if let Err(e) = sync(&mut stats) {
            abort = Some(e);
        }
        // Step 2: the rest of each site. On failure, put the old bytes back behind the int3.
        let mut rest_written = vec![false; pending.len()];
        if abort.is_none() {
            for (k, (&i, old)) in pending.iter().zip(&olds).enumerate() {
                let site = &sites[i];
                if results[i].is_err() || site.new.len() < 2 {
                    continue;
                }
                rest_written[k] = true;
                if let Err(e) = writer.write(site.ip as usize + 1, &site.new[1..]) {
                    let restored = writer.write(site.ip as usize + 1, &old[1..]);
                    rest_written[k] = restored.is_err();
                    results[i] = Err(match restored {
                        Ok(()) => e,
                        Err(e2) => format!("{e}; restoring the old bytes also failed: {e2}"),
                    });
                    if all_or_none {
                        abort.get_or_insert_with(|| results[i].clone().unwrap_err());
                        break;
                    }
                }
            }
            if let Err(e) = sync(&mut stats) {
                abort = Some(e);
            }
        }
        // Putting the whole batch back: each site's old bytes behind its int3 (every core has
        // seen the int3, so no thread decodes these bytes until byte 0 is back).
        if let Some(why) = &abort {
            for (k, (&i, old)) in pending.iter().zip(&olds).enumerate() {
                results[i] = Err(why.clone());
                if rest_written[k]
                    && let Err(e) = writer.write(sites[i].ip as usize + 1, &old[1..])
                {
                    results[i] = Err(format!("{why}; putting back its old bytes failed: {e}"));
                }
            }
        }
        // Step 3: the new first byte (or the old one where the site, or the batch, is put back).
        for (k, (&i, old)) in pending.iter().zip(&olds).enumerate() {
            if !trapped[k] {
                continue;
            }
            let site = &sites[i];
            let first = if results[i].is_ok() {
                site.new[0]
            } else {
                old[0]
            };
            if let Err(e) = writer.write(site.ip as usize, &[first]) {
                results[i] = Err(e);
            }
        }
        // Every site now holds whole instructions; a core still seeing an int3 traps and the
        // handler runs the site again, so a refused serialization here changes nothing.
        if sync(&mut stats).is_err() {
            serialize_local();
        }
        os::withdraw();
        // A last byte that could not be written (left an int3 over new bytes): all or none puts
        // every site of the batch back, in a round of its own.
        if all_or_none
            && abort.is_none()
            && let Some(why) = pending.iter().find_map(|&i| results[i].clone().err())
        {
            let back: Vec<(usize, &[u8])> = pending
                .iter()
                .zip(&olds)
                .map(|(&i, old)| (sites[i].ip as usize, &old[..]))
                .collect();
            let put_back = put_back_live(&back, writer, &mut stats);
            for (&i, r) in pending.iter().zip(put_back) {
                results[i] = Err(match r {
                    Ok(()) => why.clone(),
                    Err(e) => format!("{why}; putting back its old bytes failed: {e}"),
                });
            }
        }
    }
    stats.warning = writer.finish().err();
    (results, stats)
}

/// Writes `old` bytes back at each site with the int3 protocol, while threads may run the sites:
/// each is published as several instructions, so a thread arriving at its int3 waits for the
/// site's first byte and runs it whole.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn put_back_live(
    back: &[(usize, &[u8])],
    writer: &mut dyn TextWriter,
    stats: &mut BatchStats,
) -> Vec<Result<(), String>> {
    use crate::arch::x86_64::{INT3, serialize_local};
    use crate::os::linux as os;

    let mut active: Vec<ActiveSite> = back
        .iter()
        .map(|&(addr, old)| ActiveSite {
            addr,
            len: old.len(),
            shape: Shape::Inline { len: old.len() },
        })
        .collect();
    active.sort_by_key(|s| s.addr);
    os::publish(&mut active);
    let valgrind = crate::os::valgrind::running();
    let sync = |stats: &mut BatchStats| {
        stats.serializations += 1;
        if valgrind {
            for &(addr, old) in back {
                crate::os::valgrind::discard_translations(addr, old.len());
            }
            serialize_local();
        } else if os::sync_all_cores().is_err() {
            serialize_local();
        }
    };
    let mut results: Vec<Result<(), String>> = back
        .iter()
        .map(|&(addr, _)| writer.write(addr, &[INT3]))
        .collect();
    sync(stats);
    for (r, &(addr, old)) in results.iter_mut().zip(back) {
        if r.is_ok() && old.len() > 1 {
            *r = writer.write(addr + 1, &old[1..]);
        }
    }
    sync(stats);
    // A site whose old bytes could not be put back keeps its int3 (a trap, not a torn
    // instruction).
    for (r, &(addr, old)) in results.iter_mut().zip(back) {
        if r.is_ok() {
            *r = writer.write(addr, &old[..1]);
        }
    }
    sync(stats);
    os::withdraw();
    results
}

/// Marks every site of the batch refused because of `why` (all or none).
fn refuse_all(results: &mut [Result<(), String>], why: &str) {
    for r in results.iter_mut() {
        if r.is_ok() {
            *r = Err(format!(
                "not written: another site of this all-or-none batch cannot be: {why}"
            ));
        }
    }
}

/// The bytes at a site now.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn read_site(site: &SiteWrite) -> SiteBytes {
    // SAFETY: as for the old bytes in `write_batch_with`: mapped text only this batch writes.
    SiteBytes::from_slice(unsafe {
        core::slice::from_raw_parts(site.ip as usize as *const u8, site.new.len())
    })
}

/// Whether the int3 protocol can work in this process now; checked before each live batch writes
/// anything, so a batch that cannot be made safe is refused whole (see ARCHITECTURE.md, "Live
/// patching in a hostile process").
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn live_protocol_usable(valgrind: bool) -> Result<(), String> {
    use crate::os::linux as os;
    if !valgrind {
        // Under valgrind the threads' masks in /proc are valgrind's own (it blocks every signal
        // while running the program), and membarrier is not needed.
        os::enable_sync_core()?;
        os::threads_can_take_traps()?;
    }
    os::ensure_trap_handler().map(|_reinstalled| ())
}

/// Off x86_64 Linux nothing is ever written; apply reports the platform before calling this.
#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn write_batch_with(
    sites: &[SiteWrite],
    _writer: &mut dyn TextWriter,
    _all_or_none: bool,
) -> (Vec<Result<(), String>>, BatchStats) {
    let why = "patching is implemented for x86_64 Linux only".to_string();
    (vec![Err(why); sites.len()], BatchStats::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(ip: u64, len: usize) -> SiteWrite {
        SiteWrite {
            ip,
            new: SiteBytes::from_elem(0x90, len),
            shape: Shape::Nop,
            live: LiveWrite::Safe,
            group: None,
        }
    }

    #[test]
    fn sites_are_grouped_by_page_range() {
        let sites = [
            site(0x1ffe, 5),
            site(0x1000, 5),
            site(0x5000, 5),
            site(0x2100, 2),
        ];
        let ranges = page_ranges(&sites, 0x1000);
        assert_eq!(
            ranges,
            vec![(0x1000..0x3000, vec![1, 0, 3]), (0x5000..0x6000, vec![2])]
        );
    }
}
