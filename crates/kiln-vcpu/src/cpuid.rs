//! CPUID normalisation: what each vCPU reports about itself and the machine.
//!
//! KVM's `KVM_GET_SUPPORTED_CPUID` describes the host; a guest must instead see a consistent
//! virtual machine of `count` vCPUs in one package, one thread per core, with APIC ID = vCPU
//! index. The same rules feed the ACPI MADT, so CPUID and MADT cannot disagree.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use crate::{Error, Result};

/// Leaf 1 ECX bit 31: running under a hypervisor.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: EBX\[23:16\] (logical processor count) is valid.
pub const LEAF1_EDX_HTT: u32 = 1 << 28;
/// The KVM signature leaf.
pub const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;

/// The most vCPUs the topology leaves (8-bit APIC IDs in leaf 1) can describe.
pub const MAX_VCPUS: u32 = 255;

/// Bits needed to number `n` items (ceil(log2 n)), the shift width x2APIC topology uses.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn topology_leaf(function: u32, index: u32, cpu: u32, count: u32) -> kvm_cpuid_entry2 {
    // Level 0 (SMT): one thread per core. Level 1 (core): `count` cores. Level 2: invalid,
    // which ends enumeration.
    let (eax, ebx, ecx_type) = match index {
        0 => (0, 1, 1),
        1 => (id_bits(count), count, 2),
        _ => (0, 0, 0),
    };
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (ecx_type << 8) | (index & 0xff),
        edx: cpu,
        ..Default::default()
    }
}

/// Rewrites `entries` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `cpu` of `count`:
/// hypervisor bit, APIC IDs, logical-processor counts (leaves 1 and 4) and the extended
/// topology leaves 0xB and 0x1F. Returns the entries to append (new topology sub-leaves), as
/// the caller owns the container.
///
/// # Errors
/// [`Error::InvalidCpuCount`] if `count` is 0 or above [`MAX_VCPUS`], or `cpu >= count`.
pub fn normalize_entries(entries: &mut Vec<kvm_cpuid_entry2>, cpu: u32, count: u32) -> Result<()> {
    if count == 0 || count > MAX_VCPUS || cpu >= count {
        return Err(Error::InvalidCpuCount {
            count,
            max: MAX_VCPUS,
        });
    }
    let max_basic = entries
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    let has_leaf_0x1f = entries.iter().any(|e| e.function == 0x1f);
    entries.retain(|e| e.function != 0xb && e.function != 0x1f);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (cpu << 24) | ((count & 0xff) << 16);
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 => {
                // EAX[31:26] cores per package - 1; EAX[25:14] threads sharing this cache - 1.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                let cores = (count - 1).min(63);
                e.eax = (e.eax & 0x3fff) | (sharing.min(0xfff) << 14) | (cores << 26);
            }
            _ => {}
        }
    }
    if max_basic >= 0xb {
        for index in 0..3 {
            entries.push(topology_leaf(0xb, index, cpu, count));
        }
    }
    if has_leaf_0x1f && max_basic >= 0x1f {
        for index in 0..3 {
            entries.push(topology_leaf(0x1f, index, cpu, count));
        }
    }
    Ok(())
}

/// True if leaf 0's vendor string is "AuthenticAMD".
pub fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries
        .iter()
        .find(|e| e.function == 0)
        .is_some_and(|e| (e.ebx, e.edx, e.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163))
}

/// [`normalize_entries`] on a KVM `CpuId` container, returning a new container.
pub fn normalize(supported: &CpuId, cpu: u32, count: u32) -> Result<CpuId> {
    let mut entries = supported.as_slice().to_vec();
    normalize_entries(&mut entries, cpu, count)?;
    CpuId::from_entries(&entries).map_err(|_| Error::CpuidTooLarge(entries.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx: 0x0008_0800,
            ..Default::default()
        }
    }

    fn host() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(0, 0, 0x1f),
            leaf(1, 0, 0x806f8),
            leaf(4, 0, 0x121),
            leaf(4, 3, 0x163),
            leaf(0xb, 0, 0),
            leaf(0x1f, 0, 0),
            leaf(KVM_SIGNATURE_LEAF, 0, 0x4000_0001),
        ]
    }

    fn find(e: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *e.iter()
            .find(|x| x.function == f && x.index == i)
            .unwrap_or_else(|| panic!("leaf {f:#x}.{i} missing"))
    }

    #[test]
    fn leaf1_has_hypervisor_bit_apic_id_and_count() {
        let mut e = host();
        normalize_entries(&mut e, 3, 4).expect("normalize");
        let l1 = find(&e, 1, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn single_cpu_clears_htt() {
        let mut e = host();
        e[1].edx |= LEAF1_EDX_HTT;
        normalize_entries(&mut e, 0, 1).expect("normalize");
        assert_eq!(find(&e, 1, 0).edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn extended_topology_describes_n_cores() {
        for count in [1u32, 2, 3, 4, 8, 200] {
            let mut e = host();
            normalize_entries(&mut e, count - 1, count).expect("normalize");
            let smt = find(&e, 0xb, 0);
            let core = find(&e, 0xb, 1);
            let end = find(&e, 0xb, 2);
            assert_eq!((smt.ebx, (smt.ecx >> 8) & 0xff), (1, 1));
            assert_eq!((core.ebx, (core.ecx >> 8) & 0xff), (count, 2));
            assert!(1u64 << core.eax >= u64::from(count), "shift covers {count}");
            assert_eq!((end.ecx >> 8) & 0xff, 0);
            assert_eq!(core.edx, count - 1, "x2APIC ID");
            assert_eq!(find(&e, 0x1f, 1).ebx, count);
            assert_eq!(e.iter().filter(|x| x.function == 0xb).count(), 3);
        }
    }

    #[test]
    fn leaf4_counts_cores_and_l3_sharing() {
        let mut e = host();
        normalize_entries(&mut e, 0, 6).expect("normalize");
        let l1d = find(&e, 4, 0);
        let l3 = find(&e, 4, 3);
        assert_eq!(l1d.eax >> 26, 5);
        assert_eq!((l1d.eax >> 14) & 0xfff, 0);
        assert_eq!((l3.eax >> 14) & 0xfff, 5);
        assert_eq!(l3.eax & 0x3fff, 0x163, "cache type/level bits kept");
    }

    #[test]
    fn old_cpu_without_leaf_b_gets_none() {
        let mut e = vec![leaf(0, 0, 0xa), leaf(1, 0, 0)];
        normalize_entries(&mut e, 0, 2).expect("normalize");
        assert!(!e.iter().any(|x| x.function == 0xb));
    }

    #[test]
    fn amd_vendor_detection() {
        let mut l0 = leaf(0, 0, 0x10);
        (l0.ebx, l0.edx, l0.ecx) = (0x6874_7541, 0x6974_6e65, 0x444d_4163);
        assert!(is_amd(&[l0]));
        (l0.ebx, l0.edx, l0.ecx) = (0x756e_6547, 0x4965_6e69, 0x6c65_746e); // GenuineIntel
        assert!(!is_amd(&[l0]));
        assert!(!is_amd(&[]));
    }

    #[test]
    fn bad_counts_are_rejected() {
        for (cpu, count) in [(0, 0), (0, MAX_VCPUS + 1), (2, 2)] {
            let mut e = host();
            assert!(normalize_entries(&mut e, cpu, count).is_err());
        }
    }
}
