//! The kiln exit-benchmark control device: lets the conformance guest's `bench-exits`
//! scenario bracket a run of exits so the VMM measures the CPU time its vCPU thread spent
//! (user and system, `getrusage(RUSAGE_THREAD)`), and ask for timed irqfd injections from a
//! host thread.
//!
//! Registers (PIO, little-endian, 4 bytes each, at [`BENCH_PORT`]):
//!
//! | offset | write | read |
//! |---|---|---|
//! | 0 | mark: bit 31 clear = begin, set = end of a measured run on this vCPU | user µs of the last ended run |
//! | 4 | guest-physical address of the 16-byte irq stamp slot | system µs of the last ended run |
//! | 8 | start N irqfd injections (see [`IrqInjector`]) | injections done so far |
//! | 12 | — | ns the vCPU thread spent in user space handling exits during the last ended run (saturating u32; 0 without a clock) |
//! | 16 | — | the typical user-space ns per exit of the last ended run (mean of the uninterrupted exits, `kiln_vcpu::ExitTimes`), × 100 (0 without a clock) |
//!
//! The mark is handled on the vCPU thread that made the exit, which is the thread whose
//! usage it measures; begin and end must come from the same vCPU.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use kiln_bus::{PioAddress, PioDevice, RateLimitedWarn};

/// First port of the device.
pub const BENCH_PORT: u16 = 0x708;
/// Ports the device occupies.
pub const BENCH_PORT_SIZE: u16 = 20;
/// IOAPIC GSI the irqfd injections raise (edge, active high).
pub const BENCH_IRQ_GSI: u32 = 12;
/// An MSR unknown to KVM that kiln answers from user space (KVM user-space MSR exits), for
/// the `msr-user` benchmark kind. Reads return the number of reads so far.
pub const BENCH_MSR: u32 = 0x4b49_4c4e;
/// A 4-byte MMIO address kiln backs with an ioeventfd, so a write never leaves the kernel
/// (the `mmio-ioeventfd` kind); inside the exit-test device's MMIO window.
pub const BENCH_IOEVENTFD_MMIO: u64 = crate::consts::EXIT_TEST_MMIO_BASE + 0x800;

const MARK_END: u32 = 1 << 31;

/// Runs irqfd injections for the `irqfd` benchmark kind, on a host thread of the VMM's.
///
/// Protocol with the guest, through the 16-byte slot at `slot_gpa`: for each of `count`
/// injections the host waits until the guest's acknowledgement counter (`u64` at +8) has
/// reached the number of injections so far, writes the current kvmclock time in ns (`u64` at
/// +0), then triggers the interrupt; the guest's handler subtracts that stamp from its own
/// kvmclock reading and increments the counter.
pub trait IrqInjector: Send + Sync {
    /// Starts a series (returns at once; a series in progress is replaced).
    fn start(&self, slot_gpa: u64, count: u32);
    /// Injections done in the current series.
    fn done(&self) -> u32;
}

thread_local! {
    /// (user µs, system µs) at the last begin mark on this thread.
    static BEGIN: Cell<Option<(u64, u64)>> = const { Cell::new(None) };
}

/// How the device reads the calling vCPU thread's own exit-handling times (kiln wires them
/// to `kiln_vcpu::with_vcpu_exit_times`). Called on the vCPU thread that made the mark.
#[derive(Debug, Clone, Copy)]
pub struct ExitTimeHooks {
    /// Forgets the exit times recorded so far (at a begin mark).
    pub restart: fn(),
    /// The exit times since `restart`: the total ns spent in user space handling exits, and
    /// the typical ns per exit (mean of the uninterrupted exits) if enough were recorded.
    pub read: fn() -> (u64, Option<f64>),
}

/// Register 16's value for a typical time per exit: hundredths of a ns, saturating, at
/// least 1 when measured; 0 = not measured.
pub fn typical_register(typical_ns: Option<f64>) -> u32 {
    typical_ns.map_or(0, |t| {
        (t * 100.0).round().clamp(1.0, f64::from(u32::MAX)) as u32
    })
}

static BAD: RateLimitedWarn = RateLimitedWarn::new();

/// This thread's CPU time so far: (user µs, system µs).
pub fn thread_cpu_us() -> (u64, u64) {
    // SAFETY: rusage is plain data, filled in by getrusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage owned by this frame.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return (0, 0);
    }
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    (us(ru.ru_utime), us(ru.ru_stime))
}

/// The benchmark control device.
pub struct BenchDevice {
    user_us: AtomicU64,
    sys_us: AtomicU64,
    slot: AtomicU64,
    injector: Option<Arc<dyn IrqInjector>>,
    msr_reads: AtomicU32,
    exit_times: Option<ExitTimeHooks>,
    vmm_ns: AtomicU64,
    vmm_typical_cns: AtomicU32,
}

impl std::fmt::Debug for BenchDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BenchDevice")
            .field("injector", &self.injector.is_some())
            .finish()
    }
}

impl BenchDevice {
    /// A device; without an injector, injection requests are ignored (reads of the count
    /// stay 0, so the guest reports the kind as unsupported); `exit_ns` reads the vCPU
    /// thread's exit-handling times (registers 12 and 16 read 0 without them).
    pub fn new(injector: Option<Arc<dyn IrqInjector>>, exit_times: Option<ExitTimeHooks>) -> Self {
        BenchDevice {
            user_us: AtomicU64::new(0),
            sys_us: AtomicU64::new(0),
            slot: AtomicU64::new(0),
            injector,
            msr_reads: AtomicU32::new(0),
            exit_times,
            vmm_ns: AtomicU64::new(0),
            vmm_typical_cns: AtomicU32::new(0),
        }
    }

    /// Answers a read of [`BENCH_MSR`] (called from the vCPU's MSR exit).
    pub fn read_msr(&self) -> u64 {
        u64::from(
            self.msr_reads
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1),
        )
    }

    /// The last ended run's (user µs, system µs).
    pub fn last_run(&self) -> (u64, u64) {
        (
            self.user_us.load(Ordering::Relaxed),
            self.sys_us.load(Ordering::Relaxed),
        )
    }

    fn mark(&self, value: u32) {
        let now = thread_cpu_us();
        if value & MARK_END == 0 {
            BEGIN.with(|b| b.set(Some(now)));
            if let Some(h) = self.exit_times {
                (h.restart)();
            }
            return;
        }
        match BEGIN.with(|b| b.take()) {
            Some((u, s)) => {
                self.user_us
                    .store(now.0.saturating_sub(u), Ordering::Relaxed);
                self.sys_us
                    .store(now.1.saturating_sub(s), Ordering::Relaxed);
                let (total, typical) = self.exit_times.map_or((0, None), |h| (h.read)());
                self.vmm_ns.store(total, Ordering::Relaxed);
                self.vmm_typical_cns
                    .store(typical_register(typical), Ordering::Relaxed);
            }
            None => {
                BAD.warn(format_args!(
                    "bench device: end mark without a begin on this vCPU; ignored"
                ));
            }
        }
    }
}

fn u32_of(data: &[u8]) -> Option<u32> {
    <[u8; 4]>::try_from(data).ok().map(u32::from_le_bytes)
}

impl PioDevice for BenchDevice {
    fn pio_read(&self, _base: PioAddress, offset: u16, data: &mut [u8]) {
        let v = match offset {
            0 => self.user_us.load(Ordering::Relaxed) as u32,
            4 => self.sys_us.load(Ordering::Relaxed) as u32,
            8 => self.injector.as_ref().map_or(0, |i| i.done()),
            12 => u32::try_from(self.vmm_ns.load(Ordering::Relaxed)).unwrap_or(u32::MAX),
            16 => self.vmm_typical_cns.load(Ordering::Relaxed),
            _ => 0,
        };
        if data.len() == 4 {
            data.copy_from_slice(&v.to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: u16, data: &[u8]) {
        let Some(v) = u32_of(data) else {
            BAD.warn(format_args!(
                "bench device: {}-byte write at offset {offset}; registers are 32-bit",
                data.len()
            ));
            return;
        };
        match offset {
            0 => self.mark(v),
            4 => self.slot.store(u64::from(v), Ordering::Relaxed),
            8 => {
                if let Some(i) = &self.injector {
                    i.start(self.slot.load(Ordering::Relaxed), v);
                }
            }
            _ => {
                BAD.warn(format_args!("bench device: write at offset {offset}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, u32)>>);
    impl IrqInjector for Recorder {
        fn start(&self, slot_gpa: u64, count: u32) {
            self.0.lock().unwrap().push((slot_gpa, count));
        }
        fn done(&self) -> u32 {
            self.0.lock().unwrap().len() as u32
        }
    }

    fn w(d: &BenchDevice, off: u16, v: u32) {
        d.pio_write(PioAddress(BENCH_PORT), off, &v.to_le_bytes());
    }
    fn r(d: &BenchDevice, off: u16) -> u32 {
        let mut b = [0u8; 4];
        d.pio_read(PioAddress(BENCH_PORT), off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn marks_measure_this_threads_cpu_time() {
        thread_local! {
            static FAKE: Cell<(u64, Option<f64>)> = const { Cell::new((0, None)) };
        }
        let hooks = ExitTimeHooks {
            restart: || FAKE.with(|f| f.set((0, None))),
            read: || FAKE.with(Cell::get),
        };
        let d = BenchDevice::new(None, Some(hooks));
        FAKE.with(|f| f.set((999, Some(1.0))));
        w(&d, 0, 7);
        assert_eq!(
            FAKE.with(Cell::get),
            (0, None),
            "a begin mark restarts the exit times"
        );
        // Burn some user time between the marks.
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        FAKE.with(|f| f.set((12_345, Some(41.237))));
        w(&d, 0, 7 | MARK_END);
        assert_eq!(r(&d, 12), 12_345, "exit-handling ns between the marks");
        assert_eq!(r(&d, 16), 4124, "typical ns per exit, in hundredths");
        let (u, s) = d.last_run();
        assert!(u + s > 0, "no CPU time measured ({u}, {s})");
        assert_eq!(r(&d, 0), u as u32);
        assert_eq!(r(&d, 4), s as u32);
        // An end without a begin changes nothing.
        w(&d, 0, MARK_END);
        assert_eq!(d.last_run(), (u, s));
        // Without hooks the exit-time registers read 0.
        let bare = BenchDevice::new(None, None);
        w(&bare, 0, 1);
        w(&bare, 0, 1 | MARK_END);
        assert_eq!((r(&bare, 12), r(&bare, 16)), (0, 0));
    }

    #[test]
    fn injection_requests_reach_the_injector() {
        let rec = Arc::new(Recorder::default());
        let d = BenchDevice::new(Some(rec.clone()), None);
        w(&d, 4, 0x9000);
        w(&d, 8, 100);
        assert_eq!(*rec.0.lock().unwrap(), vec![(0x9000, 100)]);
        assert_eq!(r(&d, 8), 1);
        // Without an injector: ignored, count reads 0.
        let none = BenchDevice::new(None, None);
        w(&none, 8, 5);
        assert_eq!(r(&none, 8), 0);
    }

    #[test]
    fn odd_sizes_and_offsets_are_harmless() {
        let d = BenchDevice::new(None, None);
        d.pio_write(PioAddress(BENCH_PORT), 0, &[1, 2]);
        d.pio_write(PioAddress(BENCH_PORT), 3, &[0; 4]);
        let mut b = [0xffu8; 2];
        d.pio_read(PioAddress(BENCH_PORT), 0, &mut b);
        assert_eq!(b, [0, 0]);
        assert_eq!(d.read_msr(), 1);
        assert_eq!(d.read_msr(), 2);
    }
}
