#![warn(missing_docs)]
#![doc = include_str!("../README.md")]

mod bus_handler;
pub mod cpuid;
pub mod exit;
pub mod exit_times;
pub mod regs;
pub mod runner;
pub mod state;

pub use bus_handler::{BusExitHandler, MsrReadFn, StopCallback};
pub use exit::{handle_exit, handle_exit_cached, ExitAction, ExitHandler, StopKind, StopReason};
pub use exit_times::{ExitClock, ExitTimeSummary, ExitTimes};
pub use kiln_bus::DispatchCache;
pub use regs::{BootMode, BootRegs, Segment};
pub use runner::{
    set_exit_timing, stop_current_vcpu, with_vcpu_exit_times, ThreadInit, Vcpu, VcpuHandle,
    VcpuState,
};
pub use state::VcpuSnapshot;

use kvm_ioctls::{Kvm, VcpuFd, VmFd};

/// Errors of the vCPU layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// The vCPU count can't be described.
    #[error("invalid vCPU count {count} (supported: 1..={max})")]
    InvalidCpuCount {
        /// Requested count.
        count: u32,
        /// The limit.
        max: u32,
    },
    /// Too many CPUID entries for KVM's container.
    #[error("{0} CPUID entries exceed KVM's limit")]
    CpuidTooLarge(usize),
    /// Too many MSR entries for KVM's container.
    #[error("too many MSR entries")]
    MsrsTooLarge,
    /// KVM refused to set an MSR.
    #[error("KVM refused to set MSR {0:#x}")]
    MsrRejected(u32),
    /// The host's XSAVE state doesn't fit the 4 KiB `KVM_GET_XSAVE`/`KVM_SET_XSAVE` region
    /// (or a snapshot's region has the wrong size).
    #[error("XSAVE state of {0} bytes doesn't fit KVM_GET_XSAVE's 4096-byte region")]
    XsaveTooLarge(i32),
    /// A vCPU snapshot of another format version.
    #[error("vCPU snapshot version {found}, this build reads version {expected}")]
    SnapshotVersion {
        /// The snapshot's version.
        found: u32,
        /// The version this build reads.
        expected: u32,
    },
    /// Installing the kick signal handler failed.
    #[error("installing the vCPU kick signal handler: errno {0}")]
    SignalHandler(i32),
    /// Spawning the vCPU thread failed.
    #[error("spawning the vCPU thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// [`VcpuHandle::with_paused_fd`] on a vCPU that is not paused.
    #[error("vCPU {index} is not paused")]
    NotPaused {
        /// The vCPU.
        index: u32,
    },
    /// [`VcpuHandle::with_paused_fd`] on a vCPU whose thread has finished: the guest powered
    /// off, reset or failed, or the vCPU was stopped.
    #[error("vCPU {index} has stopped (the guest powered off, reset or failed)")]
    Stopped {
        /// The vCPU.
        index: u32,
    },
    /// The vCPU thread ended (or hung) before it ran a job given to
    /// [`VcpuHandle::with_paused_fd`].
    #[error("vCPU {index}: its thread did not run the job (ended or not answering)")]
    VcpuGone {
        /// The vCPU.
        index: u32,
    },
    /// The per-thread set-up given to [`Vcpu::start_with`] failed (e.g. a seccomp filter).
    #[error("vCPU {index} thread set-up: {why}")]
    ThreadInit {
        /// The vCPU.
        index: u32,
        /// Why.
        why: String,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// `KVM_CREATE_VM`, tried again while it fails with `EINTR`.
///
/// The ioctl can fail with `EINTR` when a signal is pending while it sets the VM up (the
/// MMU-notifier registration it does gives up on a pending signal): a `SIGSTOP`/`SIGCONT` from
/// job control, a debugger or an orchestrator freezing the process is enough — seen when
/// `kiln-bench exits --interleave` stopped kiln during start-up. The signal is taken on the
/// way back to user space, so another try goes through; the tries are bounded all the same.
pub fn create_vm(kvm: &Kvm) -> std::result::Result<VmFd, kvm_ioctls::Error> {
    retry_on_eintr(|| kvm.create_vm())
}

/// Calls `f` until it returns anything but `EINTR`, at most [`EINTR_TRIES`] times.
fn retry_on_eintr<T>(
    mut f: impl FnMut() -> std::result::Result<T, kvm_ioctls::Error>,
) -> std::result::Result<T, kvm_ioctls::Error> {
    let mut tries = 1;
    loop {
        match f() {
            Err(e) if e.errno() == libc::EINTR && tries < EINTR_TRIES => tries += 1,
            r => return r,
        }
    }
}

/// How often [`create_vm`] tries before it passes `EINTR` on.
const EINTR_TRIES: u32 = 100;

/// Creates vCPU `index` of `count` in `vm` and gives it its CPUID, MSRs, FPU and local APIC
/// wiring. Boot registers are set separately ([`regs::setup_boot_regs`]) on the boot vCPU;
/// the others wait for INIT/SIPI.
///
/// `supported` is `KVM_GET_SUPPORTED_CPUID`, read once per VM.
pub fn create_vcpu(
    vm: &VmFd,
    supported: &kvm_bindings::CpuId,
    index: u32,
    count: u32,
) -> Result<VcpuFd> {
    let fd = vm
        .create_vcpu(u64::from(index))
        .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
    let cpuid = cpuid::normalize(supported, index, count)?;
    fd.set_cpuid2(&cpuid)
        .map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))?;
    regs::setup_msrs(&fd)?;
    if cpuid::is_amd(supported.as_slice()) {
        // A refusal only means an older KVM; the guest then logs a harmless warning.
        let _ = regs::setup_amd_hwcr(&fd);
    }
    regs::setup_fpu(&fd)?;
    regs::setup_lapic(&fd)?;
    Ok(fd)
}

/// `KVM_GET_SUPPORTED_CPUID` with KVM's maximum number of entries.
pub fn supported_cpuid(kvm: &Kvm) -> Result<kvm_bindings::CpuId> {
    kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::Kvm("KVM_GET_SUPPORTED_CPUID", e))
}

/// Makes KVM forward guest accesses to MSRs it doesn't know to user space
/// (`KVM_CAP_X86_USER_SPACE_MSR` with `KVM_MSR_EXIT_REASON_UNKNOWN`), where
/// [`ExitHandler::msr_read`]/[`ExitHandler::msr_write`] answer them (by default with the #GP
/// KVM would have injected). Returns `false` if the host lacks the capability. With the host's
/// `kvm.ignore_msrs=1`, KVM answers unknown MSRs itself and nothing is forwarded.
pub fn enable_user_msr_exits(vm: &kvm_ioctls::VmFd) -> Result<bool> {
    if !vm.check_extension(kvm_ioctls::Cap::X86UserSpaceMsr) {
        return Ok(false);
    }
    let cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
        args: [
            u64::from(kvm_ioctls::MsrExitReason::Unknown.bits()),
            0,
            0,
            0,
        ],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(|e| Error::Kvm("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)", e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errno(n: i32) -> kvm_ioctls::Error {
        kvm_ioctls::Error::new(n)
    }

    #[test]
    fn eintr_is_tried_again_and_other_errors_are_not() {
        let mut calls = 0;
        let r = retry_on_eintr(|| {
            calls += 1;
            if calls < 3 {
                Err(errno(libc::EINTR))
            } else {
                Ok(calls)
            }
        });
        assert_eq!(r.ok(), Some(3));

        let mut calls = 0;
        let r: std::result::Result<(), _> = retry_on_eintr(|| {
            calls += 1;
            Err(errno(libc::ENOMEM))
        });
        assert_eq!(r.map_err(|e| e.errno()), Err(libc::ENOMEM));
        assert_eq!(calls, 1, "ENOMEM is not tried again");
    }

    #[test]
    fn a_signal_that_never_clears_ends_the_tries() {
        let mut calls = 0;
        let r: std::result::Result<(), _> = retry_on_eintr(|| {
            calls += 1;
            Err(errno(libc::EINTR))
        });
        assert_eq!(r.map_err(|e| e.errno()), Err(libc::EINTR));
        assert_eq!(calls, EINTR_TRIES);
    }
}
