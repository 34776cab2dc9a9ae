//! The CPU identity and feature words a snapshot depends on.

use serde::{Deserialize, Serialize};

/// CPUID words that must not decide compatibility: they describe the OS or the hypervisor,
/// not the silicon (leaf 1 ECX: OSXSAVE bit 27, hypervisor bit 31; leaf 7 ECX: OSPKE bit 4).
const LEAF1_ECX_IGNORED: u32 = (1 << 27) | (1 << 31);
const LEAF7_ECX_IGNORED: u32 = 1 << 4;

/// A CPU vendor and the feature words a guest's code may depend on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    /// CPUID leaf 0 vendor string (`GenuineIntel`, `AuthenticAMD`, ...).
    pub vendor: String,
    /// CPUID leaf 1 ECX.
    pub leaf1_ecx: u32,
    /// CPUID leaf 1 EDX.
    pub leaf1_edx: u32,
    /// CPUID leaf 7 subleaf 0 EBX.
    pub leaf7_ebx: u32,
    /// CPUID leaf 7 subleaf 0 ECX.
    pub leaf7_ecx: u32,
    /// CPUID leaf 7 subleaf 0 EDX.
    pub leaf7_edx: u32,
    /// CPUID leaf 0xD subleaf 0 ECX: the XSAVE area size for every feature the CPU supports.
    pub xsave_size: u32,
}

/// One CPUID answer: (eax, ebx, ecx, edx).
pub type CpuidRegs = (u32, u32, u32, u32);

fn vendor_string(ebx: u32, ecx: u32, edx: u32) -> String {
    let mut v = Vec::with_capacity(12);
    for w in [ebx, edx, ecx] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    String::from_utf8_lossy(&v).into_owned()
}

impl CpuFeatures {
    /// The words of a CPUID table, given a lookup `(leaf, subleaf) -> regs` (missing leaves
    /// read as zero).
    pub fn from_cpuid(lookup: impl Fn(u32, u32) -> Option<CpuidRegs>) -> Self {
        let get = |leaf, sub| lookup(leaf, sub).unwrap_or((0, 0, 0, 0));
        let (max, b0, c0, d0) = get(0, 0);
        let (_, _, c1, d1) = get(1, 0);
        let (_, b7, c7, d7) = if max >= 7 { get(7, 0) } else { (0, 0, 0, 0) };
        let xsave = if max >= 0xd { get(0xd, 0).2 } else { 0 };
        CpuFeatures {
            vendor: vendor_string(b0, c0, d0),
            leaf1_ecx: c1 & !LEAF1_ECX_IGNORED,
            leaf1_edx: d1,
            leaf7_ebx: b7,
            leaf7_ecx: c7 & !LEAF7_ECX_IGNORED,
            leaf7_edx: d7,
            xsave_size: xsave,
        }
    }

    /// This host's CPU.
    pub fn host() -> Self {
        Self::from_cpuid(|leaf, sub| {
            #[cfg(target_arch = "x86_64")]
            {
                // SAFETY: CPUID exists on every x86_64 CPU and has no side effects (the
                // intrinsic is safe from Rust 1.87 on, unsafe before).
                #[allow(unused_unsafe)]
                let r = unsafe { std::arch::x86_64::__cpuid_count(leaf, sub) };
                Some((r.eax, r.ebx, r.ecx, r.edx))
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = (leaf, sub);
                None
            }
        })
    }

    /// The features both have (vendor and XSAVE size of `self`): what a guest given `self`
    /// can really use on a host with `other`. KVM emulates some bits the host lacks
    /// (x2APIC, TSC deadline); intersecting with the writing host keeps them from being
    /// required of the next one.
    pub fn intersect(&self, other: &CpuFeatures) -> CpuFeatures {
        CpuFeatures {
            vendor: self.vendor.clone(),
            leaf1_ecx: self.leaf1_ecx & other.leaf1_ecx,
            leaf1_edx: self.leaf1_edx & other.leaf1_edx,
            leaf7_ebx: self.leaf7_ebx & other.leaf7_ebx,
            leaf7_ecx: self.leaf7_ecx & other.leaf7_ecx,
            leaf7_edx: self.leaf7_edx & other.leaf7_edx,
            xsave_size: self.xsave_size.min(other.xsave_size),
        }
    }

    /// Fails (saying what is missing) unless this CPU has the vendor and every feature of
    /// `required`, and an XSAVE area at least as large.
    pub fn satisfies(&self, required: &CpuFeatures) -> Result<(), String> {
        if self.vendor != required.vendor {
            return Err(format!(
                "CPU vendor {:?}, the snapshot needs {:?}",
                self.vendor, required.vendor
            ));
        }
        let words = [
            ("CPUID.1:ECX", self.leaf1_ecx, required.leaf1_ecx),
            ("CPUID.1:EDX", self.leaf1_edx, required.leaf1_edx),
            ("CPUID.7.0:EBX", self.leaf7_ebx, required.leaf7_ebx),
            ("CPUID.7.0:ECX", self.leaf7_ecx, required.leaf7_ecx),
            ("CPUID.7.0:EDX", self.leaf7_edx, required.leaf7_edx),
        ];
        let missing: Vec<String> = words
            .iter()
            .filter(|(_, have, need)| need & !have != 0)
            .map(|(name, have, need)| format!("{name} bits {:#010x}", need & !have))
            .collect();
        if !missing.is_empty() {
            return Err(format!("CPU features missing: {}", missing.join(", ")));
        }
        if self.xsave_size < required.xsave_size {
            return Err(format!(
                "XSAVE area of {} bytes, the snapshot needs {}",
                self.xsave_size, required.xsave_size
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_satisfies_itself_and_subsets() {
        let h = CpuFeatures::host();
        assert_eq!(h.vendor.len(), 12, "{h:?}");
        h.satisfies(&h).unwrap();
        let mut less = h.clone();
        less.leaf1_edx &= 0xff;
        h.satisfies(&less).unwrap();
    }

    #[test]
    fn a_missing_bit_is_named() {
        let h = CpuFeatures::host();
        let mut more = h.clone();
        more.leaf7_edx |= 1 << 30;
        if h.leaf7_edx & (1 << 30) == 0 {
            let e = h.satisfies(&more).unwrap_err();
            assert!(e.contains("CPUID.7.0:EDX bits 0x40000000"), "{e}");
        }
    }

    #[test]
    fn the_hypervisor_bit_does_not_count() {
        let f = CpuFeatures::from_cpuid(|leaf, _| match leaf {
            0 => Some((0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69)),
            1 => Some((0, 0, 1 << 31 | 1, 0)),
            _ => None,
        });
        assert_eq!(f.vendor, "GenuineIntel");
        assert_eq!(f.leaf1_ecx, 1);
    }
}
