//! Two plugins (`cdylib`s) each link their own copy of altpatch; the one whose copy installed
//! the SIGTRAP handler last is `dlclose`d, and the other toggles its key while threads run its
//! branch, then the program raises its own SIGTRAP. altpatch pins the object holding its handler
//! (`RTLD_NODELETE`) before installing it, so the closed plugin's handler, still in the chain,
//! stays mapped: no crash, no wrong branch, and the program's own handler still gets its trap.
//!
//! The plugin (`tests/fixtures/dlclose_plugin.rs`) is built with `rustc` against this test's own
//! `altpatch` rlib (a second or two), and loaded under two file names: two copies.

mod common;

use std::ffi::{CString, c_void};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use common::child::run_bounded;

static USER_TRAPS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn user_handler(_sig: libc::c_int) {
    USER_TRAPS.fetch_add(1, SeqCst);
}

struct Plugin {
    handle: *mut c_void,
    branch: extern "C" fn() -> bool,
    enabled: extern "C" fn() -> bool,
    set: extern "C" fn(bool) -> i32,
}

// SAFETY: the plugin's functions may be called from any thread.
unsafe impl Sync for Plugin {}

fn load(path: &str) -> Plugin {
    let c = CString::new(path).unwrap();
    // SAFETY: loads a library built from tests/fixtures/dlclose_plugin.rs.
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!handle.is_null(), "dlopen {path} failed");
    let sym = |name: &str| {
        let n = CString::new(name).unwrap();
        // SAFETY: looks up a symbol the plugin exports.
        let f = unsafe { libc::dlsym(handle, n.as_ptr()) };
        assert!(!f.is_null(), "{name} missing");
        f
    };
    // SAFETY: the plugin exports these with these signatures.
    unsafe {
        Plugin {
            handle,
            branch: std::mem::transmute::<*mut c_void, extern "C" fn() -> bool>(sym(
                "plugin_branch",
            )),
            enabled: std::mem::transmute::<*mut c_void, extern "C" fn() -> bool>(sym(
                "plugin_enabled",
            )),
            set: std::mem::transmute::<*mut c_void, extern "C" fn(bool) -> i32>(sym("plugin_set")),
        }
    }
}

/// Toggles `plugin`'s key `toggles` times while two threads run its branch; returns the branch
/// results that disagreed with the settled key, and the sites written.
fn toggle(plugin: &Plugin, toggles: usize) -> (u64, i64) {
    let stop = AtomicBool::new(false);
    let moving = AtomicU64::new(0); // odd while a set runs
    let wrong = AtomicU64::new(0);
    let mut written = 0i64;
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(SeqCst) {
                    let before = moving.load(SeqCst);
                    let took = (plugin.branch)();
                    let enabled = (plugin.enabled)();
                    if before == moving.load(SeqCst) && before.is_multiple_of(2) && took != enabled
                    {
                        wrong.fetch_add(1, SeqCst);
                    }
                }
            });
        }
        for _ in 0..toggles {
            moving.fetch_add(1, SeqCst);
            written += i64::from((plugin.set)(!(plugin.enabled)()));
            moving.fetch_add(1, SeqCst);
            std::thread::sleep(Duration::from_micros(200));
        }
        stop.store(true, SeqCst);
    });
    (wrong.load(SeqCst), written)
}

fn maps_contain(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .contains(path)
}

#[test]
#[ignore = "run by the test below, in a child process"]
fn child_entry() {
    // SAFETY: user_handler is an `extern "C" fn(c_int)` that only bumps an atomic counter.
    unsafe {
        common::set_signal_action(libc::SIGTRAP, user_handler as *const () as usize, 0);
    };
    let a_path = std::env::var("ALTPATCH_TEST_PLUGIN_A").unwrap();
    let b_path = std::env::var("ALTPATCH_TEST_PLUGIN_B").unwrap();
    let (a, b) = (load(&a_path), load(&b_path));
    // B installs its handler first, then A over it: A's is the one installed.
    let (wrong_b, written_b) = toggle(&b, 6);
    let (wrong_a, written_a) = toggle(&a, 6);
    assert_eq!((wrong_a, wrong_b), (0, 0));
    assert!(written_a > 0 && written_b > 0, "{written_a} {written_b}");
    // SAFETY: nothing of A runs any more (its workers have stopped).
    assert_eq!(unsafe { libc::dlclose(a.handle) }, 0);
    assert!(
        maps_contain(&a_path),
        "A's copy of altpatch is pinned: its handler stays mapped"
    );
    let (wrong, written) = toggle(&b, 100);
    println!("after dlclose: wrong={wrong} written={written}");
    assert_eq!(wrong, 0);
    assert_eq!(written, 100);
    // The program's own trap goes through both copies' handlers to the program's.
    // SAFETY: raises SIGTRAP, whose first handler is the counting one above.
    unsafe { libc::raise(libc::SIGTRAP) };
    assert_eq!(USER_TRAPS.load(SeqCst), 1);
    println!("CHILD OK");
}

/// Builds the plugin against the newest `altpatch` rlib next to this test binary.
fn build_plugin(out_dir: &Path) -> Result<PathBuf, String> {
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let rlib = std::fs::read_dir(&deps)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("libaltpatch-") && name.ends_with(".rlib")
        })
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .ok_or("no libaltpatch rlib next to the test binary")?;
    std::fs::create_dir_all(out_dir).unwrap();
    let out = out_dir.join("plugin.so");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dlclose_plugin.rs");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let status = std::process::Command::new(rustc)
        .args(["--edition", "2024", "--crate-type", "cdylib", "-L"])
        .arg(format!("dependency={}", deps.display()))
        .arg("--extern")
        .arg(format!("altpatch={}", rlib.display()))
        .arg(&source)
        .arg("-o")
        .arg(&out)
        .status()
        .map_err(|e| format!("cannot run rustc: {e}"))?;
    if !status.success() {
        return Err(format!("rustc failed: {status}"));
    }
    Ok(out)
}

#[test]
fn closing_the_plugin_whose_handler_is_installed() {
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join("dlclose_fixture");
    let plugin = build_plugin(&dir).unwrap_or_else(|e| panic!("building the plugin: {e}"));
    let (a, b) = (dir.join("a.so"), dir.join("b.so"));
    std::fs::copy(&plugin, &a).unwrap();
    std::fs::copy(&plugin, &b).unwrap();
    let run = run_bounded(
        &[],
        "child_entry",
        &[
            ("ALTPATCH_TEST_PLUGIN_A", a.to_str().unwrap()),
            ("ALTPATCH_TEST_PLUGIN_B", b.to_str().unwrap()),
        ],
        Duration::from_secs(60),
    );
    run.assert_success("dlclose of the plugin whose handler is installed");
    assert!(run.stdout.contains("CHILD OK"), "{}", run.stdout);
    assert!(
        run.stdout.contains("after dlclose: wrong=0 written=100"),
        "{}",
        run.stdout
    );
}
