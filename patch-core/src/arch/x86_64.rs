//! x86_64: the breakpoint byte, core serialization, and moving a trapped thread past a site.

use crate::plan::Shape;

/// The `int3` opcode the live protocol writes over a site's first byte.
pub const INT3: u8 = 0xcc;

/// Serializes this core's instruction stream (so it fetches freshly written code).
#[inline]
pub fn serialize_local() {
    // CPUID is architecturally serializing on every x86_64 CPU (SERIALIZE is newer and optional).
    // SAFETY: CPUID leaf 0 has no side effects; rbx is saved and restored because LLVM reserves it.
    unsafe {
        core::arch::asm!(
            "mov {tmp}, rbx",
            "cpuid",
            "mov rbx, {tmp}",
            tmp = out(reg) _,
            inout("eax") 0u32 => _,
            inout("ecx") 0u32 => _,
            out("edx") _,
            options(nostack, preserves_flags),
        );
    }
}

/// The registers a trap handler may change to resume a thread elsewhere.
pub struct Resume<'a> {
    /// The interrupted instruction pointer (after the `int3`).
    pub rip: &'a mut u64,
    /// The interrupted stack pointer.
    pub rsp: &'a mut u64,
}

/// Moves a thread that trapped on the `int3` at `site` (of `len` bytes, about to become `shape`)
/// to where executing the new bytes would take it, as the kernel's `int3_emulate_*` do.
///
/// Returns `false` for [`Shape::Inline`]: several instructions cannot be emulated here, and the
/// caller waits for the write to finish instead.
///
/// # Safety
/// `resume` must be the trapped thread's saved registers, and for [`Shape::Call`] its stack must
/// have 8 writable bytes below `rsp` that hold nothing live. Call sites are `asm!` blocks without
/// `nostack`, so the compiler keeps nothing in the red zone across them.
pub unsafe fn emulate(site: u64, len: u64, shape: Shape, resume: Resume<'_>) -> bool {
    match shape {
        Shape::Call { target } => {
            // The filler after the call is NOPs: returning to the site's end is equivalent.
            let sp = *resume.rsp - 8;
            // SAFETY: the caller guarantees the slot below the stack pointer is free.
            unsafe { (sp as *mut u64).write(site + len) };
            *resume.rsp = sp;
            *resume.rip = target;
        }
        Shape::Jump { target } => *resume.rip = target,
        Shape::Nop => *resume.rip = site + len,
        Shape::Inline { .. } => return false,
    }
    true
}
