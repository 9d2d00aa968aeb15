//! Linux: the two ways to write text, core serialization across threads, and the SIGTRAP handler
//! of the live protocol.

use std::cell::Cell;
use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::io::Read as _;
use std::mem::{ManuallyDrop, MaybeUninit};
use std::ops::Range;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use crate::arch::x86_64::{self as arch, Resume};
use crate::lock::ForkSafeMutex;
use crate::write::{ActiveSite, TextWriter};

/// Writes through `mprotect`: each page range is made read-write-execute for the batch (execute is
/// never dropped, so threads keep running it) and given back its exact original protection after.
///
/// The protection of a page is shared by every copy of altpatch linked into the same object (two
/// semver-incompatible versions in one program): a batch holds [`TextLock`] from its first
/// `prepare` to `finish`, so no other copy saves a protection this batch made, or restores one
/// while this batch writes.
#[derive(Default)]
pub struct MprotectWriter {
    restore: Vec<(Range<usize>, region::Protection)>,
    lock: Option<TextLock>,
    /// The mappings the load-time apply read just before, so `prepare` need not read
    /// `/proc/self/maps` again; pages it does not cover are queried.
    known: Option<std::sync::Arc<crate::os::MemoryMap>>,
}

impl MprotectWriter {
    /// A writer that takes the pages' original protection from `map`, read by the same apply
    /// when no other batch can run (at load: initializers run one at a time), since it is read
    /// outside [`TextLock`].
    pub fn with_map(map: std::sync::Arc<crate::os::MemoryMap>) -> MprotectWriter {
        MprotectWriter {
            known: Some(map),
            ..MprotectWriter::default()
        }
    }

    fn original_protection(
        &self,
        pages: &Range<usize>,
    ) -> Result<Vec<(Range<usize>, region::Protection)>, String> {
        if let Some(known) = self
            .known
            .as_ref()
            .and_then(|m| m.permissions(pages.clone()))
        {
            return Ok(known
                .into_iter()
                .map(|(range, p)| {
                    let mut protection = region::Protection::NONE;
                    for (on, flag) in [
                        (p.read, region::Protection::READ),
                        (p.write, region::Protection::WRITE),
                        (p.exec, region::Protection::EXECUTE),
                    ] {
                        if on {
                            protection |= flag;
                        }
                    }
                    (range, protection)
                })
                .collect());
        }
        let regions = region::query_range(pages.start as *const u8, pages.len())
            .and_then(|regions| regions.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("cannot query page protection: {e}"))?;
        Ok(regions
            .into_iter()
            .map(|r| {
                let range = r.as_range();
                (
                    range.start.max(pages.start)..range.end.min(pages.end),
                    r.protection(),
                )
            })
            .collect())
    }
}

impl TextWriter for MprotectWriter {
    fn name(&self) -> &'static str {
        "mprotect"
    }

    fn prepare(&mut self, pages: Range<usize>) -> Result<(), String> {
        self.lock.get_or_insert_with(TextLock::acquire);
        let original = self.original_protection(&pages)?;
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
        self.restore.extend(original);
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
        self.lock = None;
        failed.map_or(Ok(()), Err)
    }
}

// The lock word every copy of altpatch in this linked object shares: a COMDAT group of one name,
// which the linker keeps once however many copies define it (as for C++ inline variables), hidden
// so that each shared object keeps its own (its pages are its own).
core::arch::global_asm!(
    ".pushsection .bss.altpatch_text_lock,\"awG\",@nobits,altpatch_text_lock,comdat",
    ".weak altpatch_text_lock",
    ".hidden altpatch_text_lock",
    ".balign 4",
    "altpatch_text_lock:",
    ".zero 4",
    ".popsection",
);

unsafe extern "C" {
    /// The thread id of the batch holding the text lock, 0 when free.
    static altpatch_text_lock: AtomicI32;
}

/// Address of the text lock word, for the test that two copies find the same one.
pub fn text_lock_addr() -> usize {
    &raw const altpatch_text_lock as usize
}

/// Holds the text lock shared by the copies of altpatch in this object while alive.
pub struct TextLock;

impl TextLock {
    /// Waits for the lock. A holder that is no thread of this process any more (the process
    /// forked while another thread held it) is taken over.
    pub fn acquire() -> TextLock {
        // SAFETY: gettid takes no arguments and cannot fail.
        let me = unsafe { libc::gettid() };
        // SAFETY: the word is defined above, 4-aligned, and only used atomically.
        let word = unsafe { &altpatch_text_lock };
        loop {
            let holder = match word.compare_exchange(0, me, SeqCst, SeqCst) {
                Ok(_) => return TextLock,
                Err(holder) => holder,
            };
            // SAFETY: getpid takes no arguments and cannot fail.
            let pid = unsafe { libc::getpid() };
            // SAFETY: signal 0 only checks that the thread exists in this process.
            let gone = unsafe { libc::syscall(libc::SYS_tgkill, pid, holder, 0) } != 0
                && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
            if gone && word.compare_exchange(holder, me, SeqCst, SeqCst).is_ok() {
                return TextLock;
            }
            std::thread::yield_now();
        }
    }
}

impl Drop for TextLock {
    fn drop(&mut self) {
        // SAFETY: as in `acquire`.
        unsafe { altpatch_text_lock.store(0, SeqCst) };
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

/// Number of threads in this process: 1 when the C library knows the process to be
/// single-threaded (glibc's `__libc_single_threaded`, no system call), else the entries of
/// `/proc/self/task` (listing them costs a fraction of reading `/proc/self/status`, about 20 µs
/// here); `None` if they cannot be listed.
pub fn thread_count() -> Option<usize> {
    if libc_single_threaded() {
        return Some(1);
    }
    thread_count_from_proc()
}

/// Number of threads in this process, from the entries of `/proc/self/task`; `None` if they
/// cannot be listed.
fn thread_count_from_proc() -> Option<usize> {
    let tasks = std::fs::read_dir("/proc/self/task").ok()?;
    Some(tasks.filter(|t| t.is_ok()).count())
}

/// Whether glibc says this process is single-threaded: its `__libc_single_threaded` (glibc 2.32
/// and later), true only while no thread was ever created with `pthread_create` (glibc clears it
/// before cloning the first thread and never sets it again while threads may run). A `true` is
/// therefore sound: no other thread exists, so none can create one while we look. `false`
/// (threads were created, maybe all gone) and no such symbol
/// (older glibc, musl, a static binary that does not link it) say nothing: the caller counts
/// from `/proc`. Its limit: a thread made with a raw `clone` behind glibc's back is not seen,
/// as glibc itself does not support such threads calling into it.
///
/// The symbol is a weak reference read through the GOT (its address, null where nothing defines
/// it), so the binary links and loads on any C library.
fn libc_single_threaded() -> bool {
    let address = crate::os::weak_symbol_address!("__libc_single_threaded");
    // SAFETY: non-null, it is glibc's `char __libc_single_threaded`, alive for the process.
    // glibc clears it in the thread that creates the first other thread, before the clone: if
    // that was us, program order shows it; if another thread exists, we were created after the
    // clear, or by a thread created after it. So a relaxed load reads true only with no other
    // thread.
    address != 0
        && unsafe { core::sync::atomic::AtomicU8::from_ptr(address as *mut u8) }
            .load(core::sync::atomic::Ordering::Relaxed)
            != 0
}

/// Checks every other thread of the process, from `/proc/self/task/*/status`, for what would make
/// an `int3` of the live protocol fatal instead of a detour through our handler: a tracer (a
/// debugger takes the trap, stops or kills the thread), or SIGTRAP blocked (the kernel then
/// forces the default action: the process dies). `Err` names the thread and the reason.
///
/// What this sees is each thread's state when its file was read: a thread that blocks SIGTRAP
/// or a debugger that attaches after that, during the batch, is not seen (see ARCHITECTURE.md,
/// "Live patching in a hostile process").
pub fn threads_can_take_traps() -> Result<(), String> {
    // SAFETY: gettid takes no arguments and cannot fail.
    let me = unsafe { libc::gettid() };
    let tasks = std::fs::read_dir("/proc/self/task")
        .map_err(|e| format!("cannot list this process's threads in /proc/self/task: {e}"))?;
    let mut status = Vec::with_capacity(2048);
    let mut path = String::with_capacity(40);
    for task in tasks {
        let Ok(task) = task else { continue };
        let name = task.file_name();
        let Some(tid) = name.to_str().and_then(|n| n.parse::<libc::pid_t>().ok()) else {
            continue;
        };
        // The patching thread runs no site during the batch (its asynchronous signals are
        // blocked, SIGTRAP unblocked: `SignalsBlocked`), and one read costs tens of µs.
        if tid == me {
            continue;
        }
        path.clear();
        let _ = write!(path, "/proc/self/task/{tid}/status");
        // When the thread was first seen blocking SIGTRAP, and its CPU time then.
        let mut first_blocked = None;
        let thread = loop {
            status.clear();
            match File::open(&path).and_then(|mut f| f.read_to_end(&mut status)) {
                Ok(_) => {}
                // The thread ended since the directory was listed: it runs nothing any more.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => {
                    break ThreadStatus::default();
                }
                Err(e) => return Err(format!("cannot read {path}: {e}")),
            }
            let thread = ThreadStatus::parse(&status);
            if !blocks_sigtrap(&thread, tid) {
                break thread;
            }
            // Some masks that block SIGTRAP last a moment, in code that runs no site: glibc's
            // inside `pthread_create` (in the creating and the new thread), the kernel's as it
            // enters our handler (before `IN_HANDLER` has the thread). Read again for a while
            // before taking the thread for one that blocks SIGTRAP.
            let cpu_now = cpu_time(tid);
            let (since, cpu_then) = *first_blocked.get_or_insert((Instant::now(), cpu_now));
            if !may_be_transient(&thread, since.elapsed(), cpu_then, cpu_now) {
                break thread;
            }
            // SAFETY: sched_yield takes no arguments.
            unsafe { libc::sched_yield() };
        };
        if thread.tracer.is_some_and(|t| t != 0) {
            return Err(format!(
                "the process is traced (thread {tid} has tracer pid {}): a debugger would take \
                 the int3 traps of the live protocol",
                thread.tracer.unwrap_or_default()
            ));
        }
        if blocks_sigtrap(&thread, tid) {
            return Err(format!(
                "thread {tid} ({}) blocks SIGTRAP (SigBlk {:016x}): an int3 of the live \
                 protocol would kill the process there",
                thread.name,
                thread.blocked.unwrap_or_default()
            ));
        }
    }
    Ok(())
}

/// Whether `thread` (of id `tid`) has SIGTRAP blocked, other than by running our handler.
fn blocks_sigtrap(thread: &ThreadStatus<'_>, tid: libc::pid_t) -> bool {
    // Bit `n - 1` for signal `n`.
    thread
        .blocked
        .is_some_and(|set| set & (1 << (libc::SIGTRAP - 1)) != 0)
        && !in_handler(tid)
}

/// Whether a thread seen blocking SIGTRAP for `waited` may still be inside a transient window
/// (see [`threads_can_take_traps`]): for [`TRANSIENT_MASK`] whatever it does, then for as long as
/// it is runnable but has had almost no CPU since (preempted inside the window, as on a loaded
/// machine or a vCPU the host does not run), up to [`PREEMPTED_MAX`]. A thread that really
/// blocks SIGTRAP either sleeps or runs, and is taken for what it is after `TRANSIENT_MASK`.
fn may_be_transient(
    thread: &ThreadStatus<'_>,
    waited: Duration,
    cpu_then: Option<u64>,
    cpu_now: Option<u64>,
) -> bool {
    if waited <= TRANSIENT_MASK {
        return true;
    }
    let barely_ran = match (cpu_then, cpu_now) {
        (Some(then), Some(now)) => now.saturating_sub(then) < WINDOW_CPU.as_nanos() as u64,
        _ => false,
    };
    thread.state == Some('R') && barely_ran && waited <= PREEMPTED_MAX
}

/// How long a thread's mask may block SIGTRAP before the thread is taken for one that blocks it,
/// whatever it does meanwhile.
const TRANSIENT_MASK: Duration = Duration::from_millis(250);

/// CPU time a transient window cannot use up (it is a few µs of code): a thread that ran this
/// long with SIGTRAP blocked was not inside one.
const WINDOW_CPU: Duration = Duration::from_millis(5);

/// How long a runnable thread that barely ran may stay blocked before it is taken for one that
/// blocks SIGTRAP. 250 ms alone refused toggles spuriously in a CI run at load 13 on 2 vCPUs
/// (a worker preempted inside our handler's entry, its mask our handler's).
const PREEMPTED_MAX: Duration = Duration::from_secs(5);

/// Nanoseconds thread `tid` of this process has run on a CPU (`/proc/self/task/<tid>/schedstat`),
/// if the kernel keeps it.
fn cpu_time(tid: libc::pid_t) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// The lines of a `/proc/<pid>/task/<tid>/status` file the live protocol cares about.
#[derive(Debug, Default, PartialEq, Eq)]
struct ThreadStatus<'a> {
    name: &'a str,
    /// The `State` letter: `R` running or runnable, `S` sleeping, ...
    state: Option<char>,
    tracer: Option<u32>,
    /// `SigBlk`: bit `n - 1` set when signal `n` is blocked.
    blocked: Option<u64>,
}

impl<'a> ThreadStatus<'a> {
    fn parse(text: &'a [u8]) -> ThreadStatus<'a> {
        let mut status = ThreadStatus::default();
        for line in text.split(|&b| b == b'\n') {
            let Ok(line) = core::str::from_utf8(line) else {
                continue;
            };
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key {
                "Name" => status.name = value,
                "State" => status.state = value.chars().next(),
                "TracerPid" => status.tracer = value.parse().ok(),
                "SigBlk" => {
                    status.blocked = u64::from_str_radix(value, 16).ok();
                    break; // after Name and TracerPid in every kernel's layout
                }
                _ => {}
            }
        }
        status
    }
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
            for sig in [libc::SIGTRAP].into_iter().chain(SYNCHRONOUS) {
                libc::sigdelset(&mut all, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
            // A thread that blocked these (every signal, in a `sigwait` layout) gets them back
            // for the batch: a trap here with them blocked would kill the process.
            let mut traps: libc::sigset_t = core::mem::zeroed();
            libc::sigemptyset(&mut traps);
            for sig in [libc::SIGTRAP].into_iter().chain(SYNCHRONOUS) {
                libc::sigaddset(&mut traps, sig);
            }
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &traps, core::ptr::null_mut());
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
// | `PREVIOUS` | installer: leaked, never freed     | the handler chained to for other traps  |
// | `FIRST`    | installer, once                    | chained to when `PREVIOUS` leads back   |

static ACTIVE: AtomicPtr<Vec<ActiveSite>> = AtomicPtr::new(core::ptr::null_mut());
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static PATCHED: AtomicPtr<PatchedChunk> = AtomicPtr::new(core::ptr::null_mut());
/// The disposition ours replaced most recently: the program's own handler, installed before
/// ours or over it (see [`ensure_trap_handler`]). Leaked boxes, so a handler never reads a freed one.
static PREVIOUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(core::ptr::null_mut());
/// The disposition before ours was first installed.
static FIRST: OnceLock<libc::sigaction> = OnceLock::new();

/// Addresses of sites ever written by the live protocol, sorted; a chunk per batch that added new
/// ones. Never freed, so a thread that trapped just before a batch ended still finds its site.
struct PatchedChunk {
    sites: Box<[usize]>,
    next: *const PatchedChunk,
}

/// Serializes handler installation and `PATCHED` appends (the patcher holds its own lock too).
/// Fork-safe, like the patcher lock (`lock.rs`).
pub(crate) static INSTALL: ForkSafeMutex<()> = ForkSafeMutex::new(());

/// Our disposition: every signal but the synchronous faults is blocked while the handler runs,
/// so an asynchronous handler that runs a site cannot interrupt it and trap again with SIGTRAP
/// blocked (which the kernel turns into a kill).
fn our_action() -> libc::sigaction {
    // SAFETY: a zeroed sigaction is a valid "default" value, completed with valid sets.
    unsafe {
        let mut action: libc::sigaction = core::mem::zeroed();
        action.sa_sigaction = on_sigtrap as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
        libc::sigfillset(&mut action.sa_mask);
        for sig in SYNCHRONOUS {
            libc::sigdelset(&mut action.sa_mask, sig);
        }
        action
    }
}

/// Signals the CPU raises for the instruction a thread runs: blocking them does not hold them
/// back (the kernel kills the process instead), so they stay deliverable.
const SYNCHRONOUS: [libc::c_int; 4] = [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE];

fn is_ours(action: &libc::sigaction) -> bool {
    action.sa_sigaction == on_sigtrap as *const () as usize
}

/// Installs the SIGTRAP handler (once), chaining to whatever handler was there before.
pub fn install_trap_handler() -> Result<(), String> {
    let _guard = install_lock()?;
    if FIRST.get().is_some() {
        return Ok(());
    }
    pin_handler_code()?;
    let old = sigtrap_action(Some(&our_action()))?;
    PREVIOUS.store(Box::into_raw(Box::new(old)), SeqCst);
    let _ = FIRST.set(old);
    Ok(())
}

/// Makes sure the installed SIGTRAP handler is ours before a live batch: a program (a crash
/// reporter, a runtime) may have installed its own since, and our `int3`s would then reach it.
/// Ours is installed again, over theirs, and theirs becomes the handler ours chains to, so it
/// still gets every trap that is not ours. Returns whether it had to re-install.
pub fn ensure_trap_handler() -> Result<bool, String> {
    install_trap_handler()?;
    let current = sigtrap_action(None)?;
    if is_ours(&current) {
        return Ok(false);
    }
    let _guard = install_lock()?;
    // Theirs first becomes the one chained to, then ours goes over it: a foreign trap in between
    // still reaches theirs. Boxes are leaked: a handler running now may hold the previous one.
    PREVIOUS.store(Box::into_raw(Box::new(current)), SeqCst);
    let replaced = sigtrap_action(Some(&our_action()))?;
    if replaced.sa_sigaction != current.sa_sigaction && !is_ours(&replaced) {
        // Yet another handler went in between the two calls: chain to that one.
        PREVIOUS.store(Box::into_raw(Box::new(replaced)), SeqCst);
    }
    Ok(true)
}

fn install_lock() -> Result<crate::lock::Guard<'static, ()>, String> {
    INSTALL
        .lock()
        .map_err(|_| "the SIGTRAP handler is being installed by this thread (re-entered)".into())
}

/// Installs `new` for SIGTRAP, if given, and returns the disposition it replaces (or the current).
fn sigtrap_action(new: Option<&libc::sigaction>) -> Result<libc::sigaction, String> {
    let mut old = MaybeUninit::<libc::sigaction>::zeroed();
    let new = new.map_or(core::ptr::null(), |a| a as *const libc::sigaction);
    // SAFETY: `new` is null or a valid action; the kernel copies the old one out.
    if unsafe { libc::sigaction(libc::SIGTRAP, new, old.as_mut_ptr()) } != 0 {
        return Err(format!(
            "sigaction(SIGTRAP) failed: {}",
            io::Error::last_os_error()
        ));
    }
    // SAFETY: written by the successful sigaction.
    Ok(unsafe { old.assume_init() })
}

/// Keeps the code of the SIGTRAP handler mapped for the life of the process: when altpatch is
/// linked into a shared library, `dlclose` would otherwise unmap the handler the process still
/// calls on every SIGTRAP. `RTLD_NODELETE` on the object holding it makes `dlclose` keep it.
fn pin_handler_code() -> Result<(), String> {
    let handler = on_sigtrap as *const () as *const libc::c_void;
    // SAFETY: dladdr fills `info` for a valid code address; it takes no other pointers.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    if unsafe { libc::dladdr(handler, &mut info) } == 0 || info.dli_fname.is_null() {
        // No dynamic loader knows the address: a static executable, never unloaded.
        return Ok(());
    }
    // SAFETY: `dli_fname` is the loader's NUL-terminated name of a loaded object; NOLOAD only
    // takes another reference to it, NODELETE keeps it mapped for good.
    let pinned = unsafe {
        libc::dlopen(
            info.dli_fname,
            libc::RTLD_NOW | libc::RTLD_NOLOAD | libc::RTLD_NODELETE,
        )
    };
    if !pinned.is_null() || in_main_program(handler as usize) {
        return Ok(());
    }
    // SAFETY: dli_fname is NUL-terminated (checked non-null above).
    let name = unsafe { core::ffi::CStr::from_ptr(info.dli_fname) };
    Err(format!(
        "the SIGTRAP handler's object {} cannot be kept loaded (dlopen RTLD_NODELETE failed)",
        name.to_string_lossy()
    ))
}

/// Whether `addr` lies in a loadable segment of the main program (the first object the loader
/// lists), which is never unloaded.
fn in_main_program(addr: usize) -> bool {
    unsafe extern "C" fn first_object(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: the loader passes a valid info for the object, and `data` is the `(usize,
        // bool)` below, alive for the whole iteration.
        unsafe {
            let (addr, found) = &mut *data.cast::<(usize, bool)>();
            let info = &*info;
            let headers = core::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum));
            *found = headers.iter().any(|h| {
                let start = (info.dlpi_addr as usize).wrapping_add(h.p_vaddr as usize);
                h.p_type == libc::PT_LOAD && (start..start + h.p_memsz as usize).contains(addr)
            });
        }
        1 // the main program comes first: stop there
    }
    let mut data = (addr, false);
    // SAFETY: the callback only reads the loader's data and writes `data`.
    unsafe { libc::dl_iterate_phdr(Some(first_object), (&raw mut data).cast()) };
    data.1
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
    let slot = InHandler::enter();
    // SAFETY: the kernel passes a valid siginfo and ucontext for an SA_SIGINFO handler.
    let handled = unsafe { handle_int3(&*info, &mut *ctx.cast::<libc::ucontext_t>()) };
    drop(slot);
    if handled {
        return;
    }
    // A handler installed over ours that chains to what it replaced (ours) leads back here for
    // the same trap: pass it on to the one before ours instead of going round.
    let again = CHAINING.replace(true);
    let previous = if again {
        FIRST.get().map(|a| a as *const libc::sigaction)
    } else {
        Some(PREVIOUS.load(SeqCst).cast_const())
    };
    // SAFETY: forwards the same arguments to a disposition that is never freed.
    if let Some(prev) = previous.and_then(|p| unsafe { p.as_ref() }) {
        unsafe { chain(prev, sig, info, ctx) };
    }
    CHAINING.set(again);
}

/// The threads inside [`handle_int3`] now, by id (0: a free slot). The kernel blocks SIGTRAP (and
/// our `sa_mask`) while a thread runs the handler, so the pre-batch scan would take a thread that
/// trapped on the last batch and is not back yet for one that blocks SIGTRAP; this one did not (it
/// trapped), and gets its own mask back on return.
static IN_HANDLER: [AtomicI32; 32] = [const { AtomicI32::new(0) }; 32];

/// A slot of [`IN_HANDLER`] held while alive (none when all are taken: the scan then waits).
struct InHandler(Option<&'static AtomicI32>);

impl InHandler {
    fn enter() -> InHandler {
        // SAFETY: gettid takes no arguments and cannot fail; it is async-signal-safe.
        let tid = unsafe { libc::gettid() };
        InHandler(
            IN_HANDLER
                .iter()
                .find(|slot| slot.compare_exchange(0, tid, SeqCst, SeqCst).is_ok()),
        )
    }
}

impl Drop for InHandler {
    fn drop(&mut self) {
        if let Some(slot) = self.0 {
            slot.store(0, SeqCst);
        }
    }
}

fn in_handler(tid: libc::pid_t) -> bool {
    IN_HANDLER.iter().any(|slot| slot.load(SeqCst) == tid)
}

thread_local! {
    /// Whether this thread is inside [`chain`] (const-initialised, no destructor: plain TLS,
    /// safe in a signal handler).
    static CHAINING: Cell<bool> = const { Cell::new(false) };
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

/// Passes a trap that is not ours to `prev`, the handler installed before ours (or over it),
/// or to the default action.
unsafe fn chain(
    prev: &libc::sigaction,
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    if prev.sa_flags & libc::SA_RESETHAND != 0 && prev.sa_sigaction != libc::SIG_DFL {
        // A one-shot handler: the kernel would have reset it as it delivered this signal.
        PREVIOUS.store((&raw const DEFAULT_ACTION).cast_mut(), SeqCst);
    }
    match prev.sa_sigaction {
        libc::SIG_IGN => {}
        libc::SIG_DFL => {
            // Let the default action (terminate with a core dump) happen, as without us.
            // SAFETY: resets the disposition and re-raises the signal; async-signal-safe calls.
            unsafe {
                libc::sigaction(sig, &DEFAULT_ACTION, core::ptr::null_mut());
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

/// `SIG_DFL` with no flags (all zero), for one-shot handlers once used and for re-raising.
// SAFETY: an all-zero sigaction is SIG_DFL with an empty mask and no flags.
static DEFAULT_ACTION: libc::sigaction = unsafe { core::mem::zeroed() };

static TRAPS_HANDLED: AtomicUsize = AtomicUsize::new(0);

/// How many times a thread trapped on a site being patched and was moved on by the handler.
pub fn traps_handled() -> usize {
    TRAPS_HANDLED.load(SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_status_lines_are_parsed() {
        let text = b"Name:\tworker\nUmask:\t0022\nState:\tS (sleeping)\nTracerPid:\t42\n\
                     SigQ:\t0/62811\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\n\
                     SigBlk:\t0000000000000010\nSigIgn:\t0000000000001000\n";
        assert_eq!(
            ThreadStatus::parse(text),
            ThreadStatus {
                name: "worker",
                state: Some('S'),
                tracer: Some(42),
                blocked: Some(1 << (libc::SIGTRAP - 1)),
            }
        );
    }

    #[test]
    fn a_preempted_thread_is_waited_for_a_running_or_sleeping_one_is_not() {
        let status = |state| ThreadStatus {
            state: Some(state),
            ..ThreadStatus::default()
        };
        let ms = Duration::from_millis;
        let (then, barely, ran) = (Some(1_000_000), Some(1_100_000), Some(60_000_000));
        // Within TRANSIENT_MASK: whatever the thread does.
        assert!(may_be_transient(&status('S'), ms(100), then, ran));
        // Runnable and barely ran since: preempted inside a window.
        assert!(may_be_transient(&status('R'), ms(1000), then, barely));
        assert!(!may_be_transient(&status('R'), ms(6000), then, barely));
        // Ran for 59 ms with SIGTRAP blocked, or sleeps with it blocked: it blocks SIGTRAP.
        assert!(!may_be_transient(&status('R'), ms(1000), then, ran));
        assert!(!may_be_transient(&status('S'), ms(1000), then, barely));
        // No CPU time from the kernel: TRANSIENT_MASK alone.
        assert!(!may_be_transient(&status('R'), ms(1000), None, None));
    }

    #[test]
    fn a_process_that_made_a_thread_counts_from_proc() {
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || wait.recv());
        // glibc cleared its flag when the thread was made (this test runs on glibc).
        assert!(!libc_single_threaded());
        let count = thread_count();
        assert!(count >= Some(2), "{count:?}");
        assert_eq!(count, thread_count_from_proc());
        done.send(()).unwrap();
        let _ = other.join();
    }

    #[test]
    fn this_process_can_take_traps() {
        // The test harness neither traces itself nor blocks SIGTRAP.
        assert_eq!(threads_can_take_traps(), Ok(()));
    }
}
