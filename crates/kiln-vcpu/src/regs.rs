//! Register state at the kernel entry for each boot protocol, MSRs, FPU and local APIC setup.
//!
//! KVM-facing but guest-memory-free: the boot loader (kiln-boot) writes the GDT and page
//! tables into guest memory; this module loads the matching values into the vCPU.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;

use crate::{Error, Result};

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// A segment register's hidden state (what a GDT descriptor decodes to, plus the selector).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    /// Selector (GDT index * 8).
    pub selector: u16,
    /// Base address.
    pub base: u64,
    /// Limit in bytes (already scaled by the granularity bit).
    pub limit: u32,
    /// Type field (4 bits).
    pub type_: u8,
    /// Present.
    pub present: bool,
    /// Privilege level.
    pub dpl: u8,
    /// Default operation size (32-bit).
    pub db: bool,
    /// Code/data (true) or system (false) descriptor.
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// 4 KiB granularity.
    pub g: bool,
    /// Available-for-software bit.
    pub avl: bool,
}

impl Segment {
    fn to_kvm(self) -> kvm_segment {
        kvm_segment {
            base: self.base,
            limit: self.limit,
            selector: self.selector,
            type_: self.type_,
            present: u8::from(self.present),
            dpl: self.dpl,
            db: u8::from(self.db),
            s: u8::from(self.s),
            l: u8::from(self.l),
            g: u8::from(self.g),
            avl: u8::from(self.avl),
            unusable: u8::from(!self.present),
            padding: 0,
        }
    }
}

/// The CPU mode a boot protocol enters the kernel in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootMode {
    /// 64-bit long mode with paging (Linux 64-bit boot protocol); `pml4` is CR3.
    Long64 {
        /// Guest-physical address of the PML4.
        pml4: u64,
    },
    /// 32-bit protected mode, paging off (PVH).
    Protected32,
}

/// Everything the boot vCPU's registers must hold at the kernel entry.
#[derive(Debug, Clone, Copy)]
pub struct BootRegs {
    /// CPU mode.
    pub mode: BootMode,
    /// Entry point.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// RSI: boot_params address for the Linux protocol, else 0.
    pub rsi: u64,
    /// RBX: hvm_start_info address for PVH, else 0.
    pub rbx: u64,
    /// GDT base and limit.
    pub gdt: (u64, u16),
    /// IDT base and limit (an empty IDT: limit 0).
    pub idt: (u64, u16),
    /// CS.
    pub code: Segment,
    /// DS, ES, FS, GS, SS.
    pub data: Segment,
    /// TR.
    pub tss: Segment,
}

/// Fills `regs`/`sregs` for `boot`; pure, so it is tested without KVM.
pub fn apply_boot_regs(boot: &BootRegs, regs: &mut kvm_regs, sregs: &mut kvm_sregs) {
    *regs = kvm_regs {
        rflags: 0x2,
        rip: boot.rip,
        rsp: boot.rsp,
        rbp: boot.rsp,
        rsi: boot.rsi,
        rbx: boot.rbx,
        ..Default::default()
    };
    let data = boot.data.to_kvm();
    sregs.cs = boot.code.to_kvm();
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = boot.tss.to_kvm();
    sregs.gdt.base = boot.gdt.0;
    sregs.gdt.limit = boot.gdt.1;
    sregs.idt.base = boot.idt.0;
    sregs.idt.limit = boot.idt.1;
    match boot.mode {
        BootMode::Long64 { pml4 } => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = pml4;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        BootMode::Protected32 => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
}

/// Loads the boot register state into `vcpu` (general and segment registers, FPU).
pub fn setup_boot_regs(vcpu: &VcpuFd, boot: &BootRegs) -> Result<()> {
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?;
    let mut regs = kvm_regs::default();
    apply_boot_regs(boot, &mut regs, &mut sregs);
    vcpu.set_sregs(&sregs)
        .map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;
    vcpu.set_regs(&regs)
        .map_err(|e| Error::Kvm("KVM_SET_REGS", e))?;
    setup_fpu(vcpu)
}

/// x87 and SSE control words as after FNINIT and at reset.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| Error::Kvm("KVM_SET_FPU", e))
}

/// MSRs a 64-bit kernel expects zeroed or set at entry, as firmware leaves them.
pub fn boot_msr_entries() -> [kvm_msr_entry; 10] {
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    [
        msr(0x174, 0),             // IA32_SYSENTER_CS
        msr(0x175, 0),             // IA32_SYSENTER_ESP
        msr(0x176, 0),             // IA32_SYSENTER_EIP
        msr(0xc000_0081, 0),       // STAR
        msr(0xc000_0082, 0),       // LSTAR
        msr(0xc000_0083, 0),       // CSTAR
        msr(0xc000_0084, 0),       // SYSCALL_MASK
        msr(0xc000_0102, 0),       // KERNEL_GS_BASE
        msr(0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
        msr(0x2ff, (1 << 11) | 6), // MTRRdefType: MTRRs on, default write-back
    ]
}

/// Writes [`boot_msr_entries`]; fails naming the first MSR KVM refused.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<()> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::MsrsTooLarge)?;
    let written = vcpu
        .set_msrs(&msrs)
        .map_err(|e| Error::Kvm("KVM_SET_MSRS", e))?;
    if written != entries.len() {
        let index = entries.get(written).map_or(0, |e| e.index);
        return Err(Error::MsrRejected(index));
    }
    Ok(())
}

/// AMD's hardware configuration register.
pub const MSR_K7_HWCR: u32 = 0xc001_0015;
/// HWCR.TscFreqSel: the TSC counts at the P0 frequency. Firmware sets it on every AMD part
/// with a constant TSC; Linux reports a firmware bug when it is clear.
pub const HWCR_TSC_FREQ_SEL: u64 = 1 << 24;

/// Sets HWCR.TscFreqSel as AMD firmware does. Best effort: KVM versions that don't emulate
/// the bit refuse the write, which is reported as `false` and is otherwise harmless.
pub fn setup_amd_hwcr(vcpu: &VcpuFd) -> bool {
    let Ok(mut msrs) = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_K7_HWCR,
        ..Default::default()
    }]) else {
        return false;
    };
    let current = match vcpu.get_msrs(&mut msrs) {
        Ok(1) => msrs.as_slice()[0].data,
        _ => 0,
    };
    let Ok(set) = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_K7_HWCR,
        data: current | HWCR_TSC_FREQ_SEL,
        ..Default::default()
    }]) else {
        return false;
    };
    matches!(vcpu.set_msrs(&set), Ok(1))
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(v.to_le_bytes()) {
        *r = b as std::os::raw::c_char;
    }
}

/// Wires the local APIC like a PC: LINT0 receives the 8259's ExtINT, LINT1 is NMI.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<()> {
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| Error::Kvm("KVM_GET_LAPIC", e))?;
    set_delivery_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_delivery_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(|e| Error::Kvm("KVM_SET_LAPIC", e))
}

/// A one-screen dump of the vCPU's registers, for crash reports.
pub fn dump_registers(vcpu: &VcpuFd) -> String {
    let regs = match vcpu.get_regs() {
        Ok(r) => r,
        Err(e) => return format!("(registers unavailable: {e})"),
    };
    let sregs = match vcpu.get_sregs() {
        Ok(s) => s,
        Err(e) => return format!("(segment registers unavailable: {e})"),
    };
    format!(
        "rip={:#018x} rsp={:#018x} rflags={:#010x}\n\
         rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n\
         rsi={:#018x} rdi={:#018x} rbp={:#018x}\n\
         r8={:#018x} r9={:#018x} r10={:#018x} r11={:#018x}\n\
         r12={:#018x} r13={:#018x} r14={:#018x} r15={:#018x}\n\
         cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}\n\
         cs={:#x}(base {:#x} l={} db={}) ss={:#x} gdt={:#x}/{:#x} idt={:#x}/{:#x}",
        regs.rip,
        regs.rsp,
        regs.rflags,
        regs.rax,
        regs.rbx,
        regs.rcx,
        regs.rdx,
        regs.rsi,
        regs.rdi,
        regs.rbp,
        regs.r8,
        regs.r9,
        regs.r10,
        regs.r11,
        regs.r12,
        regs.r13,
        regs.r14,
        regs.r15,
        sregs.cr0,
        sregs.cr2,
        sregs.cr3,
        sregs.cr4,
        sregs.efer,
        sregs.cs.selector,
        sregs.cs.base,
        sregs.cs.l,
        sregs.cs.db,
        sregs.ss.selector,
        sregs.gdt.base,
        sregs.gdt.limit,
        sregs.idt.base,
        sregs.idt.limit,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(selector: u16, type_: u8, l: bool, db: bool) -> Segment {
        Segment {
            selector,
            base: 0,
            limit: 0xffff_ffff,
            type_,
            present: true,
            dpl: 0,
            db,
            s: true,
            l,
            g: true,
            avl: false,
        }
    }

    fn boot(mode: BootMode) -> BootRegs {
        BootRegs {
            mode,
            rip: 0x10_0200,
            rsp: 0x8ff0,
            rsi: 0x7000,
            rbx: 0,
            gdt: (0x500, 39),
            idt: (0x528, 0),
            code: seg(0x10, 0xb, true, false),
            data: seg(0x18, 0x3, false, true),
            tss: Segment {
                selector: 0x20,
                limit: 0x67,
                type_: 0xb,
                present: true,
                ..Default::default()
            },
        }
    }

    #[test]
    fn long_mode_entry_state() {
        let mut regs = kvm_regs::default();
        let mut sregs = kvm_sregs::default();
        apply_boot_regs(
            &boot(BootMode::Long64 { pml4: 0x9000 }),
            &mut regs,
            &mut sregs,
        );
        assert_eq!(
            (regs.rip, regs.rsi, regs.rsp, regs.rflags),
            (0x10_0200, 0x7000, 0x8ff0, 2)
        );
        assert_eq!(sregs.cr3, 0x9000);
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(sregs.efer, EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr4 & CR4_PAE, CR4_PAE);
        assert_eq!((sregs.cs.selector, sregs.cs.l), (0x10, 1));
        assert_eq!((sregs.ss.selector, sregs.ds.db), (0x18, 1));
        assert_eq!(
            (sregs.tr.selector, sregs.tr.type_, sregs.tr.s),
            (0x20, 0xb, 0)
        );
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (0x500, 39));
    }

    #[test]
    fn pvh_entry_state_has_paging_off() {
        let mut b = boot(BootMode::Protected32);
        b.rbx = 0x6000;
        b.rsi = 0;
        b.code = seg(0x10, 0xb, false, true);
        let mut regs = kvm_regs::default();
        let mut sregs = kvm_sregs::default();
        apply_boot_regs(&b, &mut regs, &mut sregs);
        assert_eq!(regs.rbx, 0x6000);
        assert_eq!(sregs.cr0, CR0_PE | CR0_ET);
        assert_eq!((sregs.efer, sregs.cr4, sregs.cr3), (0, 0, 0));
        assert_eq!((sregs.cs.l, sregs.cs.db), (0, 1));
    }

    #[test]
    fn lvt_delivery_mode_is_replaced_not_ored() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0 + 1] = 0x7; // some other mode already set
        regs[APIC_LVT0] = 0x30u8 as std::os::raw::c_char; // vector bits kept
        set_delivery_mode(&mut regs, APIC_LVT0, APIC_MODE_NMI);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x4);
        assert_eq!(regs[APIC_LVT0] as u8, 0x30);
    }
}
