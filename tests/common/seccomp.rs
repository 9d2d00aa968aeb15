//! Seccomp filters for the hostile-environment tests: installed on the calling thread (the one
//! that then patches), failing the refused calls with an errno. A filter cannot be removed, so
//! tests install them in child processes.

use std::collections::BTreeMap;

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

/// Argument `arg`, masked with `mask`, equals `value`.
pub fn masked_eq(arg: u8, mask: u64, value: u64) -> SeccompRule {
    let cond = SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    )
    .unwrap();
    SeccompRule::new(vec![cond]).unwrap()
}

/// `mprotect` asking for write and execute at once (a W^X policy).
pub fn wx_mprotect() -> (i64, Vec<SeccompRule>) {
    let wx = (libc::PROT_WRITE | libc::PROT_EXEC) as u64;
    (libc::SYS_mprotect, vec![masked_eq(2, wx, wx)])
}

/// `open`/`openat` for writing (what opening `/proc/self/mem` for writing takes).
pub fn writable_opens() -> [(i64, Vec<SeccompRule>); 2] {
    let acc = libc::O_ACCMODE as u64;
    let writable = |arg| {
        vec![
            masked_eq(arg, acc, libc::O_WRONLY as u64),
            masked_eq(arg, acc, libc::O_RDWR as u64),
        ]
    };
    [
        (libc::SYS_openat, writable(2)),
        (libc::SYS_open, writable(1)),
    ]
}

/// Installs a filter failing every call `rules` match with `errno`, on the calling thread.
pub fn refuse(rules: impl IntoIterator<Item = (i64, Vec<SeccompRule>)>, errno: i32) {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = rules.into_iter().collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        std::env::consts::ARCH.try_into().unwrap(),
    )
    .unwrap();
    let program: seccompiler::BpfProgram = filter.try_into().unwrap();
    seccompiler::apply_filter(&program).unwrap();
}

/// Whether making a fresh page writable and executable is refused now.
pub fn wx_refused() -> bool {
    // SAFETY: maps a fresh anonymous page and changes only its protection; nothing refers to it.
    unsafe {
        let page = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(page, libc::MAP_FAILED);
        libc::mprotect(
            page,
            4096,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
        ) != 0
    }
}
