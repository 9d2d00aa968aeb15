//! Load-time apply: every linked object applies its own sites as it is loaded.
//!
//! An executable, and each shared library at `dlopen` (a Rust `cdylib` carries its own copy of
//! this crate and its own site records), runs `apply_at_load` from its `.init_array`: for the
//! executable before `main`, while only one thread exists, as the dynamic linker resolves
//! IFUNCs and the kernel applies alternatives before other CPUs start. A library therefore needs
//! no call in anybody's `main`, and its own `cargo test` runs patched.
//!
//! What the initializer may do, and does: read `ALTPATCH` and `ALTPATCH_LOG`, detect the CPU,
//! list the loaded segments (`dl_iterate_phdr`, in place of `/proc/self/maps`), count threads
//! (glibc's `__libc_single_threaded`, else `/proc/self/task`), allocate, change page protections
//! and write the sites. What it may not do, and does not: print anything unless `ALTPATCH_LOG` asks (or
//! `ALTPATCH` is malformed: its error, once), start
//! threads, or let a panic cross into the C runtime (one is caught and the sites keep what they
//! ran; apply itself never panics). A library opened while other threads run patches under the
//! live protocol like any apply with threads running; sites whose rewrite needs a single thread
//! stay on their defaults and the report says why.
//!
//! `ALTPATCH=off` leaves every site on its default (the report says so). The `manual-apply`
//! feature (of `altpatch` or this crate) removes the initializer: sites then wait for
//! [`apply_patches`](crate::apply::apply_patches). Cargo unifies features over the whole build,
//! so one crate enabling it turns the load-time apply off for everything built with it; a single
//! program (or test binary) opts out by defining the symbol `__altpatch_manual_apply`
//! (`altpatch::manual_apply!()`), which the initializer looks for as a weak reference.
//!
//! The initializer is a `#[used]` static in `.init_array`: rustc keeps `#[used]` statics of
//! every linked crate (its synthetic `symbols.o` references them), and linkers keep
//! `.init_array` whatever `--gc-sections` drops, with or without LTO.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// The `.init_array` entry: glibc passes `argc`, `argv` and `envp`, unused here.
#[cfg(all(
    target_arch = "x86_64",
    target_os = "linux",
    not(feature = "manual-apply")
))]
#[used]
#[unsafe(link_section = ".init_array")]
static APPLY_AT_LOAD: extern "C" fn(
    libc::c_int,
    *const *const libc::c_char,
    *const *const libc::c_char,
) = apply_at_load;

/// Applies this object's sites, unless it has none. Never unwinds.
#[cfg_attr(
    not(all(
        target_arch = "x86_64",
        target_os = "linux",
        not(feature = "manual-apply")
    )),
    allow(dead_code)
)]
extern "C" fn apply_at_load(
    _argc: libc::c_int,
    _argv: *const *const libc::c_char,
    _envp: *const *const libc::c_char,
) {
    // An object without sites (a library that links altpatch for nothing) pays nothing: no
    // detection, no report.
    if crate::record::records().is_empty() || manual_apply_requested() {
        return;
    }
    // Apply never panics; should it, the sites keep what they ran and the panic stops here.
    AT_LOAD.store(true, Relaxed);
    let _ = std::panic::catch_unwind(|| {
        crate::apply::apply_patches();
    });
    AT_LOAD.store(false, Relaxed);
}

/// Set while the initializer applies (only one thread runs then, or the dynamic linker holds
/// its lock for `dlopen`).
static AT_LOAD: AtomicBool = AtomicBool::new(false);

/// Whether this apply is the load-time one: the mappings are then exactly the loaded segments.
pub(crate) fn applying_at_load() -> bool {
    AT_LOAD.load(Relaxed)
}

/// Whether this build applies at load (`false` with the `manual-apply` feature, or where there is
/// no `.init_array`).
pub const APPLIES_AT_LOAD: bool = cfg!(all(
    target_arch = "x86_64",
    target_os = "linux",
    not(feature = "manual-apply")
));

/// Whether the object defines `__altpatch_manual_apply` (`altpatch::manual_apply!()`): the address
/// of a weak reference, null when nothing defines it.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn manual_apply_requested() -> bool {
    crate::os::weak_symbol_address!("__altpatch_manual_apply") != 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn manual_apply_requested() -> bool {
    true
}
