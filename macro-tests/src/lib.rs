//! Sites written as a client crate writes them, compiled with `#![deny(warnings)]` (and
//! `clippy -D warnings` in CI): the generated code must add no warning of its own, whatever the
//! body's form. The facade is a renamed dependency (`ap`), reached through `crate = ap`.
//!
//! The tests in `tests/` are other crates: their calls into these functions are the cross-crate
//! calls that must be direct.
#![deny(warnings)]

use std::ptr::NonNull;

/// What a candidate adds, so that a result tells which ran.
pub const MARK: u64 = 1000;

pub fn plus_mark(x: u64) -> u64 {
    x.wrapping_add(MARK)
}

/// Trampoline mode with a register signature: callers in other crates `call` the trampoline
/// directly.
#[ap::alternative(crate = ap, popcnt => plus_mark)]
pub fn through_trampoline(x: u64) -> u64 {
    x
}

/// Call-site mode, the default's `match` and early return.
#[ap::alternative(crate = ap, inline, popcnt => plus_mark)]
pub fn classify(x: u64) -> u64 {
    if x == 0 {
        return 7;
    }
    match x % 3 {
        0 => x,
        1 => x + 1,
        _ => x + 2,
    }
}

#[derive(Debug, PartialEq, Eq, Clone)]
pub struct Point {
    pub x: u64,
    pub y: u64,
}

fn point_mark(x: u64) -> Point {
    Point { x, y: MARK }
}

/// A body that is one struct literal, in trampoline mode (`Point` is returned through memory).
#[ap::alternative(crate = ap, popcnt => point_mark)]
pub fn make_point(x: u64) -> Point {
    Point { x, y: 0 }
}

/// # Safety
/// `p` points at a readable `u64`.
pub unsafe fn read_mark(p: *const u64) -> u64 {
    // SAFETY: as the caller promised.
    unsafe { *p + MARK }
}

/// An `unsafe fn` whose body is an `unsafe` block.
///
/// # Safety
/// `p` points at a readable `u64`.
#[ap::alternative(crate = ap, inline, popcnt => read_mark)]
pub unsafe fn read(p: *const u64) -> u64 {
    // SAFETY: as the caller promised.
    unsafe { *p }
}

macro_rules! typed_site {
    ($name:ident, $t:ty) => {
        /// Call-site mode over types that arrive as `$t:ty` fragments.
        #[ap::alternative(crate = ap, inline, popcnt => asm("lea rax, [rdi + 1]"))]
        pub fn $name(x: $t) -> $t {
            x + 1
        }
    };
}
typed_site!(next_usize, usize);

fn first_or_none(xs: &[u64]) -> Option<&u64> {
    xs.get(1)
}

/// Call-site mode returning `Option<&T>`: one register, null for `None`.
#[ap::alternative(crate = ap, inline, popcnt => first_or_none)]
pub fn first(xs: &[u64]) -> Option<&u64> {
    xs.first()
}

fn never(_p: *mut u8) -> Option<NonNull<u8>> {
    None
}

/// Call-site mode returning `Option<NonNull<T>>`.
#[ap::alternative(crate = ap, inline, popcnt => never)]
pub fn non_null(p: *mut u8) -> Option<NonNull<u8>> {
    NonNull::new(p)
}

#[target_feature(enable = "popcnt")]
fn ones_hw(x: u64) -> u64 {
    u64::from(x.count_ones()) + MARK
}

/// A default compiled with `#[target_feature]`: its callers need the feature, as without the
/// macro, and the wrapper is `#[inline]` rather than `#[inline(always)]`.
#[ap::alternative(crate = ap, inline, popcnt => ones_hw)]
#[target_feature(enable = "popcnt")]
pub fn ones(x: u64) -> u64 {
    u64::from(x.count_ones())
}

/// `#[inline(never)]` is kept: one out-of-line function, so one call site whatever the callers.
#[ap::alternative(crate = ap, inline, popcnt => plus_mark)]
#[inline(never)]
pub fn not_inlined(x: u64) -> u64 {
    x
}

/// Several instruction strings per candidate, as `asm!` takes them.
pub fn times3(x: u64) -> u64 {
    let r: u64;
    // SAFETY: every candidate computes 3x (+ a mark) from `x` into `r`, touching nothing else.
    unsafe {
        ap::alternative_asm!(
            crate = ap,
            name = "times3",
            "mov {r}, {x}",
            "imul {r}, {r}, 3",
            popcnt => "lea {r}, [{x} + {x}*2]", "add {r}, 1000",
            x = in(reg) x,
            r = out(reg) r,
            options(pure, nomem, nostack),
        );
    }
    r
}

pub struct Histogram {
    pub buckets: Vec<u64>,
}

pub struct Counter {
    pub count: u64,
}

#[ap::alternative_impl(crate = ap)]
impl Histogram {
    /// Named `altpatch_macro_tests::Histogram::add`.
    #[ap::alternative(inline, popcnt => Self::add_marked)]
    pub fn add(&mut self, x: u64) -> u64 {
        self.buckets.push(x);
        self.buckets.len() as u64
    }

    fn add_marked(&mut self, x: u64) -> u64 {
        self.buckets.push(x);
        self.buckets.len() as u64 + MARK
    }

    /// Returns a struct through memory: a trampoline with a Rust call.
    #[ap::alternative(popcnt => Self::summary_marked)]
    pub fn summary(&self) -> Point {
        Point {
            x: self.buckets.len() as u64,
            y: 0,
        }
    }

    fn summary_marked(&self) -> Point {
        Point {
            x: self.buckets.len() as u64,
            y: MARK,
        }
    }
}

#[ap::alternative_impl(crate = ap)]
impl Counter {
    /// Named `altpatch_macro_tests::Counter::add`, a site of its own.
    #[ap::alternative(popcnt => Self::add_twice)]
    pub fn add(&mut self, x: u64) -> u64 {
        self.count += x;
        self.count
    }

    fn add_twice(&mut self, x: u64) -> u64 {
        self.count += 2 * x;
        self.count
    }
}

pub trait Total {
    fn total(&self) -> u64;
}

fn total_marked(h: &Histogram) -> u64 {
    h.buckets.iter().sum::<u64>() + MARK
}

#[ap::alternative_impl(crate = ap)]
impl Total for Histogram {
    /// A trait-impl method.
    #[ap::alternative(popcnt => total_marked)]
    fn total(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

fn count_bytes(s: &str, needle: Option<&u8>) -> usize {
    needle.map_or(0, |n| s.bytes().filter(|b| b == n).count()) + MARK as usize
}

/// `&str` and `Option<&T>` arguments travel in registers: call-site mode, and a trampoline its
/// callers in other crates `call` directly.
#[ap::alternative(crate = ap, popcnt => count_bytes)]
pub fn count(s: &str, needle: Option<&u8>) -> usize {
    needle.map_or(0, |n| s.bytes().filter(|b| b == n).count())
}

fn pointer_mark(p: NonNull<u64>, q: Option<NonNull<u64>>) -> u64 {
    // SAFETY: as `pointers`' callers promise.
    unsafe { *p.as_ptr() + q.map_or(0, |q| *q.as_ptr()) + MARK }
}

/// # Safety
/// `p` and `q` (if any) point at readable `u64`s.
#[ap::alternative(crate = ap, inline, popcnt => pointer_mark)]
pub unsafe fn pointers(p: NonNull<u64>, q: Option<NonNull<u64>>) -> u64 {
    // SAFETY: as the caller promised.
    unsafe { *p.as_ptr() + q.map_or(0, |q| *q.as_ptr()) }
}

fn describe_marked(p: &Point) -> String {
    format!("{}:{}+{MARK}", p.x, p.y)
}

/// An `unsafe fn` with a safe candidate, in trampoline mode with a Rust call (a `String` comes
/// back through memory).
///
/// # Safety
/// None needed; `unsafe` as a client may write it.
#[ap::alternative(crate = ap, popcnt => describe_marked)]
pub unsafe fn describe(p: &Point) -> String {
    format!("{}:{}", p.x, p.y)
}

fn joined_marked(mut parts: Vec<String>, sep: char) -> String {
    parts.push(MARK.to_string());
    parts.join(&sep.to_string())
}

/// Owned values in and out (`Vec`, `char`, `String`): a trampoline its callers in other crates
/// still `call` directly, the values passing through memory. `mut` on an argument is the body's.
#[ap::alternative(crate = ap, popcnt => joined_marked)]
pub fn joined(mut parts: Vec<String>, sep: char) -> String {
    parts.retain(|p| !p.is_empty());
    parts.join(&sep.to_string())
}

/// Drops counted, to show a value passed through memory is dropped exactly once.
pub static DROPS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub struct Tracked(pub u64);

impl Drop for Tracked {
    fn drop(&mut self) {
        DROPS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[ap::alternative_impl(crate = ap)]
impl Tracked {
    /// `self` by value, consumed by whichever candidate runs.
    #[ap::alternative(popcnt => Self::into_marked)]
    pub fn into_value(self) -> u64 {
        self.0
    }

    fn into_marked(self) -> u64 {
        self.0 + MARK
    }
}

/// A `#[target_feature]` default in trampoline mode, kept out of line by the user.
#[ap::alternative(crate = ap, popcnt => ones_hw)]
#[target_feature(enable = "popcnt")]
#[inline(never)]
pub fn ones_tramp(x: u64) -> u64 {
    u64::from(x.count_ones())
}

pub trait Scale {
    fn scale(&self, x: u64) -> u64;
}

fn scale_marked(h: &Histogram, x: u64) -> u64 {
    x * h.buckets.len() as u64 + MARK
}

#[ap::alternative_impl(crate = ap)]
impl Scale for Histogram {
    /// A trait-impl method in call-site mode.
    #[ap::alternative(inline, popcnt => scale_marked)]
    fn scale(&self, x: u64) -> u64 {
        x * self.buckets.len() as u64
    }
}
