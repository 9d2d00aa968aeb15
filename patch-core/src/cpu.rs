//! CPU detection: one snapshot of the CPUID state and the OS's XSAVE support, taken at startup.
//!
//! Every CPUID read goes through a [`CpuidSource`], so [`FakeCpuid`] can stand in for the real
//! instruction in tests. Feature leaves are decoded with `raw-cpuid`; the few things it does not
//! cover (leaf 7 EDX, the hypervisor leaf scan) are read from the raw leaves here.

use core::fmt;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use raw_cpuid::{
    CpuId, CpuIdReader, CpuIdResult, ExtendedFeatures, ExtendedProcessorFeatureIdentifiers,
    FeatureInfo,
};

use crate::{Feature, FeatureSet};

/// Where CPUID answers come from: the real instruction, or a fake for tests.
pub trait CpuidSource {
    /// CPUID leaf/subleaf as `[eax, ebx, ecx, edx]`.
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// XCR0 as read by `XGETBV(0)`; `None` when the OS did not enable XSAVE (OSXSAVE clear) or
    /// off x86.
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
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        #[cfg(target_arch = "x86_64")]
        {
            let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
            [r.eax, r.ebx, r.ecx, r.edx]
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (leaf, subleaf);
            [0; 4]
        }
    }

    fn xcr0(&self) -> Option<u64> {
        if self.cpuid(0, 0)[EAX] < 1 || self.cpuid(1, 0)[ECX] & LEAF1_ECX_OSXSAVE == 0 {
            return None;
        }
        NativeCpuid::xgetbv0()
    }
}

impl NativeCpuid {
    /// XCR0 by `XGETBV(0)`; the caller has checked CPUID.1:ECX.OSXSAVE.
    pub(crate) fn xgetbv0() -> Option<u64> {
        #[cfg(target_arch = "x86_64")]
        {
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
            let (leaf, reg, bit) = cpuid_bit(feature);
            self.set_bits(leaf, reg, 1 << bit);
            if os_state_needed(feature) != 0 {
                self.set_bits(1, ECX, LEAF1_ECX_OSXSAVE);
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

    /// Sets the hypervisor bit (leaf 1 ECX\[31\]) and a vendor leaf at `base` (max leaf
    /// `base + 1`, `signature` in EBX, ECX, EDX).
    #[must_use]
    pub fn with_hypervisor(mut self, signature: &[u8; 12], base: u32) -> Self {
        self.set_bits(1, ECX, LEAF1_ECX_HYPERVISOR);
        let [b, c, d] = vendor_regs(signature);
        self.with_leaf(base, 0, [base + 1, b, c, d])
    }

    /// A KVM signature at `base`, and leaf `base + 1` with `features_eax` and `hints_edx`.
    #[must_use]
    pub fn with_kvm(self, base: u32, features_eax: u32, hints_edx: u32) -> Self {
        let leaf = [features_eax, 0, 0, hints_edx];
        self.with_hypervisor(&KVM_SIGNATURE, base)
            .with_leaf(base + 1, 0, leaf)
    }

    fn set_bits(&mut self, leaf: u32, reg: usize, mask: u32) {
        self.leaves.entry((leaf, 0)).or_default()[reg] |= mask;
    }
}

impl CpuidSource for FakeCpuid {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let regs = self.leaves.get(&(leaf, subleaf));
        regs.copied().unwrap_or_default()
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

/// One row per feature: where its bit lives (used by [`FakeCpuid`]) and the `raw-cpuid` accessor
/// detection uses, so the round-trip tests check one against the other. FSRM is read from the raw
/// leaf: `raw-cpuid` 11.6 truncates leaf 7 EDX to the bits it knows, which exclude bit 4.
macro_rules! feature_bits {
    ($($feature:ident = $leaf:literal $reg:ident $bit:literal $info:ident.$has:ident),+ $(,)?) => {
        /// `(leaf, register index, bit)` of `feature` (subleaf 0).
        const fn cpuid_bit(feature: Feature) -> (u32, usize, u32) {
            match feature {
                $(Feature::$feature => ($leaf, $reg, $bit),)+
                Feature::Fsrm => (7, EDX, 4),
            }
        }

        impl Leaves {
            /// Whether the CPU reports `feature` (before the OS-support check).
            fn has(&self, feature: Feature) -> bool {
                match feature {
                    $(Feature::$feature => self.$info.as_ref().is_some_and(|i| i.$has()),)+
                    Feature::Fsrm => self.fsrm,
                }
            }
        }
    };
}

/// The feature leaves, decoded; `None` when the max leaf does not cover them.
struct Leaves {
    l1: Option<FeatureInfo>,
    l7: Option<ExtendedFeatures>,
    ext: Option<ExtendedProcessorFeatureIdentifiers>,
    fsrm: bool,
}

feature_bits! {
    Sse3 = 1 ECX 0 l1.has_sse3,
    Pclmulqdq = 1 ECX 1 l1.has_pclmulqdq,
    Ssse3 = 1 ECX 9 l1.has_ssse3,
    Fma = 1 ECX 12 l1.has_fma,
    Cmpxchg16b = 1 ECX 13 l1.has_cmpxchg16b,
    Sse4_1 = 1 ECX 19 l1.has_sse41,
    Sse4_2 = 1 ECX 20 l1.has_sse42,
    Movbe = 1 ECX 22 l1.has_movbe,
    Popcnt = 1 ECX 23 l1.has_popcnt,
    Aes = 1 ECX 25 l1.has_aesni,
    Xsave = 1 ECX 26 l1.has_xsave,
    Avx = 1 ECX 28 l1.has_avx,
    F16c = 1 ECX 29 l1.has_f16c,
    Rdrand = 1 ECX 30 l1.has_rdrand,
    Bmi1 = 7 EBX 3 l7.has_bmi1,
    Avx2 = 7 EBX 5 l7.has_avx2,
    Bmi2 = 7 EBX 8 l7.has_bmi2,
    Erms = 7 EBX 9 l7.has_rep_movsb_stosb,
    Avx512f = 7 EBX 16 l7.has_avx512f,
    Avx512dq = 7 EBX 17 l7.has_avx512dq,
    Rdseed = 7 EBX 18 l7.has_rdseed,
    Adx = 7 EBX 19 l7.has_adx,
    Clflushopt = 7 EBX 23 l7.has_clflushopt,
    Clwb = 7 EBX 24 l7.has_clwb,
    Avx512cd = 7 EBX 28 l7.has_avx512cd,
    Sha = 7 EBX 29 l7.has_sha,
    Avx512bw = 7 EBX 30 l7.has_avx512bw,
    Avx512vl = 7 EBX 31 l7.has_avx512vl,
    Lzcnt = 0x8000_0001 ECX 5 ext.has_lzcnt,
    Rdtscp = 0x8000_0001 EDX 27 ext.has_rdtscp,
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

macro_rules! hypervisors {
    ($($kind:ident = $name:literal $signature:literal $doc:literal,)+) => {
        /// A hypervisor family, recognised by its CPUID signature.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[cfg_attr(feature = "serde", derive(serde::Serialize), serde(rename_all = "lowercase"))]
        #[non_exhaustive]
        pub enum HypervisorKind {
            $(#[doc = $doc] $kind,)+
            /// An unrecognised signature.
            Other,
        }

        impl HypervisorKind {
            /// Every kind, in declaration order.
            pub const ALL: &'static [HypervisorKind] =
                &[$(HypervisorKind::$kind,)+ HypervisorKind::Other];

            /// The lowercase name (`"kvm"`, `"hyperv"`, `"other"`).
            pub const fn name(self) -> &'static str {
                match self {
                    $(HypervisorKind::$kind => $name,)+
                    HypervisorKind::Other => "other",
                }
            }

            /// `from_name` usable in `const` items (exact lowercase names), so that the
            /// `hypervisor = "..."` predicate of the macros fails at compile time when misspelt.
            pub const fn from_name_const(name: &str) -> Option<HypervisorKind> {
                let mut i = 0;
                while i < Self::ALL.len() {
                    if crate::feature::const_eq(name, Self::ALL[i].name()) {
                        return Some(Self::ALL[i]);
                    }
                    i += 1;
                }
                None
            }

            /// The kind a 12-byte vendor signature names.
            fn from_signature(signature: &[u8; 12]) -> HypervisorKind {
                match signature {
                    $($signature => HypervisorKind::$kind,)+
                    _ => HypervisorKind::Other,
                }
            }
        }
    };
}

hypervisors! {
    Kvm = "kvm" b"KVMKVMKVM\0\0\0" "Linux KVM.",
    Xen = "xen" b"XenVMMXenVMM" "Xen.",
    VMware = "vmware" b"VMwareVMware" "VMware.",
    HyperV = "hyperv" b"Microsoft Hv" "Hyper-V, or another hypervisor's Hyper-V enlightenments.",
    Bhyve = "bhyve" b"bhyve bhyve " "FreeBSD bhyve.",
    Qemu = "qemu" b"TCGTCGTCGTCG" "QEMU's TCG emulator.",
    Acrn = "acrn" b"ACRNACRNACRN" "ACRN.",
}

impl HypervisorKind {
    /// Looks a kind up by name, ASCII case-insensitively; `"hyper-v"` is accepted too.
    pub fn from_name(name: &str) -> Option<HypervisorKind> {
        let name = name.trim();
        let name = if name.eq_ignore_ascii_case("hyper-v") {
            "hyperv"
        } else {
            name
        };
        let mut all = HypervisorKind::ALL.iter().copied();
        all.find(|k| name.eq_ignore_ascii_case(k.name()))
    }
}

impl fmt::Display for HypervisorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// KVM's paravirt feature leaf (`base + 1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
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
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
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
            let kvm = (kind == HypervisorKind::Kvm && max > base).then(|| {
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

/// Reads each CPUID leaf once. In a VM guest every CPUID exits to the hypervisor (about 7 µs on
/// this project's KVM guest), and `raw-cpuid` reads leaf 0 again before each group of leaves.
struct Memo<'a, S: ?Sized> {
    source: &'a S,
    read: RefCell<Vec<LeafRead>>,
}

/// `(leaf, subleaf)` and the registers read.
type LeafRead = ((u32, u32), [u32; 4]);

impl<'a, S: CpuidSource + ?Sized> Memo<'a, S> {
    fn new(source: &'a S) -> Self {
        Memo {
            source,
            read: RefCell::new(Vec::new()),
        }
    }
}

impl<S: CpuidSource + ?Sized> CpuidSource for Memo<'_, S> {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let key = (leaf, subleaf);
        if let Some(&(_, regs)) = self.read.borrow().iter().find(|(k, _)| *k == key) {
            return regs;
        }
        let regs = self.source.cpuid(leaf, subleaf);
        self.read.borrow_mut().push((key, regs));
        regs
    }

    fn xcr0(&self) -> Option<u64> {
        self.source.xcr0()
    }
}

/// How [`Cpu::from_source_with`] reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Detecting {
    /// Everything from the source, now (tests, [`Cpu::from_source`]).
    Source,
    /// The live CPU: the hypervisor leaves from the instruction when first asked.
    Live,
    /// The live CPU through [`CheckedLeaves`]: the vendor and the hypervisor leaves from the
    /// instruction when first asked.
    CheckedLeaves,
}

/// A source whose leaves 1, 7 (subleaf 0) and 0x8000_0001 were read where the maximum leaves
/// have them, and are zero elsewhere (glibc's copies: its loader reads leaf 7 only when leaf 0
/// says it exists, 0x8000_0001 only when 0x8000_0000 does), presented to `raw-cpuid` with
/// maximum leaves that cover them, so that it reads neither leaf 0 nor 0x8000_0000. A zero leaf
/// is no feature, as a leaf the maximum does not reach is. Leaf 0 has no vendor here: the
/// vendor is read from the instruction when asked. Leaf 7 subleaf 1, which `raw-cpuid` reads
/// with subleaf 0, holds no [`Feature`] (see `cpuid_bit`) and reads as zero.
struct CheckedLeaves<'a, S>(&'a S);

impl<S: CpuidSource> CpuidSource for CheckedLeaves<'_, S> {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        match leaf {
            0 => [7, 0, 0, 0],
            0x8000_0000 => [0x8000_0001, 0, 0, 0],
            7 if subleaf != 0 => [0; 4],
            _ => self.0.cpuid(leaf, subleaf),
        }
    }

    fn xcr0(&self) -> Option<u64> {
        self.0.xcr0()
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
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Cpu {
    /// Set at detection, except for [`Cpu::detect`] from the C library's copies: leaf 0 is then
    /// read by the CPUID instruction when first asked (the report, a comparison).
    #[cfg_attr(feature = "serde", serde(serialize_with = "serialize_vendor"))]
    vendor: OnceLock<String>,
    features: FeatureSet,
    /// Set at detection, except for [`Cpu::detect`] under a hypervisor: its vendor leaves are
    /// read by the CPUID instruction when a predicate (or the report) first asks.
    #[cfg_attr(feature = "serde", serde(serialize_with = "serialize_hypervisor"))]
    hypervisor: OnceLock<Option<Hypervisor>>,
}

#[cfg(feature = "serde")]
fn serialize_hypervisor<S: serde::Serializer>(
    hypervisor: &OnceLock<Option<Hypervisor>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&resolve_hypervisor(hypervisor), serializer)
}

#[cfg(feature = "serde")]
fn serialize_vendor<S: serde::Serializer>(
    vendor: &OnceLock<String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(resolve_vendor(vendor))
}

fn resolve_vendor(vendor: &OnceLock<String>) -> &str {
    vendor.get_or_init(|| vendor_of(&CpuId::with_cpuid_reader(Reader(&NativeCpuid))))
}

/// The vendor string of leaf 0 (`""` when it holds none).
fn vendor_of<R: CpuIdReader>(cpuid: &CpuId<R>) -> String {
    cpuid
        .get_vendor_info()
        .as_ref()
        .map_or("", |v| v.as_str().trim_end_matches('\0'))
        .to_owned()
}

fn resolve_hypervisor(hypervisor: &OnceLock<Option<Hypervisor>>) -> Option<&Hypervisor> {
    hypervisor
        .get_or_init(|| Hypervisor::scan(&Memo::new(&NativeCpuid)))
        .as_ref()
}

impl PartialEq for Cpu {
    fn eq(&self, other: &Cpu) -> bool {
        self.vendor() == other.vendor()
            && self.features == other.features
            && self.hypervisor() == other.hypervisor()
    }
}

impl Eq for Cpu {}

impl Cpu {
    /// Detects the CPU this program runs on (no features and no hypervisor off x86_64).
    ///
    /// Issues as few CPUID instructions as it can, since in a VM guest each is a VM exit: leaves
    /// 1, 7 and 0x8000_0001 come from the C library's copy where it has one
    /// ([`GlibcCpuid`](crate::os::glibc_cpuid::GlibcCpuid)), which read them only where the
    /// maximum leaves have them, so leaves 0 and 0x8000_0000 need not be read to trust them; the
    /// vendor (leaf 0) and the hypervisor's vendor leaves are read only when asked (the report,
    /// a predicate about the hypervisor).
    pub fn detect() -> Cpu {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            let source = crate::os::glibc_cpuid::GlibcCpuid::new();
            if source.from_glibc() {
                return Cpu::from_source_with(&CheckedLeaves(&source), Detecting::CheckedLeaves);
            }
            Cpu::from_source_with(&source, Detecting::Live)
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        Cpu::from_source_with(&NativeCpuid, Detecting::Live)
    }

    /// Detects from any CPUID source: feature bits, masked by the OS-enabled XCR0 state, plus the
    /// hypervisor.
    pub fn from_source(source: &impl CpuidSource) -> Cpu {
        Cpu::from_source_with(source, Detecting::Source)
    }

    /// Reads `source`'s feature leaves; the vendor and the hypervisor leaves now (`Source`) or
    /// from the CPUID instruction when first asked.
    fn from_source_with(source: &impl CpuidSource, detecting: Detecting) -> Cpu {
        let source = &Memo::new(source);
        let cpuid = CpuId::with_cpuid_reader(Reader(source));
        let vendor = OnceLock::new();
        if detecting != Detecting::CheckedLeaves {
            let _ = vendor.set(vendor_of(&cpuid));
        }
        let leaves = Leaves {
            l1: cpuid.get_feature_info(),
            l7: cpuid.get_extended_feature_info(),
            ext: cpuid.get_extended_processor_and_feature_identifiers(),
            fsrm: source.cpuid(0, 0)[EAX] >= 7 && source.cpuid(7, 0)[EDX] & (1 << 4) != 0,
        };
        let l1 = |has: fn(&FeatureInfo) -> bool| leaves.l1.as_ref().is_some_and(has);
        let xcr0 = l1(FeatureInfo::has_oxsave).then(|| source.xcr0()).flatten();
        let os_has = |need: u64| need == 0 || xcr0.is_some_and(|x| x & need == need);
        let features = Feature::ALL
            .iter()
            .copied()
            .filter(|&f| leaves.has(f) && os_has(os_state_needed(f)))
            .collect();
        let hypervisor = OnceLock::new();
        if !l1(FeatureInfo::has_hypervisor) {
            let _ = hypervisor.set(None);
        } else if detecting == Detecting::Source {
            let _ = hypervisor.set(Hypervisor::scan(source));
        }
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
            vendor: OnceLock::from(String::new()),
            features,
            hypervisor: OnceLock::from(hypervisor),
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
        resolve_hypervisor(&self.hypervisor)
    }

    /// The CPU vendor string (`"GenuineIntel"`, `"AuthenticAMD"`; `""` for synthetic CPUs).
    pub fn vendor(&self) -> &str {
        resolve_vendor(&self.vendor)
    }

    /// This CPU with `cleared` removed, like the kernel's `clearcpuid=`: features that depend on
    /// a cleared one go too (avx → avx2, fma, f16c, avx512*; avx512f → other avx512*;
    /// xsave → avx and everything above it).
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
        let vendor = Some(self.vendor()).filter(|v| !v.is_empty());
        let vendor = vendor.unwrap_or("unknown");
        write!(
            f,
            "vendor {vendor}; features [{}]; hypervisor ",
            self.features
        )?;
        let Some(hv) = self.hypervisor() else {
            return f.write_str("none");
        };
        let (kind, signature, base) = (hv.kind, hv.signature_str(), hv.base_leaf);
        write!(f, "{kind} ({signature:?} at {base:#x})")?;
        if let Some(kvm) = &hv.kvm {
            let (features, hints) = (kvm.raw_features, kvm.raw_hints);
            write!(f, " kvm features {features:#x} hints {hints:#x}")?;
            let flags = [
                (kvm.pv_unhalt, "pv_unhalt"),
                (kvm.steal_time, "steal_time"),
                (kvm.hints_realtime, "hints_realtime"),
            ];
            for (_, name) in flags.into_iter().filter(|flag| flag.0) {
                write!(f, " {name}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Feature::*;

    fn set(features: &[Feature]) -> FeatureSet {
        features.iter().copied().collect()
    }

    fn detected(fake: &FakeCpuid) -> FeatureSet {
        Cpu::from_source(fake).features()
    }

    fn hypervisor(fake: &FakeCpuid) -> Option<Hypervisor> {
        Cpu::from_source(fake).hypervisor().copied()
    }

    /// `fake` with `mask` cleared in one register of leaf `leaf`.
    fn clear_bits(fake: FakeCpuid, leaf: u32, reg: usize, mask: u32) -> FakeCpuid {
        let mut regs = fake.cpuid(leaf, 0);
        regs[reg] &= !mask;
        fake.with_leaf(leaf, 0, regs)
    }

    #[test]
    fn plain_fake_has_vendor_and_no_features() {
        let cpu = Cpu::from_source(&FakeCpuid::new());
        assert_eq!(
            (cpu.vendor(), cpu.features(), cpu.hypervisor()),
            ("GenuineIntel", FeatureSet::EMPTY, None)
        );
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
        let mixed = set(&[
            Sse4_2, Popcnt, Lzcnt, Bmi2, Avx2, Fma, Avx512vl, Fsrm, Rdtscp, Sha,
        ]);
        assert_eq!(detected(&FakeCpuid::new().with_features(mixed)), mixed);
        let all = set(Feature::ALL);
        assert_eq!(detected(&FakeCpuid::new().with_features(all)), all);
    }

    #[test]
    fn leaves_beyond_the_max_leaf_are_not_read() {
        let fake = FakeCpuid::new().with_features(set(&[Popcnt, Avx2, Fsrm, Lzcnt]));
        let [_, b, c, d] = fake.cpuid(0, 0);
        let fake = fake.with_leaf(0, 0, [1, b, c, d]);
        let fake = fake.with_leaf(0x8000_0000, 0, [0x8000_0000, 0, 0, 0]);
        assert_eq!(detected(&fake), set(&[Popcnt]));
    }

    #[test]
    fn avx_needs_osxsave_and_xcr0_avx_state() {
        let fake = FakeCpuid::new().with_features(set(&[Avx, Avx2, Fma, F16c, Popcnt, Xsave]));
        assert_eq!(detected(&fake), set(&[Avx, Avx2, Fma, F16c, Popcnt, Xsave]));
        let plain = set(&[Popcnt, Xsave]);
        assert_eq!(detected(&fake.clone().with_xcr0(Some(0b011))), plain);
        assert_eq!(detected(&fake.clone().with_xcr0(None)), plain);
        // OSXSAVE clear: XCR0 is not consulted, although the fake would answer.
        assert_eq!(
            detected(&clear_bits(fake, 1, ECX, LEAF1_ECX_OSXSAVE)),
            plain
        );
    }

    #[test]
    fn avx512_needs_zmm_state() {
        let fake = FakeCpuid::new().with_features(set(&[Avx, Avx2, Avx512f, Avx512bw, Avx512vl]));
        assert!(detected(&fake).contains(Avx512f));
        assert_eq!(detected(&fake.with_xcr0(Some(0b111))), set(&[Avx, Avx2]));
        let no_hi16 = FakeCpuid::new()
            .with_features(set(&[Avx512f]))
            .with_xcr0(Some(0b0110_0111));
        assert_eq!(detected(&no_hi16), FeatureSet::EMPTY);
    }

    #[test]
    fn kvm_at_the_first_base_with_features_decoded() {
        let fake = FakeCpuid::new().with_kvm(0x4000_0000, (1 << 7) | (1 << 5) | (1 << 3), 1);
        let hv = hypervisor(&fake).expect("hypervisor");
        assert_eq!((hv.kind, hv.base_leaf), (HypervisorKind::Kvm, 0x4000_0000));
        assert_eq!(hv.signature_str(), "KVMKVMKVM");
        let expected = KvmFeatures {
            pv_unhalt: true,
            steal_time: true,
            hints_realtime: true,
            raw_features: 0xa8,
            raw_hints: 1,
        };
        assert_eq!(hv.kvm, Some(expected));
        let quiet = hypervisor(&FakeCpuid::new().with_kvm(0x4000_0000, 1 << 3, 0)).unwrap();
        let expected = KvmFeatures {
            raw_features: 8,
            ..KvmFeatures::default()
        };
        assert_eq!(quiet.kvm, Some(expected));
        let line = Cpu::from_source(&fake).to_string();
        let want = concat!(
            r#"vendor GenuineIntel; features []; hypervisor kvm ("KVMKVMKVM" at 0x40000000)"#,
            " kvm features 0xa8 hints 0x1 pv_unhalt steal_time hints_realtime",
        );
        assert_eq!(line, want);
    }

    /// Every CPUID is a VM exit in a guest: detection reads no leaf twice.
    #[test]
    fn detection_reads_each_leaf_once() {
        struct Counting(FakeCpuid, RefCell<Vec<(u32, u32)>>);
        impl CpuidSource for Counting {
            fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
                self.1.borrow_mut().push((leaf, subleaf));
                self.0.cpuid(leaf, subleaf)
            }
            fn xcr0(&self) -> Option<u64> {
                self.0.xcr0()
            }
        }
        let fake = FakeCpuid::new()
            .with_features(set(&[Avx2, Popcnt, Fsrm]))
            .with_kvm(0x4000_0000, 1 << 9, 0);
        let counting = Counting(fake, RefCell::default());
        let cpu = Cpu::from_source(&counting);
        assert!(cpu.has(Avx2) && cpu.has(Fsrm) && cpu.hypervisor().is_some());
        let mut reads = counting.1.take();
        let all = reads.len();
        reads.sort_unstable();
        reads.dedup();
        assert_eq!(all, reads.len(), "{reads:x?}");

        // From copies taken with the maximum leaves checked (glibc's): only the feature leaves,
        // with the same features (every one of them); the vendor is read when asked, from the
        // instruction.
        let every = Feature::ALL.iter().copied().collect();
        let all = Counting(FakeCpuid::new().with_features(every), RefCell::default());
        let checked = Cpu::from_source_with(&CheckedLeaves(&all), Detecting::CheckedLeaves);
        let mut reads = all.1.take();
        reads.sort_unstable();
        assert_eq!(reads, [(1, 0), (7, 0), (0x8000_0001, 0)]);
        assert_eq!(checked.features(), every);
        assert_eq!(checked.features(), Cpu::from_source(&all.0).features());
        let checked = Cpu::from_source_with(&CheckedLeaves(&counting), Detecting::CheckedLeaves);
        assert_eq!(checked.features(), cpu.features());
        assert_eq!(checked.vendor(), Cpu::from_source(&NativeCpuid).vendor());
    }

    #[test]
    fn kvm_feature_leaf_only_read_when_in_range() {
        let [b, c, d] = vendor_regs(&KVM_SIGNATURE);
        let fake = FakeCpuid::new().with_kvm(0x4000_0000, 1 << 7, 1);
        let hv = hypervisor(&fake.with_leaf(0x4000_0000, 0, [0x4000_0000, b, c, d])).unwrap();
        assert_eq!((hv.kind, hv.kvm), (HypervisorKind::Kvm, None));
    }

    #[test]
    fn kvm_behind_hyperv_enlightenments_wins() {
        let hyperv = FakeCpuid::new().with_hypervisor(b"Microsoft Hv", 0x4000_0000);
        let hv = hypervisor(&hyperv.clone().with_kvm(0x4000_0100, 1 << 7, 0)).unwrap();
        assert_eq!((hv.kind, hv.base_leaf), (HypervisorKind::Kvm, 0x4000_0100));
        assert!(hv.kvm.unwrap().pv_unhalt);
        // Without KVM, the first signature found wins.
        let xen = hyperv.with_hypervisor(b"XenVMMXenVMM", 0x4000_0100);
        assert_eq!(hypervisor(&xen).unwrap().kind, HypervisorKind::HyperV);
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
            let hv = hypervisor(&FakeCpuid::new().with_hypervisor(sig, 0x4000_0000)).unwrap();
            assert_eq!((hv.kind, hv.base_leaf, hv.kvm), (kind, 0x4000_0000, None));
            assert_eq!(hv.signature_str().as_bytes(), sig);
        }
        let xen = hypervisor(&FakeCpuid::new().with_hypervisor(b"XenVMMXenVMM", 0x4000_0100));
        assert_eq!(
            xen.map(|hv| (hv.kind, hv.base_leaf)),
            Some((HypervisorKind::Xen, 0x4000_0100))
        );
        // An unknown signature whose max leaf is outside its block is stray data, not a hypervisor.
        let stray = FakeCpuid::new().with_hypervisor(b"FooBarBazQux", 0x4000_0000);
        let [_, b, c, d] = stray.cpuid(0x4000_0000, 0);
        assert_eq!(
            hypervisor(&stray.with_leaf(0x4000_0000, 0, [0xd, b, c, d])),
            None
        );
    }

    #[test]
    fn no_hypervisor_bit_means_none() {
        let kvm = FakeCpuid::new().with_kvm(0x4000_0000, 1 << 7, 1);
        let cpu = Cpu::from_source(&clear_bits(kvm, 1, ECX, LEAF1_ECX_HYPERVISOR));
        assert_eq!(cpu.hypervisor(), None);
        assert!(cpu.to_string().ends_with("hypervisor none"));
        // The bit alone, with no vendor leaf, is not a hypervisor either.
        let bare = FakeCpuid::new().with_leaf(1, 0, [0, 0, LEAF1_ECX_HYPERVISOR, 0]);
        assert_eq!(hypervisor(&bare), None);
    }

    #[test]
    fn without_clears_dependants() {
        let cpu = Cpu::synthetic(
            set(&[Xsave, Avx, Avx2, Fma, F16c, Avx512f, Avx512vl, Popcnt]),
            None,
        );
        let without = |cleared: &[Feature]| cpu.without(set(cleared)).features();
        assert_eq!(without(&[Avx]), set(&[Xsave, Popcnt]));
        assert_eq!(
            without(&[Avx512f]),
            set(&[Xsave, Avx, Avx2, Fma, F16c, Popcnt])
        );
        assert_eq!(without(&[Xsave]), set(&[Popcnt]));
        assert_eq!(
            without(&[Avx2]),
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
        let cpu = Cpu::detect();
        eprintln!("{cpu}");
        macro_rules! agree {
            ($($feature:ident $std:tt),+) => {
                $(assert_eq!(cpu.has($feature), std::arch::is_x86_feature_detected!($std), $std);)+
            };
        }
        agree!(Sse3 "sse3", Ssse3 "ssse3", Sse4_1 "sse4.1", Sse4_2 "sse4.2", Popcnt "popcnt");
        agree!(Lzcnt "lzcnt", Bmi1 "bmi1", Bmi2 "bmi2", Avx "avx", Avx2 "avx2", Fma "fma");
        agree!(F16c "f16c", Avx512f "avx512f", Avx512dq "avx512dq", Avx512cd "avx512cd");
        agree!(Avx512bw "avx512bw", Avx512vl "avx512vl", Erms "ermsb", Movbe "movbe", Sha "sha");
        agree!(Aes "aes", Pclmulqdq "pclmulqdq", Rdrand "rdrand", Rdseed "rdseed", Adx "adx");
        agree!(Xsave "xsave", Cmpxchg16b "cmpxchg16b");
        assert!(!cpu.vendor().is_empty());
        assert_eq!(Cpu::detect(), cpu, "detection is deterministic");
        // From glibc's copies without leaves 0 and 0x8000_0000, as from the instruction alone
        // (vendor, features and hypervisor).
        assert_eq!(cpu, Cpu::from_source(&NativeCpuid));
    }
}
