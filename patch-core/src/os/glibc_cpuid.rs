//! CPUID leaves the C library already read at startup, so detection need not issue them again.
//!
//! glibc (2.33 and later) reads CPUID once in the dynamic loader and exports the raw registers of
//! leaves 1, 7 and 0x8000_0001 through `__x86_get_cpuid_feature_leaf` (`<sys/platform/x86.h>`).
//! In a VM guest every CPUID instruction exits to the hypervisor (about 7 µs on this project's
//! KVM guest), so reading glibc's copy saves those exits. The function is a weak reference read
//! through the GOT, which the dynamic linker filled while relocating the object (`dlsym` cost
//! 2-10 µs at load): an older glibc, musl or a static binary without it leaves it null, and
//! every leaf then comes from the instruction. (`AT_HWCAP` on x86_64 holds only leaf 1 EDX, none of whose bits
//! [`Feature`](crate::Feature) selects on, so the auxiliary vector adds nothing here.)

use crate::cpu::{CpuidSource, NativeCpuid};

/// `struct cpuid_feature` of `<bits/platform/x86.h>`.
#[repr(C)]
struct CpuidFeature {
    cpuid_array: [u32; 4],
    active_array: [u32; 4],
}

/// `CPUID_INDEX_1`, `CPUID_INDEX_7`, `CPUID_INDEX_80000001` and the leaves they hold.
const GLIBC_LEAVES: [(u32, u32); 3] = [(0, 1), (1, 7), (2, 0x8000_0001)];

type GetLeaf = unsafe extern "C" fn(u32) -> *const CpuidFeature;

/// Leaves 1, 7 (subleaf 0) and 0x8000_0001 from glibc where it has them; the CPUID instruction
/// for everything else.
#[derive(Clone, Copy, Debug, Default)]
pub struct GlibcCpuid {
    /// `[leaf 1, leaf 7, leaf 0x8000_0001]`, or `None` without glibc's function.
    leaves: Option<[[u32; 4]; 3]>,
}

impl GlibcCpuid {
    /// Reads glibc's copies (no CPUID instruction).
    pub fn new() -> GlibcCpuid {
        let found = crate::os::weak_symbol_address!("__x86_get_cpuid_feature_leaf");
        if found == 0 {
            return GlibcCpuid { leaves: None };
        }
        // SAFETY: non-null, it is glibc's function, declared
        // `const struct cpuid_feature *(unsigned int)`.
        let get: GetLeaf = unsafe { core::mem::transmute::<usize, GetLeaf>(found) };
        let mut leaves = [[0; 4]; 3];
        for (out, (index, _)) in leaves.iter_mut().zip(GLIBC_LEAVES) {
            // SAFETY: any index is valid (glibc answers a zeroed entry past its table); the
            // result points into glibc's read-only CPU data, alive for the whole process.
            let feature = unsafe { get(index) };
            if feature.is_null() {
                return GlibcCpuid { leaves: None };
            }
            // SAFETY: non-null, so it points at a `struct cpuid_feature` (see above).
            *out = unsafe { (*feature).cpuid_array };
        }
        // A zero leaf 1 means glibc did not fill its table: trust the instruction instead.
        if leaves[0] == [0; 4] {
            return GlibcCpuid { leaves: None };
        }
        GlibcCpuid {
            leaves: Some(leaves),
        }
    }

    /// Whether glibc's copies are used.
    pub fn from_glibc(&self) -> bool {
        self.leaves.is_some()
    }
}

impl CpuidSource for GlibcCpuid {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let cached = GLIBC_LEAVES
            .iter()
            .position(|&(_, l)| l == leaf && subleaf == 0);
        if let (Some(leaves), Some(i)) = (&self.leaves, cached) {
            return leaves[i];
        }
        NativeCpuid.cpuid(leaf, subleaf)
    }

    fn xcr0(&self) -> Option<u64> {
        match &self.leaves {
            // Leaf 1 non-zero: the CPU has it; OSXSAVE (ECX bit 27) guards XGETBV.
            Some(leaves) if leaves[0][2] & (1 << 27) != 0 => NativeCpuid::xgetbv0(),
            Some(_) => None,
            None => NativeCpuid.xcr0(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_leaves_are_the_instructions_leaves() {
        let glibc = GlibcCpuid::new();
        // The weak reference finds the function wherever the dynamic linker knows it.
        // SAFETY: `dlsym` with RTLD_DEFAULT and a NUL-terminated name only looks the symbol up.
        let known =
            unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"__x86_get_cpuid_feature_leaf".as_ptr()) };
        assert_eq!(glibc.from_glibc(), !known.is_null());
        // The test runs on glibc >= 2.33 here; elsewhere the source falls back to CPUID.
        for (_, leaf) in GLIBC_LEAVES {
            let native = NativeCpuid.cpuid(leaf, 0);
            let cached = glibc.cpuid(leaf, 0);
            // EBX of leaf 1 holds the APIC id of the CPU that read it; the rest must agree.
            let mask = if leaf == 1 {
                [!0, 0xffff, !0, !0]
            } else {
                [!0; 4]
            };
            for r in 0..4 {
                assert_eq!(
                    native[r] & mask[r],
                    cached[r] & mask[r],
                    "leaf {leaf:#x} reg {r}"
                );
            }
        }
        assert_eq!(glibc.xcr0(), NativeCpuid.xcr0());
    }
}
