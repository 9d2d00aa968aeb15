//! Linux: the two ways to write text, core serialization across threads, and the SIGTRAP handler
//! of the live protocol.

use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::ops::Range;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, AtomicUsize, Ordering::SeqCst};

use crate::arch::x86_64::{self as arch, Resume};
use crate::lock::ForkSafeMutex;
use crate::write::{ActiveSite, TextWriter};

/// Writes through `mprotect`: each page range is made read-write-execute for the batch (execute is
/// never dropped, so threads keep running it) and given back its exact original protection after.
#[derive(Default)]
pub struct MprotectWriter {
    restore: Vec<(Range<usize>, region::Protection)>,
}

impl TextWriter for MprotectWriter {
    fn name(&self) -> &'static str {
        "mprotect"
    }

    fn prepare(&mut self, pages: Range<usize>) -> Result<(), String> {
        let original = region::query_range(pages.start as *const u8, pages.len())
            .and_then(|regions| regions.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("cannot query page protection: {e}"))?;
        // SAFETY: the range holds the program's own code; adding write permission does not change
        // what executes, and `finish` restores the original protection.
        unsafe {
            region::protect(
                pages.start as *const u8,
                pages.len(),
                region::Protection::READ_WRITE_EXECUTE,
            )
        }
        .map_err(|e| format!("mprotect(PROT_READ|PROT_WRITE|PROT_EXEC) refused: {e}"))?;
        for r in original {
            let range = r.as_range();
            let clipped = range.start.max(pages.start)..range.end.min(pages.end);
            self.restore.push((clipped, r.protection()));
        }
        Ok(())
    }

    fn write(&mut self, addr: usize, bytes: &[u8]) -> Result<(), String> {
        // SAFETY: `addr..addr + bytes.len()` lies in a range made writable by `prepare`; the live
        // protocol guarantees no thread executes the bytes being replaced.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
        Ok(())
    }

    fn finish(&mut self) -> Result<(), String> {
        let mut failed = None;
        for (range, protection) in self.restore.drain(..) {
            // SAFETY: restores the protection these pages had before `prepare`.
            if let Err(e) =
                unsafe { region::protect(range.start as *const u8, range.len(), protection) }
            {
                failed = Some(format!("restoring protection of {range:#x?} failed: {e}"));
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

/// Writes through `/proc/self/mem`, which the kernel lets a process use on its own read-only text
/// (as a debugger would), with no writable window on the pages at all. Uses the descriptor kept
/// by [`keep_proc_mem`] when there is one for this process, else opens one for the batch.
#[derive(Default)]
pub struct ProcMemWriter {
    file: Option<ProcMem>,
}

enum ProcMem {
    /// Opened for this batch, closed at its end.
    Own(File),
    /// The kept descriptor, never closed here.
    Kept(ManuallyDrop<File>),
}

impl TextWriter for ProcMemWriter {
    fn name(&self) -> &'static str {
        "/proc/self/mem"
    }

    fn prepare(&mut self, _pages: Range<usize>) -> Result<(), String> {
        if self.file.is_none() {
            self.file = Some(match kept_proc_mem() {
                Some(kept) => ProcMem::Kept(kept),
                None => ProcMem::Own(open_proc_mem()?),
            });
        }
        Ok(())
    }

    fn write(&mut self, addr: usize, bytes: &[u8]) -> Result<(), String> {
        let file: &File = match self.file.as_ref().ok_or("/proc/self/mem is not open")? {
            ProcMem::Own(file) => file,
            ProcMem::Kept(file) => file,
        };
        match file.write_at(bytes, addr as u64) {
            Ok(n) if n == bytes.len() => Ok(()),
            Ok(n) => Err(format!(
                "short write to /proc/self/mem: {n} of {} bytes",
                bytes.len()
            )),
            Err(e) => Err(format!("write to /proc/self/mem failed: {e}")),
        }
    }

    fn finish(&mut self) -> Result<(), String> {
        self.file = None;
        Ok(())
    }
}

fn open_proc_mem() -> Result<File, String> {
    // std opens with O_CLOEXEC: a program this one executes never inherits it.
    File::options()
        .write(true)
        .open("/proc/self/mem")
        .map_err(|e| format!("cannot open /proc/self/mem for writing: {e}"))
}

/// The kept `/proc/self/mem` descriptor and the process that opened it. Read and written only
/// under the patcher lock.
static KEPT_FD: AtomicI32 = AtomicI32::new(-1);
static KEPT_PID: AtomicU32 = AtomicU32::new(0);

/// Opens `/proc/self/mem` for writing and keeps it for the life of the process (the caller holds
/// the patcher lock), so text stays writable after a sandbox that refuses `mprotect(W|X)` and
/// opening the file is entered. Best effort: where the open is refused already, nothing is kept.
///
/// The trade-off: a writable descriptor to the process's own memory stays open. Code that can
/// already make system calls in the process could open it itself unless a sandbox forbids it;
/// keeping it means a sandbox entered later no longer takes that ability from such code. It is
/// kept only by programs with static keys (apply keeps it when there are key sites, a toggle at
/// its first call), with `O_CLOEXEC`. A descriptor of `/proc/self/mem` names the memory of the
/// process that opened it: a forked child does not use its parent's, it opens its own.
pub fn keep_proc_mem() {
    // SAFETY: getpid takes no arguments and cannot fail.
    let pid = unsafe { libc::getpid() } as u32;
    if KEPT_PID.load(SeqCst) == pid && KEPT_FD.load(SeqCst) >= 0 {
        return;
    }
    let inherited = KEPT_FD.swap(-1, SeqCst);
    if inherited >= 0 {
        // SAFETY: the parent's descriptor, copied into this child by fork and owned by nothing
        // else here; closing it leaves the parent's copy open.
        drop(unsafe { File::from_raw_fd(inherited) });
    }
    if let Ok(file) = open_proc_mem() {
        KEPT_PID.store(pid, SeqCst);
        KEPT_FD.store(file.into_raw_fd(), SeqCst);
    }
}

/// The kept descriptor, if this process opened one, as a `File` that must not be dropped.
fn kept_proc_mem() -> Option<ManuallyDrop<File>> {
    let fd = KEPT_FD.load(SeqCst);
    // SAFETY: getpid takes no arguments and cannot fail.
    let pid = unsafe { libc::getpid() } as u32;
    // SAFETY: a kept descriptor stays open for the process's life (only a forked child's
    // `keep_proc_mem` closes its inherited copy, under the patcher lock a writer runs under too);
    // `ManuallyDrop` keeps this `File` from closing it.
    (fd >= 0 && KEPT_PID.load(SeqCst) == pid)
        .then(|| ManuallyDrop::new(unsafe { File::from_raw_fd(fd) }))
}

/// Faults in the pages wholly inside `buffer`'s spare capacity with one `madvise`, instead of one
/// page fault per page as they are first written (a first apply writes a report entry per site:
/// hundreds of pages, each fault costing microseconds in a VM guest). Best effort: kernels before
/// 5.14 refuse `MADV_POPULATE_WRITE`, and the pages then fault in as usual.
pub fn prefault<T>(buffer: &mut Vec<T>) {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    let spare = buffer.spare_capacity_mut();
    let page = region::page::size();
    let start = (spare.as_ptr() as usize).next_multiple_of(page);
    let end = (spare.as_ptr() as usize + size_of_val(spare)) & !(page - 1);
    if start < end {
        // SAFETY: the range lies inside memory this Vec owns and has not initialised; populating
        // it only maps its pages (writable, as they are), leaving their contents as they were.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, MADV_POPULATE_WRITE) };
    }
}

/// Number of threads in this process, from `/proc/self/status`; `None` if it cannot be read.
pub fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Threads:"))?;
    line.trim().parse().ok()
}

const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_long = 1 << 5;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_long = 1 << 6;

fn membarrier(cmd: libc::c_long) -> io::Result<()> {
    // SAFETY: membarrier takes no pointers; unknown commands fail with EINVAL.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            cmd,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Registers this process for core-serializing membarriers (once; the result is remembered).
pub fn enable_sync_core() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE).map_err(|e| {
                format!("membarrier(REGISTER_PRIVATE_EXPEDITED_SYNC_CORE) failed: {e}")
            })
        })
        .clone()
}

/// Makes every running thread of the process execute a core-serializing instruction before it
/// runs user code again, so none keeps executing stale prefetched bytes (the userland
/// `text_poke_sync()`). Requires [`enable_sync_core`].
pub fn sync_all_cores() -> Result<(), String> {
    membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)
        .map_err(|e| format!("membarrier(PRIVATE_EXPEDITED_SYNC_CORE) failed: {e}"))?;
    arch::serialize_local();
    Ok(())
}

/// Blocks asynchronous signals on the current thread while alive, so no signal handler runs a
/// site on the patching thread in the middle of a batch. Faults and SIGTRAP stay deliverable.
pub struct SignalsBlocked(libc::sigset_t);

impl SignalsBlocked {
    /// Blocks them until the value is dropped.
    pub fn block() -> SignalsBlocked {
        // SAFETY: plain signal-mask manipulation of the current thread with valid sets.
        unsafe {
            let mut all: libc::sigset_t = core::mem::zeroed();
            let mut old: libc::sigset_t = core::mem::zeroed();
            libc::sigfillset(&mut all);
            for sig in [
                libc::SIGTRAP,
                libc::SIGSEGV,
                libc::SIGBUS,
                libc::SIGILL,
                libc::SIGFPE,
            ] {
                libc::sigdelset(&mut all, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
            SignalsBlocked(old)
        }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `block`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, core::ptr::null_mut()) };
    }
}

// ---- The SIGTRAP handler ----------------------------------------------------------------------
//
// State shared with the handler, read without locks (async-signal-safe):
//
// | item       | written by                         | read by the handler                     |
// |------------|------------------------------------|-----------------------------------------|
// | `ACTIVE`   | patcher: batch published/cleared   | sites being patched now, their new shape |
// | `IN_FLIGHT`| handler: +1 before reading ACTIVE  | patcher waits for 0 before freeing      |
// | `PATCHED`  | patcher: append-only leaked chunks | "a site we patched": retry if int3 gone |
// | `PREVIOUS` | installer, once                    | the handler chained to for other traps  |

static ACTIVE: AtomicPtr<Vec<ActiveSite>> = AtomicPtr::new(core::ptr::null_mut());
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static PATCHED: AtomicPtr<PatchedChunk> = AtomicPtr::new(core::ptr::null_mut());
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// Addresses of sites ever written by the live protocol, sorted; a chunk per batch that added new
/// ones. Never freed, so a thread that trapped just before a batch ended still finds its site.
struct PatchedChunk {
    sites: Box<[usize]>,
    next: *const PatchedChunk,
}

/// Serializes handler installation and `PATCHED` appends (the patcher holds its own lock too).
/// Fork-safe, like the patcher lock (`lock.rs`).
pub(crate) static INSTALL: ForkSafeMutex<()> = ForkSafeMutex::new(());

/// Installs the SIGTRAP handler (once), chaining to whatever handler was there before.
pub fn install_trap_handler() -> Result<(), String> {
    let _guard = INSTALL
        .lock()
        .map_err(|_| "the SIGTRAP handler is being installed by this thread (re-entered)")?;
    if PREVIOUS.get().is_some() {
        return Ok(());
    }
    // SAFETY: a zeroed sigaction is a valid "no handler" value; we fill in ours with SA_SIGINFO,
    // and the kernel copies the old action out.
    unsafe {
        let mut action: libc::sigaction = core::mem::zeroed();
        action.sa_sigaction = on_sigtrap as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        let mut old: libc::sigaction = core::mem::zeroed();
        if libc::sigaction(libc::SIGTRAP, &action, &mut old) != 0 {
            return Err(format!(
                "sigaction(SIGTRAP) failed: {}",
                io::Error::last_os_error()
            ));
        }
        let _ = PREVIOUS.set(old);
    }
    Ok(())
}

/// Records `sites` as patched by the live protocol, for traps that arrive after their batch.
/// Refused on a thread already appending (re-entered from a signal handler): the batch must then
/// not be written.
pub fn remember_patched(sites: impl IntoIterator<Item = usize>) -> Result<(), String> {
    let _guard = INSTALL
        .lock()
        .map_err(|_| "the list of patched sites is being appended by this thread (re-entered)")?;
    let mut new: Vec<usize> = sites.into_iter().filter(|&s| !was_patched(s)).collect();
    if new.is_empty() {
        return Ok(());
    }
    new.sort_unstable();
    new.dedup();
    let chunk = Box::new(PatchedChunk {
        sites: new.into_boxed_slice(),
        next: PATCHED.load(SeqCst),
    });
    PATCHED.store(Box::into_raw(chunk), SeqCst);
    Ok(())
}

fn was_patched(site: usize) -> bool {
    let mut chunk = PATCHED.load(SeqCst).cast_const();
    while !chunk.is_null() {
        // SAFETY: chunks are leaked boxes, never freed or mutated after publication.
        let c = unsafe { &*chunk };
        if c.sites.binary_search(&site).is_ok() {
            return true;
        }
        chunk = c.next;
    }
    false
}

/// Publishes the batch being written, for the handler.
pub fn publish(batch: &mut Vec<ActiveSite>) {
    ACTIVE.store(batch, SeqCst);
}

/// Withdraws the batch and waits until no handler still reads it.
pub fn withdraw() {
    ACTIVE.store(core::ptr::null_mut(), SeqCst);
    while IN_FLIGHT.load(SeqCst) != 0 {
        std::thread::yield_now();
    }
}

extern "C" fn on_sigtrap(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo and ucontext for an SA_SIGINFO handler.
    let handled = unsafe { handle_int3(&*info, &mut *ctx.cast::<libc::ucontext_t>()) };
    if !handled {
        // SAFETY: forwards the same arguments to the previous disposition.
        unsafe { chain(sig, info, ctx) };
    }
}

/// Handles a trap on one of our sites; `false` means it is not ours.
///
/// # Safety
/// `uc` must be the trapped thread's context.
unsafe fn handle_int3(info: &libc::siginfo_t, uc: &mut libc::ucontext_t) -> bool {
    // `int3` raises SIGTRAP with si_code SI_KERNEL; kill(), tkill() and single-stepping do not.
    if info.si_code != libc::SI_KERNEL {
        return false;
    }
    let gregs = &mut uc.uc_mcontext.gregs;
    let site = (gregs[libc::REG_RIP as usize] as usize).wrapping_sub(1);

    let mut lookups = 0;
    loop {
        lookups += 1;
        if let Some(entry) = active_site(site) {
            let (rip, rsp) = (libc::REG_RIP as usize, libc::REG_RSP as usize);
            let (mut new_rip, mut new_rsp) = (gregs[rip] as u64, gregs[rsp] as u64);
            let resume = Resume {
                rip: &mut new_rip,
                rsp: &mut new_rsp,
            };
            // SAFETY: call sites leave no live data below the stack pointer (see `emulate`).
            if unsafe { arch::emulate(site as u64, entry.len as u64, entry.shape, resume) } {
                gregs[rip] = new_rip as i64;
                gregs[rsp] = new_rsp as i64;
            } else {
                // Several new instructions: wait for the batch to put back byte 0, then run them.
                wait_for_first_byte(site);
                gregs[rip] = site as i64;
            }
            TRAPS_HANDLED.fetch_add(1, SeqCst);
            return true;
        }
        if !was_patched(site) {
            return false;
        }
        // A trap that raced with the end of its batch: the int3 is gone, run the site again.
        // SAFETY: `site` is a patched site start (checked above), mapped and readable.
        if unsafe { core::ptr::read_volatile(site as *const u8) } != arch::INT3 {
            gregs[libc::REG_RIP as usize] = site as i64;
            TRAPS_HANDLED.fetch_add(1, SeqCst);
            return true;
        }
        // An int3 on a site we patch, in no published batch: our batch ended between the trap
        // and the lookup, and the next one (which publishes before it writes its int3) put an
        // int3 back. Look again; an int3 that stays unpublished is someone else's breakpoint.
        if lookups == FOREIGN_AFTER {
            return false;
        }
        // SAFETY: sched_yield is async-signal-safe and takes no arguments.
        unsafe { libc::sched_yield() };
    }
}

/// Lookups of an unpublished int3 on a patched site before it is taken for someone else's.
const FOREIGN_AFTER: usize = 1000;

/// The published batch's entry for `site`, if any.
fn active_site(site: usize) -> Option<ActiveSite> {
    IN_FLIGHT.fetch_add(1, SeqCst);
    let batch = ACTIVE.load(SeqCst);
    // SAFETY: the patcher frees a published batch only after withdrawing it and seeing IN_FLIGHT
    // at zero, and we incremented IN_FLIGHT before loading the pointer.
    let entry = unsafe { batch.as_ref() }.and_then(|b| {
        let i = b.binary_search_by_key(&site, |s| s.addr).ok()?;
        Some(b[i])
    });
    IN_FLIGHT.fetch_sub(1, SeqCst);
    entry
}

fn wait_for_first_byte(site: usize) {
    // SAFETY: `site` is a site in the published batch: mapped code, readable.
    while unsafe { core::ptr::read_volatile(site as *const u8) } == arch::INT3 {
        // SAFETY: sched_yield is async-signal-safe and takes no arguments.
        unsafe { libc::sched_yield() };
    }
}

/// Passes a trap that is not ours to the handler installed before ours, or to the default action.
unsafe fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let Some(prev) = PREVIOUS.get() else { return };
    match prev.sa_sigaction {
        libc::SIG_IGN => {}
        libc::SIG_DFL => {
            // Let the default action (terminate with a core dump) happen, as without us.
            // SAFETY: resets the disposition and re-raises the signal; async-signal-safe calls.
            unsafe {
                let mut dfl: libc::sigaction = core::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, core::ptr::null_mut());
                let mut set: libc::sigset_t = core::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, sig);
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, core::ptr::null_mut());
                libc::raise(sig);
            }
        }
        handler if prev.sa_flags & libc::SA_SIGINFO != 0 => {
            // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this type.
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { core::mem::transmute(handler) };
            f(sig, info, ctx);
        }
        handler => {
            // SAFETY: without SA_SIGINFO the previous handler takes only the signal number.
            let f: extern "C" fn(libc::c_int) = unsafe { core::mem::transmute(handler) };
            f(sig);
        }
    }
}

static TRAPS_HANDLED: AtomicUsize = AtomicUsize::new(0);

/// How many times a thread trapped on a site being patched and was moved on by the handler.
pub fn traps_handled() -> usize {
    TRAPS_HANDLED.load(SeqCst)
}
