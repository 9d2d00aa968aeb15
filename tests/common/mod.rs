//! Sites shared by the integration tests. Each candidate returns something different, so a
//! result tells which candidate ran.
#![allow(dead_code)]

pub mod child;
mod fork;
pub mod seccomp;

// These tests drive the engine from the bytes as built: no load-time apply in their binaries
// (tests/load_time_apply.rs and the library-pattern example test the load-time apply itself).
altpatch::manual_apply!();

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use altpatch::{Cpu, Feature, FeatureSet, How, SiteReport, TextWriter};
#[allow(unused_imports)]
pub use fork::in_forked_child;
use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic};

pub fn mix_avx2(x: u64) -> u64 {
    x.wrapping_mul(3).wrapping_add(2)
}

/// A 3-way site: default `3x`, `avx2` calls `mix_avx2` (`3x + 2`), `bmi2` runs `lea` inline
/// (`3x + 1`).
#[altpatch::alternative(inline, avx2 => mix_avx2, bmi2 => asm("lea rax, [rdi + rdi*2 + 1]"))]
pub fn mix(x: u64) -> u64 {
    x.wrapping_mul(3)
}

/// What `mix(x)` returns under each candidate.
pub fn mix_expected(candidate: &str, x: u64) -> u64 {
    match candidate {
        "default" => x.wrapping_mul(3),
        "avx2" => x.wrapping_mul(3).wrapping_add(2),
        "bmi2" => x.wrapping_mul(3).wrapping_add(1),
        other => panic!("mix has no candidate {other}"),
    }
}

pub static HOOK_TOTAL: AtomicU64 = AtomicU64::new(0);

/// A hook that becomes NOPs wherever `avx2` holds.
#[altpatch::alternative(inline, avx2 => nop)]
pub fn hook(x: u64) {
    HOOK_TOTAL.fetch_add(x, Ordering::SeqCst);
}

/// Tests in one binary share the program text: those that patch take this lock.
pub fn patch_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn cpu_with(features: &[Feature]) -> Cpu {
    Cpu::synthetic(features.iter().copied().collect::<FeatureSet>(), None)
}

/// The instructions at a site now, read back from the running program's text.
pub fn decode_site(site: &SiteReport) -> Vec<Instruction> {
    // SAFETY: the report's address and length describe a site in this program's mapped text.
    let bytes = unsafe { std::slice::from_raw_parts(site.addr() as *const u8, site.len()) };
    let mut decoder = Decoder::with_ip(64, bytes, site.addr() as u64, DecoderOptions::NONE);
    let instrs: Vec<Instruction> = decoder.iter().collect();
    assert!(
        instrs.iter().all(|i| !i.is_invalid()),
        "{} decodes: {bytes:02x?}",
        site.name()
    );
    instrs
}

/// Where the record's block for `candidate` calls, relocated: what a patched site must call.
pub fn candidate_call_target(site: &SiteReport, candidate: &str) -> u64 {
    candidate_branch_target(site, candidate, Mnemonic::Call)
}

/// Where the record's block for `candidate` branches with `mnemonic` (`Call` or `Jmp`).
pub fn candidate_branch_target(site: &SiteReport, candidate: &str, mnemonic: Mnemonic) -> u64 {
    let index = site
        .candidates()
        .position(|c| c == candidate)
        .expect("candidate exists");
    let (bytes, ip) = site.record().replacement(index).expect("block exists");
    let branch = Decoder::with_ip(64, bytes, ip as u64, DecoderOptions::NONE).decode();
    assert_eq!(
        branch.mnemonic(),
        mnemonic,
        "{candidate} of {}",
        site.name()
    );
    branch.near_branch_target()
}

/// Everything after the first `n` instructions is NOPs (or the jmp-over-int3 filler).
pub fn rest_is_filler(instrs: &[Instruction], n: usize) -> bool {
    let mut i = n;
    while i < instrs.len() {
        match instrs[i].mnemonic() {
            Mnemonic::Nop => i += 1,
            Mnemonic::Jmp => return true, // filler jumps over int3 to the site end
            _ => return false,
        }
    }
    true
}

pub fn plus_two(x: u64) -> u64 {
    x + 2
}

/// A call candidate after an inline one (regression: operands were numbered by position, so
/// this one named a `sym` operand that did not exist).
#[altpatch::alternative(inline, bmi2 => asm("lea rax, [rdi + 1]"), avx2 => plus_two)]
pub fn inc_after_asm(x: u64) -> u64 {
    x
}

/// A bare `hypervisor` predicate right before `=>` (regression: it was parsed as
/// `hypervisor = ...`).
#[altpatch::alternative(inline, in_vm: hypervisor => nop)]
pub fn bare_metal_only_hook(x: u64) {
    HOOK_TOTAL.fetch_add(x, Ordering::SeqCst);
}

/// Two sites sharing one name, so one `ALTPATCH=shared_hook=...` choice covers both.
#[altpatch::alternative(inline, name = "shared_hook", quiet: not(hypervisor) => nop, loud: all(avx2, not(avx512f)) => nop)]
pub fn shared_hook_a(x: u64) {
    HOOK_TOTAL.fetch_add(x, Ordering::SeqCst);
}

#[altpatch::alternative(inline, name = "shared_hook", quiet: not(hypervisor) => nop, loud: all(avx2, not(avx512f)) => nop)]
pub fn shared_hook_b(x: u64) {
    HOOK_TOTAL.fetch_add(x, Ordering::SeqCst);
}

pub fn weigh_scaled(xs: &[u32], scale: &u64, out: &mut u64) -> u64 {
    *out = xs.len() as u64;
    xs.iter().map(|&x| u64::from(x)).sum::<u64>() * *scale + 1
}

/// Slices and references through the site's registers: `sum(xs) * scale` (+1 for `avx2`), and
/// the slice's length written through `out`.
#[altpatch::alternative(inline, avx2 => weigh_scaled)]
pub fn weigh(xs: &[u32], scale: &u64, out: &mut u64) -> u64 {
    *out = xs.len() as u64;
    xs.iter().map(|&x| u64::from(x)).sum::<u64>() * *scale
}

/// Runs this test binary's ignored test `child_entry` in a child process with `env`; returns its
/// stdout and stderr, after checking it succeeded within two minutes. For what must happen once
/// per process (reading `ALTPATCH`) or cannot be undone (a seccomp filter).
pub fn run_child_entry(env: &[(&str, &str)]) -> (String, String) {
    let run = child::run_bounded(&[], "child_entry", env, std::time::Duration::from_secs(120));
    run.assert_success(&format!("child with {env:?}"));
    (run.stdout, run.stderr)
}

/// Installs `disposition` for `signal` with `flags` and an empty mask: a handler of the type
/// `flags` says (`extern "C" fn(c_int)`, or the three-argument form with `SA_SIGINFO`), or
/// `SIG_IGN` / `SIG_DFL`.
///
/// # Safety
/// `disposition` is `SIG_IGN`, `SIG_DFL` or a handler of the type `flags` declares, and the
/// handler does only what is async-signal-safe.
pub unsafe fn set_signal_action(signal: libc::c_int, disposition: usize, flags: libc::c_int) {
    // SAFETY: as the caller promises.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = disposition;
        action.sa_flags = flags;
        libc::sigemptyset(&mut action.sa_mask);
        assert_eq!(libc::sigaction(signal, &action, std::ptr::null_mut()), 0);
    }
}

/// A writer that refuses every page with `reason`, as a W^X policy would.
pub struct RefusingWriter(pub &'static str);

impl TextWriter for RefusingWriter {
    fn name(&self) -> &'static str {
        "refusing"
    }
    fn prepare(&mut self, _pages: std::ops::Range<usize>) -> Result<(), String> {
        Err(self.0.into())
    }
    fn write(&mut self, _addr: usize, _bytes: &[u8]) -> Result<(), String> {
        unreachable!("never prepared")
    }
    fn finish(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// Instructions formatted so that the same code relocated elsewhere prints the same: branch
/// targets and RIP-relative operands as absolute addresses, no branch-size hints.
fn formatted(instrs: &[Instruction]) -> Vec<String> {
    use iced_x86::{Formatter, IntelFormatter};
    let mut formatter = IntelFormatter::new();
    formatter.options_mut().set_show_branch_size(false);
    formatter.options_mut().set_rip_relative_addresses(false);
    instrs
        .iter()
        .map(|instr| {
            let mut text = String::new();
            formatter.format(instr, &mut text);
            text
        })
        .collect()
}

fn decode_all(bytes: &[u8], ip: u64) -> Vec<Instruction> {
    Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE)
        .iter()
        .collect()
}

/// The instructions a site's bytes start with before their filler (NOPs, or a `jmp` over
/// `int3`s to the site's end, or nothing after a `jmp` that leaves the site).
fn site_body(site: &SiteReport) -> Vec<Instruction> {
    let mut instrs = decode_site(site);
    let end = site.addr() as u64 + site.len() as u64;
    let filler = |i: &Instruction| {
        i.mnemonic() == Mnemonic::Nop
            || (i.mnemonic() == Mnemonic::Jmp && i.near_branch_target() == end)
            || i.mnemonic() == Mnemonic::Int3
    };
    let body = match instrs
        .iter()
        .position(|i| i.mnemonic() == Mnemonic::Jmp && !filler(i))
    {
        // Whatever follows a jump out of the site never runs.
        Some(jmp) if instrs[..jmp].iter().all(|i| !filler(i)) => jmp + 1,
        _ => instrs.iter().position(filler).unwrap_or(instrs.len()),
    };
    assert!(
        instrs[body..]
            .iter()
            .all(|i| filler(i) || i.mnemonic() == Mnemonic::Jmp),
        "{}: {:?} after the instructions is not filler",
        site.name(),
        formatted(&instrs[body..])
    );
    instrs.truncate(body);
    instrs
}

/// Asserts that the report entry says what the site's bytes are, read back and decoded
/// independently of the planner: `chosen()`'s instructions (relocated, or for a trampoline a
/// copy of its function's body) followed by filler, and `how()` their form. Returns what the
/// site was found to run, for messages.
pub fn assert_entry_matches_bytes(site: &SiteReport) -> String {
    let what = format!(
        "{} at {:#x} ({} / {})",
        site.name(),
        site.addr(),
        site.chosen(),
        site.how()
    );
    let body = site_body(site);
    let index = site
        .candidates()
        .position(|c| c == site.chosen())
        .unwrap_or_else(|| panic!("{what}: chosen is not a candidate"));
    let (bytes, ip) = site.record().replacement(index).expect("block exists");
    let block = decode_all(bytes, ip as u64);
    let trampoline = site.kind() == Some(altpatch::SiteKind::Trampoline);
    let expected = match site.how() {
        // A trampoline holding a copy of the candidate's function: that function's first
        // instructions, through its `ret`.
        How::Inline if trampoline => {
            let target = block[0].near_branch_target();
            // SAFETY: the candidate's function is mapped program text at least as long as the copy.
            let code = unsafe { std::slice::from_raw_parts(target as *const u8, site.len()) };
            let mut body_instrs = decode_all(code, target);
            body_instrs.truncate(body.len());
            body_instrs
        }
        _ => block,
    };
    assert_eq!(
        formatted(&body),
        formatted(&expected),
        "{what}: the site's instructions are not its chosen candidate's"
    );
    let form = match body.first() {
        None => How::Nop,
        Some(first) if body.len() == 1 && first.mnemonic() == Mnemonic::Call => How::Call,
        Some(first) if first.mnemonic() == Mnemonic::Jmp => How::Jmp,
        Some(_) => How::Inline,
    };
    match site.how() {
        How::Unpatched => assert_eq!(index, 0, "{what}: unpatched must be the default"),
        how => assert_eq!(how, form, "{what}: the bytes are a {form}"),
    }
    what
}

/// [`assert_entry_matches_bytes`] for every site of `report` it recognised (`How::Unknown`
/// says it did not).
pub fn assert_report_matches_bytes(report: &altpatch::Report) {
    for site in report.sites.iter().filter(|s| s.how() != How::Unknown) {
        assert_entry_matches_bytes(site);
    }
}

/// [`run_child_entry`] with a time bound of `limit`: a child still running then (hung) is killed
/// and the test fails, as it does when the child crashes or fails. Returns its stdout.
pub fn run_child_entry_within(env: &[(&str, &str)], limit: std::time::Duration) -> String {
    let run = child::run_bounded(&[], "child_entry", env, limit);
    run.assert_success(&format!("child with {env:?}"));
    run.stdout
}
