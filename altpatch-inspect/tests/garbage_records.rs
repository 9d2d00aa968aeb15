//! Whatever bytes the records hold, the tool gives a verdict (status 0 or 1, valid JSON) and never
//! panics: offsets pointing anywhere, unknown kinds, absurd lengths and counts.

mod common;

use std::os::unix::fs::FileExt;

use common::*;

/// xorshift64: a fixed sequence, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_record_bytes_get_a_verdict_never_a_panic() {
    exercise();
    let (_, json) = inspect_json(&this_binary());
    let records: Vec<u64> = sites(&json)
        .iter()
        .map(|s| s["record_file_offset"].as_u64().unwrap())
        .collect();
    let copy = TempPath::new("garbage");
    std::fs::copy(this_binary(), &copy.0).unwrap();
    let file = std::fs::File::options().write(true).open(&copy.0).unwrap();
    let original = std::fs::read(&copy.0).unwrap();

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut refused = 0;
    for round in 0..64 {
        let record = records[rng.next() as usize % records.len()];
        let mut changed = Vec::new();
        for _ in 0..1 + rng.next() % 3 {
            let at = record + rng.next() % 16;
            file.write_all_at(&[rng.next() as u8], at).unwrap();
            changed.push(at);
        }
        let (out, json) = inspect_json(&copy.0);
        let err = stderr(&out);
        assert!(
            matches!(out.status.code(), Some(0 | 1)) && !err.contains("panicked"),
            "round {round}, bytes {changed:x?}: status {:?}, {err}",
            out.status
        );
        if out.status.code() == Some(1) {
            refused += 1;
            assert!(
                sites(&json).iter().any(|s| s["status"] == "refused")
                    || !json["problems"].as_array().unwrap().is_empty(),
                "status 1 names its reason: {json:#}"
            );
        }
        for at in changed {
            file.write_all_at(&original[at as usize..at as usize + 1], at)
                .unwrap();
        }
    }
    // Most changes break a record; if none did, the test changed nothing that is read.
    assert!(refused > 32, "only {refused} of 64 rounds flagged a record");
}
