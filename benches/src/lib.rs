//! Shared pieces of the Kiln benchmarks: a minimal real-mode VM that loops on one kind of
//! exit, the raw kvm-ioctls loop that is the floor, and the same loop through kiln-vcpu's
//! exit dispatch and kiln-bus.
#![warn(missing_docs)]

use std::sync::Arc;
use std::time::Instant;

use kiln_bus::{DispatchCache, MmioAddress, MmioBus, MmioDevice, PioAddress, PioBus, PioDevice};
use kiln_legacy::ExitTestDevice;
use kiln_vcpu::{handle_exit_cached, BusExitHandler, ExitAction};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

/// Where the benchmark guest's code lives.
const CODE_ADDR: u64 = 0x1000;
/// The guest-physical address the MMIO loop writes to (unbacked, so every write exits).
pub const BENCH_MMIO_ADDR: u64 = 0x10000;

/// Which exit the guest loops on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// `out dx, al` to the exit-test port.
    Pio,
    /// `mov [0], al` with DS pointing at [`BENCH_MMIO_ADDR`].
    Mmio,
}

impl ExitKind {
    /// Real-mode code that loops forever on this exit.
    pub fn code(self) -> &'static [u8] {
        match self {
            // mov dx, 0x700 ; l: out dx, al ; jmp l
            ExitKind::Pio => &[0xba, 0x00, 0x07, 0xee, 0xeb, 0xfd],
            // mov ax, 0x1000 ; mov ds, ax ; l: mov [0], al ; jmp l
            ExitKind::Mmio => &[0xb8, 0x00, 0x10, 0x8e, 0xd8, 0xa2, 0x00, 0x00, 0xeb, 0xfb],
        }
    }

    /// Name for reports.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::Pio => "pio",
            ExitKind::Mmio => "mmio",
        }
    }
}

/// A one-vCPU VM running an [`ExitKind`] loop, plus the kiln handler for the same exits.
pub struct ExitVm {
    _kvm: Kvm,
    _vm: VmFd,
    /// The vCPU.
    pub vcpu: VcpuFd,
    /// The guest memory mapping (one page), kept alive as long as the VM.
    mem: *mut libc::c_void,
    /// kiln's handler: kiln-bus with the exit-test device at the port and MMIO address.
    pub handler: BusExitHandler,
    /// The exit-test device, to check that exits arrived.
    pub device: Arc<ExitTestDevice>,
    /// The floor's own exit-test device: the floor does the same device work per exit, called
    /// statically, so the difference is only kiln's dispatch.
    pub floor_device: Arc<ExitTestDevice>,
}

// SAFETY: `mem` is a private anonymous mapping only the VM uses; moving the owner between
// threads is fine.
unsafe impl Send for ExitVm {}

impl Drop for ExitVm {
    fn drop(&mut self) {
        // SAFETY: `mem` was returned by mmap with length 0x1000 and is unmapped once, here,
        // after which the VM (dropped after this) no longer runs.
        unsafe { libc::munmap(self.mem, 0x1000) };
    }
}

impl ExitVm {
    /// Builds the VM; `None` if KVM is unavailable (callers print why).
    pub fn new(kind: ExitKind) -> Result<Self, String> {
        let kvm = Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
        let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
        // SAFETY: anonymous private mapping of one page; checked for MAP_FAILED below.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                0x1000,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mem == libc::MAP_FAILED {
            return Err("mmap failed".into());
        }
        let code = kind.code();
        // SAFETY: `mem` is a fresh 4 KiB writable mapping and `code` is a few bytes.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), mem.cast::<u8>(), code.len()) };
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: CODE_ADDR,
            memory_size: 0x1000,
            userspace_addr: mem as u64,
            flags: 0,
        };
        // SAFETY: the region maps memory owned by the returned ExitVm, which unmaps it only
        // in Drop, after which the VM is not run again.
        unsafe { vm.set_user_memory_region(region) }.map_err(|e| format!("memory: {e}"))?;
        let vcpu = vm.create_vcpu(0).map_err(|e| format!("vCPU: {e}"))?;
        let mut sregs = vcpu.get_sregs().map_err(|e| format!("sregs: {e}"))?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).map_err(|e| format!("sregs: {e}"))?;
        let regs = kvm_bindings::kvm_regs {
            rip: CODE_ADDR,
            rflags: 2,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(|e| format!("regs: {e}"))?;

        let device = Arc::new(ExitTestDevice::default());
        let mut pio = PioBus::new();
        let mut mmio = MmioBus::new();
        pio.insert(
            PioAddress(kiln_legacy::EXIT_TEST_PORT),
            kiln_legacy::EXIT_TEST_PORT_SIZE,
            device.clone(),
        )
        .map_err(|e| e.to_string())?;
        mmio.insert(MmioAddress(BENCH_MMIO_ADDR), 0x1000, device.clone())
            .map_err(|e| e.to_string())?;
        let handler = BusExitHandler::new(Arc::new(pio), Arc::new(mmio), None);
        Ok(ExitVm {
            _kvm: kvm,
            _vm: vm,
            vcpu,
            mem,
            handler,
            device,
            floor_device: Arc::new(ExitTestDevice::default()),
        })
    }

    /// The floor: `n` exits through the thinnest possible kvm-ioctls loop, each doing the
    /// exit-test device's work (a static call).
    pub fn run_raw(&mut self, n: u64) {
        self.raw::<false>(n);
    }

    /// [`run_raw`](Self::run_raw), timing each exit's user-space part (from `KVM_RUN`
    /// returning to the next `KVM_RUN`, as kiln's vCPU threads do with `--exit-bench`);
    /// returns their sum in ns.
    pub fn run_raw_timed(&mut self, n: u64) -> u64 {
        self.raw::<true>(n)
    }

    /// The kiln path: `n` exits through kiln-vcpu's `handle_exit_cached` (with a per-vCPU
    /// dispatch cache, as kiln's run loop keeps one), kiln-bus and the exit-test device.
    pub fn run_kiln(&mut self, n: u64) {
        self.kiln::<false>(n);
    }

    /// [`run_kiln`](Self::run_kiln), timed like [`run_raw_timed`](Self::run_raw_timed).
    pub fn run_kiln_timed(&mut self, n: u64) -> u64 {
        self.kiln::<true>(n)
    }

    fn raw<const TIMED: bool>(&mut self, n: u64) -> u64 {
        let mut done = 0;
        let mut user_ns = 0u64;
        let mut exited_at: Option<Instant> = None;
        let dev = &*self.floor_device;
        while done < n {
            if let Some(t) = exited_at.take() {
                user_ns += t.elapsed().as_nanos() as u64;
            }
            let r = self.vcpu.run();
            if TIMED && r.is_ok() {
                exited_at = Some(Instant::now());
            }
            match r {
                Ok(VcpuExit::IoOut(port, data)) => {
                    let base = kiln_legacy::EXIT_TEST_PORT;
                    dev.pio_write(PioAddress(base), port.wrapping_sub(base), data);
                    done += 1;
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    dev.mmio_write(MmioAddress(BENCH_MMIO_ADDR), addr - BENCH_MMIO_ADDR, data);
                    done += 1;
                }
                Ok(other) => panic!("unexpected exit {other:?}"),
                Err(e) if e.errno() == libc::EINTR => {}
                Err(e) => panic!("KVM_RUN: {e}"),
            }
        }
        if let Some(t) = exited_at {
            user_ns += t.elapsed().as_nanos() as u64;
        }
        user_ns
    }

    #[inline(never)]
    fn kiln<const TIMED: bool>(&mut self, n: u64) -> u64 {
        let mut cache = DispatchCache::new();
        let mut user_ns = 0u64;
        let mut exited_at: Option<Instant> = None;
        for _ in 0..n {
            if let Some(t) = exited_at.take() {
                user_ns += t.elapsed().as_nanos() as u64;
            }
            match self.vcpu.run() {
                Ok(exit) => {
                    if TIMED {
                        exited_at = Some(Instant::now());
                    }
                    let action = handle_exit_cached(exit, &self.handler, &mut cache);
                    assert_eq!(action, ExitAction::Continue);
                }
                Err(e) if e.errno() == libc::EINTR => {}
                Err(e) => panic!("KVM_RUN: {e}"),
            }
        }
        if let Some(t) = exited_at {
            user_ns += t.elapsed().as_nanos() as u64;
        }
        user_ns
    }
}

/// User and system CPU time of the calling thread, in microseconds.
pub fn thread_cpu_us() -> (u64, u64) {
    // SAFETY: rusage is plain data, filled by getrusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage owned by this frame.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    (us(ru.ru_utime), us(ru.ru_stime))
}
