//! The vCPU thread on real KVM with tiny real-mode guests: pause/resume/stop and crash
//! reports. Fails without /dev/kvm unless KILN_SKIP_KVM=1.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kiln_vcpu::{ExitHandler, StopReason, Vcpu, VcpuState};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};

fn kvm_or_skip(test: &str) -> Option<Kvm> {
    if std::env::var_os("KILN_SKIP_KVM").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED {test}: KILN_SKIP_KVM=1");
        return None;
    }
    Some(Kvm::new().unwrap_or_else(|e| panic!("{test} needs /dev/kvm: {e}; KILN_SKIP_KVM=1 skips")))
}

#[derive(Default)]
struct Counter(AtomicU64);

impl ExitHandler for Counter {
    type Cache<'a> = ();
    fn pio_read(&self, _port: u16, data: &mut [u8]) {
        data.fill(0);
    }
    fn pio_write(&self, _port: u16, _data: &[u8]) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn mmio_write(&self, _addr: u64, _data: &[u8]) {}
}

/// A VM with one page of real-mode `code` at 0x1000 and the vCPU pointed at it.
fn vm_with_code(
    kvm: &Kvm,
    code: &[u8],
    idt_limit: Option<u16>,
) -> (VmFd, kvm_ioctls::VcpuFd, Vec<u8>) {
    let vm = kvm.create_vm().expect("vm");
    let mut mem = vec![0u8; 0x2000];
    // Page-align inside the Vec so the slot starts on a page.
    let off = mem.as_ptr().align_offset(0x1000);
    mem[off..off + code.len()].copy_from_slice(code);
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0x1000,
        memory_size: 0x1000,
        userspace_addr: mem[off..].as_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `mem` is returned to the caller, who keeps it alive until after the vCPU
    // thread is joined.
    unsafe { vm.set_user_memory_region(region) }.expect("memory");
    let vcpu = vm.create_vcpu(0).expect("vcpu");
    let mut sregs = vcpu.get_sregs().expect("sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if let Some(limit) = idt_limit {
        sregs.idt.limit = limit;
    }
    vcpu.set_sregs(&sregs).expect("sregs");
    let regs = kvm_bindings::kvm_regs {
        rip: 0x1000,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).expect("regs");
    (vm, vcpu, mem)
}

#[test]
fn pause_resume_stop() {
    let Some(kvm) = kvm_or_skip("pause_resume_stop") else {
        return;
    };
    // l: out 0x80, al ; jmp l
    let (_vm, fd, _mem) = vm_with_code(&kvm, &[0xe6, 0x80, 0xeb, 0xfc], None);
    let counter = Arc::new(Counter::default());
    let handle = Vcpu::new(fd, 0, counter.clone())
        .start(false)
        .expect("start");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(handle.pause(Duration::from_secs(5)), VcpuState::Paused);
    let paused_at = counter.0.load(Ordering::Relaxed);
    assert!(paused_at > 0, "the guest ran before the pause");
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(
        counter.0.load(Ordering::Relaxed),
        paused_at,
        "no exits while paused"
    );
    handle.resume();
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        counter.0.load(Ordering::Relaxed) > paused_at,
        "runs again after resume"
    );
    handle.stop();
    assert_eq!(handle.join(), StopReason::Requested);
}

#[test]
fn starts_paused_and_stops_without_running() {
    let Some(kvm) = kvm_or_skip("starts_paused_and_stops_without_running") else {
        return;
    };
    let (_vm, fd, _mem) = vm_with_code(&kvm, &[0xe6, 0x80, 0xeb, 0xfc], None);
    let counter = Arc::new(Counter::default());
    let handle = Vcpu::new(fd, 0, counter.clone())
        .start(true)
        .expect("start");
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(handle.state(), VcpuState::Paused);
    handle.stop();
    assert_eq!(handle.join(), StopReason::Requested);
    assert_eq!(counter.0.load(Ordering::Relaxed), 0);
}

#[test]
fn triple_fault_is_reported_with_registers() {
    let Some(kvm) = kvm_or_skip("triple_fault_is_reported_with_registers") else {
        return;
    };
    // ud2 with an empty IDT: #UD can't be delivered -> #DF -> triple fault.
    let (_vm, fd, _mem) = vm_with_code(&kvm, &[0x0f, 0x0b], Some(0));
    let handle = Vcpu::new(fd, 0, Arc::new(Counter::default()))
        .start(false)
        .expect("start");
    match handle.join() {
        StopReason::TripleFault { registers } => {
            assert!(registers.contains("rip="), "{registers}");
        }
        StopReason::InternalError { .. } => {
            // kvm-pvm may fail to emulate the fault delivery instead; still a crash report.
        }
        other => panic!("expected a triple fault, got {other:?}"),
    }
}

#[test]
fn jobs_run_on_the_paused_thread_only() {
    let Some(kvm) = kvm_or_skip("jobs_run_on_the_paused_thread_only") else {
        return;
    };
    // l: out 0x80, al ; jmp l
    let (_vm, fd, _mem) = vm_with_code(&kvm, &[0xe6, 0x80, 0xeb, 0xfc], None);
    let counter = Arc::new(Counter::default());
    let handle = Vcpu::new(fd, 0, counter.clone())
        .start(false)
        .expect("start");
    std::thread::sleep(Duration::from_millis(20));
    let t = Duration::from_secs(5);
    // Running: refused, and the guest keeps going.
    let e = handle
        .with_paused_fd(t, |fd| fd.get_regs().map(|r| r.rip))
        .unwrap_err();
    assert!(matches!(e, kiln_vcpu::Error::NotPaused { index: 0 }), "{e}");
    assert_eq!(handle.pause(t), VcpuState::Paused);
    let at_pause = counter.0.load(Ordering::Relaxed);
    let (rip, thread) = handle
        .with_paused_fd(t, |fd| {
            (
                fd.get_regs().expect("regs").rip,
                std::thread::current().name().map(str::to_string),
            )
        })
        .expect("job");
    // The loop is two instructions at 0x1000 and 0x1002.
    assert!((0x1000..0x1004).contains(&rip), "rip {rip:#x}");
    assert_eq!(thread.as_deref(), Some("kiln-vcpu0"));
    // Twice in a row works and the vCPU stays paused meanwhile.
    handle.with_paused_fd(t, |_| ()).expect("second job");
    assert_eq!(counter.0.load(Ordering::Relaxed), at_pause);
    handle.resume();
    std::thread::sleep(Duration::from_millis(20));
    assert!(counter.0.load(Ordering::Relaxed) > at_pause);
    handle.stop();
    // Finished: a job can't run, and the error says the vCPU stopped.
    let deadline = std::time::Instant::now() + t;
    while handle.state() != VcpuState::Finished && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let e = handle.with_paused_fd(t, |_| ()).unwrap_err();
    assert!(matches!(e, kiln_vcpu::Error::Stopped { index: 0 }), "{e}");
    assert_eq!(handle.join(), StopReason::Requested);
}
