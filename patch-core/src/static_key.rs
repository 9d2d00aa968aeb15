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
//! [`StaticKey::set`] changes a key's sites as one: it plans every site for the new state, writes
//! them as one batch (the live int3 protocol when threads run), and stores the flag only once
//! every site holds its new bytes. If any site cannot be written, none is (the batch is refused
//! before its first byte, or put back if a write fails half-way), the flag keeps its old value,
//! and `set` returns a [`KeyError`]. Either way, when `set` returns, every site agrees with
//! [`StaticKey::is_enabled`]: a site never patched reads the flag, a patched one holds the NOP or
//! `jmp` of the flag's value.

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

    /// The key's current state. Async-signal-safe (one atomic load).
    #[inline]
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Enables the key: every `static_branch_*!` site of it now takes the enabled path.
    pub fn enable(&'static self) -> Result<KeyUpdate, KeyError> {
        self.set(true)
    }

    /// Disables the key.
    pub fn disable(&'static self) -> Result<KeyUpdate, KeyError> {
        self.set(false)
    }

    /// Sets the key and rewrites its sites, all or none.
    ///
    /// `Ok`: the flag is `enabled` and every site of the key agrees with it (rewritten, already
    /// right, or reading the flag where this process does not patch; see [`KeyUpdate`]).
    /// `Err`: nothing was written and the key keeps its old state, which every site agrees with;
    /// the error says why (a site that cannot be rewritten now, a sandbox that refuses the writes
    /// or the cross-core serialization, or a re-entered call).
    ///
    /// The outcome is a `Result`, not a report to be read: a refused toggle is a state the caller
    /// must handle (retry later, fall back, log), and `?`, `expect` and the `must_use` lint make
    /// sure it is seen. A caller for whom a refused toggle is acceptable writes `.ok()`.
    ///
    /// Whether sites are patched at all is what the program's startup decided: the first of
    /// `apply_patches()` and the first `set` reads `ALTPATCH` (and the build features) once, and
    /// both keep that decision for the life of the process; changing `ALTPATCH` later changes
    /// nothing. `set` before `apply_patches()` is fine: it patches the key's sites then.
    ///
    /// Not async-signal-safe: it allocates and takes the patcher lock. Called from a signal handler
    /// that interrupted `set` (or an apply) on the same thread, it returns
    /// [`KeyError::Reentered`] at once, with nothing changed, rather than deadlocking. A
    /// `fork()` while another thread toggles waits for that toggle to finish, so the child can
    /// toggle too.
    #[cold]
    pub fn set(&'static self, enabled: bool) -> Result<KeyUpdate, KeyError> {
        crate::apply::update_key(self, enabled)
    }

    /// Stores the flag; the patcher calls this once the key's sites hold their new bytes.
    pub(crate) fn store(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Release);
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
        self.wanted_for(self.key.is_enabled())
    }

    /// Index of the candidate the site should hold when its key is `enabled`.
    pub fn wanted_for(&self, enabled: bool) -> usize {
        if enabled == self.jump_when_enabled {
            2
        } else {
            1
        }
    }
}

/// What a successful [`StaticKey::set`] did. Every site of the key agrees with the flag.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyUpdate {
    /// Sites of the key in the program.
    pub sites: usize,
    /// Sites rewritten by this update (the others already held the right bytes).
    pub written: usize,
    /// Why the key's sites read the flag instead of being patched (this process does not patch:
    /// `ALTPATCH=off` at startup, a configuration error, the `force-unpatched` feature, another
    /// platform); `None` when they are patched.
    pub unpatched: Option<String>,
}

/// Why a [`StaticKey::set`] changed nothing: the key keeps its old state and every site still
/// agrees with it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// Called on a thread that is already inside `set` or an apply (from a signal handler that
    /// interrupted it). Waiting would deadlock.
    Reentered,
    /// A site of the key cannot be rewritten now, so none is.
    NotWritten {
        /// Sites of the key in the program.
        sites: usize,
        /// Why (the first site's reason; the writer's error, the refusal of a live batch, ...).
        why: String,
    },
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Reentered => f.write_str(
                "StaticKey::set re-entered on a thread already patching (from a signal handler?); \
                 the key keeps its state",
            ),
            KeyError::NotWritten { sites, why } => write!(
                f,
                "none of the key's {sites} sites were rewritten and the key keeps its state: {why}"
            ),
        }
    }
}

impl std::error::Error for KeyError {}

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
