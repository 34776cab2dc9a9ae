//! The floor: the same conformance guest, set up with kiln's crates, but run by the thinnest
//! possible kvm-ioctls loop — one `match` on the exit, no bus, no dynamic calls, no locks.
//! What kiln adds per exit is the difference between kiln's numbers and these.
//!
//! The floor does the same device work per exit as kiln: the benchmarked PIO and MMIO
//! accesses go to an [`ExitTestDevice`](legacy::ExitTestDevice) of its own (a relaxed atomic
//! add per write, the count read back on a read), called statically from the `match`. So the
//! difference is only kiln's dispatch (bus lookup, access checks, dynamic device call), not
//! the device.

use std::fs::File;
use std::time::{Duration, Instant};

use kiln_vcpu::{ExitClock, ExitTimes};

use kvm_ioctls::{Kvm, VcpuExit};

use kiln_bus::{MmioAddress, MmioDevice, PioAddress, PioDevice};

use kiln_legacy as legacy;
use kiln_memory::{Backing, MemoryConfig};

/// Guest RAM of the floor VM.
const MEM: u64 = 256 << 20;

fn e<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |err| format!("floor: {what}: {err}")
}

fn set_le(data: &mut [u8], v: u32) {
    let b = v.to_le_bytes();
    for (i, d) in data.iter_mut().enumerate() {
        *d = b.get(i).copied().unwrap_or(0);
    }
}

/// Boots the guest with `cmdline` on one vCPU, run by the calling thread, to power-off;
/// returns its serial output, which it also writes to stdout line by line as the guest
/// prints it (so a runner can follow the guest's progress, as it follows kiln's console).
/// `kiln-bench exits` runs it in a fresh process each round (`kiln-bench floor`, see
/// [`crate::vmms::run_floor`]), as it runs kiln.
pub fn run(cmdline: &str, timeout: Duration) -> Result<String, String> {
    let kvm = Kvm::new().map_err(e("/dev/kvm"))?;
    let vm = kiln_vcpu::create_vm(&kvm).map_err(e("KVM_CREATE_VM"))?;
    vm.set_tss_address(0xfffb_d000)
        .map_err(e("KVM_SET_TSS_ADDR"))?;
    let _chip = kiln_irq::IrqChip::create(&vm).map_err(e("irqchip"))?;
    let mem = kiln_memory::create_guest_memory(&MemoryConfig {
        size: MEM,
        backing: Backing::Anonymous,
    })
    .map_err(e("guest memory"))?;
    // SAFETY: `mem` outlives the vCPU, which is dropped at the end of this function.
    unsafe { kiln_memory::register_memory(&vm, &mem) }.map_err(e("memory slots"))?;
    kiln_vcpu::enable_user_msr_exits(&vm).map_err(e("MSR exits"))?;
    let rsdp = kiln_acpi::write(
        &mem,
        &kiln_acpi::AcpiConfig {
            cpus: 1,
            serial: true,
            ged_gsi: legacy::GED_GSI,
            virtio_mmio: Vec::new(),
        },
    )
    .map_err(e("ACPI tables"))?;
    let elf = crate::vmms::guest_elf()?;
    let kernel = File::open(&elf).map_err(e("guest ELF"))?;
    let _ = std::fs::remove_file(&elf);
    let entry = kiln_boot::load(
        &mem,
        kiln_boot::BootConfig {
            kernel,
            initrd: None::<File>,
            cmdline: format!("{cmdline} kiln.cpus=1"),
            protocol: kiln_boot::Protocol::Auto,
            acpi_rsdp: Some(rsdp),
        },
    )
    .map_err(e("loading the guest"))?;
    let supported = kiln_vcpu::supported_cpuid(&kvm).map_err(e("CPUID"))?;
    let mut vcpu = kiln_vcpu::create_vcpu(&vm, &supported, 0, 1).map_err(e("vCPU"))?;
    kiln_vcpu::regs::setup_boot_regs(&vcpu, &kiln::vm::boot_regs(&entry))
        .map_err(e("vCPU registers"))?;

    exit_loop(&mut vcpu, timeout)
}

/// What the floor keeps between exits besides the device: serial output, the bench marks.
#[derive(Default)]
struct Floor {
    serial: Vec<u8>,
    /// (user µs, system µs) at the last begin mark.
    begin: (u64, u64),
    /// The last ended run's (user µs, system µs, user-space ns, typical user-space ns per
    /// exit × 100), as the bench device's registers 0, 4, 12 and 16 report them.
    last: (u32, u32, u32, u32),
    msr_reads: u64,
    /// How much of `serial` has gone to stdout.
    streamed: usize,
}

impl Floor {
    /// A write to COM1: kept, and each finished line passed on to stdout at once.
    #[cold]
    #[inline(never)]
    fn serial_out(&mut self, data: &[u8]) {
        self.serial.extend_from_slice(data);
        if let Some(nl) = data.iter().rposition(|&b| b == b'\n') {
            self.stream_to(self.serial.len() - data.len() + nl + 1);
        }
    }

    /// Writes `serial[streamed..end]` to stdout. A closed stdout only loses the live copy:
    /// the output is returned as well.
    fn stream_to(&mut self, end: usize) {
        use std::io::Write;
        if let Some(new) = self.serial.get(self.streamed..end) {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(new).and_then(|()| out.flush());
            self.streamed = end;
        }
    }

    /// A write to the bench device's mark register (kiln_legacy::BenchDevice).
    #[cold]
    #[inline(never)]
    fn mark(&mut self, data: &[u8], times: &ExitTimes) {
        // Bit 31 of the mark: end of a measured run.
        let end = data.get(3).is_some_and(|b| b & 0x80 != 0);
        let now = legacy::thread_cpu_us();
        if end {
            let b = self.begin;
            let t = times.summary();
            self.last = (
                now.0.saturating_sub(b.0) as u32,
                now.1.saturating_sub(b.1) as u32,
                u32::try_from(t.total_ns).unwrap_or(u32::MAX),
                legacy::typical_register(t.typical_ns),
            );
        } else {
            self.begin = now;
            times.clear();
        }
    }

    /// A read of a port other than the exit-test device's.
    #[cold]
    #[inline(never)]
    fn port_in(&self, port: u16, data: &mut [u8]) {
        let v = match port {
            // LSR: transmitter empty, so the guest never waits to print.
            0x3fd => 0x60,
            legacy::BENCH_PORT => self.last.0,
            0x70c => self.last.1,
            0x714 => self.last.2,
            0x718 => self.last.3,
            _ => 0,
        };
        set_le(data, v);
    }
}

/// What the loop does after an exit that is not the benchmarked device's.
enum Next {
    Run,
    /// The guest powered off.
    Done,
    Fail(String),
}

impl Floor {
    /// Every exit but the exit-test device's four: out of line, so the loop holds the
    /// benchmarked arms alone and their path after each world switch runs through as few
    /// instruction lines as kiln's.
    #[cold]
    #[inline(never)]
    fn other_exit(
        &mut self,
        exit: Result<VcpuExit<'_>, kvm_ioctls::Error>,
        times: &ExitTimes,
    ) -> Next {
        match exit {
            Ok(VcpuExit::IoOut(port, data)) => match port {
                legacy::COM1_PORT => self.serial_out(data),
                legacy::POWER_PORT | legacy::QEMU_DEBUG_EXIT_PORT => return Next::Done,
                legacy::BENCH_PORT => self.mark(data, times),
                _ => {}
            },
            Ok(VcpuExit::IoIn(port, data)) => self.port_in(port, data),
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0),
            Ok(VcpuExit::MmioWrite(..))
            | Ok(VcpuExit::Hlt)
            | Ok(VcpuExit::Intr)
            | Ok(VcpuExit::IrqWindowOpen) => {}
            Ok(VcpuExit::X86Rdmsr(m)) => {
                if m.index == legacy::BENCH_MSR {
                    self.msr_reads += 1;
                    *m.data = self.msr_reads;
                } else {
                    *m.error = 1;
                }
            }
            Ok(VcpuExit::X86Wrmsr(m)) => *m.error = 1,
            Ok(VcpuExit::SystemEvent(..)) => return Next::Done,
            Ok(other) => {
                return Next::Fail(format!(
                    "floor: unexpected exit {other:?}\n{}",
                    String::from_utf8_lossy(&self.serial)
                ))
            }
            Err(err) if err.errno() == libc::EINTR || err.errno() == libc::EAGAIN => {}
            Err(err) => return Next::Fail(format!("floor: KVM_RUN: {err}")),
        }
        Next::Run
    }
}

/// The exit loop, in a function of its own so its code is compact: the benchmarked arms
/// come first, everything else is out of line.
#[inline(never)]
fn exit_loop(vcpu: &mut kvm_ioctls::VcpuFd, timeout: Duration) -> Result<String, String> {
    const TEST_PORTS: std::ops::Range<u16> =
        legacy::EXIT_TEST_PORT..legacy::EXIT_TEST_PORT + legacy::EXIT_TEST_PORT_SIZE;
    const TEST_MMIO: std::ops::Range<u64> =
        legacy::EXIT_TEST_MMIO_BASE..legacy::EXIT_TEST_MMIO_BASE + legacy::EXIT_TEST_MMIO_SIZE;
    // On the heap, as kiln's is.
    let device = std::sync::Arc::new(legacy::ExitTestDevice::new());
    let mut f = Floor::default();
    // User-space time between KVM_RUN returning and the next KVM_RUN, recorded as kiln's
    // vCPU threads record it with --exit-bench (same clock, same ExitTimes).
    let times = ExitTimes::new();
    let clock = ExitClock::get();
    let mut exited_at: u64 = 0;
    let deadline = Instant::now() + timeout;
    let mut exits = 0u64;
    loop {
        if exited_at != 0 {
            times.record(clock.ns_between(exited_at, clock.now()));
            exited_at = 0;
        }
        exits += 1;
        if exits % 4096 == 0 && Instant::now() > deadline {
            return Err(format!(
                "floor: the guest did not power off within {timeout:?}\n{}",
                String::from_utf8_lossy(&f.serial)
            ));
        }
        let r = vcpu.run();
        if r.is_ok() {
            exited_at = clock.now();
        }
        match r {
            Ok(VcpuExit::IoOut(port, data)) if TEST_PORTS.contains(&port) => device.pio_write(
                PioAddress(legacy::EXIT_TEST_PORT),
                port - legacy::EXIT_TEST_PORT,
                data,
            ),
            Ok(VcpuExit::IoIn(port, data)) if TEST_PORTS.contains(&port) => device.pio_read(
                PioAddress(legacy::EXIT_TEST_PORT),
                port - legacy::EXIT_TEST_PORT,
                data,
            ),
            Ok(VcpuExit::MmioWrite(addr, data)) if TEST_MMIO.contains(&addr) => device.mmio_write(
                MmioAddress(legacy::EXIT_TEST_MMIO_BASE),
                addr - legacy::EXIT_TEST_MMIO_BASE,
                data,
            ),
            Ok(VcpuExit::MmioRead(addr, data)) if TEST_MMIO.contains(&addr) => device.mmio_read(
                MmioAddress(legacy::EXIT_TEST_MMIO_BASE),
                addr - legacy::EXIT_TEST_MMIO_BASE,
                data,
            ),
            other => match f.other_exit(other, &times) {
                Next::Run => {}
                Next::Done => break,
                Next::Fail(msg) => return Err(msg),
            },
        }
    }
    f.stream_to(f.serial.len());
    Ok(String::from_utf8_lossy(&f.serial).into_owned())
}
