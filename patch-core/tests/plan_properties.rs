//! The planner on arbitrary input: it never panics, and whatever it plans decodes to the chosen
//! candidate's instructions (relocated) followed by filler, exactly as long as the site.

use iced_x86::{Decoder, DecoderOptions, Instruction, OpKind};
use patch_core::plan::{Block, Plan, decode, fill_nops, is_filler, plan_site, relocate};
use proptest::prelude::*;

const SITE: u64 = 0x5555_0000_1000;
const REPL: u64 = 0x5555_0010_0000;

/// Same instruction, comparing branches by target (the encoder may choose rel8 or rel32).
fn same(a: &Instruction, b: &Instruction) -> bool {
    let branch = |i: &Instruction| i.op_count() == 1 && i.op0_kind() == OpKind::NearBranch64;
    if branch(a) && branch(b) {
        a.mnemonic() == b.mnemonic() && a.near_branch_target() == b.near_branch_target()
    } else {
        a == b
    }
}

/// The plan's bytes are the chosen block relocated to the site, then filler.
fn assert_plan_is_chosen(plan: &Plan, chosen: Block<'_>, site_len: usize) {
    assert_eq!(plan.bytes.len(), site_len);
    let want = decode(Block {
        bytes: &relocate(chosen, SITE).unwrap(),
        ip: SITE,
    })
    .unwrap();
    let mut decoder = Decoder::with_ip(64, &plan.bytes, SITE, DecoderOptions::NONE);
    for w in &want {
        let got = decoder.decode();
        assert!(!got.is_invalid() && same(&got, w), "{got} != {w}");
    }
    assert!(
        is_filler(&plan.bytes[decoder.position()..]),
        "{:02x?}",
        plan.bytes
    );
}

/// Real instruction encodings at `REPL + offset`, some relative: calls, short and near jumps,
/// RIP-relative `lea`, and plain ones.
fn pool(offset: u64) -> Vec<Vec<u8>> {
    let far = |op: u8, target: u64, len: u64| {
        let rel = (target as i64 - (REPL + offset + len) as i64) as i32;
        let mut v = if op == 0x8d {
            vec![0x48, 0x8d, 0x05]
        } else {
            vec![op]
        };
        v.extend_from_slice(&rel.to_le_bytes());
        v
    };
    vec![
        vec![],
        vec![0xf3, 0x48, 0x0f, 0xb8, 0xc7], // popcnt rax, rdi
        vec![0x48, 0x89, 0xf8],             // mov rax, rdi
        vec![0x48, 0x8d, 0x44, 0x3f, 0x01], // lea rax, [rdi+rdi+1]
        far(0xe8, 0x5555_0200_0000, 5),     // call far
        far(0xe9, 0x5555_0200_0040, 5),     // jmp far
        far(0x8d, 0x5555_0300_0000, 7),     // lea rax, [rip+far]
        vec![0xeb, 0x00],                   // jmp to its own end
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_and_plans_decode_as_intended(
        current in proptest::collection::vec(any::<u8>(), 1..24),
        blocks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..12), 1..4),
        chosen in 0usize..4,
    ) {
        let chosen = chosen % blocks.len();
        let blocks: Vec<Block<'_>> = blocks.iter().enumerate().map(|(i, b)| Block { bytes: b, ip: REPL + 64 * i as u64 }).collect();
        let names = ["default", "a", "b", "c"];
        if let Ok(plan) = plan_site(SITE, &current, &blocks, &names, chosen) {
            assert_plan_is_chosen(&plan, blocks[chosen], current.len());
        }
    }

    #[test]
    fn valid_sites_always_plan_every_candidate(
        picks in proptest::collection::vec(0usize..8, 1..4),
        pad in 0usize..20,
        chosen in 0usize..4,
    ) {
        let encoded: Vec<Vec<u8>> = picks.iter().enumerate().map(|(i, &p)| pool(64 * i as u64)[p].clone()).collect();
        let blocks: Vec<Block<'_>> = encoded.iter().enumerate().map(|(i, b)| Block { bytes: b, ip: REPL + 64 * i as u64 }).collect();
        let relocated: Vec<Vec<u8>> = blocks.iter().map(|b| relocate(*b, SITE).unwrap()).collect();
        let site_len = relocated.iter().map(Vec::len).max().unwrap() + pad;
        // The site as built: the default, then the assembler's `0x90` padding.
        let mut current = relocated[0].clone();
        current.resize(site_len, 0x90);
        let chosen = chosen % blocks.len();
        let names = ["default", "a", "b", "c"];
        let plan = plan_site(SITE, &current, &blocks, &names, chosen).unwrap();
        assert_plan_is_chosen(&plan, blocks[chosen], site_len);
        // And back to the default from there.
        let back = plan_site(SITE, &plan.bytes, &blocks, &names, 0).unwrap();
        assert_plan_is_chosen(&back, blocks[0], site_len);
    }
}

#[test]
fn filler_of_every_length_is_recognised() {
    for len in 0..300 {
        let mut out = Vec::new();
        fill_nops(&mut out, len);
        assert!(is_filler(&out), "{len}");
    }
}
