//! Interpretation of CPUID results for the `cpuid` scenario. The guest passes a closure that
//! executes the instruction; tests pass tables.

use core::fmt;

use crate::line::{Describe, Described, LineBuf};

/// One CPUID result.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidResult {
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// KVM's hypervisor signature in leaf 0x4000_0000 EBX, ECX, EDX.
pub const KVM_SIGNATURE: [u8; 12] = *b"KVMKVMKVM\0\0\0";
/// First hypervisor leaf.
pub const HV_LEAF: u32 = 0x4000_0000;
/// KVM features leaf, which the max hypervisor leaf must reach.
pub const KVM_FEATURES_LEAF: u32 = 0x4000_0001;
/// Leaf 0xB level type: SMT.
pub const LEVEL_SMT: u32 = 1;
/// Leaf 0xB level type: core.
pub const LEVEL_CORE: u32 = 2;

/// Why the CPUID checks failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuidError {
    /// Leaf 1 ECX bit 31 clear.
    NoHypervisorBit,
    /// Leaf 0x4000_0000 signature is not KVM's.
    Signature([u8; 12]),
    /// Leaf 0x4000_0000 EAX (max hypervisor leaf) too small.
    HvMaxLeaf(u32),
    /// Leaf 1 EBX[31:24] (BSP initial APIC ID) is not 0.
    BspApicId(u32),
    /// More than one vCPU but leaf 1 EDX.HTT is clear.
    HttClear,
    /// Leaf 1 EBX[23:16] smaller than the vCPU count.
    LogicalCount {
        /// Leaf 1 EBX[23:16].
        reported: u32,
        /// `kiln.cpus`.
        cpus: u32,
    },
    /// Leaf 0xB subleaf has the wrong level number (ECX[7:0]).
    X2LevelNumber {
        /// Subleaf queried.
        subleaf: u32,
        /// ECX[7:0].
        found: u32,
    },
    /// Leaf 0xB subleaf 0 is not the SMT level.
    X2FirstNotSmt(u32),
    /// Leaf 0xB reports no core level.
    X2NoCoreLevel,
    /// Leaf 0xB logical processor counts decrease between levels.
    X2CountOrder,
    /// Leaf 0xB EDX (x2APIC ID) of the BSP is not 0.
    X2ApicId(u32),
    /// Leaf 0xB core-level EBX[15:0] differs from the vCPU count.
    X2CoreCount {
        /// EBX[15:0] at the core level.
        reported: u32,
        /// `kiln.cpus`.
        cpus: u32,
    },
    /// Leaf 0xB core-level shift (EAX[4:0]) cannot hold the vCPU count.
    X2Shift {
        /// EAX[4:0].
        shift: u32,
        /// `kiln.cpus`.
        cpus: u32,
    },
    /// Leaf 4 EAX[31:26] + 1 (cores per package) smaller than the vCPU count (Intel only).
    Leaf4Cores {
        /// EAX[31:26] + 1.
        reported: u32,
        /// `kiln.cpus`.
        cpus: u32,
    },
}

impl Describe for CpuidError {
    fn describe(&self, out: &mut LineBuf) {
        let want_cpus = |out: &mut LineBuf, what: &str, reported: u32, cpus: u32| {
            out.push_str(what);
            out.push_dec(u64::from(reported));
            out.push_str(", kiln.cpus ");
            out.push_dec(u64::from(cpus));
        };
        match *self {
            CpuidError::NoHypervisorBit => out.push_str("leaf 1 ECX.hypervisor (bit 31) clear"),
            CpuidError::Signature(s) => {
                out.push_str("leaf 0x40000000 signature ");
                for b in s {
                    out.push_hex_digits(u64::from(b), 2);
                }
                out.push_str(", want KVMKVMKVM");
            }
            CpuidError::HvMaxLeaf(m) => {
                out.push_str("leaf 0x40000000 EAX < 0x40000001: ");
                out.push_hex(u64::from(m));
            }
            CpuidError::BspApicId(id) => {
                out.push_str("BSP initial APIC ID (leaf 1 EBX[31:24]) is ");
                out.push_dec(u64::from(id));
            }
            CpuidError::HttClear => out.push_str("kiln.cpus > 1 but leaf 1 EDX.HTT clear"),
            CpuidError::LogicalCount { reported, cpus } => {
                want_cpus(out, "leaf 1 EBX[23:16] logical processors ", reported, cpus)
            }
            CpuidError::X2LevelNumber { subleaf, found } => {
                out.push_str("leaf 0xb subleaf ");
                out.push_dec(u64::from(subleaf));
                out.push_str(" has level number ");
                out.push_dec(u64::from(found));
            }
            CpuidError::X2FirstNotSmt(t) => {
                out.push_str("leaf 0xb subleaf 0 is not the SMT level, type ");
                out.push_dec(u64::from(t));
            }
            CpuidError::X2NoCoreLevel => out.push_str("leaf 0xb has no core level (type 2)"),
            CpuidError::X2CountOrder => out.push_str("leaf 0xb logical processor counts decrease"),
            CpuidError::X2ApicId(id) => {
                out.push_str("leaf 0xb x2APIC ID of the BSP is ");
                out.push_dec(u64::from(id));
            }
            CpuidError::X2CoreCount { reported, cpus } => want_cpus(
                out,
                "leaf 0xb core level logical processors ",
                reported,
                cpus,
            ),
            CpuidError::X2Shift { shift, cpus } => {
                want_cpus(out, "leaf 0xb core level shift too small: ", shift, cpus)
            }
            CpuidError::Leaf4Cores { reported, cpus } => {
                want_cpus(out, "leaf 4 EAX[31:26]+1 cores ", reported, cpus)
            }
        }
    }
}

impl fmt::Display for CpuidError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Described(self).fmt(f)
    }
}

/// What the checks saw, for the PASS detail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidSummary {
    /// Leaf 0 EAX.
    pub max_basic: u32,
    /// Leaf 0x4000_0000 EAX.
    pub max_hv: u32,
    /// Leaf 1 EBX[23:16] when HTT is set, else 1; `None` when topology was not checked.
    pub logical: Option<u32>,
    /// Logical processors at the leaf 0xB core level, if leaf 0xB exists and was checked.
    pub x2_core_count: Option<u32>,
    /// Leaf 0 vendor string.
    pub vendor: [u8; 12],
}

fn regs_bytes(a: u32, b: u32, c: u32) -> [u8; 12] {
    let mut s = [0u8; 12];
    s[..4].copy_from_slice(&a.to_le_bytes());
    s[4..8].copy_from_slice(&b.to_le_bytes());
    s[8..].copy_from_slice(&c.to_le_bytes());
    s
}

/// Runs the CPUID checks. `cpuid(leaf, subleaf)` executes the instruction. Identity (hypervisor
/// bit, KVM signature and leaves) is always checked; topology (BSP APIC IDs, leaf 1 counts,
/// leaf 0xB, Intel leaf 4) only when `cpus` (`kiln.cpus`) is given.
pub fn check_cpuid(
    cpuid: &mut dyn FnMut(u32, u32) -> CpuidResult,
    cpus: Option<u32>,
) -> Result<CpuidSummary, CpuidError> {
    let l0 = cpuid(0, 0);
    let mut sum = CpuidSummary {
        max_basic: l0.eax,
        vendor: regs_bytes(l0.ebx, l0.edx, l0.ecx),
        ..Default::default()
    };
    let l1 = cpuid(1, 0);
    if l1.ecx & (1 << 31) == 0 {
        return Err(CpuidError::NoHypervisorBit);
    }
    let hv = cpuid(HV_LEAF, 0);
    let sig = regs_bytes(hv.ebx, hv.ecx, hv.edx);
    if sig != KVM_SIGNATURE {
        return Err(CpuidError::Signature(sig));
    }
    if hv.eax < KVM_FEATURES_LEAF {
        return Err(CpuidError::HvMaxLeaf(hv.eax));
    }
    sum.max_hv = hv.eax;

    // Topology is the sub-check tied to kiln.cpus: without it, only identity is checked.
    // (Under kvm-pvm on AMD, CPUID is not virtualised at all and reports the host's topology.)
    let Some(n) = cpus else {
        return Ok(sum);
    };
    check_topology(cpuid, &l1, n, &mut sum)?;
    Ok(sum)
}

fn check_topology(
    cpuid: &mut dyn FnMut(u32, u32) -> CpuidResult,
    l1: &CpuidResult,
    n: u32,
    sum: &mut CpuidSummary,
) -> Result<(), CpuidError> {
    // Leaf 1.
    let apic_id = l1.ebx >> 24;
    if apic_id != 0 {
        return Err(CpuidError::BspApicId(apic_id));
    }
    let htt = l1.edx & (1 << 28) != 0;
    let logical = if htt { (l1.ebx >> 16) & 0xff } else { 1 };
    sum.logical = Some(logical);
    if n > 1 && !htt {
        return Err(CpuidError::HttClear);
    }
    if logical < n {
        return Err(CpuidError::LogicalCount {
            reported: logical,
            cpus: n,
        });
    }

    // Extended topology (leaf 0xB), walked until the invalid level.
    if sum.max_basic >= 0xB && cpuid(0xB, 0).ebx & 0xffff != 0 {
        let mut core: Option<CpuidResult> = None;
        let mut prev_count = 0u32;
        for sub in 0..8u32 {
            let r = cpuid(0xB, sub);
            let level_type = (r.ecx >> 8) & 0xff;
            if level_type == 0 {
                break;
            }
            if r.ecx & 0xff != sub {
                return Err(CpuidError::X2LevelNumber {
                    subleaf: sub,
                    found: r.ecx & 0xff,
                });
            }
            if sub == 0 && level_type != LEVEL_SMT {
                return Err(CpuidError::X2FirstNotSmt(level_type));
            }
            if r.edx != 0 {
                return Err(CpuidError::X2ApicId(r.edx));
            }
            let count = r.ebx & 0xffff;
            if count < prev_count {
                return Err(CpuidError::X2CountOrder);
            }
            prev_count = count;
            if level_type == LEVEL_CORE {
                core = Some(r);
            }
        }
        let core = core.ok_or(CpuidError::X2NoCoreLevel)?;
        let count = core.ebx & 0xffff;
        sum.x2_core_count = Some(count);
        if count != n {
            return Err(CpuidError::X2CoreCount {
                reported: count,
                cpus: n,
            });
        }
        let shift = core.eax & 0x1f;
        if (1u64 << shift) < u64::from(n) {
            return Err(CpuidError::X2Shift { shift, cpus: n });
        }
    }

    // Leaf 4 is Intel's deterministic cache leaf; AMD leaves it reserved.
    if &sum.vendor == b"GenuineIntel" && sum.max_basic >= 4 {
        let l4 = cpuid(4, 0);
        if l4.eax & 0x1f != 0 {
            let cores = (l4.eax >> 26) + 1;
            // The field is 6 bits wide: 64 is the most it can say.
            if cores < n.min(64) {
                return Err(CpuidError::Leaf4Cores {
                    reported: cores,
                    cpus: n,
                });
            }
        }
    }
    Ok(())
}

/// Writes the PASS detail for `s` into `out`.
pub fn describe(s: &CpuidSummary, out: &mut LineBuf) {
    out.clear();
    out.push_str("vendor=");
    out.push_escaped(&s.vendor);
    out.push_str(" max_basic=");
    out.push_hex(u64::from(s.max_basic));
    out.push_str(" max_hv=");
    out.push_hex(u64::from(s.max_hv));
    if let Some(l) = s.logical {
        out.push_str(" logical=");
        out.push_dec(u64::from(l));
    }
    if let Some(c) = s.x2_core_count {
        out.push_str(" leaf0b_core=");
        out.push_dec(u64::from(c));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// CPUID as kiln promises to set it for `n` vCPUs (see the brief in the crate README).
    fn kiln_table(n: u32, vendor: &[u8; 12]) -> HashMap<(u32, u32), CpuidResult> {
        let mut t = HashMap::new();
        let v =
            |i: usize| u32::from_le_bytes([vendor[i], vendor[i + 1], vendor[i + 2], vendor[i + 3]]);
        t.insert(
            (0, 0),
            CpuidResult {
                eax: 0xd,
                ebx: v(0),
                edx: v(4),
                ecx: v(8),
            },
        );
        t.insert(
            (1, 0),
            CpuidResult {
                eax: 0,
                ebx: n << 16,
                ecx: 1 << 31,
                edx: if n > 1 { 1 << 28 } else { 0 },
            },
        );
        t.insert(
            (4, 0),
            CpuidResult {
                eax: ((n - 1).min(63) << 26) | 0x121,
                ..Default::default()
            },
        );
        let shift = 32 - (n - 1).leading_zeros();
        t.insert(
            (0xB, 0),
            CpuidResult {
                eax: 0,
                ebx: 1,
                ecx: 1 << 8,
                edx: 0,
            },
        );
        t.insert(
            (0xB, 1),
            CpuidResult {
                eax: shift,
                ebx: n,
                ecx: (2 << 8) | 1,
                edx: 0,
            },
        );
        t.insert(
            (0xB, 2),
            CpuidResult {
                ecx: 2,
                ..Default::default()
            },
        );
        t.insert(
            (HV_LEAF, 0),
            CpuidResult {
                eax: 0x4000_0001,
                ebx: u32::from_le_bytes(*b"KVMK"),
                ecx: u32::from_le_bytes(*b"VMKV"),
                edx: u32::from_le_bytes(*b"M\0\0\0"),
            },
        );
        t
    }

    fn run(
        t: &HashMap<(u32, u32), CpuidResult>,
        cpus: Option<u32>,
    ) -> Result<CpuidSummary, CpuidError> {
        check_cpuid(
            &mut |l, s| t.get(&(l, s)).copied().unwrap_or_default(),
            cpus,
        )
    }

    #[test]
    fn kiln_topology_passes_for_several_counts() {
        for n in [1, 2, 3, 4, 8, 255] {
            for vendor in [b"GenuineIntel", b"AuthenticAMD"] {
                let s = run(&kiln_table(n, vendor), Some(n)).unwrap();
                assert_eq!(s.x2_core_count, Some(n));
            }
        }
    }

    #[test]
    fn wrong_cpu_count_fails() {
        let t = kiln_table(2, b"GenuineIntel");
        assert_eq!(
            run(&t, Some(4)),
            Err(CpuidError::LogicalCount {
                reported: 2,
                cpus: 4
            })
        );
        let mut t = kiln_table(4, b"GenuineIntel");
        t.get_mut(&(0xB, 1)).unwrap().ebx = 2;
        assert_eq!(
            run(&t, Some(4)),
            Err(CpuidError::X2CoreCount {
                reported: 2,
                cpus: 4
            })
        );
        let mut t = kiln_table(4, b"GenuineIntel");
        t.get_mut(&(0xB, 1)).unwrap().eax = 1;
        assert_eq!(
            run(&t, Some(4)),
            Err(CpuidError::X2Shift { shift: 1, cpus: 4 })
        );
        let mut t = kiln_table(4, b"GenuineIntel");
        t.get_mut(&(4, 0)).unwrap().eax = 0x121;
        assert_eq!(
            run(&t, Some(4)),
            Err(CpuidError::Leaf4Cores {
                reported: 1,
                cpus: 4
            })
        );
        // Without kiln.cpus the topology is not checked.
        assert!(run(&t, None).is_ok());
        let mut t = kiln_table(2, b"GenuineIntel");
        t.get_mut(&(1, 0)).unwrap().ebx |= 1 << 24;
        assert_eq!(run(&t, None).unwrap().x2_core_count, None);
    }

    #[test]
    fn htt_must_be_set_for_smp() {
        let mut t = kiln_table(2, b"AuthenticAMD");
        t.get_mut(&(1, 0)).unwrap().edx = 0;
        assert_eq!(run(&t, Some(2)), Err(CpuidError::HttClear));
    }

    #[test]
    fn hypervisor_identity() {
        let mut t = kiln_table(1, b"GenuineIntel");
        t.get_mut(&(1, 0)).unwrap().ecx = 0;
        assert_eq!(run(&t, None), Err(CpuidError::NoHypervisorBit));
        let mut t = kiln_table(1, b"GenuineIntel");
        t.get_mut(&(HV_LEAF, 0)).unwrap().ebx = u32::from_le_bytes(*b"Micr");
        assert!(matches!(run(&t, None), Err(CpuidError::Signature(_))));
        let mut t = kiln_table(1, b"GenuineIntel");
        t.get_mut(&(HV_LEAF, 0)).unwrap().eax = 0x4000_0000;
        assert_eq!(run(&t, None), Err(CpuidError::HvMaxLeaf(0x4000_0000)));
    }

    #[test]
    fn bsp_ids_must_be_zero() {
        let mut t = kiln_table(2, b"GenuineIntel");
        t.get_mut(&(1, 0)).unwrap().ebx |= 1 << 24;
        assert_eq!(run(&t, Some(2)), Err(CpuidError::BspApicId(1)));
        let mut t = kiln_table(2, b"GenuineIntel");
        t.get_mut(&(0xB, 1)).unwrap().edx = 3;
        assert_eq!(run(&t, Some(2)), Err(CpuidError::X2ApicId(3)));
    }

    #[test]
    fn leaf_0b_structure() {
        let mut t = kiln_table(2, b"GenuineIntel");
        t.get_mut(&(0xB, 0)).unwrap().ecx = 2 << 8;
        assert_eq!(run(&t, Some(2)), Err(CpuidError::X2FirstNotSmt(2)));
        let mut t = kiln_table(2, b"GenuineIntel");
        t.get_mut(&(0xB, 1)).unwrap().ecx = 2 << 8;
        assert_eq!(
            run(&t, Some(2)),
            Err(CpuidError::X2LevelNumber {
                subleaf: 1,
                found: 0
            })
        );
        let mut t = kiln_table(2, b"GenuineIntel");
        t.remove(&(0xB, 1));
        assert_eq!(run(&t, Some(2)), Err(CpuidError::X2NoCoreLevel));
        // No leaf 0xB at all (max basic leaf below it): skipped.
        let mut t = kiln_table(2, b"GenuineIntel");
        t.get_mut(&(0, 0)).unwrap().eax = 0xa;
        assert_eq!(run(&t, Some(2)).unwrap().x2_core_count, None);
    }

    #[test]
    fn describe_mentions_vendor() {
        let s = run(&kiln_table(1, b"AuthenticAMD"), Some(1)).unwrap();
        let mut l = LineBuf::new();
        describe(&s, &mut l);
        assert!(
            l.as_str().starts_with("vendor=AuthenticAMD"),
            "{}",
            l.as_str()
        );
    }
}
