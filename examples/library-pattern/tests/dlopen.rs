//! A library opened with `dlopen` patches its own sites at load, from its own copy of altpatch,
//! while this process already runs other threads (the live protocol).
#![cfg(all(target_os = "linux", not(feature = "manual-apply")))]

use std::ffi::CString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

/// The cdylib cargo built beside this test's own binary (target/<profile>/deps).
fn library_path() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for dir in [deps, deps.parent().unwrap()] {
        let path = dir.join("libbytestats.so");
        if path.exists() {
            return path;
        }
    }
    panic!("libbytestats.so not found beside {}", exe.display());
}

#[test]
fn a_dlopened_library_patches_its_sites_at_load() {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // Another thread running: the library's initializer sees a live process.
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        let path = CString::new(library_path().into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: loading a library built by this workspace; its initializer is the load-time
        // apply under test.
        let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        stop.store(true, Ordering::Relaxed);
        assert!(!handle.is_null(), "dlopen failed");
        let symbol = |name: &str| {
            let name = CString::new(name).unwrap();
            // SAFETY: a symbol lookup in the handle just opened.
            let found = unsafe { libc::dlsym(handle, name.as_ptr()) };
            assert!(!found.is_null(), "{name:?} missing");
            found
        };
        // SAFETY: both are `extern "C" fn() -> ...` exported by the library (src/lib.rs).
        let which: extern "C" fn() -> u32 =
            unsafe { std::mem::transmute(symbol("bytestats_which")) };
        // SAFETY: as above.
        let patched: extern "C" fn() -> i64 =
            unsafe { std::mem::transmute(symbol("bytestats_patched_sites")) };
        // `which` is one call site: a call to its candidate, safe to write while threads run.
        assert_eq!(which(), 2, "the library's own call site runs its candidate");
        assert!(
            patched() >= 1,
            "the library applied its own sites: {}",
            patched()
        );
    });
}
