//! # altpatch: x86 alternatives for userland Rust
//!
//! Mark hot code with [`alternative`]; that is all. When the program (or a shared library holding
//! sites) is loaded, altpatch inspects the machine (CPUID features, hypervisor, `ALTPATCH`
//! overrides) and rewrites its own machine code so each site runs the best variant at the cost of
//! native code: a direct `call`, the variant's instructions inline, or NOPs. No function-pointer
//! load, no branch per call, and no call in `main` required: a library with sites is patched in
//! every program that uses it, and in its own `cargo test`.
//!
//! ```
//! #[altpatch::alternative(inline, popcnt => asm("popcnt rax, rdi"))]
//! pub fn popcount(x: u64) -> u64 {
//!     // The portable default, run until (and unless) the site is patched.
//!     let mut n = 0;
//!     let mut v = x;
//!     while v != 0 {
//!         v &= v - 1;
//!         n += 1;
//!     }
//!     n
//! }
//!
//! // Already patched at load; apply_patches() is optional and returns the same report.
//! let report = altpatch::apply_patches();
//! assert_eq!(popcount(0b1011), 3);
//! println!("{report}");
//! ```
//!
//! ## Load-time apply
//!
//! Every linked object applies its own sites from an `.init_array` initializer, as the dynamic
//! linker resolves IFUNCs: the executable before `main`, while only one thread exists, and each
//! shared library when it is loaded (a Rust `cdylib` carries its own copy of altpatch and of its
//! records; opened by `dlopen` while threads run, it patches under the live protocol, and a site
//! whose rewrite needs a single thread stays on its default, saying so). The initializer reads
//! `ALTPATCH`/`ALTPATCH_LOG`, the loaded segments and the thread count (glibc's single-thread
//! flag, else `/proc/self/task`), allocates and writes the sites; it prints nothing unless
//! `ALTPATCH_LOG` asks, starts no thread, and no panic leaves it.
//! An object without sites pays nothing. [`apply_patches()`] stays: idempotent, it returns the
//! load-time report ([`applied_report()`] too). `ALTPATCH=off` leaves every site on its default;
//! the `manual-apply` cargo feature removes the initializer, so sites wait for
//! [`apply_patches()`] (or a [`Patcher`]) and a program decides when patching happens.
//! The first apply of a small program costs about 60 µs for one site and 130 µs for 100 on the
//! project's loaded 2-vCPU guest (`benches/README.md`): CPU features are read from the C
//! library's copy of CPUID (no CPUID instruction), the hypervisor leaves only when a predicate
//! asks, the thread count from glibc's single-thread flag, and the common site shapes are
//! verified byte for byte without building the decoder's tables.
//!
//! ## How it works
//!
//! Each call of `popcount` above is compiled to a *site*: `call <default>` padded at build time
//! to the longest candidate, plus a record in the `altpatch_sites_v0_1` linker section. On a CPU with
//! POPCNT, the load-time apply turns
//!
//! ```text
//! e8 xx xx xx xx    call popcount::__altpatch_default_popcount
//! 90                nop
//! ```
//! into
//! ```text
//! f3 48 0f b8 c7    popcnt rax, rdi
//! 90                nop
//! ```
//! after checking (with iced-x86) that the bytes there are exactly what the record promises.
//! Relative operands are relocated, tails are filled with the longest NOP, and while other threads
//! run, the write follows the kernel's int3 + core-serialization protocol. See `ARCHITECTURE.md`.
//!
//! ## The macros
//!
//! * [`#[alternative]`](macro@alternative): a function or method with candidates, patched
//!   through a per-function trampoline (any signature) or, with `inline`, at every call site.
//! * [`alternative_asm!`]: multi-way inline assembly (the kernel's `ALTERNATIVE_2/_3`).
//! * [`static_branch_unlikely!`] / [`static_branch_likely!`] with a [`StaticKey`]: jump labels,
//!   a 5-byte NOP or a `jmp`, flipped at run time with `enable()`/`disable()`, safely while
//!   other threads run the branches. A toggle changes all of a key's sites or none: it returns
//!   a `Result`, and a refused one leaves the key and its branches as they were.
//!
//! ## Overrides: `ALTPATCH`
//!
//! `ALTPATCH` changes what the first apply selects, for tests and operations; it is read once,
//! by the load-time apply (or the first [`apply_patches()`] with `manual-apply`);
//! [`Patcher::overrides_str`] takes the same text for a re-apply.
//!
//! **Syntax.** Items separated by `,`, in any order; whitespace around an item and around its
//! `=` is ignored. There is no quoting: names are identifiers (`::`-joined for sites) and no
//! item holds a `,`, `=` or space (quote the whole value for your shell only). An empty item (a
//! stray `,`) is an error, since it usually means a value went missing.
//!
//! | item | what it does |
//! |---|---|
//! | `off` | selects every site's default. On the first apply nothing needs writing (sites hold their build-time defaults); on a re-apply ([`Patcher`]) a site an earlier apply patched is written back to its default as built where that is safe now (one holding several instructions only when no other thread runs), and otherwise reported as what it still holds. Static branches go back to reading their key's flag. |
//! | `cpu=-FEAT[-FEAT...]` | hides features from the CPU snapshot selection sees (the kernel's `clearcpuid=`); features that depend on one go with it (`-avx` hides `avx2`, `fma`, ...). Repeatable; accumulates. Names as in [`Feature`] (`sse4_2` or `sse4.2`, `lzcnt` or `abm`). `cpu=+FEAT` is an error: forcing a feature on would make the CPU fault. |
//! | `SITE=CANDIDATE` | forces the candidate on the site, ahead of every predicate. `SITE` is a site's full name as the report prints it (`module::function`, or its `name = "..."`), or any suffix of it starting after a `::` that no other site name ends with (`popcount`, `ring::add`). Every site sharing the name (inlined copies, `name = "..."`) takes the choice. Of several choices for one site, the last wins. |
//!
//! **Errors.** A malformed item; an unknown feature, site or candidate; a suffix several site
//! names end with (the error lists them); a static branch (it follows its [`StaticKey`], never
//! `ALTPATCH`); a forced candidate whose predicate needs a CPU feature this CPU lacks or
//! `cpu=-` hides (the error names the features: forced, it would run instructions that fault).
//! Any error rejects the whole value: nothing is selected or written, every site keeps what it
//! runs (at startup, its default). The message names the valid choices; [`apply_patches()`]
//! prints it to stderr once, the report keeps it ([`Report::error`]) and [`try_apply_patches`]
//! returns it. Nothing panics.
//!
//! `ALTPATCH_LOG` set to anything but empty, `0`, `false`, `no` or `off` (any case) prints the
//! report to stderr when the first apply runs (at load, by default).
//!
//! ## The report
//!
//! Every site's entry says what its bytes are after the apply: [`SiteReport::chosen`] is the
//! candidate the site holds (recognised by the planner, as it must before any write) and
//! [`SiteReport::how`] its form (`call`, `jmp`, `inline`, `nop`, or `unpatched`: the default
//! as built; `unknown` for a site refused unrecognised, whose bytes are none of its candidates). When the selected candidate cannot be written (other threads run and the site
//! holds several instructions, a refused page, a configuration error), the entry names what the
//! site still runs and [`SiteReport::why`] says what was selected and why it was not written.

pub use patch_core::cpu::{Cpu, CpuidSource, FakeCpuid, Hypervisor, HypervisorKind, KvmFeatures};
pub use patch_core::overrides::{OverrideError, Overrides};
pub use patch_core::plan::{LiveWrite, Shape};
pub use patch_core::record::SiteKind;
pub use patch_core::write::{FallbackWriter, TextWriter};

/// The writers of x86_64 Linux, for [`Patcher::writer`]. The default is
/// `FallbackWriter::new(MprotectWriter::default(), ProcMemWriter::default())`.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub mod writers {
    pub use patch_core::os::linux::{MprotectWriter, ProcMemWriter};
}
pub use patch_core::{
    Feature, FeatureSet, How, KeyError, KeyUpdate, Patcher, Report, SiteReport, StaticKey,
};
pub use patch_core::{applied_report, apply_patches, try_apply_patches};

/// Makes a function patchable: its body is the portable default, the listed candidates are
/// chosen when the program is loaded (see "Load-time apply").
///
/// **Trampoline mode** (the default) works for any non-generic function or method (methods
/// need [`#[alternative_impl]`](macro@alternative_impl) on their impl block): callers make a
/// direct `call` to a per-function trampoline whose `jmp` is retargeted to the winner. That
/// `call` is made from an `asm!` block, so it is a `call rel32` from other crates too (a Rust
/// call to another crate's function goes through the GOT in a PIE build): arguments and result
/// travel in registers as in call-site mode below, and values of any other type through memory
/// (a pointer to the argument, moved out by the callee; a pointer to the caller's slot for the
/// result). Only a function returning `impl Trait` or `!`, or with more arguments than the six
/// integer registers hold, keeps a Rust call. When the winner's compiled body is short straight-line code through its `ret` (up to
/// the trampoline's 16 bytes: a `popcnt; ret`) and no other thread runs, the trampoline holds a
/// copy of that body instead of the `jmp`, so a call through it costs what a direct call costs.
/// A candidate with another signature is a type error; `#[target_feature]` candidates are fine
/// (their shim gets the features the predicate guarantees).
///
/// ```
/// #[target_feature(enable = "avx2")]
/// fn sum_avx2(xs: &[u32]) -> u64 {
///     xs.iter().map(|&x| u64::from(x)).sum() // compiled with AVX2: vectorized 8 wide
/// }
///
/// #[altpatch::alternative(avx2 => sum_avx2)]
/// fn sum(xs: &[u32]) -> u64 {
///     xs.iter().map(|&x| u64::from(x)).sum()
/// }
///
/// struct Table(Vec<u32>);
/// #[altpatch::alternative_impl]
/// impl Table {
///     #[altpatch::alternative(avx2 => Self::total_avx2)]
///     fn total(&self) -> u64 {
///         sum(&self.0)
///     }
///     #[target_feature(enable = "avx2")]
///     fn total_avx2(&self) -> u64 {
///         sum_avx2(&self.0)
///     }
/// }
///
/// altpatch::apply_patches();
/// assert_eq!(sum(&[1, 2, 3]), 6);
/// assert_eq!(Table(vec![4, 5]).total(), 9);
/// ```
///
/// **Call-site mode** (`inline`) makes every inlined call a site of its own, so a patched call
/// costs exactly a direct call, the native instruction, or nothing. The signature must fit the C
/// ABI in registers: up to six integer, `bool`, raw-pointer or reference arguments (in `rdi`,
/// `rsi`, `rdx`, `rcx`, `r8`, `r9`; a slice or `&str` takes two, pointer and length) and up to
/// eight `f32`/`f64` (in `xmm0`..), returning one of those but a slice (in `rax` or `xmm0`) or
/// `()`. A pointer that `Option` keeps in one register counts as a pointer, argument or result:
/// `&T`, `NonNull<T>`, `Option<&T>`, `Option<NonNull<T>>` (null for `None`);
/// `Option<*const T>` is two registers (return the raw pointer, null for `None`, instead).
/// Each inlined copy is a site (a function called from many places makes many); an
/// `#[inline(never)]` on the function keeps it out of line, one site for every caller, at the
/// cost of a call to reach it.
///
/// ```
/// fn popcount_hw(x: u64) -> u64 {
///     x.count_ones() as u64
/// }
///
/// static EVENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
///
/// #[altpatch::alternative(inline, popcnt => popcount_hw, sse4_2 => asm("popcnt rax, rdi"))]
/// fn popcount(x: u64) -> u64 {
///     (0..64).filter(|i| x >> i & 1 == 1).count() as u64
/// }
///
/// /// A hook that disappears (NOPs) outside virtual machines.
/// #[altpatch::alternative(inline, bare_metal: not(hypervisor) => nop)]
/// fn vm_hook(n: u64) {
///     EVENTS.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
/// }
///
/// altpatch::apply_patches();
/// assert_eq!(popcount(u64::MAX), 64);
/// vm_hook(1);
/// ```
///
/// Candidates, tried in order (the first whose predicate holds wins; the default always holds):
///
/// * `predicate => path`: the function `path`, with the same signature;
/// * `predicate => asm("instr", ...)` (call-site mode): instructions copied into each call site,
///   using the ABI registers above and free to clobber any caller-saved register. One
///   instruction of at most 5 bytes (the call's length; pad a shorter one with `ds` prefixes to
///   exactly 5 to switch back as freely) can be written while other threads run; a longer one,
///   or several, only when no other thread runs, as at a program's start (a thread may be
///   stopped inside the old bytes: see [`LiveWrite`]);
/// * `predicate => nop` (call-site mode, functions returning `()`): nothing at all. The
///   caller's code around the site stays as compiled for a call (the argument in `rdi`, live
///   values in callee-saved registers); a hook that must cost only its NOP when off belongs
///   behind [`static_branch_unlikely!`] (`benches/README.md` measures both).
///
/// Predicates: a feature name ([`Feature`]: `avx2`, `sse4_2`, `popcnt`, ...), `all(..)`,
/// `any(..)`, `not(..)`, `hypervisor` (any), `hypervisor = "kvm"`, `kvm_hints_realtime`,
/// `when = path::to::fn` (a `fn() -> bool`). A candidate is named after its predicate when that
/// is one word, else after its function; name any other `name: predicate => target`. Names are
/// what `ALTPATCH=site=name` and the report use. `name = "..."` sets the site's own name (by
/// default `module::function`), so that several functions can share one `ALTPATCH` choice.
///
/// `crate = path` says where this crate is when it is not `::altpatch` (a renamed dependency,
/// `ap = { package = "altpatch", .. }`, or a re-export from your own crate), as serde's and
/// tracing's macros take it: `#[ap::alternative(crate = ap, avx2 => sum_avx2)]`.
///
/// The function's attributes stay on it. One `#[inline]`, `#[inline(never)]` or
/// `#[inline(always)]` is used as written; without one it gets `#[inline(always)]`, or `#[inline]`
/// when it has `#[target_feature]`, which also compiles the default's body (its callers need
/// the features, as without the macro).
///
/// A panic in the default or a candidate aborts the process: they are reached through
/// `extern "sysv64"` / `extern "C"` functions, which do not unwind.
///
/// Generic functions, methods of generic impls, `async fn`, `const fn`, unsupported signatures
/// and methods outside an `#[alternative_impl]` block are compile errors that say what to do
/// instead.
pub use patch_macros::alternative;

/// Placed on an impl block, expands the [`#[alternative]`](macro@alternative) methods in it:
/// a method's attribute alone sees neither its type nor its trait.
///
/// Each site is named after its type, `module::Type::method` (`ALTPATCH=Type::method=..` picks
/// it), and the generated functions go into an inherent impl of the type, so methods of trait
/// impls work too. Generic impls are refused (each instantiation would need its own site).
/// `crate = path` is passed on to the methods.
///
/// ```
/// pub struct Histogram(Vec<u32>);
///
/// #[altpatch::alternative_impl]
/// impl Histogram {
///     #[altpatch::alternative(inline, popcnt => asm("popcnt rax, rsi"))]
///     pub fn ones(&self, x: u64) -> u64 {
///         u64::from(x.count_ones())
///     }
/// }
///
/// #[altpatch::alternative_impl]
/// impl std::ops::Index<usize> for Histogram {
///     type Output = u32;
///     #[altpatch::alternative(avx2 => Self::bucket)]
///     fn index(&self, i: usize) -> &u32 {
///         &self.0[i]
///     }
/// }
///
/// impl Histogram {
///     fn bucket(&self, i: usize) -> &u32 {
///         &self.0[i]
///     }
/// }
///
/// let report = altpatch::apply_patches();
/// assert!(report.site("Histogram::ones").count() > 0);
/// let h = Histogram(vec![1, 2]);
/// assert_eq!(h.ones(0b111), 3);
/// assert_eq!(h[1], 2);
/// ```
///
/// Without it, `#[alternative]` on a method (a function with a receiver or naming `Self`) is a
/// compile error that asks for it; an associated function that does neither is expanded like a
/// free function, named `module::function`.
pub use patch_macros::alternative_impl;

/// Turns the load-time apply off for the program (or test binary) whose crate root invokes it:
/// its sites run their defaults until it calls [`apply_patches()`] or a [`Patcher`].
///
/// The `manual-apply` cargo feature does the same for every object built with it, and cargo
/// unifies features across a build; this macro is for one binary. Invoke it once, in a binary or
/// test crate, never in a library (it defines the symbol `__altpatch_manual_apply`, which the
/// load-time initializer looks for).
///
/// ```
/// altpatch::manual_apply!();
///
/// fn main() {
///     // ... set things up, then patch when this program decides:
///     altpatch::apply_patches();
/// }
/// ```
#[macro_export]
macro_rules! manual_apply {
    () => {
        #[doc(hidden)]
        #[allow(non_upper_case_globals)]
        #[unsafe(no_mangle)]
        #[used]
        static __altpatch_manual_apply: u8 = 0;
    };
}

/// Multi-way inline assembly, like the kernel's `ALTERNATIVE_2/_3`: the default instructions
/// and candidates with predicates, padded at build time to the longest, operands bound as in
/// `asm!` (named operands only). Use it inside `unsafe`, as `asm!`. (It cannot be called
/// `alternative!`: Rust gives attribute and bang macros one namespace, and
/// [`#[alternative]`](macro@alternative) has the name.)
///
/// ```
/// fn times3(x: u64) -> u64 {
///     let r: u64;
///     // SAFETY: every candidate computes 3x from `x` into `r` and touches nothing else.
///     unsafe {
///         altpatch::alternative_asm!(
///             name = "times3",
///             "imul {r}, {x}, 3",
///             bmi2 => "lea {r}, [{x} + {x}*2]",
///             x = in(reg) x,
///             r = lateout(reg) r,
///             options(pure, nomem, nostack),
///         );
///     }
///     r
/// }
///
/// altpatch::apply_patches();
/// assert_eq!(times3(14), 42);
/// ```
///
/// The default and each candidate are one instruction string or several, as `asm!` takes them
/// (`bmi2 => "lea {r}, [{x} + {x}*2]", "add {r}, 1"`; a list `["..", ".."]` works too).
/// Replacements may contain relative branches, calls and RIP-relative operands: they are
/// relocated when copied into the site. Candidates are named as in [`alternative`](macro@alternative);
/// `name = "..."` names the site and `crate = path` finds this crate under another name, both
/// before the default.
pub use patch_macros::alternative_asm;

#[doc(hidden)]
pub mod __private {
    pub use patch_core::Feature;
    pub use patch_core::cpu::HypervisorKind;
    pub use patch_core::record::{Candidate, SiteDescriptor, records};
    pub use patch_core::select::Predicate;
    pub use patch_core::static_key::{BRANCH_CANDIDATES, KeySite};
    pub use patch_core::{__repl_section as repl_section, __sites_section as sites_section};

    /// Address of the lock word all copies of altpatch in this object share (0 off x86_64 Linux).
    pub fn text_lock_addr() -> usize {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        return patch_core::os::linux::text_lock_addr();
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        return 0;
    }

    /// Traps the live protocol's handler took (0 off x86_64 Linux).
    pub fn traps_handled() -> usize {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        return patch_core::os::linux::traps_handled();
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        return 0;
    }
}

/// `true` when `KEY` is enabled; laid out for the disabled case, which costs one 5-byte NOP.
///
/// ```
/// static TRACE: altpatch::StaticKey = altpatch::StaticKey::new(false);
///
/// fn work(x: u64) -> u64 {
///     if altpatch::static_branch_unlikely!(TRACE) {
///         eprintln!("tracing {x}");
///     }
///     x * 2
/// }
///
/// altpatch::apply_patches();
/// assert_eq!(work(2), 4);
/// // Rewrites the branch into a `jmp`, safely while other threads run it; all of the key's
/// // sites or none (`Err`: the key keeps its state and says why).
/// TRACE.enable().expect("toggled");
/// assert!(altpatch::static_branch_unlikely!(TRACE));
/// TRACE.disable().expect("toggled");
/// ```
///
/// Before patching (and wherever patching is impossible) the site jumps to an out-of-line check
/// of the key's flag, so the result is always the key's state.
#[macro_export]
macro_rules! static_branch_unlikely {
    ($key:path) => {
        $crate::__static_branch!($key, "jne", true)
    };
}

/// `true` when `KEY` is enabled; laid out for the enabled case, which costs one 5-byte NOP.
///
/// ```
/// static FAST_PATH: altpatch::StaticKey = altpatch::StaticKey::new(true);
///
/// altpatch::apply_patches();
/// assert!(altpatch::static_branch_likely!(FAST_PATH));
/// ```
#[macro_export]
macro_rules! static_branch_likely {
    ($key:path) => {
        $crate::__static_branch!($key, "je", false)
    };
}

/// A static branch site. `$jcc` jumps from the out-of-line check to `target` exactly when the
/// patched site would hold a `jmp` (see the table in `patch_core::static_key`).
#[doc(hidden)]
#[macro_export]
macro_rules! __static_branch {
    ($key:path, $jcc:literal, $jump_when_enabled:literal) => {{
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        let enabled = 'altpatch_branch: {
            static __ALTPATCH_SITE: $crate::__private::SiteDescriptor = $crate::__private::SiteDescriptor {
                name: ::core::concat!(::core::module_path!(), "::", ::core::stringify!($key)),
                file: ::core::file!(),
                line: ::core::line!(),
                candidates: &$crate::__private::BRANCH_CANDIDATES,
                key: ::core::option::Option::Some($crate::__private::KeySite {
                    key: &$key,
                    jump_when_enabled: $jump_when_enabled,
                }),
            };
            // SAFETY: the site is a 5-byte `jmp` to a flag check that reads the key's first byte
            // (its `AtomicBool`) and jumps to `target` or back; it touches no stack and no
            // registers but the flags. The record's table: the check, a NOP, a `jmp target`.
            unsafe {
                ::core::arch::asm!(
                    "6500: jmp 6800f",
                    "6599:",
                    ".pushsection .text.altpatch_check,\"ax\"",
                    "6800: cmp byte ptr [rip + {key}], 0",
                    ::core::concat!($jcc, " {target}"),
                    "jmp 6599b",
                    ".popsection",
                    ::core::concat!(".pushsection ", $crate::__private::sites_section!(), ",\"aR\""),
                    ".balign 4",
                    ".long 6500b - .",
                    ".long {desc} - .",
                    ".long 6700f - .",
                    ".byte 6599b - 6500b, {kind}, 3, 1",
                    ".popsection",
                    ::core::concat!(".pushsection ", $crate::__private::repl_section!(), ",\"aR\""),
                    ".balign 4",
                    "6700:",
                    ".long 7000f - .", ".byte 7001f - 7000f, 0, 0, 0",
                    ".long 7002f - .", ".byte 7003f - 7002f, 0, 0, 0",
                    ".long 7004f - .", ".byte 7005f - 7004f, 0, 0, 0",
                    "7000: jmp 6800b",
                    "7001:",
                    "7002:",
                    "7003:",
                    "7004: jmp {target}",
                    "7005:",
                    ".popsection",
                    key = sym $key,
                    desc = sym __ALTPATCH_SITE,
                    kind = const 4,
                    target = label { break 'altpatch_branch $jump_when_enabled },
                    options(nostack),
                );
            }
            !$jump_when_enabled
        };
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        let enabled = $key.is_enabled();
        enabled
    }};
}
