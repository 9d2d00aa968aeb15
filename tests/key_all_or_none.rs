//! A key's sites change as one: when one site of a key cannot be rewritten (here its bytes are
//! not what the record promises), `set` writes none, the key keeps its old state, and the
//! `KeyError` says why; once the site is whole again the key toggles. Workers run the key's other
//! site throughout and never see it disagree with the key. In a child process with a time bound,
//! since the test rewrites a site's bytes by hand.

mod common;
#[path = "common/toggle.rs"]
mod toggle;

use std::time::Duration;

use altpatch::KeyError;
use common::run_child_entry_within;
use toggle::{KEY, Workers, branch_taken, settle};

/// A second site of `KEY`, never run: its bytes are replaced while the workers run the first.
#[inline(never)]
fn second_site() -> bool {
    altpatch::static_branch_unlikely!(toggle::KEY)
}

/// Writes `bytes` over the program's text at `addr` (the site is not running).
fn poke(addr: usize, bytes: &[u8]) {
    let page = region::page::floor(addr as *const u8);
    // SAFETY: `addr` is a site of this program that no thread runs (`second_site` is never
    // called); the page is made writable for the copy and given back read-execute.
    unsafe {
        region::protect(
            page,
            region::page::size() * 2,
            region::Protection::READ_WRITE_EXECUTE,
        )
        .unwrap();
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len());
        region::protect(
            page,
            region::page::size() * 2,
            region::Protection::READ_EXECUTE,
        )
        .unwrap();
    }
}

fn site_bytes(addr: usize) -> Vec<u8> {
    // SAFETY: a site of this program's mapped text, 5 bytes long.
    unsafe { std::slice::from_raw_parts(addr as *const u8, 5) }.to_vec()
}

#[test]
#[ignore = "entry point of the child processes the other tests start"]
fn child_entry() {
    if std::env::var_os("ALTPATCH_TEST_ALL_OR_NONE").is_none() {
        return;
    }
    let report = altpatch::apply_patches();
    assert!(report.disabled.is_none(), "{report}");
    let sites: Vec<_> = report
        .sites
        .iter()
        .filter(|s| s.name().ends_with("toggle::KEY"))
        .collect();
    assert_eq!(sites.len(), 2, "{report}");
    let second = sites
        .iter()
        .find(|s| s.file().ends_with("key_all_or_none.rs"))
        .expect("the second site")
        .addr();
    let first = sites.iter().find(|s| s.addr() != second).unwrap().addr();

    let workers = Workers::start(2);
    for i in 0..100 {
        let update = workers.set(i % 2 == 0).expect("both sites are whole");
        assert_eq!((update.sites, update.written), (2, 2), "{update:?}");
        assert_eq!(second_site(), KEY.is_enabled());
        settle();
    }
    // The key is disabled; its second site becomes `ud2` + NOPs: not a byte the record promises.
    assert!(!KEY.is_enabled());
    let whole = site_bytes(second);
    poke(second, &[0x0f, 0x0b, 0x0f, 0x1f, 0x00]);
    let first_before = site_bytes(first);
    let mut refused = 0;
    for _ in 0..100 {
        match workers.set(true) {
            Err(KeyError::NotWritten { sites: 2, why }) => {
                assert!(why.contains("refused"), "{why}");
                refused += 1;
            }
            other => panic!("a toggle with a broken site must be refused: {other:?}"),
        }
        // The key keeps its state, and the site the workers run its bytes.
        assert!(!KEY.is_enabled());
        assert!(!branch_taken());
        assert_eq!(site_bytes(first), first_before);
        settle();
    }
    poke(second, &whole);
    for i in 0..100 {
        let update = workers.set(i % 2 == 0).expect("whole again");
        assert_eq!(update.sites, 2, "{update:?}");
        assert_eq!(second_site(), KEY.is_enabled());
        settle();
    }
    let seen = workers.stop_all_right();
    println!("REFUSED={refused} {seen:?}");
}

#[test]
fn a_key_with_a_site_it_cannot_rewrite_keeps_its_state() {
    let out = run_child_entry_within(
        &[("ALTPATCH_TEST_ALL_OR_NONE", "1")],
        Duration::from_secs(60),
    );
    assert!(out.contains("REFUSED=100"), "{out}");
}
