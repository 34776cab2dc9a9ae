//! What a VM exit means: a free function from a KVM exit to an action, so every exit kind is
//! tested with synthetic exits and no guest.

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::VcpuExit;

/// Where PIO and MMIO exits go. Implementations are shared by all vCPU threads (`&self`),
/// must not allocate per call, and must tolerate any guest input (unknown addresses, odd
/// sizes): fill reads with something and ignore writes they don't understand.
pub trait ExitHandler: Send + Sync {
    /// Per-vCPU state the run loop keeps on the vCPU thread's stack and passes to the
    /// `*_cached` methods: a [`kiln_bus::DispatchCache`] for [`crate::BusExitHandler`], `()`
    /// for a handler that needs none.
    type Cache<'a>: Default
    where
        Self: 'a;
    /// `in` from `port`: fill `data` (1, 2 or 4 bytes).
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// `out` to `port`.
    fn pio_write(&self, port: u16, data: &[u8]);
    /// A read of unbacked guest-physical memory at `addr`: fill `data` (1..=8 bytes).
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// A write to unbacked guest-physical memory at `addr`.
    fn mmio_write(&self, addr: u64, data: &[u8]);
    /// [`pio_read`](Self::pio_read) with the calling vCPU's [`Cache`](Self::Cache).
    /// Default: ignores the cache.
    #[inline]
    fn pio_read_cached<'a>(&'a self, cache: &mut Self::Cache<'a>, port: u16, data: &mut [u8]) {
        let _ = cache;
        self.pio_read(port, data);
    }
    /// [`pio_write`](Self::pio_write) with the calling vCPU's cache.
    #[inline]
    fn pio_write_cached<'a>(&'a self, cache: &mut Self::Cache<'a>, port: u16, data: &[u8]) {
        let _ = cache;
        self.pio_write(port, data);
    }
    /// [`mmio_read`](Self::mmio_read) with the calling vCPU's cache.
    #[inline]
    fn mmio_read_cached<'a>(&'a self, cache: &mut Self::Cache<'a>, addr: u64, data: &mut [u8]) {
        let _ = cache;
        self.mmio_read(addr, data);
    }
    /// [`mmio_write`](Self::mmio_write) with the calling vCPU's cache.
    #[inline]
    fn mmio_write_cached<'a>(&'a self, cache: &mut Self::Cache<'a>, addr: u64, data: &[u8]) {
        let _ = cache;
        self.mmio_write(addr, data);
    }
    /// `rdmsr` of an MSR KVM forwarded to user space (see
    /// [`enable_user_msr_exits`](crate::enable_user_msr_exits)): `Some(value)`, or `None` to
    /// inject #GP as KVM would have. Default: #GP.
    fn msr_read(&self, _index: u32) -> Option<u64> {
        None
    }
    /// `wrmsr` of an MSR KVM forwarded to user space: `true` if accepted, `false` to inject
    /// #GP. Default: #GP.
    fn msr_write(&self, _index: u32, _value: u64) -> bool {
        false
    }
    /// Called on the vCPU thread when the vCPU stops for good, before its thread ends. The
    /// VMM uses it to wake its main loop. Default: nothing.
    fn vcpu_stopped(&self, _cpu: u32, _reason: &StopReason) {}
}

/// Why a vCPU stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The VMM asked it to stop ([`crate::VcpuHandle::stop`]).
    Requested,
    /// The guest asked for power-off through KVM (`KVM_SYSTEM_EVENT_SHUTDOWN`).
    PowerOff,
    /// The guest asked for a reset through KVM (`KVM_SYSTEM_EVENT_RESET`).
    Reset,
    /// The guest reported a crash (`KVM_SYSTEM_EVENT_CRASH`).
    GuestCrash,
    /// Triple fault (`KVM_EXIT_SHUTDOWN`). `registers` is a dump taken at the exit.
    TripleFault {
        /// Register dump.
        registers: String,
    },
    /// KVM could not emulate something (`KVM_EXIT_INTERNAL_ERROR`).
    InternalError {
        /// `kvm_run.internal.suberror`.
        suberror: u32,
        /// Register dump.
        registers: String,
    },
    /// VM entry failed (`KVM_EXIT_FAIL_ENTRY`).
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
        /// Register dump.
        registers: String,
    },
    /// An exit this VMM does not handle; stopping beats spinning on it.
    Unhandled {
        /// The exit's name.
        exit: &'static str,
        /// Register dump.
        registers: String,
    },
    /// `KVM_RUN` itself failed.
    RunFailed {
        /// errno.
        errno: i32,
    },
}

impl StopReason {
    /// True for stops that mean the guest or KVM failed (the VMM exits non-zero).
    pub fn is_failure(&self) -> bool {
        !matches!(
            self,
            StopReason::Requested | StopReason::PowerOff | StopReason::Reset
        )
    }
}

/// What the run loop does after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitAction {
    /// Re-enter the guest.
    Continue,
    /// Stop this vCPU; the run loop adds a register dump where the reason has one.
    Stop(StopKind),
}

/// A stop decided by [`handle_exit`], before the run loop attaches register dumps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    /// See [`StopReason::PowerOff`].
    PowerOff,
    /// See [`StopReason::Reset`].
    Reset,
    /// See [`StopReason::GuestCrash`].
    GuestCrash,
    /// See [`StopReason::TripleFault`].
    TripleFault,
    /// See [`StopReason::InternalError`].
    InternalError,
    /// See [`StopReason::FailEntry`].
    FailEntry(u64),
    /// See [`StopReason::Unhandled`].
    Unhandled(&'static str),
}

/// Dispatches one exit. PIO/MMIO go to `handler`; KVM's interrupted-by-signal and
/// halted exits continue; guest power events and failures stop the vCPU.
/// Generic over the handler so a concrete one (e.g. [`crate::BusExitHandler`]) is called
/// statically and can inline: every dynamic call left on the exit path is a cold miss after a
/// world switch.
#[inline]
pub fn handle_exit<H: ExitHandler>(exit: VcpuExit<'_>, handler: &H) -> ExitAction {
    handle_exit_cached(exit, handler, &mut H::Cache::default())
}

/// [`handle_exit`] with the vCPU's dispatch cache (the run loop keeps one per vCPU, so a
/// repeated access to one device skips the bus lookup; see [`kiln_bus::DispatchCache`]).
///
/// Always inlined: the run loop's exit path is this function's hit arms, and a call (with
/// its result returned through memory) would put another frame and a cache line of its own
/// on it.
#[inline(always)]
pub fn handle_exit_cached<'a, H: ExitHandler>(
    exit: VcpuExit<'_>,
    handler: &'a H,
    cache: &mut H::Cache<'a>,
) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => handler.pio_read_cached(cache, port, data),
        VcpuExit::IoOut(port, data) => handler.pio_write_cached(cache, port, data),
        VcpuExit::MmioRead(addr, data) => handler.mmio_read_cached(cache, addr, data),
        VcpuExit::MmioWrite(addr, data) => handler.mmio_write_cached(cache, addr, data),
        VcpuExit::X86Rdmsr(exit) => match handler.msr_read(exit.index) {
            Some(v) => *exit.data = v,
            None => *exit.error = 1,
        },
        VcpuExit::X86Wrmsr(exit) => {
            if !handler.msr_write(exit.index, exit.data) {
                *exit.error = 1;
            }
        }
        // With the in-kernel irqchip KVM handles HLT itself; a HLT exit can only be spurious.
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
        VcpuExit::Shutdown => return ExitAction::Stop(StopKind::TripleFault),
        VcpuExit::InternalError => return ExitAction::Stop(StopKind::InternalError),
        VcpuExit::FailEntry(reason, _) => return ExitAction::Stop(StopKind::FailEntry(reason)),
        VcpuExit::SystemEvent(kind, _) => {
            return ExitAction::Stop(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => StopKind::PowerOff,
                KVM_SYSTEM_EVENT_RESET => StopKind::Reset,
                KVM_SYSTEM_EVENT_CRASH => StopKind::GuestCrash,
                _ => StopKind::Unhandled("KVM_EXIT_SYSTEM_EVENT"),
            })
        }
        other => return ExitAction::Stop(StopKind::Unhandled(exit_name(&other))),
    }
    ExitAction::Continue
}

#[cold]
fn exit_name(exit: &VcpuExit<'_>) -> &'static str {
    match exit {
        VcpuExit::Unknown => "KVM_EXIT_UNKNOWN",
        VcpuExit::Exception => "KVM_EXIT_EXCEPTION",
        VcpuExit::Hypercall(_) => "KVM_EXIT_HYPERCALL",
        VcpuExit::Debug(_) => "KVM_EXIT_DEBUG",
        VcpuExit::Nmi => "KVM_EXIT_NMI",
        VcpuExit::X86Rdmsr(_) => "KVM_EXIT_X86_RDMSR",
        VcpuExit::X86Wrmsr(_) => "KVM_EXIT_X86_WRMSR",
        VcpuExit::MemoryFault { .. } => "KVM_EXIT_MEMORY_FAULT",
        VcpuExit::IoapicEoi(_) => "KVM_EXIT_IOAPIC_EOI",
        _ => "unsupported KVM exit",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        log: Mutex<Vec<String>>,
    }

    impl ExitHandler for Recorder {
        type Cache<'a> = ();
        fn pio_read(&self, port: u16, data: &mut [u8]) {
            data.fill(0xab);
            self.log
                .lock()
                .unwrap()
                .push(format!("in {port:#x} {}", data.len()));
        }
        fn pio_write(&self, port: u16, data: &[u8]) {
            self.log
                .lock()
                .unwrap()
                .push(format!("out {port:#x} {data:?}"));
        }
        fn mmio_read(&self, addr: u64, data: &mut [u8]) {
            data.fill(0xcd);
            self.log
                .lock()
                .unwrap()
                .push(format!("mr {addr:#x} {}", data.len()));
        }
        fn mmio_write(&self, addr: u64, data: &[u8]) {
            self.log
                .lock()
                .unwrap()
                .push(format!("mw {addr:#x} {data:?}"));
        }
    }

    #[test]
    fn msr_exits_answer_or_inject_gp() {
        struct Msrs;
        impl ExitHandler for Msrs {
            type Cache<'a> = ();
            fn pio_read(&self, _: u16, _: &mut [u8]) {}
            fn pio_write(&self, _: u16, _: &[u8]) {}
            fn mmio_read(&self, _: u64, _: &mut [u8]) {}
            fn mmio_write(&self, _: u64, _: &[u8]) {}
            fn msr_read(&self, index: u32) -> Option<u64> {
                (index == 0x1234).then_some(42)
            }
        }
        use kvm_ioctls::{MsrExitReason, ReadMsrExit, WriteMsrExit};
        for (index, want_error, want_data) in [(0x1234, 0, 42), (0x9999, 1, 0)] {
            let (mut error, mut data) = (0u8, 0u64);
            let exit = VcpuExit::X86Rdmsr(ReadMsrExit {
                error: &mut error,
                reason: MsrExitReason::Unknown,
                index,
                data: &mut data,
            });
            assert_eq!(handle_exit(exit, &Msrs), ExitAction::Continue);
            assert_eq!((error, data), (want_error, want_data), "{index:#x}");
        }
        // Writes default to #GP.
        let mut error = 0u8;
        let exit = VcpuExit::X86Wrmsr(WriteMsrExit {
            error: &mut error,
            reason: MsrExitReason::Unknown,
            index: 0x1234,
            data: 1,
        });
        assert_eq!(handle_exit(exit, &Msrs), ExitAction::Continue);
        assert_eq!(error, 1);
    }

    #[test]
    fn io_exits_reach_the_handler() {
        let h = Recorder::default();
        let mut buf = [0u8; 2];
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x3f8, b"A"), &h),
            ExitAction::Continue
        );
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x3fd, &mut buf), &h),
            ExitAction::Continue
        );
        assert_eq!(buf, [0xab, 0xab]);
        let mut m = [0u8; 8];
        assert_eq!(
            handle_exit(VcpuExit::MmioRead(0xc000_0000, &mut m), &h),
            ExitAction::Continue
        );
        assert_eq!(m, [0xcd; 8]);
        assert_eq!(
            handle_exit(VcpuExit::MmioWrite(0xd000_0000, &[1, 2, 3, 4]), &h),
            ExitAction::Continue
        );
        assert_eq!(
            *h.log.lock().unwrap(),
            [
                "out 0x3f8 [65]",
                "in 0x3fd 2",
                "mr 0xc0000000 8",
                "mw 0xd0000000 [1, 2, 3, 4]"
            ]
        );
    }

    #[test]
    fn power_events_and_failures_stop() {
        let h = Recorder::default();
        let cases = [
            (
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, &[]),
                StopKind::PowerOff,
            ),
            (
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[]),
                StopKind::Reset,
            ),
            (
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, &[]),
                StopKind::GuestCrash,
            ),
            (VcpuExit::Shutdown, StopKind::TripleFault),
            (VcpuExit::InternalError, StopKind::InternalError),
            (VcpuExit::FailEntry(7, 0), StopKind::FailEntry(7)),
            (
                VcpuExit::Exception,
                StopKind::Unhandled("KVM_EXIT_EXCEPTION"),
            ),
        ];
        for (exit, want) in cases {
            assert_eq!(handle_exit(exit, &h), ExitAction::Stop(want));
        }
        assert!(h.log.lock().unwrap().is_empty());
    }

    #[test]
    fn spurious_exits_continue() {
        let h = Recorder::default();
        for exit in [VcpuExit::Hlt, VcpuExit::Intr, VcpuExit::IrqWindowOpen] {
            assert_eq!(handle_exit(exit, &h), ExitAction::Continue);
        }
    }

    #[test]
    fn failure_classification() {
        assert!(!StopReason::PowerOff.is_failure());
        assert!(!StopReason::Reset.is_failure());
        assert!(!StopReason::Requested.is_failure());
        assert!(StopReason::TripleFault {
            registers: String::new()
        }
        .is_failure());
        assert!(StopReason::RunFailed { errno: 5 }.is_failure());
    }
}
