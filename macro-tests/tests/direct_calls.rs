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

/// The instructions of the function at `addr`, up to its first `ret`.
fn decode_function(addr: usize) -> Vec<Instruction> {
    // SAFETY: `addr` is a function of this program; 256 bytes from it are mapped text.
    let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, 256) };
    let mut decoder = Decoder::with_ip(64, bytes, addr as u64, DecoderOptions::NONE);
    let mut out = Vec::new();
    for instr in decoder.iter() {
        out.push(instr);
        if instr.mnemonic() == Mnemonic::Ret {
            return out;
        }
    }
    panic!("no `ret` in 256 bytes at {addr:#x}: {out:?}");
}

#[test]
fn a_caller_in_another_crate_calls_the_trampoline_directly() {
    let report = ap::apply_patches();
    let sites: Vec<_> = report
        .site("altpatch_macro_tests::through_trampoline")
        .collect();
    assert_eq!(sites.len(), 1, "{report}");
    let trampoline = sites[0].addr() as u64;

    let instrs = decode_function(caller as fn(u64) -> u64 as usize);
    let calls: Vec<&Instruction> = instrs
        .iter()
        .filter(|i| i.mnemonic() == Mnemonic::Call)
        .collect();
    assert!(
        calls
            .iter()
            .all(|i| i.code() == Code::Call_rel32_64 && i.op0_kind() == OpKind::NearBranch64),
        "an indirect call in {instrs:?}"
    );
    assert!(
        calls.iter().any(|i| i.near_branch_target() == trampoline),
        "no `call rel32` to the trampoline at {trampoline:#x} in {instrs:?}"
    );
    // And the call works, whichever candidate the CPU got.
    let expected = if sites[0].chosen() == "default" {
        5
    } else {
        5 + altpatch_macro_tests::MARK
    };
    assert_eq!(caller(black_box(5)), expected);
}
