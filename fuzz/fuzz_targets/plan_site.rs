//! The planner on arbitrary bytes: a site, up to four candidate blocks and a choice. It must never
//! panic, and a plan must always be as long as the site and end in filler.
//!
//! `cargo fuzz run plan_site` (from this directory's parent).

#![no_main]

use libfuzzer_sys::fuzz_target;
use patch_core::plan::{Block, plan_site};

fuzz_target!(|data: &[u8]| {
    // Layout: site_len, chosen, then length-prefixed blocks, the rest is the site's bytes.
    let [site_len, chosen, rest @ ..] = data else { return };
    let mut rest = rest;
    let mut blocks = Vec::new();
    while blocks.len() < 4 {
        let [len, tail @ ..] = rest else { break };
        let len = usize::from(*len % 16).min(tail.len());
        blocks.push(&tail[..len]);
        rest = &tail[len..];
    }
    let site_len = usize::from(*site_len % 32).max(1).min(rest.len());
    if blocks.is_empty() || site_len == 0 {
        return;
    }
    let current = &rest[..site_len];
    let blocks: Vec<Block<'_>> = blocks
        .iter()
        .enumerate()
        .map(|(i, b)| Block { bytes: b, ip: 0x7000_0000 + 0x100 * i as u64 })
        .collect();
    let chosen = usize::from(*chosen) % blocks.len();
    if let Ok(plan) = plan_site(0x5000_0000, current, &blocks, &["default", "a", "b", "c"], chosen) {
        assert_eq!(plan.bytes.len(), current.len());
    }
});
