//! Legacy x86 platform devices for Kiln VMs, KVM-free.
//!
//! Each device is a plain state machine behind the [`kiln_bus`] device traits: it raises
//! interrupts through a [`kiln_irq::InterruptLine`], reports power events through
//! [`PowerEvents`], and writes output to any [`std::io::Write`]. Nothing here knows about KVM,
//! so every device is tested with synthetic accesses.
//!
//! Registers are one byte wide. A wider access is split into byte lanes the way an ISA bus
//! does: byte `i` of the access goes to the register at `offset + i`; lanes past the end of
//! the device read 0 and are ignored on write. No guest access panics.
#![warn(missing_docs)]
#![doc = include_str!("../README.md")]

mod bench;
pub mod consts;
mod exit_test;
mod i8042;
mod no_pci;
mod post;
mod power;
mod serial;

// The constants are also reachable from the crate root (`kiln_legacy::COM1_PORT`).
pub use bench::{
    thread_cpu_us, typical_register, BenchDevice, ExitTimeHooks, IrqInjector, BENCH_IOEVENTFD_MMIO,
    BENCH_IRQ_GSI, BENCH_MSR, BENCH_PORT, BENCH_PORT_SIZE,
};
pub use consts::*;
pub use exit_test::ExitTestDevice;
pub use i8042::{I8042Device, CTRL_ALT_DEL_SCANCODES, I8042_STATUS_OBF};
pub use no_pci::NoPciHost;
pub use post::PostDevice;
pub use power::PowerDevice;
pub use serial::{LineTrigger, SerialDevice};
/// Re-exported from `vm-superio` so users need no direct dependency on it.
pub use vm_superio::serial::{NoEvents, SerialEvents, SerialState};

/// Errors of the legacy devices.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Restoring the serial port from a saved [`SerialState`] failed (FIFO longer than the
    /// UART's 64 bytes, or the pending interrupt could not be re-raised).
    #[error("serial device: restoring state with {fifo_len} bytes in the RX FIFO: {source}")]
    SerialRestore {
        /// Length of the saved RX FIFO.
        fifo_len: usize,
        /// What vm-superio reported.
        #[source]
        source: vm_superio::serial::Error<std::io::Error>,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Power events a guest can request; the VMM implements it (stop the vCPUs and exit, or
/// rebuild the VM).
///
/// Called from vCPU threads: implementations must only signal (an eventfd, an atomic flag, a
/// channel send) and return, never block on the vCPUs.
pub trait PowerEvents: Send + Sync {
    /// The guest asked to power off (ACPI S5 or an equivalent).
    fn power_off(&self);
    /// The guest asked for a reset (reset register, i8042 CPU reset).
    fn reset(&self);
}

/// The register a byte lane of an access lands on: `offset + lane`, if that is still inside
/// a device of `size` registers.
#[inline]
fn lane_register(offset: u64, lane: usize, size: u64) -> Option<u64> {
    let reg = offset.checked_add(lane as u64)?;
    (reg < size).then_some(reg)
}

#[cfg(test)]
mod test_util {
    use super::PowerEvents;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Counts power events.
    #[derive(Default)]
    pub struct CountingPower {
        pub offs: AtomicU32,
        pub resets: AtomicU32,
    }

    impl CountingPower {
        pub fn offs(&self) -> u32 {
            self.offs.load(Ordering::Relaxed)
        }
        pub fn resets(&self) -> u32 {
            self.resets.load(Ordering::Relaxed)
        }
    }

    impl PowerEvents for CountingPower {
        fn power_off(&self) {
            self.offs.fetch_add(1, Ordering::Relaxed);
        }
        fn reset(&self) {
            self.resets.fetch_add(1, Ordering::Relaxed);
        }
    }
}
