//! vCPU state save/restore on real KVM: a tiny real-mode guest counts in memory and reports
//! each count by PIO; its state moves to a second VM with a copy of its memory, where it
//! must continue counting. Fails without /dev/kvm unless KILN_SKIP_KVM=1.

use kiln_vcpu::state::{VcpuSnapshot, MSR_IA32_TSC};
use kvm_bindings::{kvm_msr_entry, kvm_userspace_memory_region, Msrs};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

fn kvm_or_skip(test: &str) -> Option<Kvm> {
    if std::env::var_os("KILN_SKIP_KVM").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED {test}: KILN_SKIP_KVM=1");
        return None;
    }
    Some(Kvm::new().unwrap_or_else(|e| panic!("{test} needs /dev/kvm: {e}; KILN_SKIP_KVM=1 skips")))
}

const CODE_GPA: u64 = 0x1000;
const COUNTER_GPA: usize = 0x1800;
const PORT: u16 = 0x80;

/// Real mode, at 0x1000:
///   inc dword [0x1800] ; mov eax, [0x1800] ; out 0x80, eax ; jmp 0x1000
const COUNTER_LOOP: [u8; 14] = [
    0x66, 0xff, 0x06, 0x00, 0x18, // inc dword [0x1800]
    0x66, 0xa1, 0x00, 0x18, // mov eax, [0x1800]
    0x66, 0xe7, 0x80, // out 0x80, eax
    0xeb, 0xf2, // jmp 0x1000
];
/// The address of the `jmp`, where the guest stands once an `out` has completed.
const AFTER_OUT: u64 = CODE_GPA + 12;

/// A VM with an in-kernel irqchip, a vCPU with the host's supported CPUID, and one page at 0x1000 whose contents are `page`.
/// The returned buffer backs guest memory and must outlive the VM.
fn vm_with_page(kvm: &Kvm, page: &[u8]) -> (VmFd, VcpuFd, Vec<u8>, usize) {
    let vm = kvm.create_vm().expect("vm");
    vm.create_irq_chip().expect("irqchip");
    let mut mem = vec![0u8; 0x2000];
    let off = mem.as_ptr().align_offset(0x1000);
    mem[off..off + page.len()].copy_from_slice(page);
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: CODE_GPA,
        memory_size: 0x1000,
        userspace_addr: mem[off..].as_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `mem` is returned to the caller, who keeps it alive (and unmoved: a Vec's
    // buffer doesn't move with the Vec) while the VM exists.
    unsafe { vm.set_user_memory_region(region) }.expect("memory");
    let vcpu = vm.create_vcpu(0).expect("vcpu");
    let cpuid = kiln_vcpu::supported_cpuid(kvm).expect("cpuid");
    vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
    (vm, vcpu, mem, off)
}

fn counter(mem: &[u8], off: usize) -> u32 {
    let at = off + COUNTER_GPA - CODE_GPA as usize;
    u32::from_le_bytes(mem[at..at + 4].try_into().expect("4 bytes"))
}

/// Runs until the next exit, which must be the guest's `out`; returns the count it wrote.
fn next_count(vcpu: &mut VcpuFd) -> u32 {
    match vcpu.run().expect("KVM_RUN") {
        VcpuExit::IoOut(PORT, data) => u32::from_le_bytes(data.try_into().expect("4 bytes")),
        other => panic!("unexpected exit {other:?}"),
    }
}

/// Completes the pending `out` without entering the guest again (KVM API: re-enter
/// `KVM_RUN` with `immediate_exit` set), so the vCPU's state is consistent.
fn complete_pending_io(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    let r = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    let e = r.expect_err("immediate_exit must return EINTR");
    assert_eq!(e.errno(), libc::EINTR, "{e}");
}

fn read_tsc(vcpu: &VcpuFd) -> u64 {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_TSC,
        ..Default::default()
    }])
    .expect("msrs");
    assert_eq!(vcpu.get_msrs(&mut msrs).expect("KVM_GET_MSRS"), 1);
    msrs.as_slice()[0].data
}

#[test]
fn restored_vcpu_continues_in_a_second_vm() {
    let Some(kvm) = kvm_or_skip("restored_vcpu_continues_in_a_second_vm") else {
        return;
    };
    let (_vm1, mut vcpu1, mem1, off1) = vm_with_page(&kvm, &COUNTER_LOOP);
    let mut sregs = vcpu1.get_sregs().expect("sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu1.set_sregs(&sregs).expect("sregs");
    vcpu1
        .set_regs(&kvm_bindings::kvm_regs {
            rip: CODE_GPA,
            rflags: 2,
            ..Default::default()
        })
        .expect("regs");
    // A TSC far from a fresh VM's, so a restore that lost it can't pass by accident.
    const TSC_START: u64 = 1 << 40;
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_TSC,
        data: TSC_START,
        ..Default::default()
    }])
    .expect("msrs");
    assert_eq!(vcpu1.set_msrs(&msrs).expect("KVM_SET_MSRS"), 1);
    // kvm-pvm accepts the write but keeps the guest TSC at the host's: there the TSC can't
    // jump in the first place and continuity is only checked for monotonicity.
    let tsc_writable = read_tsc(&vcpu1).wrapping_sub(TSC_START) < 1 << 38;
    if !tsc_writable {
        eprintln!("note: this host ignores IA32_TSC writes; TSC continuity checked loosely");
    }

    const RUNS: u32 = 500;
    for i in 1..=RUNS {
        assert_eq!(next_count(&mut vcpu1), i);
    }
    complete_pending_io(&mut vcpu1);

    let saved = VcpuSnapshot::save(&vcpu1, &kvm).expect("save");
    assert_eq!(saved.regs.rip, AFTER_OUT, "saved after the out completed");
    assert_eq!(saved.regs.rax & 0xffff_ffff, u64::from(RUNS));
    assert_eq!(counter(&mem1, off1), RUNS);
    assert!(saved.lapic.is_some(), "the VM has an in-kernel irqchip");
    assert!(!saved.cpuid.is_empty());
    let tsc = saved.msr(MSR_IA32_TSC).expect("IA32_TSC is saved");
    if tsc_writable {
        assert!(tsc >= TSC_START, "saved TSC {tsc:#x} < {TSC_START:#x}");
    }

    // Through the serialized form, as a snapshot file would carry it.
    let json = serde_json::to_vec(&saved).expect("encode");
    let loaded: VcpuSnapshot = serde_json::from_slice(&json).expect("decode");
    assert_eq!(loaded, saved);

    let page = mem1[off1..off1 + 0x1000].to_vec();
    let (_vm2, mut vcpu2, mem2, off2) = vm_with_page(&kvm, &page);
    loaded.restore(&vcpu2).expect("restore");

    let regs = vcpu2.get_regs().expect("regs");
    assert_eq!(regs.rip, saved.regs.rip, "RIP identical at restore");
    assert_eq!(regs, saved.regs);
    assert_eq!(vcpu2.get_sregs().expect("sregs"), saved.sregs);
    let tsc2 = read_tsc(&vcpu2);
    assert!(
        tsc2 >= tsc && (!tsc_writable || tsc2 - tsc < 1 << 38),
        "TSC jumped: saved {tsc:#x}, restored {tsc2:#x}"
    );
    let again = VcpuSnapshot::save(&vcpu2, &kvm).expect("save restored");
    assert_eq!(again.cpuid, saved.cpuid);
    assert_eq!(again.xcrs, saved.xcrs);
    assert_eq!(again.debug_regs, saved.debug_regs);
    assert_eq!(again.mp_state, saved.mp_state);

    // The guest goes on counting where it was.
    for i in RUNS + 1..=RUNS + 50 {
        assert_eq!(next_count(&mut vcpu2), i);
    }
    complete_pending_io(&mut vcpu2);
    assert_eq!(counter(&mem2, off2), RUNS + 50);
    // The first VM's memory is untouched by the second.
    assert_eq!(counter(&mem1, off1), RUNS);
}

#[test]
fn restore_rejects_another_version() {
    let Some(kvm) = kvm_or_skip("restore_rejects_another_version") else {
        return;
    };
    let (_vm, vcpu, _mem, _off) = vm_with_page(&kvm, &COUNTER_LOOP);
    let mut s = VcpuSnapshot::save(&vcpu, &kvm).expect("save");
    s.version += 1;
    let err = s.restore(&vcpu).expect_err("other version");
    assert!(err.to_string().contains("version"), "{err}");
}
