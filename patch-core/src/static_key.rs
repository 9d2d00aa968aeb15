//! Static keys (jump labels): a branch that costs a 5-byte NOP or a `jmp`, flipped at run time.
//!
//! A branch site starts as a `jmp` to an out-of-line check of the key's flag, so it is correct
//! before any patching and wherever patching is impossible. Once patched it is one NOP (falls
//! through) or one `jmp` to the branch target:
//!
//! | macro                     | falls through (NOP) when | jumps when   | returns           |
//! |---------------------------|--------------------------|--------------|-------------------|
//! | `static_branch_unlikely!` | key disabled             | key enabled  | `key.is_enabled()` |
//! | `static_branch_likely!`   | key enabled              | key disabled | `key.is_enabled()` |
//!
//! [`StaticKey::set`] stores the flag first, then rewrites every site of the key through the
//! engine's writer (the live int3 protocol when threads run), so toggling is safe while other
//! threads execute the sites, before or after `apply_patches()`.

use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

/// A boolean whose branches are patched into the code.
///
/// `#[repr(C)]` with the flag first: the out-of-line check reads it as a byte at the key's address.
#[repr(C)]
pub struct StaticKey {
    enabled: AtomicBool,
}

impl StaticKey {
    /// A key, initially `enabled` or not.
    pub const fn new(enabled: bool) -> StaticKey {
        StaticKey {
            enabled: AtomicBool::new(enabled),
        }
    }

    /// The key's current state.
    #[inline]
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Enables the key: every `static_branch_*!` site of it now takes the enabled path.
    pub fn enable(&'static self) -> KeyUpdate {
        self.set(true)
    }

    /// Disables the key.
    pub fn disable(&'static self) -> KeyUpdate {
        self.set(false)
    }

    /// Sets the key and rewrites its sites; returns what was rewritten. The flag is stored
    /// first, so sites that cannot be rewritten (patching off or denied) still read it.
    #[cold]
    pub fn set(&'static self, enabled: bool) -> KeyUpdate {
        crate::apply::update_key(self, || self.enabled.store(enabled, Ordering::Release))
    }
}

impl fmt::Debug for StaticKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticKey")
            .field("enabled", &self.is_enabled())
            .finish()
    }
}

/// How a branch site relates to its key, in its descriptor.
#[derive(Debug)]
pub struct KeySite {
    /// The key.
    pub key: &'static StaticKey,
    /// `true` for `static_branch_unlikely!` (jump when enabled), `false` for `_likely!`.
    pub jump_when_enabled: bool,
}

impl KeySite {
    /// Index of the candidate the site should hold now: 1 = NOP (fall through), 2 = `jmp`.
    pub fn wanted(&self) -> usize {
        if self.key.is_enabled() == self.jump_when_enabled {
            2
        } else {
            1
        }
    }
}

/// What a [`StaticKey::set`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyUpdate {
    /// Sites of the key in the program.
    pub sites: usize,
    /// Sites rewritten by this update.
    pub written: usize,
    /// Why sites were left reading the flag, if any were.
    pub unpatched: Option<String>,
}

/// The candidate names of every branch site: the out-of-line check, a NOP, a `jmp`.
pub const BRANCH_CANDIDATES: [crate::record::Candidate; 3] = [
    crate::record::Candidate {
        name: "default",
        predicate_text: "check the flag",
        predicate: crate::select::Predicate::Always,
    },
    crate::record::Candidate {
        name: "nop",
        predicate_text: "fall through",
        predicate: crate::select::Predicate::Always,
    },
    crate::record::Candidate {
        name: "jmp",
        predicate_text: "jump",
        predicate: crate::select::Predicate::Always,
    },
];
