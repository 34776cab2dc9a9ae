//! The exit benchmark's VMM side: kiln-legacy's bench control device on the PIO bus, an
//! ioeventfd on the bench MMIO address, user-space MSR exits for the bench MSR, and (with
//! `--exit-bench`) the irqfd injector thread. See docs/benchmarks.md and the guest's
//! `bench-exits` scenario.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use kiln_bus::{PioAddress, PioBus};
use kiln_irq::{InterruptLine, IrqChip, IrqfdLine};
use kiln_legacy as legacy;
use kiln_memory::GuestMemoryMmap;

use crate::devices::PioDev;
use crate::vm::VmmError;

/// What [`attach`] set up; keep it alive as long as the VM runs.
pub struct Bench {
    /// The control device (also answers the bench MSR).
    pub device: Arc<legacy::BenchDevice>,
    _ioeventfd: EventFd,
    injector: Option<Arc<Injector>>,
}

impl Bench {
    /// Stops the injector thread, if any.
    pub fn stop(&self) {
        if let Some(i) = &self.injector {
            i.shutdown();
        }
    }
}

/// The irqfd injector: a host thread that waits for the guest's requests.
pub struct Injector {
    request: Mutex<Request>,
    wake: Condvar,
    done: AtomicU32,
    generation: AtomicU64,
}

#[derive(Default)]
struct Request {
    series: Option<(u64, u32)>,
    stop: bool,
}

impl Injector {
    fn shutdown(&self) {
        if let Ok(mut r) = self.request.lock() {
            r.stop = true;
        }
        self.wake.notify_all();
    }
}

impl legacy::IrqInjector for Injector {
    fn start(&self, slot_gpa: u64, count: u32) {
        if let Ok(mut r) = self.request.lock() {
            r.series = Some((slot_gpa, count));
        }
        self.done.store(0, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.wake.notify_all();
    }

    fn done(&self) -> u32 {
        self.done.load(Ordering::Acquire)
    }
}

/// kvmclock now, as the guest's pvclock would read it (`KVM_GET_CLOCK` on a dup of the VM
/// fd, so the thread doesn't borrow the `VmFd`).
fn kvm_clock_ns(vm: &OwnedFd) -> Option<u64> {
    let mut data = kvm_bindings::kvm_clock_data::default();
    // SAFETY: KVM_GET_CLOCK writes one kvm_clock_data into `data`, which is valid and owned
    // by this frame; the fd is a VM fd.
    let rc = unsafe {
        libc::ioctl(
            vm.as_raw_fd(),
            kiln_seccomp::KVM_GET_CLOCK as libc::c_ulong,
            &mut data,
        )
    };
    (rc == 0).then_some(data.clock)
}

/// One series: for each injection wait for the guest's acknowledgement of the previous one,
/// let the guest settle (it waits in `hlt`), stamp, inject.
fn run_series(
    inj: &Injector,
    vm: &OwnedFd,
    mem: &GuestMemoryMmap,
    line: &IrqfdLine,
    gpa: u64,
    count: u32,
) {
    let generation = inj.generation.load(Ordering::Acquire);
    for i in 0..count {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            if inj.generation.load(Ordering::Acquire) != generation {
                return; // Replaced by a new request.
            }
            match mem.read_obj::<u64>(GuestAddress(gpa.saturating_add(8))) {
                Ok(ack) if ack >= u64::from(i) => break,
                Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_micros(20)),
                // A bad slot address or a guest that stopped answering ends the series.
                _ => return,
            }
        }
        // Let the guest get back into `hlt`, so each injection wakes a halted vCPU.
        std::thread::sleep(Duration::from_micros(50));
        let Some(now) = kvm_clock_ns(vm) else {
            return;
        };
        if mem.write_obj(now, GuestAddress(gpa)).is_err() || line.trigger().is_err() {
            return;
        }
        inj.done.store(i + 1, Ordering::Release);
    }
}

/// Puts the bench device on `pio`, the ioeventfd on the bench MMIO address, and with
/// `injector` on, starts the injector thread (running `thread_init` first: its seccomp
/// filter).
pub(crate) fn attach(
    vm: &VmFd,
    chip: &IrqChip,
    mem: &GuestMemoryMmap,
    pio: &mut PioBus<PioDev>,
    injector: bool,
    thread_init: Box<dyn FnOnce() -> Result<(), String> + Send>,
) -> Result<Bench, VmmError> {
    let os = |what: &'static str| move |source: std::io::Error| VmmError::Os { what, source };
    let ioeventfd = EventFd::new(EFD_NONBLOCK).map_err(os("bench ioeventfd"))?;
    // Nobody reads it: the counter just grows. The write never leaves the kernel.
    vm.register_ioevent(
        &ioeventfd,
        &IoEventAddress::Mmio(legacy::BENCH_IOEVENTFD_MMIO),
        NoDatamatch,
    )
    .map_err(|source| VmmError::VmSetup {
        what: "KVM_IOEVENTFD for the bench MMIO address",
        source,
    })?;
    let inj = if injector {
        let line = chip.legacy_line(vm, legacy::BENCH_IRQ_GSI)?;
        // SAFETY: dup of a valid fd; the result is owned by the OwnedFd below.
        let fd = unsafe { libc::dup(vm.as_raw_fd()) };
        if fd < 0 {
            return Err(VmmError::Os {
                what: "dup of the VM fd for the bench injector",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let vm_fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let inj = Arc::new(Injector {
            request: Mutex::new(Request::default()),
            wake: Condvar::new(),
            done: AtomicU32::new(0),
            generation: AtomicU64::new(0),
        });
        let thread_inj = inj.clone();
        let mem = mem.clone();
        std::thread::Builder::new()
            .name("kiln-bench".into())
            .spawn(move || {
                if let Err(e) = thread_init() {
                    eprintln!("kiln: bench injector: {e}; irqfd benchmark unavailable");
                    return;
                }
                loop {
                    let series = {
                        let Ok(mut r) = thread_inj.request.lock() else {
                            return;
                        };
                        loop {
                            if r.stop {
                                return;
                            }
                            if let Some(s) = r.series.take() {
                                break s;
                            }
                            r = match thread_inj.wake.wait(r) {
                                Ok(g) => g,
                                Err(_) => return,
                            };
                        }
                    };
                    run_series(&thread_inj, &vm_fd, &mem, &line, series.0, series.1);
                }
            })
            .map_err(os("spawning the bench injector"))?;
        Some(inj)
    } else {
        None
    };
    // With --exit-bench the vCPU threads also time their exit handling (two clock reads per
    // exit), which the bench device reports per run.
    kiln_vcpu::set_exit_timing(injector);
    let device = Arc::new(legacy::BenchDevice::new(
        inj.clone().map(|i| i as Arc<dyn legacy::IrqInjector>),
        Some(legacy::ExitTimeHooks {
            restart: || {
                kiln_vcpu::with_vcpu_exit_times(kiln_vcpu::ExitTimes::clear);
            },
            read: || {
                kiln_vcpu::with_vcpu_exit_times(|t| {
                    let s = t.summary();
                    (s.total_ns, s.typical_ns)
                })
                .unwrap_or((0, None))
            },
        }),
    ));
    pio.insert(
        PioAddress(legacy::BENCH_PORT),
        legacy::BENCH_PORT_SIZE,
        device.clone().into(),
    )?;
    Ok(Bench {
        device,
        _ioeventfd: ioeventfd,
        injector: inj,
    })
}

/// The MSR answer function for [`kiln_vcpu::BusExitHandler::with_msr_read`]: the bench MSR
/// counts reads; every other forwarded MSR gets #GP, as KVM would have given.
pub fn msr_reader(device: Arc<legacy::BenchDevice>) -> kiln_vcpu::MsrReadFn {
    Box::new(move |index| (index == legacy::BENCH_MSR).then(|| device.read_msr()))
}
