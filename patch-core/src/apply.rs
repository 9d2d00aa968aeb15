//! Apply: record → detection → selection → plan → write → report, for every site in the program.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Instant;

use crate::cpu::Cpu;
use crate::lock::{ForkSafeMutex, Reentered};
use crate::overrides::{OverrideError, Overrides};
use crate::plan::{self, Block};
use crate::record::{self, SiteDescriptor, SiteRecord};
use crate::report::{How, Report, SiteReport};
use crate::select::{self, Reason, Selection};
use crate::static_key::{KeyError, KeyUpdate, StaticKey};
use crate::write::{SiteBytes, SiteWrite, TextWriter};

/// `ALTPATCH_LOG=1` prints the report to stderr when the first `apply_patches()` runs (at load); unset, empty, `0`,
/// `false`, `no` and `off` (any case) leave it off.
pub const LOG_ENV_VAR: &str = "ALTPATCH_LOG";

/// Whether an `ALTPATCH_LOG` value asks for the report.
fn log_wanted(value: Option<&std::ffi::OsStr>) -> bool {
    let Some(value) = value else { return false };
    let value = value.to_string_lossy();
    let value = value.trim();
    let off = ["", "0", "false", "no", "off"];
    !off.iter().any(|word| value.eq_ignore_ascii_case(word))
}

/// One patcher at a time: applies and static-key toggles all write under it, and everything they
/// keep between calls lives in it (see `lock.rs`: fork-safe, refuses re-entry).
pub(crate) static PATCHER: ForkSafeMutex<PatcherState> = ForkSafeMutex::new(PatcherState::new());

/// What the patcher keeps between calls; reached only under [`PATCHER`], so a `fork` never
/// copies any of it half-made.
pub(crate) struct PatcherState {
    /// Interned reasons (see [`intern`]).
    reasons: Option<Reasons>,
    /// `ALTPATCH` as the first of `apply_patches()` and the first key toggle read it: the
    /// process's configuration, which both keep.
    startup: Option<Result<Overrides, OverrideError>>,
    /// Why static keys' sites read their flag in this process (`None`: they are patched): what
    /// the startup apply decided, or will decide from the same `ALTPATCH`.
    keys_unpatched: Option<Option<String>>,
    /// Branch sites grouped by key (the program's records do not change).
    key_sites: Option<KeySites>,
    /// The mappings read by the first toggle: the program's text does not move, and a sandbox
    /// entered later may refuse reading `/proc/self/maps`.
    memory: Option<crate::os::MemoryMap>,
}

impl PatcherState {
    const fn new() -> Self {
        PatcherState {
            reasons: None,
            startup: None,
            keys_unpatched: None,
            key_sites: None,
            memory: None,
        }
    }

    /// The startup configuration, made from `env` (read before taking the lock: reading the
    /// environment takes std's environment lock, which a thread calling `fork` may hold while
    /// it waits for this one) if this is the first call.
    fn startup(
        &mut self,
        env: Option<Result<Overrides, OverrideError>>,
    ) -> &Result<Overrides, OverrideError> {
        let startup = self
            .startup
            .get_or_insert_with(|| env.unwrap_or_else(Overrides::from_env));
        STARTUP_READ.store(true, SeqCst);
        startup
    }

    /// Why key sites read their flag, decided once: from the startup apply's report, or before
    /// it, as that apply will decide from the same `ALTPATCH`.
    fn keys_unpatched(&mut self, env: Option<Result<Overrides, OverrideError>>) -> Option<String> {
        if self.keys_unpatched.is_none() {
            let decided = match APPLIED.get() {
                Some(report) => report.disabled.clone(),
                None => {
                    let overrides = self.startup(env).clone();
                    // The CPU matters only to resolve choices.
                    let detected = match &overrides {
                        Ok(o) if !o.choices.is_empty() => Cpu::detect(),
                        _ => Cpu::synthetic(Default::default(), None),
                    };
                    let (overrides, _, error) = resolve(overrides, detected, record::records());
                    disabled_reason(&overrides, error.as_ref())
                }
            };
            self.keys_unpatched = Some(decided);
        }
        self.keys_unpatched.clone().flatten()
    }
}

/// Whether [`PatcherState::startup`] is made: later callers need not read `ALTPATCH`.
static STARTUP_READ: AtomicBool = AtomicBool::new(false);

/// `ALTPATCH`, read now unless the startup configuration is already made.
fn env_unless_known() -> Option<Result<Overrides, OverrideError>> {
    (!STARTUP_READ.load(SeqCst)).then(Overrides::from_env)
}

static APPLIED: OnceLock<Report> = OnceLock::new();

/// Selects and patches every site of this object (the program, or the shared library this copy
/// of the crate is linked into), once; later calls return the same report.
///
/// The load-time initializer ([`crate::load`]) calls it before `main`, so a program need not:
/// it then returns the load-time report.
///
/// Concurrent callers wait for the first. Configuration comes from `ALTPATCH`; a malformed value
/// patches nothing and is reported: printed to stderr once, here, and in the report (see
/// [`try_apply_patches`] to get it as an error). `ALTPATCH` is read once per process, by this or
/// by the first static-key toggle, whichever comes first; static keys follow what this apply
/// decided (patch or not), whatever `ALTPATCH` says later.
pub fn apply_patches() -> &'static Report {
    if let Some(report) = APPLIED.get() {
        return report;
    }
    let env = env_unless_known();
    let report = {
        let Ok(mut state) = PATCHER.lock() else {
            return Box::leak(Box::new(Report::reentered()));
        };
        if let Some(report) = APPLIED.get() {
            return report;
        }
        let patcher = Patcher {
            overrides: state.startup(env).clone(),
            ..Patcher::default()
        };
        let report = patcher.apply_locked(&mut state);
        state.keys_unpatched.get_or_insert(report.disabled.clone());
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if report.disabled.is_none() && !key_sites(&mut state.key_sites).is_empty() {
            // Keys are toggled after startup, maybe inside a sandbox that refuses opening it.
            crate::os::linux::keep_proc_mem();
        }
        // Set under the lock: a `fork` (which waits for it) never copies it half-set.
        APPLIED.get_or_init(|| report)
    };
    if log_wanted(std::env::var_os(LOG_ENV_VAR).as_deref()) {
        eprint!("{report}");
    } else if let Some(error) = &report.error {
        // Nobody sets `ALTPATCH` by accident: a mistake in it is said even without the log
        // (as `env_logger` does with a bad filter).
        eprintln!("{error}; nothing patched");
    }
    report
}

/// [`apply_patches`], with a malformed `ALTPATCH` value returned as an error.
pub fn try_apply_patches() -> Result<&'static Report, &'static OverrideError> {
    let report = apply_patches();
    report.error.as_ref().map_or(Ok(report), Err)
}

/// The report of [`apply_patches`], if it has run.
pub fn applied_report() -> Option<&'static Report> {
    APPLIED.get()
}

/// A configurable apply: a CPU snapshot, overrides and a writer of your choice.
///
/// Unlike [`apply_patches`] it runs every time it is called, re-selecting every site: tests use it
/// to force each candidate in turn, operations to re-select after a configuration change.
pub struct Patcher {
    cpu: Option<Cpu>,
    overrides: Result<Overrides, OverrideError>,
    writer: Option<Box<dyn TextWriter>>,
}

impl Default for Patcher {
    fn default() -> Self {
        Patcher {
            cpu: None,
            overrides: Ok(Overrides::default()),
            writer: None,
        }
    }
}

impl Patcher {
    /// Detected CPU, no overrides, the default writer.
    pub fn new() -> Patcher {
        Patcher::default()
    }

    /// Detected CPU, overrides from `ALTPATCH`.
    pub fn from_env() -> Patcher {
        Patcher {
            overrides: Overrides::from_env(),
            ..Patcher::default()
        }
    }

    /// Selects for this CPU snapshot instead of the detected one.
    pub fn cpu(mut self, cpu: Cpu) -> Patcher {
        self.cpu = Some(cpu);
        self
    }

    /// Uses these overrides (the same as `ALTPATCH`).
    pub fn overrides(mut self, overrides: Overrides) -> Patcher {
        self.overrides = Ok(overrides);
        self
    }

    /// Parses overrides in `ALTPATCH` syntax; an error is kept and reported by `apply`.
    pub fn overrides_str(mut self, text: &str) -> Patcher {
        self.overrides = Overrides::parse(text);
        self
    }

    /// Writes with `writer` instead of the default (mprotect, falling back to `/proc/self/mem`).
    pub fn writer(mut self, writer: Box<dyn TextWriter>) -> Patcher {
        self.writer = Some(writer);
        self
    }

    /// Selects, verifies, plans and writes every site; never panics, whatever it finds.
    ///
    /// Every report entry says what the site's bytes are when it returns: the candidate the
    /// planner recognises there, whether this apply wrote it, found it in place, or could not
    /// write it. `off` selects every site's default: nothing to write on a first apply, and on a
    /// re-apply the build-time bytes are put back wherever they may be written (a site holding
    /// several instructions only with no other thread running), the rest reported as they are.
    /// An error in the overrides writes nothing: every site keeps what it runs.
    ///
    /// Called on a thread that is already patching (a signal handler that interrupted an apply
    /// or a key toggle), it examines nothing and returns a report with no sites saying so.
    pub fn apply(self) -> Report {
        match PATCHER.lock() {
            Ok(mut state) => self.apply_locked(&mut state),
            Err(Reentered) => Report::reentered(),
        }
    }

    fn apply_locked(self, state: &mut PatcherState) -> Report {
        let start = Instant::now();
        let records = record::records();
        let detected = self.cpu.unwrap_or_else(Cpu::detect);
        let (overrides, cpu, error) = resolve(self.overrides, detected, records);
        let reasons = state.reasons.get_or_insert_with(Reasons::default);
        let memory = std::sync::Arc::new(memory_map(records));
        let mut writer = self
            .writer
            // At load, initializers run one at a time, so the map just read is what the pages
            // hold; later, another copy of this crate may be mid-batch, and the writer reads the
            // protection under its text lock.
            .unwrap_or_else(|| {
                default_writer(crate::load::applying_at_load().then(|| memory.clone()))
            });
        let disabled = disabled_reason(&overrides, error.as_ref());
        // What this apply may do: nothing at all (no patching in this build: nothing was ever
        // written, so every site holds its default as built), only look (an error: nothing is
        // written), put back defaults (`off`), or select and write.
        let (select, write) = match (&error, &disabled) {
            _ if !PATCHING_BUILT => {
                let why = disabled
                    .clone()
                    .map(|d| intern(reasons, d))
                    .unwrap_or_default();
                return Report {
                    sites: records
                        .iter()
                        .map(|rec| SiteReport::new(rec, why.into()))
                        .collect(),
                    cpu,
                    disabled,
                    error,
                    writer: writer.name(),
                    stats: Default::default(),
                    elapsed: start.elapsed(),
                };
            }
            (Some(_), _) => (false, false),
            (None, Some(_)) => (false, true),
            (None, None) => (true, true),
        };

        let mut report = Report {
            sites: Vec::with_capacity(records.len()),
            cpu,
            disabled,
            error,
            writer: writer.name(),
            stats: Default::default(),
            elapsed: Default::default(),
        };
        // Room for every site: untouched (so unfaulted) when few are written, and no regrowth
        // copying thousands of writes when all are.
        let mut writes = Vec::with_capacity(records.len());
        let mut written_sites = Vec::with_capacity(records.len());
        // Every site gets a report entry: fault the pages in with one call, not one fault each.
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        crate::os::linux::prefault(&mut report.sites);
        // Inlined copies share their descriptor, so they share its selection and its reason: the
        // reason is made once per descriptor, and a copy's report entry borrows it (no allocation
        // and no reference count per site).
        // Room for a small program's descriptors up front (growing it rehashed 7 times for 100
        // sites); a large program's copies share far fewer descriptors than it has sites.
        let mut selected: AddressMap<Selected> =
            AddressMap::with_capacity_and_hasher(records.len().min(256), Default::default());
        let mut suffixed = Suffixed {
            made: HashMap::default(),
            reasons,
        };
        // "<predicate> holds" by the predicate's source text: descriptors written alike share
        // it, so a first apply formats (and interns) each once, not once per descriptor. Keyed
        // by the text's address and length (the compiler keeps one copy of equal literals of a
        // crate), not by its contents: hashing the text with SipHash cost 190 instructions a
        // descriptor. Equal texts at two addresses are formatted twice and interned once.
        let mut holds: HashMap<(usize, usize), &'static str, BuildHasherDefault<AddressHasher>> =
            HashMap::default();
        let mut scratch = Scratch {
            // `off` puts back the bytes as built: a trampoline's `jmp`, not a copy of the
            // default's body.
            inline_bodies: (!select).then_some(false),
            ..Scratch::default()
        };
        for rec in records {
            if !record::is_understood(rec) {
                report
                    .sites
                    .push(SiteReport::unknown(rec, not_understood(rec).into()));
                continue;
            }
            let desc = rec.descriptor();
            let entry = selected.entry(address(desc)).or_insert_with(|| {
                // Not selecting: no predicate runs (a `when` function may not expect to).
                let selection = if select {
                    select::select(desc, &report.cpu, &overrides)
                } else {
                    Selection {
                        index: 0,
                        reason: Reason::Off,
                    }
                };
                let mut interned = |why| match why_selected(desc, why) {
                    Cow::Borrowed(why) => why,
                    Cow::Owned(why) => intern(suffixed.reasons, why),
                };
                let why = match (&selection.reason, desc.candidates.get(selection.index)) {
                    (Reason::PredicateHolds, Some(chosen)) => *holds
                        .entry((
                            chosen.predicate_text.as_ptr() as usize,
                            chosen.predicate_text.len(),
                        ))
                        .or_insert_with(|| interned(&selection)),
                    _ => interned(&selection),
                };
                Selected {
                    why,
                    selection,
                    already_in_place: None,
                    restored: None,
                }
            });
            let site = match plan_record(rec, &memory, &mut scratch, |_| entry.selection.clone()) {
                Ok((selection, planned, new_bytes)) => {
                    let how = How::running(selection.index, planned.shape, rec);
                    let (chosen, how, why) = match new_bytes {
                        // An error: say what the site holds, write nothing.
                        _ if !write => {
                            let held = held_how(rec, planned.held, planned.held_len);
                            (planned.held, held, CONFIGURATION_ERROR.into())
                        }
                        Some(mut new_bytes) => {
                            new_bytes.group = Some(&desc.name);
                            // What the site holds, in case it stays: 8 bytes, as small as the
                            // index alone would be (the records' counts and lengths are bytes).
                            written_sites.push(HeldSite {
                                index: u32::try_from(report.sites.len()).unwrap_or(u32::MAX),
                                candidate: u8::try_from(planned.held).unwrap_or(u8::MAX),
                                len: u8::try_from(planned.held_len).unwrap_or(u8::MAX),
                            });
                            writes.push(new_bytes);
                            let why = match how {
                                How::Unpatched => entry.restored(&mut suffixed),
                                _ => entry.why,
                            };
                            (selection.index, how, why.into())
                        }
                        None if how != How::Unpatched => (
                            selection.index,
                            how,
                            entry.already_in_place(&mut suffixed).into(),
                        ),
                        None => (selection.index, how, entry.why.into()),
                    };
                    let mut site = SiteReport::new(rec, why);
                    // The record's count (a byte) bounds the index.
                    site.chosen = u8::try_from(chosen).unwrap_or(u8::MAX);
                    site.how = how;
                    site
                }
                Err(why) => SiteReport::unknown(rec, why.into()),
            };
            report.sites.push(site);
        }

        if !writes.is_empty() {
            let (results, stats) = crate::write::write_batch(&writes, writer.as_mut());
            report.stats = stats;
            report.writer = writer.name();
            for (held, result) in written_sites.into_iter().zip(results) {
                let site = &mut report.sites[held.index as usize];
                match result {
                    Ok(()) => site.written = true,
                    // The site keeps the bytes it held (a write never leaves it half-done).
                    Err(e) => {
                        let record = site.record;
                        let candidate = usize::from(held.candidate);
                        let holds = site.candidates().nth(candidate).unwrap_or("?");
                        let why = selected
                            .get(&address(record.descriptor()))
                            .map_or("", |entry| entry.why);
                        site.why = format!(
                            "{} selected ({why}) but not written: {e}; still runs {holds}",
                            site.chosen(),
                        )
                        .into();
                        site.chosen = held.candidate;
                        site.how = held_how(record, candidate, usize::from(held.len));
                    }
                }
            }
        }
        report.elapsed = start.elapsed();
        report
    }
}

/// The process's mappings: at load, the loaded segments (no system call; checked to hold this
/// object's first site), otherwise `/proc/self/maps`.
fn memory_map(records: &[SiteRecord]) -> crate::os::MemoryMap {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if crate::load::applying_at_load() {
        let segments = crate::os::loaded_segments();
        if records
            .first()
            .is_some_and(|r| segments.is_executable(r.site_addr(), usize::from(r.len)))
        {
            return segments;
        }
    }
    crate::os::memory_map()
}

/// The default writer; given the map this apply read, it restores page protections from it
/// instead of reading `/proc/self/maps` again.
fn default_writer(memory: Option<std::sync::Arc<crate::os::MemoryMap>>) -> Box<dyn TextWriter> {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        use crate::os::linux::{MprotectWriter, ProcMemWriter};
        let mprotect = memory.map_or_else(MprotectWriter::default, MprotectWriter::with_map);
        Box::new(crate::write::FallbackWriter::new(
            mprotect,
            ProcMemWriter::default(),
        ))
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        let _ = memory;
        Box::new(crate::os::NoWriter)
    }
}

/// Every site's descriptor, once however many inlined copies share it: what `ALTPATCH` choices
/// are resolved against (static branches included, to name them in errors).
fn descriptors(records: &[SiteRecord]) -> Vec<&'static SiteDescriptor> {
    let mut seen: AddressMap<()> = AddressMap::default();
    let mut last = None;
    let mut descriptors = Vec::new();
    for desc in records
        .iter()
        .filter(|r| record::is_understood(r))
        .map(|r| r.descriptor())
    {
        // Inlined copies of one site are usually neighbours: most repeats cost no hashing.
        if last.replace(address(desc)) != Some(address(desc))
            && seen.insert(address(desc), ()).is_none()
        {
            descriptors.push(desc);
        }
    }
    descriptors
}

/// `overrides` resolved against the program's sites for the `detected` CPU (masked by their
/// `cpu=`): the overrides to select with, the CPU, and an error that makes the apply write nothing.
fn resolve(
    overrides: Result<Overrides, OverrideError>,
    detected: Cpu,
    records: &[SiteRecord],
) -> (Overrides, Cpu, Option<OverrideError>) {
    match overrides {
        Ok(mut o) => {
            let cpu = detected.without(o.cleared);
            // Only choices need the program's sites (a walk over every record).
            let resolved = if o.choices.is_empty() {
                Ok(())
            } else {
                o.resolve(descriptors(records), &cpu)
            };
            match resolved {
                Ok(()) => (o, cpu, None),
                Err(e) => (Overrides::default(), detected, Some(e)),
            }
        }
        Err(e) => (Overrides::default(), detected, Some(e)),
    }
}

/// Each site's reason when a configuration error leaves every site as it is.
const CONFIGURATION_ERROR: &str =
    "configuration error (see above): nothing written, runs what it ran";

/// Whether this build patches at all (x86_64 Linux, without the `force-unpatched` feature).
const PATCHING_BUILT: bool =
    !cfg!(feature = "force-unpatched") && cfg!(all(target_arch = "x86_64", target_os = "linux"));

fn disabled_reason(overrides: &Overrides, error: Option<&OverrideError>) -> Option<String> {
    if let Some(e) = error {
        return Some(format!(
            "configuration error, every site keeps what it runs (its default, at startup): {e}"
        ));
    }
    if cfg!(feature = "force-unpatched") {
        return Some("built with the `force-unpatched` feature".into());
    }
    if !cfg!(all(target_arch = "x86_64", target_os = "linux")) {
        return Some("patching is implemented for x86_64 Linux only; defaults run".into());
    }
    overrides
        .off
        .then(|| format!("{}=off", crate::overrides::ENV_VAR))
}

/// A site of the batch and the candidate it holds until written (or if it is not).
struct HeldSite {
    /// The site's index in the report.
    index: u32,
    /// The held candidate ([`plan::Planned::held`]).
    candidate: u8,
    /// Its length at the site ([`plan::Planned::held_len`]).
    len: u8,
}

/// How a site runs that holds `candidate` in its first `len` bytes: read from the site, off the
/// hot path (a site left as it was, or an error).
#[cold]
fn held_how(rec: &SiteRecord, candidate: usize, len: usize) -> How {
    // SAFETY: the planner read this range (mapped, executable, hence readable, text) under the
    // patcher lock we hold; only the patcher writes it.
    let current =
        unsafe { core::slice::from_raw_parts(rec.site_addr() as *const u8, usize::from(rec.len)) };
    How::running(
        candidate,
        plan::held_shape(current, rec.site_addr() as u64, len),
        rec,
    )
}

/// What one apply decided for a descriptor, shared by the reports of all its inlined copies.
struct Selected {
    selection: Selection,
    why: &'static str,
    already_in_place: Option<&'static str>,
    restored: Option<&'static str>,
}

impl Selected {
    fn already_in_place(&mut self, suffixed: &mut Suffixed) -> &'static str {
        self.already_in_place
            .get_or_insert_with(|| suffixed.get(self.why, " (already in place)"))
    }

    fn restored(&mut self, suffixed: &mut Suffixed) -> &'static str {
        self.restored
            .get_or_insert_with(|| suffixed.get(self.why, " (default restored)"))
    }
}

/// Reasons with a suffix appended, made once per apply for each distinct reason, not once per
/// descriptor: every static branch is a descriptor of its own, and a program's thousand branches
/// share two reasons. A reason is static or interned, so its address and length identify it.
struct Suffixed<'a> {
    made: HashMap<(usize, usize, usize), &'static str, BuildHasherDefault<AddressHasher>>,
    /// The process's interned reasons (in the patcher's state).
    reasons: &'a mut Reasons,
}

impl Suffixed<'_> {
    fn get(&mut self, why: &'static str, suffix: &'static str) -> &'static str {
        let key = (why.as_ptr() as usize, why.len(), suffix.as_ptr() as usize);
        if let Some(&made) = self.made.get(&key) {
            return made;
        }
        let made = intern(self.reasons, format!("{why}{suffix}"));
        self.made.insert(key, made);
        made
    }
}

/// The one copy of `text` kept for the life of the process, in `reasons` (the patcher's state).
///
/// Selection reasons are made from a site's descriptor (its predicates, the key, `ALTPATCH`
/// choices), so a program has a bounded set of them however often it applies; keeping each once
/// lets every report entry borrow it instead of allocating (10,000 sites make 10,000 reports).
/// Reasons that carry per-site data (a refusal's bytes, a write error) are owned by their entry.
fn intern(reasons: &mut Reasons, text: String) -> &'static str {
    if let Some(&known) = reasons.get(text.as_str()) {
        return known;
    }
    let leaked: &'static str = Box::leak(text.into_boxed_str());
    reasons.insert(leaked);
    leaked
}

/// The interned reasons. Their texts come from the program's own descriptors, not from input an
/// attacker picks, so they need no keyed hash: std's random keys cost a `getrandom` system call
/// at the first apply of every process.
type Reasons = HashSet<&'static str, BuildHasherDefault<AddressHasher>>;

/// A map keyed by the address of a static (a descriptor, a key). Such addresses are unique and
/// well spread: a multiply hashes them (SipHash, the std default, cost more than the rest of a
/// site's bookkeeping).
type AddressMap<V> = HashMap<usize, V, BuildHasherDefault<AddressHasher>>;

fn address<T>(item: &T) -> usize {
    item as *const T as usize
}

#[derive(Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        // Fold the high bits down: hashbrown indexes buckets with the low bits, which a product
        // of 8-aligned addresses leaves zero.
        self.0 ^ (self.0 >> 32)
    }

    fn write(&mut self, bytes: &[u8]) {
        // Reasons' texts: eight bytes at a time.
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            self.write_u64(u64::from_le_bytes(word.try_into().expect("8 bytes")));
        }
        for &b in words.remainder() {
            self.write_u64(u64::from(b));
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: the high bits hashbrown uses get every input bit's influence.
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

fn not_understood(rec: &SiteRecord) -> String {
    format!(
        "record not understood (version {}, kind {:?}, {} entries); left as built",
        rec.version,
        rec.kind(),
        rec.count
    )
}

/// Buffers [`plan_record`] reuses from one site to the next.
#[derive(Default)]
struct Scratch {
    blocks: Vec<Block<'static>>,
    names: Vec<&'static str>,
    planned: Vec<u8>,
    /// Whether a trampoline may take its candidate's body in place of its `jmp`: only with no
    /// other thread running, since a site holding several instructions cannot be rewritten
    /// again while threads run (`LiveWrite::OldSequence`). Read at the first trampoline.
    inline_bodies: Option<bool>,
}

impl Scratch {
    fn inline_bodies(&mut self) -> bool {
        *self.inline_bodies.get_or_insert_with(|| {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            return crate::os::linux::thread_count() == Some(1);
            #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
            false
        })
    }
}

/// Whether `start..start + len` holds (part of) a site: a body holding one is not copied (the
/// copy would miss that site's later patches). Sites do not overlap, so only the last one
/// starting before the range's end can reach into it.
fn holds_a_site(start: usize, len: usize) -> bool {
    // Every site's range, sorted; made at the first trampoline (the program's sites never change).
    static RANGES: OnceLock<Vec<(usize, usize)>> = OnceLock::new();
    let ranges = RANGES.get_or_init(|| {
        let mut ranges: Vec<(usize, usize)> = record::records()
            .iter()
            .map(|r| (r.site_addr(), usize::from(r.len)))
            .collect();
        ranges.sort_unstable();
        ranges
    });
    let i = ranges.partition_point(|&(s, _)| s < start + len);
    i > 0 && ranges[i - 1].0 + ranges[i - 1].1 > start
}

/// The straight-line body of the function a trampoline candidate (`jmp target`) jumps to, read
/// from memory, when a trampoline of `len` bytes may hold a copy of it.
fn trampoline_body(
    block: Block<'static>,
    len: usize,
    memory: &crate::os::MemoryMap,
) -> Option<Block<'static>> {
    let [0xe9, rel @ ..] = block.bytes else {
        return None;
    };
    let rel = i32::from_le_bytes(rel.try_into().ok()?);
    let target = (block.ip + 5).wrapping_add_signed(i64::from(rel)) as usize;
    if !memory.is_executable(target, len) || holds_a_site(target, len) {
        return None;
    }
    // SAFETY: checked to be mapped and executable (hence readable on x86_64); program text.
    let code = unsafe { core::slice::from_raw_parts(target as *const u8, len) };
    let code = Block {
        bytes: code,
        ip: target as u64,
    };
    let body = plan::straight_line_body(code)?;
    Some(Block {
        bytes: &code.bytes[..body],
        ip: code.ip,
    })
}

/// Selects and plans one record, or says why it is left alone.
fn plan_record(
    rec: &SiteRecord,
    memory: &crate::os::MemoryMap,
    scratch: &mut Scratch,
    select: impl FnOnce(&SiteDescriptor) -> Selection,
) -> Result<(Selection, plan::Planned, Option<SiteWrite>), String> {
    if !record::is_understood(rec) {
        return Err(not_understood(rec));
    }
    let desc = rec.descriptor();
    if desc.candidates.len() != usize::from(rec.count) {
        return Err(format!(
            "record has {} candidate blocks but its descriptor names {}; left as built",
            rec.count,
            desc.candidates.len()
        ));
    }
    let site = rec.site_addr();
    let len = usize::from(rec.len);
    if !memory.is_executable(site, len) {
        return Err(format!(
            "site {site:#x}+{len} is not in executable memory; left alone"
        ));
    }
    let trampoline = rec.kind() == Some(record::SiteKind::Trampoline);
    let Scratch { blocks, names, .. } = scratch;
    blocks.clear();
    names.clear();
    names.extend(desc.candidate_names());
    for i in 0..desc.candidates.len() {
        let (bytes, ip) = rec.replacement(i).ok_or("candidate table too short")?;
        if !memory.is_readable(ip, bytes.len()) {
            return Err(format!(
                "candidate {} bytes at {ip:#x} are not readable; left alone",
                desc.candidates[i].name
            ));
        }
        blocks.push(Block {
            bytes,
            ip: ip as u64,
        });
    }
    // SAFETY: the range was checked to be mapped and executable (hence readable on x86_64), and
    // only the patcher (whose lock we hold) writes it.
    let current = unsafe { core::slice::from_raw_parts(site as *const u8, len) };
    let selection = select(desc);
    let planned = if trampoline {
        let inline_body = scratch.inline_bodies();
        // The chosen candidate's body first: a site holding any candidate's `jmp` (as built, or
        // as an earlier apply left it) is recognised without reading the other functions, which
        // may need the decoder. Every body only when the site holds something else.
        let mut bodies: Vec<Option<Block<'static>>> = vec![None; scratch.blocks.len()];
        if let Some(chosen) = scratch.blocks.get(selection.index) {
            bodies[selection.index] = trampoline_body(*chosen, len, memory);
        }
        let plan = |bodies: &[Option<Block<'static>>], planned: &mut Vec<u8>| {
            plan::plan_trampoline_into(
                site as u64,
                current,
                &scratch.blocks,
                bodies,
                inline_body,
                &scratch.names,
                selection.index,
                planned,
            )
        };
        match plan(&bodies, &mut scratch.planned) {
            Err(plan::Refusal::UnexpectedBytes { .. }) => {
                let bodies: Vec<Option<Block<'static>>> = scratch
                    .blocks
                    .iter()
                    .map(|b| trampoline_body(*b, len, memory))
                    .collect();
                plan(&bodies, &mut scratch.planned)
            }
            planned => planned,
        }
    } else {
        plan::plan_site_into(
            site as u64,
            current,
            &scratch.blocks,
            &scratch.names,
            selection.index,
            &mut scratch.planned,
        )
    };
    let planned =
        planned.map_err(|refusal| format!("refused: {refusal}; runs what it ran before"))?;
    let plan::Planned { shape, live, .. } = planned;
    let new_bytes = &scratch.planned;
    // Only a site that changes gets its own copy of the new bytes.
    let write = (new_bytes[..] != *current).then(|| SiteWrite {
        ip: site as u64,
        new: SiteBytes::from_slice(new_bytes),
        shape,
        live,
        group: None,
    });
    Ok((selection, planned, write))
}

/// Why `selection` was made: static text where it names nothing of the descriptor.
fn why_selected(desc: &SiteDescriptor, selection: &Selection) -> Cow<'static, str> {
    let candidates = desc.candidates;
    match selection.reason {
        Reason::Off => "patching is off".into(),
        Reason::Forced => format!("forced by {}", crate::overrides::ENV_VAR).into(),
        Reason::Key(_) => selection.reason.text().into(),
        Reason::PredicateHolds => format!("{} holds", candidates[selection.index].predicate).into(),
        Reason::NoCandidateHolds if candidates.len() == 1 => "no other candidate".into(),
        Reason::NoCandidateHolds => {
            let tried: Vec<String> = candidates[1..]
                .iter()
                .map(|c| c.predicate.to_string())
                .collect();
            format!("none of {} holds", tried.join(", ")).into()
        }
    }
}

type KeySites = AddressMap<Vec<&'static SiteRecord>>;

fn key_sites(made: &mut Option<KeySites>) -> &KeySites {
    made.get_or_insert_with(|| {
        let mut by_key: AddressMap<Vec<&'static SiteRecord>> = AddressMap::default();
        for rec in record::records()
            .iter()
            .filter(|r| record::is_understood(r))
        {
            if let Some(site) = &rec.descriptor().key {
                by_key.entry(address(site.key)).or_default().push(rec);
            }
        }
        by_key
    })
}

/// Sets `key` to `enabled` and rewrites its sites, all or none, under the patcher lock (so
/// concurrent toggles of one key end in the state of the last).
///
/// Order: plan every site for the new state (a site that cannot be planned refuses the toggle),
/// write them as one all-or-none batch, and store the flag only then. Until the flag is stored,
/// sites never patched read the old value and patched sites hold the old NOP/`jmp`, or (during
/// the batch) the new one: a toggle in progress. A refused toggle therefore leaves everything as
/// it was: no byte written (or every byte put back) and the old flag.
pub(crate) fn update_key(key: &'static StaticKey, enabled: bool) -> Result<KeyUpdate, KeyError> {
    // Nothing before the lock allocates: a signal handler that re-enters gets `Reentered`
    // without touching the allocator the interrupted `set` may be inside.
    let env = env_unless_known();
    let mut state = PATCHER.lock().map_err(|Reentered| KeyError::Reentered)?;
    let state = &mut *state;
    let unpatched = state.keys_unpatched(env);
    let sites: &[&'static SiteRecord] = key_sites(&mut state.key_sites)
        .get(&address(key))
        .map_or(&[], |v| v.as_slice());
    let mut update = KeyUpdate {
        sites: sites.len(),
        written: 0,
        unpatched,
    };
    let refused = |why: String| KeyError::NotWritten {
        sites: sites.len(),
        why,
    };
    // Nothing is ever written here: every site reads the flag.
    if !PATCHING_BUILT {
        key.store(enabled);
        return Ok(update);
    }
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if update.unpatched.is_none() {
        crate::os::linux::keep_proc_mem();
    }
    let memory = state.memory.get_or_insert_with(crate::os::memory_map);
    let mut writes = Vec::with_capacity(sites.len());
    let mut scratch = Scratch::default();
    for rec in sites.iter().copied() {
        let index = |desc: &SiteDescriptor| Selection {
            index: match (&update.unpatched, &desc.key) {
                (None, Some(site)) => site.wanted_for(enabled),
                _ => 0,
            },
            reason: Reason::Key(enabled),
        };
        match plan_record(rec, memory, &mut scratch, index) {
            // Patching off: a site holding its check (in whatever encoding) reads the flag and
            // is left alone; only one an explicit `Patcher` patched gets its check back.
            Ok((_, planned, _)) if update.unpatched.is_some() && planned.held == 0 => {}
            Ok((_, _, Some(write))) => writes.push(write),
            Ok(_) => {}
            Err(why) => return Err(refused(format!("{}: {why}", rec.descriptor().name))),
        }
    }
    if !writes.is_empty() {
        let mut writer = default_writer(None);
        let (results, _) = crate::write::write_batch_all_or_none(&writes, writer.as_mut());
        if let Some(Err(why)) = results.into_iter().find(Result::is_err) {
            return Err(refused(why));
        }
        update.written = writes.len();
    }
    key.store(enabled);
    Ok(update)
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_values() {
        let wanted = |v: &str| super::log_wanted(Some(v.as_ref()));
        assert!(!super::log_wanted(None));
        for off in ["", " ", "0", "false", "FALSE", "no", "No", "off", " off "] {
            assert!(!wanted(off), "{off:?}");
        }
        for on in ["1", "true", "yes", "on", "2", "all"] {
            assert!(wanted(on), "{on:?}");
        }
    }
}
