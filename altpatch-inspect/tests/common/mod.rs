//! Sites of every shape, so each test binary is itself a binary the tool can inspect, and helpers
//! to run the tool on it.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};

/// An inline candidate: one instruction copied into the site.
#[altpatch::alternative(inline, popcnt => asm("popcnt rax, rdi"))]
pub fn popcount(x: u64) -> u64 {
    u64::from(x.count_ones())
}

fn double_fast(x: u64) -> u64 {
    x << 1
}

/// A call candidate with a compound predicate.
#[altpatch::alternative(inline, all(avx2, bmi2) => double_fast)]
pub fn double(x: u64) -> u64 {
    x.wrapping_mul(2)
}

pub static HOOKED: AtomicU64 = AtomicU64::new(0);

fn hook_off() -> bool {
    true
}

/// A named `nop` candidate chosen by a `when` function.
#[altpatch::alternative(inline, off: when = hook_off => nop)]
pub fn hook(x: u64) {
    HOOKED.fetch_add(x, Ordering::Relaxed);
}

fn sum_sse42(xs: &[u32]) -> u64 {
    xs.iter().map(|&x| u64::from(x)).sum()
}

/// Trampoline mode: a `jmp` in a per-function trampoline.
#[altpatch::alternative(sse4_2 => sum_sse42)]
pub fn sum(xs: &[u32]) -> u64 {
    xs.iter().map(|&x| u64::from(x)).sum()
}

pub static TRACE: altpatch::StaticKey = altpatch::StaticKey::new(false);

/// A static branch: a `jmp` to an out-of-line flag check, or a NOP, or a `jmp` to the branch.
pub fn traced(x: u64) -> u64 {
    if altpatch::static_branch_unlikely!(TRACE) {
        x + 1000
    } else {
        x
    }
}

/// Runs every site (two copies of `popcount`), so all of them are emitted and linked.
pub fn exercise() -> u64 {
    let x = black_box(0b1011_u64);
    let total = popcount(x) + popcount(black_box(x + 1)) + double(x) + sum(&[1, 2, 3]) + traced(x);
    hook(x);
    assert_eq!(total, 3 + 2 + 22 + 6 + 11);
    total
}

pub const TOOL: &str = env!("CARGO_BIN_EXE_altpatch-inspect");

/// Runs the tool with `args`.
pub fn tool<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(TOOL)
        .args(args)
        .output()
        .expect("run altpatch-inspect")
}

/// Runs the tool with `--json` on `binary` and parses what it prints.
pub fn inspect_json(binary: &Path) -> (Output, serde_json::Value) {
    let out = tool(&[OsStr::new("--json"), binary.as_os_str()]);
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, json)
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// This test binary.
pub fn this_binary() -> PathBuf {
    std::env::current_exe().expect("current_exe")
}

/// A path in the temp directory unique to this process and `name`; removed when dropped.
pub struct TempPath(pub PathBuf);

impl TempPath {
    pub fn new(name: &str) -> TempPath {
        TempPath(std::env::temp_dir().join(format!(
            "altpatch-inspect-test-{}-{name}",
            std::process::id()
        )))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Where this PIE was loaded: the start of its mapping at file offset 0, which holds link-time
/// address 0 (the first `PT_LOAD` of a PIE).
pub fn load_base() -> u64 {
    let exe = std::fs::read_link("/proc/self/exe").expect("/proc/self/exe");
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    maps.lines()
        .filter(|l| l.ends_with(exe.to_str().expect("UTF-8 path")))
        .find_map(|l| {
            let mut fields = l.split_whitespace();
            let start = fields.next()?.split_once('-')?.0;
            let offset = fields.nth(1)?;
            (u64::from_str_radix(offset, 16).ok()? == 0)
                .then(|| u64::from_str_radix(start, 16).ok())?
        })
        .expect("a mapping of the executable at offset 0")
}

/// The sites of the tool's JSON.
pub fn sites(json: &serde_json::Value) -> &Vec<serde_json::Value> {
    json["sites"].as_array().expect("a `sites` array")
}

/// The first site whose name ends with `::{short}`.
pub fn site<'a>(json: &'a serde_json::Value, short: &str) -> &'a serde_json::Value {
    sites(json)
        .iter()
        .find(|s| {
            s["name"]
                .as_str()
                .is_some_and(|n| n.ends_with(&format!("::{short}")))
        })
        .unwrap_or_else(|| panic!("no site {short} in {json:#}"))
}
