//! A caller in another crate reaches a trampoline with a direct `call rel32`: in a PIE build
//! rustc calls another crate's function through the GOT (`call [rip + GOT]`), so the wrapper makes
//! the call from `asm!` with a `sym` operand, which the linker resolves to the trampoline itself.
//! CI runs this file in release too.

use std::hint::black_box;

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind};

/// This crate's call of the library's trampoline-mode function, kept out of line to be decoded.
#[inline(never)]
fn caller(x: u64) -> u64 {
    altpatch_macro_tests::through_trampoline(x)
}

/// A `&str` and an `Option<&u8>` travel in registers too.
#[inline(never)]
fn caller_str(s: &str, needle: Option<&u8>) -> usize {
    altpatch_macro_tests::count(s, needle)
}

/// Owned values in and out pass through memory, still with a direct call.
#[inline(never)]
fn caller_owned(parts: Vec<String>) -> String {
    altpatch_macro_tests::joined(parts, '/')
}

/// The instructions of the function at `addr`, up to its first `ret`.
fn decode_function(addr: usize) -> Vec<Instruction> {
    // SAFETY: `addr` is a function of this program; 1 KiB from it is mapped text.
    let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, 1024) };
    let mut decoder = Decoder::with_ip(64, bytes, addr as u64, DecoderOptions::NONE);
    let mut out = Vec::new();
    for instr in decoder.iter() {
        out.push(instr);
        if instr.mnemonic() == Mnemonic::Ret {
            return out;
        }
    }
    panic!("no `ret` in 1 KiB at {addr:#x}: {:?}", codes(&out));
}

/// The address of the trampoline of the site `name`.
fn trampoline(report: &ap::Report, name: &str) -> u64 {
    let sites: Vec<_> = report.site(name).collect();
    assert_eq!(sites.len(), 1, "{report}");
    assert_eq!(sites[0].kind(), Some(ap::SiteKind::Trampoline));
    sites[0].addr() as u64
}

fn codes(instrs: &[Instruction]) -> Vec<(u64, Code)> {
    instrs.iter().map(|i| (i.ip(), i.code())).collect()
}

/// Asserts that every call in `instrs` is a `call rel32` and one reaches `trampoline`.
fn assert_direct_call(instrs: &[Instruction], trampoline: u64) {
    let calls: Vec<&Instruction> = instrs
        .iter()
        .filter(|i| i.mnemonic() == Mnemonic::Call)
        .collect();
    assert!(
        calls
            .iter()
            .all(|i| i.code() == Code::Call_rel32_64 && i.op0_kind() == OpKind::NearBranch64),
        "an indirect call in {:?}",
        codes(instrs)
    );
    assert!(
        calls.iter().any(|i| i.near_branch_target() == trampoline),
        "no `call rel32` to the trampoline at {trampoline:#x} in {:?}",
        codes(instrs)
    );
}

#[test]
fn a_caller_in_another_crate_calls_the_trampoline_directly() {
    let report = ap::apply_patches();
    let tramp = trampoline(report, "altpatch_macro_tests::through_trampoline");
    assert_direct_call(&decode_function(caller as fn(u64) -> u64 as usize), tramp);
    let tramp = trampoline(report, "altpatch_macro_tests::count");
    let instrs = decode_function(caller_str as fn(&str, Option<&u8>) -> usize as usize);
    assert_direct_call(&instrs, tramp);
    let tramp = trampoline(report, "altpatch_macro_tests::joined");
    let instrs = decode_function(caller_owned as fn(Vec<String>) -> String as usize);
    assert_direct_call(&instrs, tramp);

    // And the calls work, whichever candidate the CPU got.
    let sites: Vec<_> = report
        .site("altpatch_macro_tests::through_trampoline")
        .collect();
    let expected = if sites[0].chosen() == "default" {
        5
    } else {
        5 + altpatch_macro_tests::MARK
    };
    assert_eq!(caller(black_box(5)), expected);
}
