//! CPU detection: one snapshot of the CPUID state and the OS's XSAVE support, taken at startup.
//!
//! Every CPUID read goes through a [`CpuidSource`], so [`FakeCpuid`] can stand in for the real
//! instruction in tests. Feature leaves are decoded with `raw-cpuid`; the few things it does not
//! cover (leaf 7 EDX, the hypervisor leaf scan) are read from the raw leaves here.

use core::fmt;
use std::collections::BTreeMap;

use raw_cpuid::{
    CpuId, CpuIdReader, CpuIdResult, ExtendedFeatures, ExtendedProcessorFeatureIdentifiers,
    FeatureInfo,
};

use crate::{Feature, FeatureSet};

/// Where CPUID answers come from: the real instruction, or a fake for tests.
pub trait CpuidSource {
    /// CPUID leaf/subleaf as `[eax, ebx, ecx, edx]`.
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// XCR0 as read by `XGETBV(0)`; `None` when the OS did not enable XSAVE (OSXSAVE clear) or off x86.
    fn xcr0(&self) -> Option<u64>;
}

const EAX: usize = 0;
const EBX: usize = 1;
const ECX: usize = 2;
const EDX: usize = 3;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// XCR0 bits 1 and 2: SSE and AVX (YMM upper halves) state.
const XCR0_AVX: u64 = 0b110;
/// XCR0 bits 5, 6, 7: opmask, ZMM_Hi256 and Hi16_ZMM state, on top of [`XCR0_AVX`].
const XCR0_AVX512: u64 = XCR0_AVX | 0b1110_0000;
const HV_FIRST_BASE: u32 = 0x4000_0000;
const HV_LAST_BASE: u32 = 0x4001_0000;
const KVM_SIGNATURE: [u8; 12] = *b"KVMKVMKVM\0\0\0";

/// The real CPUID instruction (all zeros and no XCR0 on targets other than x86_64).
#[derive(Clone, Copy, Debug, Default)]
pub struct NativeCpuid;

impl CpuidSource for NativeCpuid {
    #[cfg(target_arch = "x86_64")]
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn cpuid(&self, _leaf: u32, _subleaf: u32) -> [u32; 4] {
        [0; 4]
    }

    #[cfg(target_arch = "x86_64")]
    fn xcr0(&self) -> Option<u64> {
        if self.cpuid(0, 0)[EAX] < 1 || self.cpuid(1, 0)[ECX] & LEAF1_ECX_OSXSAVE == 0 {
            return None;
        }
        let (eax, edx): (u32, u32);
        // SAFETY: CPUID.1:ECX.OSXSAVE is set, so the OS enabled CR4.OSXSAVE and XGETBV with
        // ECX = 0 is valid at any privilege level; it only writes EAX and EDX.
        unsafe {
            core::arch::asm!(
                "xgetbv",
                in("ecx") 0u32,
                out("eax") eax,
                out("edx") edx,
                options(nomem, nostack, preserves_flags),
            );
        }
        Some(u64::from(edx) << 32 | u64::from(eax))
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn xcr0(&self) -> Option<u64> {
        None
    }
}

/// A table of CPUID leaves, for tests. Unlisted leaves read as zeros.
///
/// `FakeCpuid::default()` is an empty table (max leaf 0, no XCR0); [`FakeCpuid::new`] is the usual
/// starting point.
#[derive(Clone, Debug, Default)]
pub struct FakeCpuid {
    leaves: BTreeMap<(u32, u32), [u32; 4]>,
    xcr0: Option<u64>,
}

impl FakeCpuid {
    /// A "GenuineIntel" CPU with basic leaves up to 0xd and extended leaves up to 0x8000_0008, no
    /// features, and XCR0 with x87, SSE, AVX, opmask and ZMM state enabled.
    pub fn new() -> Self {
        let [b, d, c] = vendor_regs(b"GenuineIntel");
        FakeCpuid::default()
            .with_leaf(0, 0, [0xd, b, c, d])
            .with_leaf(0x8000_0000, 0, [0x8000_0008, 0, 0, 0])
            .with_xcr0(Some(1 | XCR0_AVX512))
    }

    /// Sets the CPUID bits that make detection report `features` (and OSXSAVE when any of them
    /// needs OS-enabled AVX state). Bits already set stay set.
    #[must_use]
    pub fn with_features(mut self, features: FeatureSet) -> Self {
        for feature in features.iter() {
            let (leaf, subleaf, reg, bit) = cpuid_bit(feature);
            self.set_bit(leaf, subleaf, reg, bit);
            if os_state_needed(feature) != 0 {
                self.set_bit(1, 0, ECX, 27);
            }
        }
        self
    }

    /// Sets one leaf's registers `[eax, ebx, ecx, edx]` outright.
    #[must_use]
    pub fn with_leaf(mut self, leaf: u32, subleaf: u32, regs: [u32; 4]) -> Self {
        self.leaves.insert((leaf, subleaf), regs);
        self
    }

    /// Sets what `XGETBV(0)` returns.
    #[must_use]
    pub fn with_xcr0(mut self, xcr0: Option<u64>) -> Self {
        self.xcr0 = xcr0;
        self
    }

    /// Sets the hypervisor bit (leaf 1 ECX\[31\]) and a vendor leaf at `base` with max leaf `base + 1`.
    #[must_use]
    pub fn with_hypervisor(mut self, signature: &[u8; 12], base: u32) -> Self {
        self.set_bit(1, 0, ECX, 31);
        let [b, c, d] = vendor_regs(signature);
        self.with_leaf(base, 0, [base + 1, b, c, d])
    }

    /// A KVM signature at `base`, and leaf `base + 1` with `features_eax` and `hints_edx`.
    #[must_use]
    pub fn with_kvm(self, base: u32, features_eax: u32, hints_edx: u32) -> Self {
        self.with_hypervisor(&KVM_SIGNATURE, base).with_leaf(
            base + 1,
            0,
            [features_eax, 0, 0, hints_edx],
        )
    }

    fn set_bit(&mut self, leaf: u32, subleaf: u32, reg: usize, bit: u32) {
        self.leaves.entry((leaf, subleaf)).or_default()[reg] |= 1 << bit;
    }
}

impl CpuidSource for FakeCpuid {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        self.leaves
            .get(&(leaf, subleaf))
            .copied()
            .unwrap_or_default()
    }

    fn xcr0(&self) -> Option<u64> {
        self.xcr0
    }
}

/// Splits a 12-byte string into three little-endian register values, in order.
fn vendor_regs(s: &[u8; 12]) -> [u32; 3] {
    core::array::from_fn(|i| {
        u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]])
    })
}

/// Where each feature's bit lives: (leaf, subleaf, register index, bit). Used by [`FakeCpuid`];
/// detection decodes the same bits through `raw-cpuid`, so the round-trip tests check both.
const fn cpuid_bit(feature: Feature) -> (u32, u32, usize, u32) {
    match feature {
        Feature::Sse3 => (1, 0, ECX, 0),
        Feature::Pclmulqdq => (1, 0, ECX, 1),
        Feature::Ssse3 => (1, 0, ECX, 9),
        Feature::Fma => (1, 0, ECX, 12),
        Feature::Cmpxchg16b => (1, 0, ECX, 13),
        Feature::Sse4_1 => (1, 0, ECX, 19),
        Feature::Sse4_2 => (1, 0, ECX, 20),
        Feature::Movbe => (1, 0, ECX, 22),
        Feature::Popcnt => (1, 0, ECX, 23),
        Feature::Aes => (1, 0, ECX, 25),
        Feature::Xsave => (1, 0, ECX, 26),
        Feature::Avx => (1, 0, ECX, 28),
        Feature::F16c => (1, 0, ECX, 29),
        Feature::Rdrand => (1, 0, ECX, 30),
        Feature::Bmi1 => (7, 0, EBX, 3),
        Feature::Avx2 => (7, 0, EBX, 5),
        Feature::Bmi2 => (7, 0, EBX, 8),
        Feature::Erms => (7, 0, EBX, 9),
        Feature::Avx512f => (7, 0, EBX, 16),
        Feature::Avx512dq => (7, 0, EBX, 17),
        Feature::Rdseed => (7, 0, EBX, 18),
        Feature::Adx => (7, 0, EBX, 19),
        Feature::Clflushopt => (7, 0, EBX, 23),
        Feature::Clwb => (7, 0, EBX, 24),
        Feature::Avx512cd => (7, 0, EBX, 28),
        Feature::Sha => (7, 0, EBX, 29),
        Feature::Avx512bw => (7, 0, EBX, 30),
        Feature::Avx512vl => (7, 0, EBX, 31),
        Feature::Fsrm => (7, 0, EDX, 4),
        Feature::Lzcnt => (0x8000_0001, 0, ECX, 5),
        Feature::Rdtscp => (0x8000_0001, 0, EDX, 27),
    }
}

/// The XCR0 bits the OS must have enabled for `feature` to be usable (0: none).
const fn os_state_needed(feature: Feature) -> u64 {
    match feature {
        Feature::Avx | Feature::Avx2 | Feature::Fma | Feature::F16c => XCR0_AVX,
        Feature::Avx512f
        | Feature::Avx512dq
        | Feature::Avx512cd
        | Feature::Avx512bw
        | Feature::Avx512vl => XCR0_AVX512,
        _ => 0,
    }
}

/// `(feature, what it requires)`: clearing the requirement clears the feature too (transitively).
const DEPENDS: &[(Feature, Feature)] = &[
    (Feature::Avx, Feature::Xsave),
    (Feature::Avx2, Feature::Avx),
    (Feature::Fma, Feature::Avx),
    (Feature::F16c, Feature::Avx),
    (Feature::Avx512f, Feature::Avx),
    (Feature::Avx512dq, Feature::Avx512f),
    (Feature::Avx512cd, Feature::Avx512f),
    (Feature::Avx512bw, Feature::Avx512f),
    (Feature::Avx512vl, Feature::Avx512f),
];

/// A hypervisor family, recognised by its CPUID signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HypervisorKind {
    /// Linux KVM (`"KVMKVMKVM\0\0\0"`).
    Kvm,
    /// Xen (`"XenVMMXenVMM"`).
    Xen,
    /// VMware (`"VMwareVMware"`).
    VMware,
    /// Microsoft Hyper-V, or another hypervisor's Hyper-V enlightenments (`"Microsoft Hv"`).
    HyperV,
    /// FreeBSD bhyve (`"bhyve bhyve "`).
    Bhyve,
    /// QEMU's TCG emulator (`"TCGTCGTCGTCG"`).
    Qemu,
    /// ACRN (`"ACRNACRNACRN"`).
    Acrn,
    /// An unrecognised signature.
    Other,
}

impl HypervisorKind {
    /// Every kind, in declaration order.
    pub const ALL: &'static [HypervisorKind] = &[
        HypervisorKind::Kvm,
        HypervisorKind::Xen,
        HypervisorKind::VMware,
        HypervisorKind::HyperV,
        HypervisorKind::Bhyve,
        HypervisorKind::Qemu,
        HypervisorKind::Acrn,
        HypervisorKind::Other,
    ];

    /// The lowercase name (`"kvm"`, `"hyperv"`).
    pub const fn name(self) -> &'static str {
        match self {
            HypervisorKind::Kvm => "kvm",
            HypervisorKind::Xen => "xen",
            HypervisorKind::VMware => "vmware",
            HypervisorKind::HyperV => "hyperv",
            HypervisorKind::Bhyve => "bhyve",
            HypervisorKind::Qemu => "qemu",
            HypervisorKind::Acrn => "acrn",
            HypervisorKind::Other => "other",
        }
    }

    /// Looks a kind up by name, ASCII case-insensitively; `"hyper-v"` is accepted too.
    pub fn from_name(name: &str) -> Option<HypervisorKind> {
        let name = name.trim();
        if name.eq_ignore_ascii_case("hyper-v") {
            return Some(HypervisorKind::HyperV);
        }
        HypervisorKind::ALL
            .iter()
            .copied()
            .find(|k| name.eq_ignore_ascii_case(k.name()))
    }

    /// The kind a 12-byte vendor signature names.
    fn from_signature(signature: &[u8; 12]) -> HypervisorKind {
        match signature {
            b"KVMKVMKVM\0\0\0" => HypervisorKind::Kvm,
            b"XenVMMXenVMM" => HypervisorKind::Xen,
            b"VMwareVMware" => HypervisorKind::VMware,
            b"Microsoft Hv" => HypervisorKind::HyperV,
            b"bhyve bhyve " => HypervisorKind::Bhyve,
            b"TCGTCGTCGTCG" => HypervisorKind::Qemu,
            b"ACRNACRNACRN" => HypervisorKind::Acrn,
            _ => HypervisorKind::Other,
        }
    }
}

impl fmt::Display for HypervisorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// KVM's paravirt feature leaf (`base + 1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KvmFeatures {
    /// `KVM_FEATURE_PV_UNHALT` (EAX bit 7): paravirt spinlock kick.
    pub pv_unhalt: bool,
    /// `KVM_FEATURE_STEAL_TIME` (EAX bit 5).
    pub steal_time: bool,
    /// `KVM_HINTS_REALTIME` (EDX bit 0): vCPUs are never preempted.
    pub hints_realtime: bool,
    /// The whole EAX (feature bits).
    pub raw_features: u32,
    /// The whole EDX (hint bits).
    pub raw_hints: u32,
}

impl KvmFeatures {
    /// Decodes EAX (features) and EDX (hints) of the KVM feature leaf.
    pub const fn from_regs(features_eax: u32, hints_edx: u32) -> KvmFeatures {
        KvmFeatures {
            pv_unhalt: features_eax & (1 << 7) != 0,
            steal_time: features_eax & (1 << 5) != 0,
            hints_realtime: hints_edx & 1 != 0,
            raw_features: features_eax,
            raw_hints: hints_edx,
        }
    }
}

/// The hypervisor the program runs under, as its CPUID leaves describe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hypervisor {
    /// Which hypervisor.
    pub kind: HypervisorKind,
    /// The raw signature from EBX, ECX, EDX of the vendor leaf.
    pub signature: [u8; 12],
    /// The vendor leaf the signature was found at (`0x4000_0000`, `0x4000_0100`, ...).
    pub base_leaf: u32,
    /// KVM's feature leaf, when the kind is KVM and the leaf exists.
    pub kvm: Option<KvmFeatures>,
}

impl Hypervisor {
    /// The signature as text (lossy), trailing NULs trimmed: `"KVMKVMKVM"`.
    pub fn signature_str(&self) -> String {
        let end = self
            .signature
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |i| i + 1);
        String::from_utf8_lossy(&self.signature[..end]).into_owned()
    }

    /// Scans the hypervisor vendor leaves. Done by hand: `raw-cpuid` only looks at `0x4000_0000`,
    /// so it misses KVM behind Hyper-V enlightenments at `0x4000_0100`.
    fn scan(source: &(impl CpuidSource + ?Sized)) -> Option<Hypervisor> {
        let mut first = None;
        for base in (HV_FIRST_BASE..=HV_LAST_BASE).step_by(0x100) {
            let [max, b, c, d] = source.cpuid(base, 0);
            let mut signature = [0; 12];
            for (chunk, reg) in signature.chunks_exact_mut(4).zip([b, c, d]) {
                chunk.copy_from_slice(&reg.to_le_bytes());
            }
            let kind = HypervisorKind::from_signature(&signature);
            // Unknown signatures must also look like a vendor leaf (max leaf in its own 0x100
            // block), so stray data from out-of-range leaves is not taken for a hypervisor.
            let plausible = signature != [0; 12]
                && (kind != HypervisorKind::Other || (base..base + 0x100).contains(&max));
            if !plausible {
                continue;
            }
            let kvm = (kind == HypervisorKind::Kvm && max >= base + 1).then(|| {
                let [eax, _, _, edx] = source.cpuid(base + 1, 0);
                KvmFeatures::from_regs(eax, edx)
            });
            let found = Hypervisor {
                kind,
                signature,
                base_leaf: base,
                kvm,
            };
            if kind == HypervisorKind::Kvm {
                return Some(found);
            }
            first.get_or_insert(found);
        }
        first
    }
}

/// Adapts any [`CpuidSource`] to `raw-cpuid`'s reader trait.
struct Reader<'a, S: ?Sized>(&'a S);

impl<S: ?Sized> Clone for Reader<'_, S> {
    fn clone(&self) -> Self {
        Reader(self.0)
    }
}

impl<S: CpuidSource + ?Sized> CpuIdReader for Reader<'_, S> {
    fn cpuid2(&self, eax: u32, ecx: u32) -> CpuIdResult {
        let [eax, ebx, ecx, edx] = self.0.cpuid(eax, ecx);
        CpuIdResult { eax, ebx, ecx, edx }
    }
}

/// One snapshot of the CPU and OS support, taken once at startup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cpu {
    vendor: String,
    features: FeatureSet,
    hypervisor: Option<Hypervisor>,
}

impl Cpu {
    /// Detects the CPU this program runs on (no features and no hypervisor off x86_64).
    pub fn detect() -> Cpu {
        Cpu::from_source(&NativeCpuid)
    }

    /// Detects from any CPUID source: feature bits, masked by the OS-enabled XCR0 state, plus the
    /// hypervisor.
    pub fn from_source(source: &impl CpuidSource) -> Cpu {
        let cpuid = CpuId::with_cpuid_reader(Reader(source));
        let vendor = cpuid.get_vendor_info().map_or_else(String::new, |v| {
            v.as_str().trim_end_matches('\0').to_owned()
        });
        let fi = cpuid.get_feature_info();
        let ef = cpuid.get_extended_feature_info();
        let ext = cpuid.get_extended_processor_and_feature_identifiers();
        let l1 = |f: fn(&FeatureInfo) -> bool| fi.as_ref().is_some_and(f);
        let l7 = |f: fn(&ExtendedFeatures) -> bool| ef.as_ref().is_some_and(f);
        let lx = |f: fn(&ExtendedProcessorFeatureIdentifiers) -> bool| ext.as_ref().is_some_and(f);
        // raw-cpuid 11.6 truncates leaf 7 EDX to the bits it knows, which excludes FSRM (bit 4).
        let max_leaf = source.cpuid(0, 0)[EAX];
        let fsrm = max_leaf >= 7 && source.cpuid(7, 0)[EDX] & (1 << 4) != 0;
        let xcr0 = if l1(FeatureInfo::has_oxsave) {
            source.xcr0()
        } else {
            None
        };

        let mut features = FeatureSet::EMPTY;
        for &feature in Feature::ALL {
            let cpu_has = match feature {
                Feature::Sse3 => l1(FeatureInfo::has_sse3),
                Feature::Ssse3 => l1(FeatureInfo::has_ssse3),
                Feature::Sse4_1 => l1(FeatureInfo::has_sse41),
                Feature::Sse4_2 => l1(FeatureInfo::has_sse42),
                Feature::Popcnt => l1(FeatureInfo::has_popcnt),
                Feature::Avx => l1(FeatureInfo::has_avx),
                Feature::Fma => l1(FeatureInfo::has_fma),
                Feature::F16c => l1(FeatureInfo::has_f16c),
                Feature::Movbe => l1(FeatureInfo::has_movbe),
                Feature::Aes => l1(FeatureInfo::has_aesni),
                Feature::Pclmulqdq => l1(FeatureInfo::has_pclmulqdq),
                Feature::Rdrand => l1(FeatureInfo::has_rdrand),
                Feature::Xsave => l1(FeatureInfo::has_xsave),
                Feature::Cmpxchg16b => l1(FeatureInfo::has_cmpxchg16b),
                Feature::Bmi1 => l7(ExtendedFeatures::has_bmi1),
                Feature::Bmi2 => l7(ExtendedFeatures::has_bmi2),
                Feature::Avx2 => l7(ExtendedFeatures::has_avx2),
                Feature::Avx512f => l7(ExtendedFeatures::has_avx512f),
                Feature::Avx512dq => l7(ExtendedFeatures::has_avx512dq),
                Feature::Avx512cd => l7(ExtendedFeatures::has_avx512cd),
                Feature::Avx512bw => l7(ExtendedFeatures::has_avx512bw),
                Feature::Avx512vl => l7(ExtendedFeatures::has_avx512vl),
                Feature::Erms => l7(ExtendedFeatures::has_rep_movsb_stosb),
                Feature::Clflushopt => l7(ExtendedFeatures::has_clflushopt),
                Feature::Clwb => l7(ExtendedFeatures::has_clwb),
                Feature::Sha => l7(ExtendedFeatures::has_sha),
                Feature::Rdseed => l7(ExtendedFeatures::has_rdseed),
                Feature::Adx => l7(ExtendedFeatures::has_adx),
                Feature::Fsrm => fsrm,
                Feature::Lzcnt => lx(ExtendedProcessorFeatureIdentifiers::has_lzcnt),
                Feature::Rdtscp => lx(ExtendedProcessorFeatureIdentifiers::has_rdtscp),
            };
            let need = os_state_needed(feature);
            let os_has = need == 0 || xcr0.is_some_and(|x| x & need == need);
            if cpu_has && os_has {
                features.insert(feature);
            }
        }
        let hypervisor = if l1(FeatureInfo::has_hypervisor) {
            Hypervisor::scan(source)
        } else {
            None
        };
        Cpu {
            vendor,
            features,
            hypervisor,
        }
    }

    /// A CPU with exactly these features and this hypervisor, and an empty vendor: for tests of
    /// selection.
    pub fn synthetic(features: FeatureSet, hypervisor: Option<Hypervisor>) -> Cpu {
        Cpu {
            vendor: String::new(),
            features,
            hypervisor,
        }
    }

    /// The usable features.
    pub fn features(&self) -> FeatureSet {
        self.features
    }

    /// Whether `feature` is usable.
    pub fn has(&self, feature: Feature) -> bool {
        self.features.contains(feature)
    }

    /// The hypervisor, if the hypervisor bit is set and a vendor leaf was found.
    pub fn hypervisor(&self) -> Option<&Hypervisor> {
        self.hypervisor.as_ref()
    }

    /// The CPU vendor string (`"GenuineIntel"`, `"AuthenticAMD"`; `""` for synthetic CPUs).
    pub fn vendor(&self) -> &str {
        &self.vendor
    }

    /// This CPU with `cleared` removed, like the kernel's `clearcpuid=`: features that depend on a
    /// cleared one go too (avx → avx2, fma, f16c, avx512*; avx512f → other avx512*; xsave → avx).
    #[must_use]
    pub fn without(&self, cleared: FeatureSet) -> Cpu {
        let mut gone = cleared;
        loop {
            let before = gone;
            for &(feature, requires) in DEPENDS {
                if gone.contains(requires) {
                    gone.insert(feature);
                }
            }
            if gone == before {
                break;
            }
        }
        Cpu {
            features: self.features.difference(gone),
            ..self.clone()
        }
    }
}

impl fmt::Display for Cpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let vendor = if self.vendor.is_empty() {
            "unknown"
        } else {
            &self.vendor
        };
        write!(
            f,
            "vendor {vendor}; features [{}]; hypervisor ",
            self.features
        )?;
        let Some(hv) = &self.hypervisor else {
            return f.write_str("none");
        };
        write!(
            f,
            "{} ({:?} at {:#x})",
            hv.kind,
            hv.signature_str(),
            hv.base_leaf
        )?;
        if let Some(kvm) = &hv.kvm {
            write!(
                f,
                " kvm features {:#x} hints {:#x}",
                kvm.raw_features, kvm.raw_hints
            )?;
            for (on, name) in [
                (kvm.pv_unhalt, "pv_unhalt"),
                (kvm.steal_time, "steal_time"),
                (kvm.hints_realtime, "hints_realtime"),
            ] {
                if on {
                    write!(f, " {name}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(features: &[Feature]) -> FeatureSet {
        features.iter().copied().collect()
    }

    /// `fake` with `regs[reg] &= !mask` on one leaf.
    fn clear_bits(fake: FakeCpuid, leaf: u32, reg: usize, mask: u32) -> FakeCpuid {
        let mut regs = fake.cpuid(leaf, 0);
        regs[reg] &= !mask;
        fake.with_leaf(leaf, 0, regs)
    }

    #[test]
    fn plain_fake_has_vendor_and_no_features() {
        let cpu = Cpu::from_source(&FakeCpuid::new());
        assert_eq!(cpu.vendor(), "GenuineIntel");
        assert!(cpu.features().is_empty());
        assert_eq!(cpu.hypervisor(), None);
        let [b, d, c] = vendor_regs(b"AuthenticAMD");
        let amd = FakeCpuid::new().with_leaf(0, 0, [0xd, b, c, d]);
        assert_eq!(Cpu::from_source(&amd).vendor(), "AuthenticAMD");
        assert_eq!(Cpu::from_source(&FakeCpuid::default()).vendor(), "");
    }

    #[test]
    fn every_single_feature_round_trips() {
        for &feature in Feature::ALL {
            let cpu = Cpu::from_source(&FakeCpuid::new().with_features(set(&[feature])));
            assert_eq!(cpu.features(), set(&[feature]), "{feature}");
            assert!(cpu.has(feature));
        }
    }

    #[test]
    fn mixed_and_full_sets_round_trip() {
        use Feature::*;
        let mixed = set(&[
            Sse4_2, Popcnt, Lzcnt, Bmi2, Avx2, Fma, Avx512vl, Fsrm, Rdtscp, Sha, Cmpxchg16b,
        ]);
        assert_eq!(
            Cpu::from_source(&FakeCpuid::new().with_features(mixed)).features(),
            mixed
        );
        let all: FeatureSet = Feature::ALL.iter().copied().collect();
        assert_eq!(
            Cpu::from_source(&FakeCpuid::new().with_features(all)).features(),
            all
        );
    }

    #[test]
    fn leaves_beyond_the_max_leaf_are_not_read() {
        use Feature::*;
        let fake = FakeCpuid::new().with_features(set(&[Popcnt, Avx2, Fsrm, Lzcnt]));
        let [_, b, c, d] = fake.cpuid(0, 0);
        let fake =
            fake.with_leaf(0, 0, [1, b, c, d])
                .with_leaf(0x8000_0000, 0, [0x8000_0000, 0, 0, 0]);
        assert_eq!(Cpu::from_source(&fake).features(), set(&[Popcnt]));
    }

    #[test]
    fn avx_needs_osxsave_and_xcr0_avx_state() {
        use Feature::*;
        let fake = FakeCpuid::new().with_features(set(&[Avx, Avx2, Fma, F16c, Popcnt, Xsave]));
        assert_eq!(
            Cpu::from_source(&fake).features(),
            set(&[Avx, Avx2, Fma, F16c, Popcnt, Xsave])
        );
        let no_ymm = fake.clone().with_xcr0(Some(0b011));
        assert_eq!(Cpu::from_source(&no_ymm).features(), set(&[Popcnt, Xsave]));
        let no_xcr0 = fake.clone().with_xcr0(None);
        assert_eq!(Cpu::from_source(&no_xcr0).features(), set(&[Popcnt, Xsave]));
        // OSXSAVE clear: XCR0 must not even be consulted, although the fake would answer.
        let no_osxsave = clear_bits(fake, 1, ECX, LEAF1_ECX_OSXSAVE);
        assert_eq!(
            Cpu::from_source(&no_osxsave).features(),
            set(&[Popcnt, Xsave])
        );
    }

    #[test]
    fn avx512_needs_zmm_state() {
        use Feature::*;
        let fake = FakeCpuid::new().with_features(set(&[Avx, Avx2, Avx512f, Avx512bw, Avx512vl]));
        assert!(Cpu::from_source(&fake).has(Avx512f));
        let ymm_only = fake.with_xcr0(Some(0b111));
        assert_eq!(Cpu::from_source(&ymm_only).features(), set(&[Avx, Avx2]));
        let no_hi16 = FakeCpuid::new()
            .with_features(set(&[Avx512f]))
            .with_xcr0(Some(0b0110_0111));
        assert!(!Cpu::from_source(&no_hi16).has(Avx512f));
    }

    #[test]
    fn kvm_at_the_first_base_with_features_decoded() {
        let fake = FakeCpuid::new().with_kvm(0x4000_0000, (1 << 7) | (1 << 5) | (1 << 3), 1);
        let cpu = Cpu::from_source(&fake);
        let hv = cpu.hypervisor().expect("hypervisor");
        assert_eq!(hv.kind, HypervisorKind::Kvm);
        assert_eq!(hv.base_leaf, 0x4000_0000);
        assert_eq!(hv.signature_str(), "KVMKVMKVM");
        let kvm = hv.kvm.expect("kvm features");
        assert_eq!(
            kvm,
            KvmFeatures {
                pv_unhalt: true,
                steal_time: true,
                hints_realtime: true,
                raw_features: 0xa8,
                raw_hints: 1
            }
        );
        let quiet = Cpu::from_source(&FakeCpuid::new().with_kvm(0x4000_0000, 1 << 3, 0));
        let quiet = quiet.hypervisor().unwrap().kvm.unwrap();
        assert!(!quiet.pv_unhalt && !quiet.steal_time && !quiet.hints_realtime);
        assert_eq!(quiet.raw_features, 8);
        let line = cpu.to_string();
        assert!(
            line.contains("GenuineIntel") && line.contains("kvm") && line.contains("pv_unhalt"),
            "{line}"
        );
        assert!(
            line.contains("hints_realtime") && line.contains("0x40000000"),
            "{line}"
        );
    }

    #[test]
    fn kvm_feature_leaf_only_read_when_in_range() {
        let [b, c, d] = vendor_regs(&KVM_SIGNATURE);
        let fake = FakeCpuid::new().with_kvm(0x4000_0000, 1 << 7, 1).with_leaf(
            0x4000_0000,
            0,
            [0x4000_0000, b, c, d],
        );
        let cpu = Cpu::from_source(&fake);
        let hv = cpu.hypervisor().unwrap();
        assert_eq!((hv.kind, hv.kvm), (HypervisorKind::Kvm, None));
    }

    #[test]
    fn kvm_behind_hyperv_enlightenments_wins() {
        let fake = FakeCpuid::new()
            .with_hypervisor(b"Microsoft Hv", 0x4000_0000)
            .with_kvm(0x4000_0100, 1 << 7, 0);
        let cpu = Cpu::from_source(&fake);
        let hv = cpu.hypervisor().unwrap();
        assert_eq!((hv.kind, hv.base_leaf), (HypervisorKind::Kvm, 0x4000_0100));
        assert!(hv.kvm.unwrap().pv_unhalt);
        // Without KVM, the first signature found wins.
        let xen = FakeCpuid::new()
            .with_hypervisor(b"Microsoft Hv", 0x4000_0000)
            .with_hypervisor(b"XenVMMXenVMM", 0x4000_0100);
        assert_eq!(
            Cpu::from_source(&xen).hypervisor().unwrap().kind,
            HypervisorKind::HyperV
        );
    }

    #[test]
    fn known_and_unknown_signatures() {
        for (sig, kind) in [
            (b"XenVMMXenVMM", HypervisorKind::Xen),
            (b"VMwareVMware", HypervisorKind::VMware),
            (b"Microsoft Hv", HypervisorKind::HyperV),
            (b"bhyve bhyve ", HypervisorKind::Bhyve),
            (b"TCGTCGTCGTCG", HypervisorKind::Qemu),
            (b"ACRNACRNACRN", HypervisorKind::Acrn),
            (b"FooBarBazQux", HypervisorKind::Other),
        ] {
            let cpu = Cpu::from_source(&FakeCpuid::new().with_hypervisor(sig, 0x4000_0000));
            let hv = cpu.hypervisor().unwrap();
            assert_eq!((hv.kind, hv.base_leaf, hv.kvm), (kind, 0x4000_0000, None));
            assert_eq!(hv.signature_str().as_bytes(), sig);
        }
        // Xen can sit at 0x40000100 (after its own Viridian leaves are disabled).
        let cpu = Cpu::from_source(&FakeCpuid::new().with_hypervisor(b"XenVMMXenVMM", 0x4000_0100));
        assert_eq!(cpu.hypervisor().unwrap().base_leaf, 0x4000_0100);
    }

    #[test]
    fn no_hypervisor_bit_means_none() {
        let fake = clear_bits(
            FakeCpuid::new().with_kvm(0x4000_0000, 1 << 7, 1),
            1,
            ECX,
            LEAF1_ECX_HYPERVISOR,
        );
        let cpu = Cpu::from_source(&fake);
        assert_eq!(cpu.hypervisor(), None);
        assert!(cpu.to_string().ends_with("hypervisor none"));
        // The bit alone, with no vendor leaf, is not a hypervisor either.
        let bare = FakeCpuid::new().with_leaf(1, 0, [0, 0, LEAF1_ECX_HYPERVISOR, 0]);
        assert_eq!(Cpu::from_source(&bare).hypervisor(), None);
    }

    #[test]
    fn without_clears_dependants() {
        use Feature::*;
        let cpu = Cpu::synthetic(
            set(&[Xsave, Avx, Avx2, Fma, F16c, Avx512f, Avx512vl, Popcnt]),
            None,
        );
        assert_eq!(cpu.without(set(&[Avx])).features(), set(&[Xsave, Popcnt]));
        assert_eq!(
            cpu.without(set(&[Avx512f])).features(),
            set(&[Xsave, Avx, Avx2, Fma, F16c, Popcnt])
        );
        assert_eq!(cpu.without(set(&[Xsave])).features(), set(&[Popcnt]));
        assert_eq!(
            cpu.without(set(&[Avx2])).features(),
            set(&[Xsave, Avx, Fma, F16c, Avx512f, Avx512vl, Popcnt])
        );
        assert_eq!(cpu.without(FeatureSet::EMPTY), cpu);
        assert_eq!(cpu.vendor(), "");
    }

    #[test]
    fn hypervisor_kind_names() {
        for &kind in HypervisorKind::ALL {
            assert_eq!(HypervisorKind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(
            HypervisorKind::from_name("Hyper-V"),
            Some(HypervisorKind::HyperV)
        );
        assert_eq!(HypervisorKind::from_name("KVM"), Some(HypervisorKind::Kvm));
        assert_eq!(HypervisorKind::from_name("virtualbox"), None);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn detect_agrees_with_std() {
        use Feature::*;
        use std::arch::is_x86_feature_detected as std_has;
        let cpu = Cpu::detect();
        eprintln!("{cpu}");
        let pairs = [
            (Sse3, std_has!("sse3")),
            (Ssse3, std_has!("ssse3")),
            (Sse4_1, std_has!("sse4.1")),
            (Sse4_2, std_has!("sse4.2")),
            (Popcnt, std_has!("popcnt")),
            (Lzcnt, std_has!("lzcnt")),
            (Bmi1, std_has!("bmi1")),
            (Bmi2, std_has!("bmi2")),
            (Avx, std_has!("avx")),
            (Avx2, std_has!("avx2")),
            (Fma, std_has!("fma")),
            (F16c, std_has!("f16c")),
            (Avx512f, std_has!("avx512f")),
            (Avx512dq, std_has!("avx512dq")),
            (Avx512cd, std_has!("avx512cd")),
            (Avx512bw, std_has!("avx512bw")),
            (Avx512vl, std_has!("avx512vl")),
            (Erms, std_has!("ermsb")),
            (Movbe, std_has!("movbe")),
            (Sha, std_has!("sha")),
            (Aes, std_has!("aes")),
            (Pclmulqdq, std_has!("pclmulqdq")),
            (Rdrand, std_has!("rdrand")),
            (Rdseed, std_has!("rdseed")),
            (Adx, std_has!("adx")),
            (Xsave, std_has!("xsave")),
            (Cmpxchg16b, std_has!("cmpxchg16b")),
        ];
        for (feature, std_says) in pairs {
            assert_eq!(cpu.has(feature), std_says, "{feature}: ours vs std");
        }
        assert!(!cpu.vendor().is_empty());
        assert_eq!(Cpu::detect(), cpu, "detection is deterministic");
    }
}
