//! Capture and restore of everything guest-visible of one x86_64 vCPU: the groundwork for
//! VM snapshots.
//!
//! [`VcpuSnapshot::save`] reads a vCPU that is not running (its thread paused, or stopped at
//! an exit whose I/O KVM has completed: re-enter `KVM_RUN` once with `immediate_exit` set).
//! [`VcpuSnapshot::restore`] writes it into a freshly created vCPU of another VM whose guest
//! memory holds the same contents. The snapshot derives serde's `Serialize`/`Deserialize`;
//! the format is the caller's choice.
//!
//! The order of the `KVM_GET_*`/`KVM_SET_*` calls matters and follows Firecracker's
//! x86_64 vCPU code:
//!
//! - save: MP state first (`KVM_GET_MP_STATE` may accept pending APIC events and so change
//!   the rest), vCPU events last (the other GETs may change what they report).
//! - restore: CPUID first (other SETs depend on it), then the TSC frequency, MP state, regs,
//!   sregs (they carry the APIC base MSR), FPU/XSAVE, XCRs, debug registers, LAPIC (after
//!   sregs), MSRs (after the LAPIC: the TSC-deadline MSR needs it), and vCPU events last,
//!   because `KVM_SET_REGS` clears pending exceptions that `KVM_SET_VCPU_EVENTS` restores.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The IA32_TSC MSR: restoring it keeps the guest's TSC from jumping.
pub const MSR_IA32_TSC: u32 = 0x10;

/// Number of 32-bit words in the legacy 4 KiB `kvm_xsave` region.
const XSAVE_WORDS: usize = 1024;

/// Tolerance for a TSC frequency difference, parts per million (as Firecracker: calibration
/// makes identical hosts differ slightly).
const TSC_KHZ_TOL_PPM: u64 = 250;

/// Format version of [`VcpuSnapshot`]; bumped whenever a field changes meaning.
pub const SNAPSHOT_VERSION: u32 = 1;

/// The x87/SSE state of `KVM_GET_FPU`, for hosts without XSAVE (`kvm_fpu` has no serde
/// support in kvm-bindings, so its fields are mirrored here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LegacyFpu {
    /// ST0..ST7 / MM0..MM7.
    pub fpr: [[u8; 16]; 8],
    /// FPU control word.
    pub fcw: u16,
    /// FPU status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last FPU opcode.
    pub last_opcode: u16,
    /// Last FPU instruction pointer.
    pub last_ip: u64,
    /// Last FPU data pointer.
    pub last_dp: u64,
    /// XMM0..XMM15.
    pub xmm: [[u8; 16]; 16],
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for LegacyFpu {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&LegacyFpu> for kvm_fpu {
    fn from(f: &LegacyFpu) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Floating-point and vector state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FpuState {
    /// The 4 KiB `KVM_GET_XSAVE` region (1024 words): x87, SSE, AVX and whatever else the
    /// guest's XCR0 enables.
    Xsave(Vec<u32>),
    /// `KVM_GET_FPU` (x87 and SSE only), on hosts without `KVM_CAP_XSAVE`.
    Legacy(Box<LegacyFpu>),
}

/// Everything guest-visible of one vCPU. See the [module docs](self) for the save/restore
/// order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuSnapshot {
    /// [`SNAPSHOT_VERSION`] when saved.
    pub version: u32,
    /// The CPUID table the vCPU was given (`KVM_GET_CPUID2`).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// `KVM_GET_MP_STATE`.
    pub mp_state: kvm_mp_state,
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// FPU/vector state.
    pub fpu: FpuState,
    /// Extended control registers (XCR0), on hosts with `KVM_CAP_XCRS`.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers; `None` when the VM has no in-kernel irqchip.
    pub lapic: Option<kvm_lapic_state>,
    /// The MSRs KVM lists as saveable and could read, including [`MSR_IA32_TSC`].
    pub msrs: Vec<kvm_msr_entry>,
    /// The vCPU's TSC frequency in kHz, if KVM reports it.
    pub tsc_khz: Option<u32>,
    /// Pending exceptions, interrupts, NMIs and SMIs (`KVM_GET_VCPU_EVENTS`).
    pub events: kvm_vcpu_events,
}

fn ioctl<T>(what: &'static str, r: std::result::Result<T, kvm_ioctls::Error>) -> Result<T> {
    r.map_err(|e| Error::Kvm(what, e))
}

impl VcpuSnapshot {
    /// Reads the state of `vcpu`, which must not be running (see the [module docs](self)).
    /// `kvm` supplies the capabilities and the list of saveable MSRs.
    pub fn save(vcpu: &VcpuFd, kvm: &Kvm) -> Result<Self> {
        let mp_state = ioctl("KVM_GET_MP_STATE", vcpu.get_mp_state())?;
        let regs = ioctl("KVM_GET_REGS", vcpu.get_regs())?;
        let sregs = ioctl("KVM_GET_SREGS", vcpu.get_sregs())?;
        let fpu = if kvm.check_extension(Cap::Xsave) {
            // The legacy ioctl copies only 4 KiB; larger state (dynamically enabled features
            // such as AMX) needs KVM_GET_XSAVE2, which kiln doesn't use.
            let size = kvm.check_extension_int(Cap::Xsave2);
            if usize::try_from(size).is_ok_and(|s| s > std::mem::size_of::<kvm_xsave>()) {
                return Err(Error::XsaveTooLarge(size));
            }
            let xsave = ioctl("KVM_GET_XSAVE", vcpu.get_xsave())?;
            FpuState::Xsave(xsave.region.to_vec())
        } else {
            FpuState::Legacy(Box::new(LegacyFpu::from(&ioctl(
                "KVM_GET_FPU",
                vcpu.get_fpu(),
            )?)))
        };
        let xcrs = if kvm.check_extension(Cap::Xcrs) {
            Some(ioctl("KVM_GET_XCRS", vcpu.get_xcrs())?)
        } else {
            None
        };
        let debug_regs = ioctl("KVM_GET_DEBUGREGS", vcpu.get_debug_regs())?;
        let lapic = match vcpu.get_lapic() {
            Ok(l) => Some(l),
            // No in-kernel irqchip: there is no LAPIC to save.
            Err(e) if e.errno() == libc::ENXIO => None,
            Err(e) => return Err(Error::Kvm("KVM_GET_LAPIC", e)),
        };
        let tsc_khz = vcpu.get_tsc_khz().ok().filter(|&k| k != 0);
        let cpuid = ioctl("KVM_GET_CPUID2", vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES))?
            .as_slice()
            .to_vec();
        let index_list = ioctl("KVM_GET_MSR_INDEX_LIST", kvm.get_msr_index_list())?;
        let msrs = read_msrs(vcpu, index_list.as_slice())?;
        let events = ioctl("KVM_GET_VCPU_EVENTS", vcpu.get_vcpu_events())?;
        Ok(Self {
            version: SNAPSHOT_VERSION,
            cpuid,
            mp_state,
            regs,
            sregs,
            fpu,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            tsc_khz,
            events,
        })
    }

    /// Writes this state into `vcpu`, a vCPU that has not run yet, of a VM whose memory
    /// holds what the saved guest's did (and an in-kernel irqchip if the saved one had one).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<()> {
        if self.version != SNAPSHOT_VERSION {
            return Err(Error::SnapshotVersion {
                found: self.version,
                expected: SNAPSHOT_VERSION,
            });
        }
        let cpuid =
            CpuId::from_entries(&self.cpuid).map_err(|_| Error::CpuidTooLarge(self.cpuid.len()))?;
        ioctl("KVM_SET_CPUID2", vcpu.set_cpuid2(&cpuid))?;
        if let Some(khz) = self.tsc_khz {
            // Scale only if the host's frequency differs beyond calibration noise.
            let here = vcpu.get_tsc_khz().unwrap_or(0);
            if u64::from(here.abs_diff(khz)) * 1_000_000 > u64::from(khz) * TSC_KHZ_TOL_PPM {
                ioctl("KVM_SET_TSC_KHZ", vcpu.set_tsc_khz(khz))?;
            }
        }
        ioctl("KVM_SET_MP_STATE", vcpu.set_mp_state(self.mp_state))?;
        ioctl("KVM_SET_REGS", vcpu.set_regs(&self.regs))?;
        ioctl("KVM_SET_SREGS", vcpu.set_sregs(&self.sregs))?;
        match &self.fpu {
            FpuState::Xsave(words) => {
                let mut xsave = kvm_xsave::default();
                if words.len() != XSAVE_WORDS {
                    return Err(Error::XsaveTooLarge(
                        i32::try_from(words.len() * 4).unwrap_or(i32::MAX),
                    ));
                }
                xsave.region.copy_from_slice(words);
                // SAFETY: KVM reads `guest_fpu.uabi_size` bytes, which exceeds the 4 KiB of
                // `xsave` only if this process asked for dynamically enabled XSTATE features
                // for guests (arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM)); kiln never does, and
                // `save` refuses such hosts.
                ioctl("KVM_SET_XSAVE", unsafe { vcpu.set_xsave(&xsave) })?;
            }
            FpuState::Legacy(fpu) => ioctl("KVM_SET_FPU", vcpu.set_fpu(&kvm_fpu::from(&**fpu)))?,
        }
        if let Some(xcrs) = &self.xcrs {
            ioctl("KVM_SET_XCRS", vcpu.set_xcrs(xcrs))?;
        }
        ioctl("KVM_SET_DEBUGREGS", vcpu.set_debug_regs(&self.debug_regs))?;
        if let Some(lapic) = &self.lapic {
            ioctl("KVM_SET_LAPIC", vcpu.set_lapic(lapic))?;
        }
        for chunk in self.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(chunk).map_err(|_| Error::MsrsTooLarge)?;
            let written = ioctl("KVM_SET_MSRS", vcpu.set_msrs(&msrs))?;
            if written < chunk.len() {
                return Err(Error::MsrRejected(chunk[written].index));
            }
        }
        ioctl("KVM_SET_VCPU_EVENTS", vcpu.set_vcpu_events(&self.events))?;
        Ok(())
    }

    /// The saved value of `index`, if that MSR was saved.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|e| e.index == index).map(|e| e.data)
    }
}

/// Reads `indices` in batches of at most [`KVM_MAX_MSR_ENTRIES`]. `KVM_GET_MSRS` stops at
/// the first MSR it can't read; that one is dropped and the batch goes on after it, so the
/// result holds exactly the MSRs this vCPU can report.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| Error::MsrsTooLarge)?;
        let read = ioctl("KVM_GET_MSRS", vcpu.get_msrs(&mut msrs))?;
        out.extend_from_slice(&msrs.as_slice()[..read.min(batch.len())]);
        // Skip the unreadable MSR (if any) that ended this batch.
        let consumed = if read < batch.len() { read + 1 } else { read };
        rest = &rest[consumed..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VcpuSnapshot {
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[0x20] = 7;
        lapic.regs[1023] = -3;
        let mut xsave = vec![0u32; XSAVE_WORDS];
        xsave[6] = 0x1f80;
        xsave[1023] = 0xdead_beef;
        VcpuSnapshot {
            version: SNAPSHOT_VERSION,
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                index: 0,
                eax: 0x806f8,
                ecx: 1 << 31,
                ..Default::default()
            }],
            mp_state: kvm_mp_state { mp_state: 3 },
            regs: kvm_regs {
                rax: 42,
                rip: 0x1005,
                rflags: 0x202,
                ..Default::default()
            },
            sregs: kvm_sregs {
                cr0: 0x11,
                apic_base: 0xfee0_0900,
                ..Default::default()
            },
            fpu: FpuState::Xsave(xsave),
            xcrs: Some(kvm_xcrs {
                nr_xcrs: 1,
                ..Default::default()
            }),
            debug_regs: kvm_debugregs {
                dr7: 0x400,
                ..Default::default()
            },
            lapic: Some(lapic),
            msrs: vec![
                kvm_msr_entry {
                    index: MSR_IA32_TSC,
                    data: 1 << 40,
                    ..Default::default()
                },
                kvm_msr_entry {
                    index: 0xc000_0080,
                    data: 0x500,
                    ..Default::default()
                },
            ],
            tsc_khz: Some(2_100_000),
            events: kvm_vcpu_events {
                flags: 4,
                ..Default::default()
            },
        }
    }

    #[test]
    fn json_round_trip_is_lossless() {
        let s = sample();
        let json = serde_json::to_string(&s).expect("encode");
        let back: VcpuSnapshot = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, s);
        assert_eq!(back.msr(MSR_IA32_TSC), Some(1 << 40));
    }

    #[test]
    fn legacy_fpu_round_trips_through_kvm_fpu_and_json() {
        let mut fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            last_ip: 0x1234,
            ..Default::default()
        };
        fpu.xmm[15][3] = 9;
        fpu.fpr[7][0] = 1;
        let legacy = LegacyFpu::from(&fpu);
        assert_eq!(kvm_fpu::from(&legacy), fpu);
        let s = VcpuSnapshot {
            fpu: FpuState::Legacy(Box::new(legacy)),
            xcrs: None,
            lapic: None,
            tsc_khz: None,
            ..sample()
        };
        let back: VcpuSnapshot =
            serde_json::from_str(&serde_json::to_string(&s).expect("encode")).expect("decode");
        assert_eq!(back, s);
    }

    #[test]
    fn truncated_input_is_rejected() {
        let json = serde_json::to_string(&sample()).expect("encode");
        assert!(serde_json::from_str::<VcpuSnapshot>(&json[..json.len() / 2]).is_err());
    }
}
