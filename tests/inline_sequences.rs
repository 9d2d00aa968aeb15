//! `alternative_asm!`: multi-way inline sequences, padded at build time, with replacements that
//! are relocated when copied: a RIP-relative `lea` and a `call` in non-first position, executed
//! after patching (in the spirit of the kernel's alternatives relocation self-test). A sequence
//! of several instructions is rewritten only with no other thread running (a thread may be
//! stopped between them), as the kernel applies its alternatives before other CPUs start.

mod common;

use std::hint::black_box;

use altpatch::{Feature, How, Patcher};
use common::*;
use iced_x86::Mnemonic;

static TABLE: [u64; 4] = [10, 20, 30, 40];

extern "sysv64" fn add_one(x: u64) -> u64 {
    x + 1
}

/// default: `TABLE[i]`; avx2: `TABLE[i] + 1` through a RIP-relative `lea` and a `call`;
/// bmi2: `TABLE[i] * 2`.
#[inline(never)]
fn lookup(i: u64) -> u64 {
    let r: u64;
    // SAFETY: every candidate reads TABLE[i] (i < 4 at every call) and calls only `add_one`, with
    // all caller-saved registers declared clobbered.
    unsafe {
        altpatch::alternative_asm!(
            name = "reloc_selftest",
            ["lea rax, [rip + {table}]", "mov rax, [rax + rdi*8]"],
            avx2 => ["lea rax, [rip + {table}]", "mov rdi, [rax + rdi*8]", "call {add_one}"],
            bmi2 => ["lea rax, [rip + {table}]", "mov rax, [rax + rdi*8]", "add rax, rax"],
            table = sym TABLE,
            add_one = sym add_one,
            inout("rdi") i => _,
            out("rax") r,
            clobber_abi("C"),
        );
    }
    r
}

#[test]
fn relocated_lea_and_call_run_after_patching() {
    let _lock = patch_lock();
    assert_eq!(lookup(black_box(2)), 30, "unpatched default");
    in_forked_child(patch_each_candidate_and_run_it);
}

#[test]
fn a_sequence_is_not_rewritten_while_other_threads_run() {
    let _lock = patch_lock();
    let report = Patcher::new().cpu(cpu_with(&[Feature::Avx2])).apply();
    assert!(report.stats.live, "the harness's threads run");
    let site = report.site("reloc_selftest").next().unwrap();
    assert!(!site.written(), "{report}");
    assert_eq!(site.how(), How::Unpatched);
    assert!(
        site.why().contains("stopped between them"),
        "{}",
        site.why()
    );
    assert_eq!(lookup(black_box(2)), 30, "still the default");
    assert_eq!(decode_site(site)[1].mnemonic(), Mnemonic::Mov);
}

fn patch_each_candidate_and_run_it() {
    for (features, chosen, expected) in [
        (&[Feature::Avx2][..], "avx2", 31),
        (&[Feature::Bmi2][..], "bmi2", 60),
        (&[][..], "default", 30),
    ] {
        let report = Patcher::new().cpu(cpu_with(features)).apply();
        let site = report
            .site("reloc_selftest")
            .next()
            .expect("the site is recorded");
        assert_eq!(site.chosen(), chosen, "{report}");
        assert_eq!(site.kind(), Some(altpatch::SiteKind::Inline));
        assert_eq!(lookup(black_box(2)), expected, "{chosen}");

        let instrs = decode_site(site);
        assert_eq!(instrs[0].mnemonic(), Mnemonic::Lea);
        assert_eq!(
            instrs[0].ip_rel_memory_address(),
            TABLE.as_ptr() as u64,
            "lea relocated"
        );
        if chosen == "avx2" {
            assert_eq!(site.how(), How::Inline);
            assert_eq!(instrs[2].mnemonic(), Mnemonic::Call);
            assert_eq!(
                instrs[2].near_branch_target(),
                add_one as *const () as u64,
                "call relocated"
            );
            assert!(rest_is_filler(&instrs, 3));
        }
    }
}
