//! Builds and runs one VM: KVM, memory, interrupt controller, devices, kernel, vCPUs; then
//! waits for the guest to power off, reset or crash, or for a signal.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use kiln_bus::{MmioAddress, MmioBus, PioAddress, PioBus};
use kiln_irq::{InterruptLine, IrqChip};
use kiln_legacy as legacy;
use kiln_memory::GuestMemoryMmap;
use kiln_vcpu::{BootMode, BootRegs, BusExitHandler, Segment, StopReason, Vcpu, VcpuHandle};

use crate::config::{
    format_cpu_list, parse_memory_arg, AffinityTarget, BootProtocolArg, Cli, ConfigError,
    CpuAffinityArg, DiskArg, MemoryArg, RngArg, SeccompSelftest, SerialArg, VcpuPriorityArg,
    BUNDLED_GUEST_CMDLINE,
};
use crate::control::{ControlReceiver, VmRequest, VmResponse};
use crate::devices::{MmioDev, PioDev};
use crate::virtio::VirtioSlot;
use kiln_seccomp::ThreadKind;

/// Exit status: the VMM failed (the message names the flag or resource).
pub const EXIT_ERROR: u8 = 1;
/// Exit status: the guest asked for a reset (kiln does not reboot in place).
pub const EXIT_RESET: u8 = 3;
/// Exit status: the guest crashed (triple fault, KVM internal error, entry failure).
pub const EXIT_CRASH: u8 = 4;

/// Where KVM may put its TSS (three pages just below the 4 GiB boundary's BIOS area; inside
/// the MMIO hole so it never shadows RAM).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors building or running a VM; each names the flag or resource at fault.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A flag value is malformed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An incoming migration (`--migrate-listen`) failed.
    #[error("{0}")]
    Migration(String),
    /// The KVM device can't be used.
    #[error("{path}: {source} (KVM must be available and this user allowed to open it)")]
    Kvm {
        /// The device path (`/dev/kvm`, or `$KILN_KVM_DEVICE`).
        path: String,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `--cpus` out of range.
    #[error("--cpus {requested}: must be between 1 and {max} (KVM and APIC ID limit here)")]
    Cpus {
        /// What was asked.
        requested: u32,
        /// The limit.
        max: u32,
    },
    /// `--memory` rejected.
    #[error("--memory {value}: {source}")]
    Memory {
        /// What was asked.
        value: String,
        /// Why.
        #[source]
        source: kiln_memory::Error,
    },
    /// `--kernel` or `--initrd` can't be opened.
    #[error("{flag} {path}: {source}")]
    Open {
        /// The flag.
        flag: &'static str,
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Loading the kernel, initrd or command line failed.
    #[error("{flag}: {source}")]
    Boot {
        /// The flag at fault.
        flag: String,
        /// Why.
        #[source]
        source: kiln_boot::Error,
    },
    /// The serial console's output can't be opened.
    #[error("--serial file:{path}: {source}")]
    SerialFile {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A KVM VM-level operation failed.
    #[error("KVM {what}: {source}")]
    VmSetup {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// ACPI table generation failed.
    #[error("ACPI tables: {0}")]
    Acpi(#[from] kiln_acpi::Error),
    /// Interrupt controller setup failed.
    #[error(transparent)]
    Irq(#[from] kiln_irq::Error),
    /// vCPU setup failed.
    #[error("vCPU: {0}")]
    Vcpu(#[from] kiln_vcpu::Error),
    /// Device bus setup failed.
    #[error("device bus: {0}")]
    Bus(#[from] kiln_bus::Error),
    /// A `--disk` image can't be used.
    #[error("--disk path={path}: {why}")]
    Disk {
        /// The image path.
        path: String,
        /// Why.
        why: String,
    },
    /// A rate limit is unusable.
    #[error("{flag}: rate limit: {why}")]
    RateLimit {
        /// The flag.
        flag: String,
        /// Why.
        why: String,
    },
    /// A `--net` tap can't be used.
    #[error("--net tap={tap}: {why}")]
    Net {
        /// The tap name.
        tap: String,
        /// Why.
        why: String,
    },
    /// More virtio devices than there are interrupt lines for them.
    #[error(
        "--disk/--net/--rng: {count} virtio devices asked for, at most {max} fit (one IOAPIC GSI each)"
    )]
    TooManyDevices {
        /// Devices asked for.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// `--balloon` is unusable.
    #[error("--balloon: {0}")]
    Balloon(String),
    /// Writing or restoring a snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// `--vsock` is unusable (its listener can't be created, ...).
    #[error("--vsock: {0}")]
    Vsock(String),
    /// Building, loading or installing seccomp filters failed.
    #[error(transparent)]
    Seccomp(#[from] kiln_seccomp::Error),
    /// A host OS call failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The kernel to boot.
#[derive(Debug, Clone)]
pub enum KernelSource {
    /// A file given with `--kernel`.
    Path(PathBuf),
    /// The bundled conformance guest.
    Bundled,
}

/// A validated VM description.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Kernel.
    pub kernel: KernelSource,
    /// Initrd path.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPU count (range-checked against KVM in [`run`]).
    pub cpus: u32,
    /// Guest memory in bytes.
    pub memory: u64,
    /// The `--memory` text, for error messages.
    pub memory_arg: String,
    /// Guest memory backing and host policy (`--memory`).
    pub memory_options: MemoryArg,
    /// `--cpu-affinity`, checked against `cpus` and the host CPUs kiln may use.
    pub cpu_affinity: Vec<CpuAffinityArg>,
    /// `--vcpu-priority`.
    pub vcpu_priority: Option<VcpuPriorityArg>,
    /// Serial console.
    pub serial: SerialArg,
    /// Boot protocol.
    pub protocol: BootProtocolArg,
    /// How long SIGTERM waits for the guest to power off before stopping it.
    pub shutdown_timeout: Duration,
    /// `--disk`s, in order.
    pub disks: Vec<DiskArg>,
    /// `--net`s, in order.
    pub nets: Vec<crate::config::NetArg>,
    /// `--rng`.
    pub rng: RngArg,
    /// Where each virtio device sits (derived from `disks` and `rng`).
    pub virtio: Vec<VirtioSlot>,
    /// Seccomp filters per thread kind (`None`: `--no-seccomp`).
    pub seccomp: Option<Arc<kiln_seccomp::Filters>>,
    /// `--seccomp-selftest`: the thread kind that makes a forbidden call.
    pub seccomp_selftest: Option<ThreadKind>,
    /// `--exit-bench`: run the benchmark's irqfd injector.
    pub exit_bench: bool,
    /// `--balloon`.
    pub balloon: Option<crate::config::BalloonArg>,
    /// `--vsock`.
    pub vsock: Option<crate::config::VsockArg>,
    /// What vCPU threads are called, before their index (`None`: `kiln-vcpu`; `fc_vcpu ` when
    /// kiln runs as `firecracker`).
    pub vcpu_thread_prefix: Option<String>,
}

fn seccomp_filters(cli: &Cli) -> Result<Option<Arc<kiln_seccomp::Filters>>, VmmError> {
    if cli.no_seccomp {
        return Ok(None);
    }
    let filters = match &cli.seccomp_filter {
        None => kiln_seccomp::Filters::builtin()?,
        Some(path) => {
            let f = File::open(path).map_err(|e| kiln_seccomp::Error::Custom {
                path: path.display().to_string(),
                why: e.to_string(),
            })?;
            kiln_seccomp::Filters::from_json(path, io::BufReader::new(f))?
        }
    };
    Ok(Some(Arc::new(filters)))
}

/// Seccomp for the API server's threads (`--api-sock`) and the metrics flusher, from the
/// command line's seccomp flags; installs the SIGSYS reporter. `None` with `--no-seccomp`, or
/// with a `--seccomp-filter` file that has no `api` filter (said on stderr: such files
/// predate the API).
pub fn api_filters(cli: &Cli) -> Result<Option<Arc<kiln_seccomp::Filters>>, VmmError> {
    let Some(f) = seccomp_filters(cli)? else {
        return Ok(None);
    };
    if f.program(ThreadKind::Api).is_none() {
        eprintln!(
            "kiln: --seccomp-filter: no \"api\" filter; the API server threads run without one"
        );
        return Ok(None);
    }
    kiln_seccomp::install_sigsys_handler()?;
    Ok(Some(f))
}

/// The host CPUs this process may run on (`sched_getaffinity`).
fn allowed_host_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..crate::config::MAX_HOST_CPUS)
        // SAFETY: the index is below CPU_SETSIZE, inside `set`.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Checks `--cpu-affinity` against `--cpus` and the host CPUs this process may use.
fn check_affinity(args: &[CpuAffinityArg], cpus: u32) -> Result<(), VmmError> {
    let allowed = allowed_host_cpus().map_err(|source| VmmError::Os {
        what: "--cpu-affinity: sched_getaffinity",
        source,
    })?;
    // SAFETY: sysconf only reads a system parameter.
    let configured = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as usize;
    for (i, a) in args.iter().enumerate() {
        let err = |why: String| {
            VmmError::Config(ConfigError::CpuAffinity {
                value: a.text.clone(),
                why,
            })
        };
        if let AffinityTarget::Vcpu(v) = a.target {
            if v >= cpus {
                return Err(err(format!(
                    "vCPU {v} does not exist with --cpus {cpus} (the highest index is {})",
                    cpus.saturating_sub(1)
                )));
            }
        }
        if args[..i].iter().any(|b| b.target == a.target) {
            let who = match a.target {
                AffinityTarget::Vcpu(v) => format!("vCPU {v}"),
                AffinityTarget::Vmm => "vmm".to_string(),
            };
            return Err(err(format!(
                "{who} is already pinned by an earlier --cpu-affinity"
            )));
        }
        for &c in &a.host_cpus {
            if c >= configured {
                return Err(err(format!(
                    "host CPU {c} does not exist (this host has CPUs 0-{})",
                    configured - 1
                )));
            }
            if !allowed.contains(&c) {
                return Err(err(format!(
                    "host CPU {c} is not one kiln may run on ({}; see taskset, cgroup cpusets)",
                    format_cpu_list(&allowed)
                )));
            }
        }
    }
    Ok(())
}

/// Pins the calling thread to `cpus`.
fn set_thread_affinity(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: the parser keeps CPU numbers below CPU_SETSIZE, inside `set`.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Puts the calling thread under `--vcpu-priority`.
fn set_thread_priority(priority: VcpuPriorityArg) -> Result<(), String> {
    let VcpuPriorityArg::Fifo(p) = priority;
    let param = libc::sched_param {
        sched_priority: i32::from(p),
    };
    // SAFETY: `param` is a valid sched_param; pid 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    Err(if e.raw_os_error() == Some(libc::EPERM) {
        format!(
            "--vcpu-priority {priority}: the host does not permit SCHED_FIFO ({e}): kiln needs \
             CAP_SYS_NICE, or an RLIMIT_RTPRIO of at least {p} (ulimit -r), and real-time \
             runtime in its cgroup"
        )
    } else {
        format!("--vcpu-priority {priority}: sched_setscheduler: {e}")
    })
}

/// What a new thread of `kind` runs first: its seccomp filter (and the self-test hook).
/// vCPU threads use [`vcpu_thread_init`].
fn thread_init(
    spec: &VmSpec,
    kind: ThreadKind,
) -> Box<dyn FnOnce() -> Result<(), String> + Send + 'static> {
    // Every thread that isn't a vCPU is one of the VMM's own.
    let placement = (kind != ThreadKind::Vcpu)
        .then(|| spec.affinity_of(AffinityTarget::Vmm))
        .flatten();
    thread_init_placed(spec, kind, placement, None)
}

/// [`thread_init`] for vCPU `index`: its `--cpu-affinity` and `--vcpu-priority` too.
fn vcpu_thread_init(
    spec: &VmSpec,
    index: u32,
) -> Box<dyn FnOnce() -> Result<(), String> + Send + 'static> {
    let placement = spec.affinity_of(AffinityTarget::Vcpu(index));
    let init = thread_init_placed(spec, ThreadKind::Vcpu, placement, spec.vcpu_priority);
    match &spec.vcpu_thread_prefix {
        None => init,
        Some(prefix) => {
            let name = format!("{prefix}{index}");
            Box::new(move || {
                set_os_thread_name(&name);
                init()
            })
        }
    }
}

/// Renames the calling thread as the OS shows it (`/proc/self/task/*/comm`, at most 15 bytes).
fn set_os_thread_name(name: &str) {
    let mut bytes: Vec<u8> = name.bytes().filter(|&b| b != 0).take(15).collect();
    bytes.push(0);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from `bytes`,
    // which lives across the call.
    unsafe { libc::prctl(libc::PR_SET_NAME, bytes.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

fn thread_init_placed(
    spec: &VmSpec,
    kind: ThreadKind,
    affinity: Option<CpuAffinityArg>,
    priority: Option<VcpuPriorityArg>,
) -> Box<dyn FnOnce() -> Result<(), String> + Send + 'static> {
    let filters = spec.seccomp.clone();
    let selftest = spec.seccomp_selftest == Some(kind);
    Box::new(move || {
        // Before the filter: it allows neither sched_setaffinity nor sched_setscheduler.
        if let Some(a) = affinity {
            set_thread_affinity(&a.host_cpus)
                .map_err(|e| format!("--cpu-affinity {}: sched_setaffinity: {e}", a.text))?;
        }
        if let Some(p) = priority {
            set_thread_priority(p)?;
        }
        if let Some(f) = filters {
            f.install(kind).map_err(|e| e.to_string())?;
        }
        if selftest {
            kiln_seccomp::forbidden_call_for_tests();
        }
        Ok(())
    })
}

impl VmSpec {
    /// The `--cpu-affinity` for `target`, if any.
    fn affinity_of(&self, target: AffinityTarget) -> Option<CpuAffinityArg> {
        self.cpu_affinity
            .iter()
            .find(|a| a.target == target)
            .cloned()
    }

    /// Validates the command line.
    pub fn from_cli(cli: Cli) -> Result<Self, VmmError> {
        let seccomp = seccomp_filters(&cli)?;
        let memory_options = parse_memory_arg(&cli.memory)?;
        let memory_err = |source| VmmError::Memory {
            value: cli.memory.clone(),
            source,
        };
        memory_options.config.check().map_err(memory_err)?;
        memory_options
            .policy
            .check(&memory_options.config.backing)
            .map_err(memory_err)?;
        let memory = memory_options.config.size;
        check_affinity(&cli.cpu_affinity, cli.cpus)?;
        let kernel = cli.kernel.map_or(KernelSource::Bundled, KernelSource::Path);
        let cmdline = match (&kernel, cli.cmdline) {
            (_, Some(c)) => c,
            (KernelSource::Bundled, None) => BUNDLED_GUEST_CMDLINE.to_string(),
            (KernelSource::Path(_), None) => "console=ttyS0".to_string(),
        };
        // The bundled guest checks the VM against what was asked for.
        let cmdline = match kernel {
            KernelSource::Bundled => format!(
                "{cmdline} kiln.layout=kiln kiln.mem={memory} kiln.cpus={}",
                cli.cpus
            ),
            KernelSource::Path(_) => cmdline,
        };
        let virtio = crate::virtio::slots(
            &cli.disk,
            &cli.net,
            &cli.rng,
            cli.balloon.as_ref(),
            cli.vsock.as_ref(),
        )?;
        if let Some(b) = &cli.balloon {
            if b.size > memory {
                return Err(VmmError::Balloon(format!(
                    "size={} bytes is more than the guest's memory ({memory} bytes)",
                    b.size
                )));
            }
        }
        let seccomp_selftest = cli.seccomp_selftest.map(|k| match k {
            SeccompSelftest::Vmm => ThreadKind::Vmm,
            SeccompSelftest::Vcpu => ThreadKind::Vcpu,
            SeccompSelftest::Device => ThreadKind::Device,
            SeccompSelftest::Stdin => ThreadKind::Stdin,
            SeccompSelftest::Bench => ThreadKind::Bench,
            SeccompSelftest::Api => ThreadKind::Api,
        });
        Ok(VmSpec {
            kernel,
            initrd: cli.initrd,
            cmdline,
            cpus: cli.cpus,
            memory,
            memory_arg: cli.memory,
            memory_options,
            cpu_affinity: cli.cpu_affinity,
            vcpu_priority: cli.vcpu_priority,
            serial: cli.serial,
            protocol: cli.boot_protocol,
            shutdown_timeout: Duration::from_secs_f64(cli.shutdown_timeout),
            disks: cli.disk,
            nets: cli.net,
            rng: cli.rng,
            virtio,
            seccomp,
            seccomp_selftest,
            exit_bench: cli.exit_bench,
            balloon: cli.balloon,
            vsock: cli.vsock,
            vcpu_thread_prefix: None,
        })
    }
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off.
    PowerOff,
    /// The guest asked for a reset.
    Reset,
    /// The guest crashed; the report has the reason and registers.
    Crashed(String),
    /// Stopped by this signal.
    Signal(i32),
    /// Migrated away: the VM runs in another kiln now.
    Migrated,
}

impl Outcome {
    /// The process exit status for this outcome (documented in `kiln --help`).
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::PowerOff | Outcome::Migrated => 0,
            Outcome::Reset => EXIT_RESET,
            Outcome::Crashed(_) => EXIT_CRASH,
            Outcome::Signal(n) => 128u8.saturating_add(u8::try_from(*n).unwrap_or(0)),
        }
    }
}

const EVENT_NONE: u8 = 0;
const EVENT_POWER_OFF: u8 = 1;
const EVENT_RESET: u8 = 2;

/// Guest power requests (from the power device and the i8042) and vCPU stops, funnelled to
/// the main thread through one eventfd.
struct VmEvents {
    power: AtomicU8,
    wake: EventFd,
}

impl VmEvents {
    fn post(&self, event: u8) {
        // The guest must not run past the write that asked for this.
        kiln_vcpu::stop_current_vcpu();
        // Keep the first request: a reset after power-off changes nothing.
        let _ = self
            .power
            .compare_exchange(EVENT_NONE, event, Ordering::AcqRel, Ordering::Acquire);
        self.wake_main();
    }

    fn wake_main(&self) {
        // Can only fail if the counter would overflow, in which case it's already readable.
        let _ = self.wake.write(1);
    }
}

impl legacy::PowerEvents for VmEvents {
    fn power_off(&self) {
        self.post(EVENT_POWER_OFF);
    }
    fn reset(&self) {
        self.post(EVENT_RESET);
    }
}

fn vm_setup<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VmmError> {
    r.map_err(|source| VmmError::VmSetup { what, source })
}

/// Blocks SIGINT and SIGTERM in this thread (and all threads it spawns after) and returns a
/// signalfd that reads them, so signals are handled in the main loop, not in a handler.
pub fn signal_fd() -> Result<OwnedFd, VmmError> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
    }
    // SAFETY: valid set pointer; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(VmmError::Os {
            what: "blocking SIGINT/SIGTERM",
            source: io::Error::from_raw_os_error(rc),
        });
    }
    // SAFETY: valid set pointer; -1 asks for a new fd.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(VmmError::Os {
            what: "signalfd",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: signalfd returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads one pending signal from the signalfd [`signal_fd`] made; `None` if none was
/// there (or the read came up short).
pub fn read_signal(signals: &OwnedFd) -> Option<i32> {
    // SAFETY: signalfd_siginfo is plain data.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let len = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reading at most `len` bytes into `info`, which is `len` bytes long.
    let n = unsafe {
        libc::read(
            signals.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            len,
        )
    };
    (n == len as isize).then_some(info.ssi_signo as i32)
}

/// What woke the main thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// A signal (SIGINT, SIGTERM).
    Signal(i32),
    /// A control request waits.
    Control,
    /// A guest event (power request, vCPU stop) or the timeout.
    Other,
}

/// Waits until `wake`, `signals` or `control` is readable or `timeout` passes (`None`:
/// forever); says which (a signal first, then a control request).
fn wait_for_event(
    wake: &EventFd,
    signals: &OwnedFd,
    control: Option<RawFd>,
    timeout: Option<Duration>,
) -> Result<Wake, VmmError> {
    let mut fds = [
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: signals.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            // A negative fd is ignored by poll.
            fd: control.unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
        // SAFETY: `fds` is a valid array of three pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 3, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(VmmError::Os {
                what: "poll",
                source: e,
            });
        }
        break;
    }
    if fds[1].revents & libc::POLLIN != 0 {
        if let Some(sig) = read_signal(signals) {
            return Ok(Wake::Signal(sig));
        }
    }
    if fds[0].revents & libc::POLLIN != 0 {
        let _ = wake.read();
    }
    if fds[2].revents & libc::POLLIN != 0 {
        return Ok(Wake::Control);
    }
    Ok(Wake::Other)
}

/// Unbuffered stdout: a guest's prompt without a newline must show at once, and nothing may
/// sit in a buffer when the VM dies.
struct RawStdout;

impl io::Write for RawStdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: writes from a valid slice to fd 1, which this process owns.
        let n = unsafe { libc::write(1, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn serial_output(serial: &SerialArg) -> Result<Box<dyn io::Write + Send>, VmmError> {
    Ok(match serial {
        SerialArg::Stdio => Box::new(RawStdout),
        SerialArg::Null => Box::new(io::sink()),
        SerialArg::File(p) => Box::new(File::options().create(true).append(true).open(p).map_err(
            |source| VmmError::SerialFile {
                path: p.display().to_string(),
                source,
            },
        )?),
    })
}

/// Feeds stdin to the serial RX FIFO on its own thread; the thread dies with the process.
fn spawn_stdin_reader(
    serial: Arc<legacy::SerialDevice>,
    init: Box<dyn FnOnce() -> Result<(), String> + Send>,
) -> Result<(), VmmError> {
    std::thread::Builder::new()
        .name("kiln-stdin".into())
        .spawn(move || {
            if let Err(e) = init() {
                eprintln!("kiln: stdin reader: {e}; the guest gets no console input");
                return;
            }
            let mut buf = [0u8; 64];
            let mut stdin = io::stdin().lock();
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let taken = serial.enqueue_input(rest);
                    rest = rest.get(taken..).unwrap_or_default();
                    if !rest.is_empty() {
                        // The guest hasn't drained the FIFO yet.
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        })
        .map_err(|source| VmmError::Os {
            what: "spawning the stdin thread",
            source,
        })?;
    Ok(())
}

struct Devices {
    pio: PioBus<PioDev>,
    mmio: MmioBus<MmioDev>,
    serial: Arc<legacy::SerialDevice>,
    i8042: Arc<legacy::I8042Device>,
    /// The ACPI GED's interrupt: raising it is a power-button press.
    power_button: kiln_irq::IrqfdLine,
}

fn build_devices(
    vm: &VmFd,
    chip: &IrqChip,
    serial_out: Box<dyn io::Write + Send>,
    events: &Arc<VmEvents>,
    serial_state: Option<&crate::snapshot::SerialSnapshot>,
) -> Result<Devices, VmmError> {
    let mut pio = PioBus::default();
    let mut mmio = MmioBus::default();
    let com1_irq = Arc::new(chip.legacy_line(vm, legacy::COM1_IRQ)?);
    let serial = Arc::new(match serial_state {
        None => legacy::SerialDevice::new(com1_irq, serial_out),
        Some(s) => {
            legacy::SerialDevice::from_state(&s.to_state(), com1_irq, legacy::NoEvents, serial_out)
                .map_err(crate::snapshot::SnapshotError::from)?
        }
    });
    pio.insert(
        PioAddress(legacy::COM1_PORT),
        legacy::COM1_PORT_SIZE,
        serial.clone().into(),
    )?;
    let power: Arc<dyn legacy::PowerEvents> = events.clone();
    let keyboard_irq = Arc::new(chip.legacy_line(vm, legacy::KEYBOARD_IRQ)?);
    let i8042 = Arc::new(legacy::I8042Device::new(power.clone()).with_keyboard_irq(keyboard_irq));
    pio.insert(PioAddress(legacy::I8042_DATA_PORT), 1, i8042.clone().into())?;
    pio.insert(
        PioAddress(legacy::I8042_COMMAND_PORT),
        1,
        i8042.clone().into(),
    )?;
    pio.insert(
        PioAddress(legacy::POST_PORT),
        1,
        Arc::new(legacy::PostDevice::default()).into(),
    )?;
    pio.insert(
        PioAddress(legacy::POWER_PORT),
        legacy::POWER_PORT_SIZE,
        Arc::new(legacy::PowerDevice::new(power)).into(),
    )?;
    // No PCI yet: answer the kernel's config-space probes as an empty bus would.
    pio.insert(
        PioAddress(legacy::PCI_CONFIG_PORT),
        legacy::PCI_CONFIG_PORT_SIZE,
        Arc::new(legacy::NoPciHost::new()).into(),
    )?;
    let exit_test = Arc::new(legacy::ExitTestDevice::default());
    pio.insert(
        PioAddress(legacy::EXIT_TEST_PORT),
        legacy::EXIT_TEST_PORT_SIZE,
        exit_test.clone().into(),
    )?;
    mmio.insert(
        MmioAddress(legacy::EXIT_TEST_MMIO_BASE),
        legacy::EXIT_TEST_MMIO_SIZE,
        exit_test.into(),
    )?;
    let power_button = chip.legacy_line(vm, legacy::GED_GSI)?;
    Ok(Devices {
        pio,
        mmio,
        serial,
        i8042,
        power_button,
    })
}

/// The user's files, opened before anything else so a bad path is reported first.
struct Inputs {
    kernel: File,
    kernel_flag: String,
    initrd: Option<File>,
    serial_out: Box<dyn io::Write + Send>,
    disks: Vec<Option<File>>,
    taps: Vec<Option<kiln_virtio::Tap>>,
}

fn open_inputs(spec: &VmSpec) -> Result<Inputs, VmmError> {
    let open = |flag: &'static str, p: &PathBuf| {
        let f = File::open(p).map_err(|source| VmmError::Open {
            flag,
            path: p.display().to_string(),
            source,
        })?;
        // Opening a directory succeeds; reading it doesn't. Say so up front.
        match f.metadata() {
            Ok(m) if m.is_file() => Ok(f),
            Ok(_) => Err(VmmError::Open {
                flag,
                path: p.display().to_string(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            }),
            Err(source) => Err(VmmError::Open {
                flag,
                path: p.display().to_string(),
                source,
            }),
        }
    };
    let (kernel, kernel_flag) = match &spec.kernel {
        KernelSource::Path(p) => (open("--kernel", p)?, format!("--kernel {}", p.display())),
        KernelSource::Bundled => (memfd_with(crate::guest::ELF)?, "bundled guest".to_string()),
    };
    let initrd = spec
        .initrd
        .as_ref()
        .map(|p| open("--initrd", p))
        .transpose()?;
    let serial_out = serial_output(&spec.serial)?;
    let disks = spec
        .disks
        .iter()
        .map(|d| crate::virtio::open_disk(d).map(Some))
        .collect::<Result<_, _>>()?;
    // Taps are attached here, on the main thread, before any seccomp filter.
    let taps = crate::virtio::open_taps(&spec.nets)?;
    Ok(Inputs {
        kernel,
        kernel_flag,
        initrd,
        serial_out,
        disks,
        taps,
    })
}

fn load_kernel(
    spec: &VmSpec,
    mem: &GuestMemoryMmap,
    kernel: File,
    kernel_flag: &str,
    initrd: Option<File>,
) -> Result<kiln_boot::BootEntry, VmmError> {
    let acpi_rsdp = kiln_acpi::write(mem, &acpi_config(spec))?;
    let protocol = match spec.protocol {
        BootProtocolArg::Auto => kiln_boot::Protocol::Auto,
        BootProtocolArg::Linux => kiln_boot::Protocol::Linux,
        BootProtocolArg::Pvh => kiln_boot::Protocol::Pvh,
    };
    let cfg = kiln_boot::BootConfig {
        kernel,
        initrd,
        cmdline: spec.cmdline.clone(),
        protocol,
        acpi_rsdp: Some(acpi_rsdp),
    };
    kiln_boot::load(mem, cfg).map_err(|source| VmmError::Boot {
        flag: boot_error_flag(&source, kernel_flag, spec),
        source,
    })
}

/// What the ACPI tables describe for `spec`.
pub fn acpi_config(spec: &VmSpec) -> kiln_acpi::AcpiConfig {
    kiln_acpi::AcpiConfig {
        cpus: spec.cpus,
        serial: true,
        ged_gsi: legacy::GED_GSI,
        virtio_mmio: crate::virtio::acpi_devices(&spec.virtio),
    }
}

/// `--dump-acpi DIR`: writes the tables `spec` would get, without KVM.
pub fn dump_acpi(spec: &VmSpec, dir: &std::path::Path) -> Result<Vec<PathBuf>, VmmError> {
    let tables = kiln_acpi::build(&acpi_config(spec))?;
    tables.dump(dir).map_err(|source| VmmError::Os {
        what: "--dump-acpi: writing the tables",
        source,
    })
}

/// Which flag a boot error is about.
fn boot_error_flag(e: &kiln_boot::Error, kernel_flag: &str, spec: &VmSpec) -> String {
    use kiln_boot::Error as E;
    match e {
        E::CmdlineTooLong { .. } => "--cmdline".to_string(),
        E::InitrdTooLarge { .. } | E::InitrdRead(..) => match &spec.initrd {
            Some(p) => format!("--initrd {}", p.display()),
            None => "--initrd".to_string(),
        },
        _ => kernel_flag.to_string(),
    }
}

/// Puts `bytes` in an anonymous memory file so the loader reads it like any kernel file.
fn memfd_with(bytes: &[u8]) -> Result<File, VmmError> {
    use std::io::{Seek, Write};
    // SAFETY: the name is a valid NUL-terminated string; flags are valid.
    let fd = unsafe { libc::memfd_create(c"kiln-bundled-guest".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(VmmError::Os {
            what: "memfd_create for the bundled guest",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: memfd_create returned a fresh fd that nothing else owns.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(bytes)
        .and_then(|()| f.rewind())
        .map_err(|source| VmmError::Os {
            what: "writing the bundled guest",
            source,
        })?;
    Ok(f)
}

fn segment(selector: u16, descriptor: u64) -> Segment {
    let d = kiln_boot::decode_descriptor(descriptor);
    Segment {
        selector,
        base: d.base,
        limit: d.limit,
        type_: d.type_,
        present: d.present,
        dpl: d.dpl,
        db: d.db,
        s: d.s,
        l: d.l,
        g: d.g,
        avl: d.avl,
    }
}

/// The vCPU entry registers for a loaded kernel (shared with the exit benchmark's floor).
pub fn boot_regs(entry: &kiln_boot::BootEntry) -> BootRegs {
    let gdt = &entry.gdt;
    let pvh = entry.protocol == kiln_boot::Protocol::Pvh;
    BootRegs {
        mode: match entry.page_tables {
            Some(pml4) if !pvh => BootMode::Long64 { pml4: pml4.0 },
            _ => BootMode::Protected32,
        },
        rip: entry.entry.0,
        rsp: entry.stack.0,
        rsi: if pvh { 0 } else { entry.boot_info.0 },
        rbx: if pvh { entry.boot_info.0 } else { 0 },
        gdt: (gdt.base.0, gdt.limit),
        idt: (entry.idt_base.0, 0),
        code: segment(0x10, gdt.entries[2]),
        data: segment(0x18, gdt.entries[3]),
        tss: segment(0x20, gdt.entries[4]),
    }
}

/// Builds the VM described by `spec`, runs it to the end and says how it ended.
pub fn run(spec: VmSpec) -> Result<Outcome, VmmError> {
    run_with(spec, None)
}

/// Like [`run`], and also executes the requests that arrive on `control` (pause, resume,
/// snapshot, ...) while the VM runs.
pub fn run_with(spec: VmSpec, control: Option<ControlReceiver>) -> Result<Outcome, VmmError> {
    // Before any thread exists, so every thread inherits the blocked signals.
    let signals = signal_fd()?;
    let mut vm = Vm::boot(spec)?;
    let outcome = vm.wait(&signals, control.as_ref());
    if let Some(c) = &control {
        c.refuse_all("the VM has ended");
    }
    vm.shutdown();
    outcome
}

/// Stops every vCPU thread still running and waits for them, so no thread outlives the
/// memory it runs on (used on the error paths of [`Vm::boot`]).
fn stop_all(handles: Vec<VcpuHandle>) {
    for h in &handles {
        h.stop();
    }
    for h in handles {
        h.join();
    }
}

/// A running VM: everything [`Vm::boot`] built, held until [`Vm::shutdown`].
pub struct Vm {
    spec: VmSpec,
    // Field order is drop order: vCPU threads and device threads are stopped explicitly in
    // `shutdown`, before the VM fd and the memory go.
    vcpus: Vec<VcpuHandle>,
    virtio: crate::virtio::VirtioDevices,
    bench: crate::bench::Bench,
    events: Arc<VmEvents>,
    stops: Arc<Mutex<Vec<(u32, StopReason)>>>,
    serial: Arc<legacy::SerialDevice>,
    i8042: Arc<legacy::I8042Device>,
    power_button: kiln_irq::IrqfdLine,
    paused: bool,
    /// Set once a migration handed the VM to another kiln: [`Vm::wait`] then ends.
    migrated: bool,
    /// The disk images' open files (dups of the devices'), whose `flock`s a migration
    /// releases for the destination.
    pub(crate) disk_locks: Vec<File>,
    /// Diff snapshot bookkeeping (dirty logging and the pages dirtied since the last full
    /// snapshot).
    pub(crate) dirty: crate::snapshot::DirtyTracking,
    chip: IrqChip,
    fd: VmFd,
    kvm: Arc<Kvm>,
    mem: GuestMemoryMmap,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("cpus", &self.vcpus.len())
            .field("paused", &self.paused)
            .finish()
    }
}

/// How long a pause waits for each vCPU to leave the guest.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

impl Vm {
    /// Builds the VM described by `spec`, loads its kernel and starts its vCPUs. Call
    /// [`signal_fd`] (through [`run_with`]) first so no thread takes SIGINT/SIGTERM.
    pub fn boot(spec: VmSpec) -> Result<Vm, VmmError> {
        Self::build(spec, None)
    }

    /// Rebuilds a saved VM: the machine `spec` describes (see
    /// [`crate::snapshot::restore_spec`]) with guest memory `mem` already holding the saved
    /// contents, then puts the interrupt controllers, clock, devices and vCPUs into `state`
    /// and starts the vCPUs (paused if `paused`). No kernel is loaded. Live migration calls
    /// this on the destination with memory it received.
    pub fn restore_from(
        spec: VmSpec,
        state: crate::snapshot::VmState,
        mem: GuestMemoryMmap,
        paused: bool,
    ) -> Result<Vm, VmmError> {
        Self::build(
            spec,
            Some(crate::snapshot::RestoreInput { state, mem, paused }),
        )
    }

    fn build(spec: VmSpec, restore: Option<crate::snapshot::RestoreInput>) -> Result<Vm, VmmError> {
        if spec.seccomp.is_some() {
            kiln_seccomp::install_sigsys_handler()?;
        }
        let inputs = open_inputs(&spec)?;
        let memory_err = |source| VmmError::Memory {
            value: spec.memory_arg.clone(),
            source,
        };
        // Host limits (RAM, hugepage pool, THP switch, NUMA node), before anything is built.
        let mem_cfg = &spec.memory_options.config;
        let mem_policy = &spec.memory_options.policy;
        mem_cfg.validate().map_err(memory_err)?;
        mem_policy.validate(&mem_cfg.backing).map_err(memory_err)?;
        let kvm_path = std::env::var("KILN_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".to_string());
        let kvm_err = |source| VmmError::Kvm {
            path: kvm_path.clone(),
            source,
        };
        let kvm_cpath = std::ffi::CString::new(kvm_path.clone()).map_err(|_| VmmError::Os {
            what: "KILN_KVM_DEVICE contains a NUL byte",
            source: io::ErrorKind::InvalidInput.into(),
        })?;
        let kvm = Kvm::new_with_path(&kvm_cpath).map_err(kvm_err)?;
        let max_cpus = u32::try_from(kvm.get_max_vcpus())
            .unwrap_or(u32::MAX)
            .min(kiln_vcpu::cpuid::MAX_VCPUS);
        if spec.cpus == 0 || spec.cpus > max_cpus {
            return Err(VmmError::Cpus {
                requested: spec.cpus,
                max: max_cpus,
            });
        }
        let vm = kiln_vcpu::create_vm(&kvm).map_err(kvm_err)?;
        vm_setup("KVM_SET_TSS_ADDR", vm.set_tss_address(KVM_TSS_ADDRESS))?;
        let chip = IrqChip::create(&vm)?;
        let (mem, restore) = match restore {
            None => (
                kiln_memory::create_guest_memory_with(mem_cfg, mem_policy).map_err(memory_err)?,
                None,
            ),
            Some(r) => {
                let crate::snapshot::RestoreInput { state, mem, paused } = r;
                (mem, Some((state, paused)))
            }
        };
        // Registering the memory with KVM costs milliseconds on some hosts (kvm-pvm: ~5 ms) and
        // needs nothing from the kernel load, which only writes the host mapping: overlap them.
        // The vCPUs start only after both are done.
        let (registered, entry) = std::thread::scope(|s| {
            let reg = s.spawn(|| {
                // SAFETY: `mem` outlives every vCPU run: the vCPU threads are joined before it
                // drops.
                unsafe { kiln_memory::register_memory(&vm, &mem) }
            });
            // A restored guest's memory already holds its kernel (and ACPI tables).
            let entry = match restore {
                None => load_kernel(
                    &spec,
                    &mem,
                    inputs.kernel,
                    &inputs.kernel_flag,
                    inputs.initrd,
                )
                .map(Some),
                Some(_) => Ok(None),
            };
            (reg.join(), entry)
        });
        match registered {
            Ok(r) => r.map_err(memory_err)?,
            Err(_) => {
                return Err(VmmError::Os {
                    what: "registering guest memory (thread panicked)",
                    source: io::ErrorKind::Other.into(),
                })
            }
        }
        let entry = entry?;

        let events = Arc::new(VmEvents {
            power: AtomicU8::new(EVENT_NONE),
            wake: EventFd::new(EFD_NONBLOCK).map_err(|source| VmmError::Os {
                what: "eventfd",
                source,
            })?,
        });
        if let Some((state, _)) = &restore {
            crate::snapshot::restore_vm_state(&vm, state)?;
        }
        let mut devices = build_devices(
            &vm,
            &chip,
            inputs.serial_out,
            &events,
            restore.as_ref().map(|(s, _)| &s.serial),
        )?;
        // Second handles on the disks' open files, sharing their locks: a migration hands
        // the locks to the destination (and takes them back if it fails).
        let disk_locks = inputs
            .disks
            .iter()
            .flatten()
            .map(|f| f.try_clone())
            .collect::<io::Result<Vec<File>>>()
            .map_err(|source| VmmError::Os {
                what: "duplicating a disk image fd",
                source,
            })?;
        let virtio = crate::virtio::build(
            &vm,
            &chip,
            &mem,
            &spec.virtio,
            &spec.disks,
            inputs.disks,
            &spec.nets,
            inputs.taps,
            &spec.rng,
            spec.balloon.as_ref(),
            spec.vsock.as_ref(),
            &mut devices.mmio,
            thread_init(&spec, ThreadKind::Device),
        )?;
        let bench = crate::bench::attach(
            &vm,
            &chip,
            &mem,
            &mut devices.pio,
            spec.exit_bench,
            thread_init(&spec, ThreadKind::Bench),
        )?;
        // Unknown MSRs come to user space, where only the bench MSR has an answer (#GP otherwise,
        // as before); hosts without the capability just don't run the `msr-user` benchmark.
        kiln_vcpu::enable_user_msr_exits(&vm)?;
        if spec.serial == SerialArg::Stdio {
            spawn_stdin_reader(
                devices.serial.clone(),
                thread_init(&spec, ThreadKind::Stdin),
            )?;
        }

        let stops: Arc<Mutex<Vec<(u32, StopReason)>>> = Arc::default();
        let handler = {
            let events = events.clone();
            let stops = stops.clone();
            Arc::new(
                BusExitHandler::new(
                    Arc::new(devices.pio),
                    Arc::new(devices.mmio),
                    Some(Box::new(move |cpu, reason: &StopReason| {
                        if *reason != StopReason::Requested {
                            if let Ok(mut s) = stops.lock() {
                                s.push((cpu, reason.clone()));
                            }
                            events.wake_main();
                        }
                    })),
                )
                .with_msr_read(crate::bench::msr_reader(bench.device.clone())),
            )
        };

        if let Some((state, _)) = &restore {
            crate::snapshot::restore_devices(&virtio, state)?;
        }
        let supported = kiln_vcpu::supported_cpuid(&kvm)?;
        let mut vcpus = Vec::with_capacity(spec.cpus as usize);
        for index in 0..spec.cpus {
            let fd = kiln_vcpu::create_vcpu(&vm, &supported, index, spec.cpus)?;
            match (&restore, &entry) {
                (Some((state, _)), _) => crate::snapshot::restore_vcpu(&fd, state, index)?,
                (None, Some(entry)) if index == 0 => {
                    kiln_vcpu::regs::setup_boot_regs(&fd, &boot_regs(entry))?
                }
                _ => {}
            }
            crate::metrics::register_vcpu(&fd);
            vcpus.push(Vcpu::new(fd, index, handler.clone()));
        }
        let start_paused = restore.as_ref().is_some_and(|(_, paused)| *paused);
        let handles: Vec<VcpuHandle> = vcpus
            .into_iter()
            .zip(0..)
            .map(|(v, index)| v.start_with(start_paused, vcpu_thread_init(&spec, index)))
            .collect::<Result<_, _>>()?;
        if start_paused {
            if let Some(l) = &virtio.event_loop {
                l.pause();
            }
        }
        // Every thread exists now; from here on the main thread only waits, kicks and tears
        // down.
        if let Err(e) = thread_init(&spec, ThreadKind::Vmm)() {
            stop_all(handles);
            return Err(VmmError::Os {
                what: "main thread set-up",
                source: io::Error::other(e),
            });
        }

        Ok(Vm {
            spec,
            vcpus: handles,
            virtio,
            bench,
            events,
            stops,
            serial: devices.serial,
            i8042: devices.i8042,
            power_button: devices.power_button,
            paused: start_paused,
            dirty: crate::snapshot::DirtyTracking::default(),
            migrated: false,
            disk_locks,
            chip,
            fd: vm,
            kvm: Arc::new(kvm),
            mem,
        })
    }

    /// Waits for the guest to power off, reset or crash, or for a signal, executing the
    /// requests that arrive on `control` meanwhile; says how the VM ended. The vCPUs may
    /// still exist afterwards: call [`shutdown`](Self::shutdown).
    pub fn wait(
        &mut self,
        signals: &OwnedFd,
        control: Option<&ControlReceiver>,
    ) -> Result<Outcome, VmmError> {
        // SIGTERM first asks the guest to power off (ACPI power button through the GED) and
        // gives it `shutdown_timeout`; SIGINT, a second SIGTERM or the deadline stop it hard.
        let mut graceful_deadline: Option<std::time::Instant> = None;
        let control_fd = control.map(ControlReceiver::fd);
        loop {
            let timeout =
                graceful_deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
            let woke = wait_for_event(&self.events.wake, signals, control_fd, timeout)?;
            match (woke, graceful_deadline) {
                (Wake::Signal(libc::SIGTERM), None) if !self.spec.shutdown_timeout.is_zero() => {
                    if let Err(e) = self.power_button.trigger() {
                        eprintln!("kiln: power button event failed ({e}); stopping now");
                        return Ok(Outcome::Signal(libc::SIGTERM));
                    }
                    graceful_deadline =
                        Some(std::time::Instant::now() + self.spec.shutdown_timeout);
                    continue;
                }
                (Wake::Signal(sig), _) => return Ok(Outcome::Signal(sig)),
                (Wake::Control, _) => {
                    if let Some(c) = control {
                        c.drain(|r| self.handle(r));
                    }
                    if self.migrated {
                        // The requester (the control-socket thread) still has to write the
                        // report it was just handed; the process ends right after this
                        // returns, so give it a moment.
                        std::thread::sleep(Duration::from_millis(200));
                        return Ok(Outcome::Migrated);
                    }
                }
                (_, Some(d)) if std::time::Instant::now() >= d => {
                    eprintln!(
                        "kiln: guest did not power off within {:?} of SIGTERM; stopping it",
                        self.spec.shutdown_timeout
                    );
                    return Ok(Outcome::Signal(libc::SIGTERM));
                }
                _ => {}
            }
            if let Some(outcome) = self.ended() {
                return Ok(outcome);
            }
        }
    }

    /// How the guest ended, if it has.
    fn ended(&self) -> Option<Outcome> {
        match self.events.power.load(Ordering::Acquire) {
            EVENT_POWER_OFF => return Some(Outcome::PowerOff),
            EVENT_RESET => return Some(Outcome::Reset),
            _ => {}
        }
        let first_stop = self.stops.lock().ok().and_then(|s| s.first().cloned());
        first_stop.map(|(cpu, reason)| match reason {
            StopReason::PowerOff => Outcome::PowerOff,
            StopReason::Reset => Outcome::Reset,
            other => Outcome::Crashed(format!("vCPU {cpu}: {}", describe(&other))),
        })
    }

    /// Executes one control request (on the main thread, between guest events).
    pub fn handle(&mut self, request: VmRequest) -> Result<VmResponse, String> {
        match request {
            VmRequest::Pause => self.pause().map(|()| VmResponse::Done),
            VmRequest::Resume => {
                self.resume();
                Ok(VmResponse::Done)
            }
            VmRequest::CtrlAltDel => self
                .i8042
                .trigger_ctrl_alt_del()
                .map(|()| VmResponse::Done)
                .map_err(|e| format!("SendCtrlAltDel: keyboard interrupt failed: {e}")),
            VmRequest::Snapshot(p) => self
                .snapshot(&p)
                .map(VmResponse::Report)
                .map_err(|e| e.to_string()),
            VmRequest::Migrate(p) => {
                let report = crate::migration::migrate(self, &p)?;
                self.migrated = true;
                eprintln!("kiln: migrated to {}: {report}", p.to);
                Ok(VmResponse::Report(report.to_string()))
            }
            VmRequest::BalloonTarget(bytes) => self.balloon_target(bytes),
            VmRequest::BalloonStats => self.balloon_stats(),
        }
    }

    fn balloon_target(&mut self, bytes: u64) -> Result<VmResponse, String> {
        let b = self
            .virtio
            .balloon
            .as_ref()
            .ok_or("the VM has no balloon device")?;
        if bytes > self.spec.memory {
            return Err(format!(
                "balloon target of {bytes} bytes is more than the guest's memory ({} bytes)",
                self.spec.memory
            ));
        }
        let pages = u32::try_from(bytes / kiln_virtio::balloon::PAGE_SIZE).unwrap_or(u32::MAX);
        b.with_device(|d| d.set_target(pages))
            .map_err(|e| format!("balloon: {e}"))?;
        Ok(VmResponse::Done)
    }

    fn balloon_stats(&mut self) -> Result<VmResponse, String> {
        let b = self
            .virtio
            .balloon
            .as_ref()
            .ok_or("the VM has no balloon device")?;
        let (target, actual, stats) =
            b.with_device(|d| (d.target_pages(), d.actual_pages(), d.stats()));
        let page = kiln_virtio::balloon::PAGE_SIZE;
        let mut out = serde_json::Map::new();
        out.insert("target_pages".into(), target.into());
        out.insert("actual_pages".into(), actual.into());
        out.insert(
            "target_mib".into(),
            ((u64::from(target) * page) >> 20).into(),
        );
        out.insert(
            "actual_mib".into(),
            ((u64::from(actual) * page) >> 20).into(),
        );
        for (name, v) in kiln_virtio::balloon::BalloonStats::NAMES
            .iter()
            .zip(stats.values)
        {
            if let Some(v) = v {
                out.insert((*name).into(), v.into());
            }
        }
        Ok(VmResponse::Report(
            serde_json::Value::Object(out).to_string(),
        ))
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Stops every vCPU outside the guest (kick + immediate_exit), then quiesces the devices:
    /// afterwards no guest instruction runs, no queue is processed and no interrupt is
    /// injected until [`resume`](Self::resume). On failure everything runs again.
    pub fn pause(&mut self) -> Result<(), String> {
        if self.paused {
            return Ok(());
        }
        for (i, h) in self.vcpus.iter().enumerate() {
            if h.pause(PAUSE_TIMEOUT) == kiln_vcpu::VcpuState::Running {
                for h in &self.vcpus[..=i] {
                    h.resume();
                }
                return Err(format!(
                    "vCPU {} did not leave the guest within {PAUSE_TIMEOUT:?}",
                    h.index()
                ));
            }
        }
        if let Some(l) = &self.virtio.event_loop {
            l.pause();
        }
        // The exit benchmark's irqfd injector (--exit-bench only) is left running: it only
        // works for a guest that is waiting for it, and is not part of any snapshot.
        self.paused = true;
        Ok(())
    }

    /// Lets a paused VM run again: devices first, so nothing a vCPU asks for waits.
    pub fn resume(&mut self) {
        if !self.paused {
            return;
        }
        if let Some(l) = &self.virtio.event_loop {
            l.resume();
        }
        for h in &self.vcpus {
            h.resume();
        }
        self.paused = false;
    }

    /// The guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The vCPU threads, in index order.
    pub fn vcpu_handles(&self) -> &[VcpuHandle] {
        &self.vcpus
    }

    /// The virtio devices.
    pub fn virtio(&self) -> &crate::virtio::VirtioDevices {
        &self.virtio
    }

    /// The serial console device.
    pub fn serial(&self) -> &Arc<legacy::SerialDevice> {
        &self.serial
    }

    /// The i8042 controller.
    pub fn i8042(&self) -> &Arc<legacy::I8042Device> {
        &self.i8042
    }

    /// The in-kernel interrupt controller.
    pub fn irq_chip(&self) -> &IrqChip {
        &self.chip
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &VmFd {
        &self.fd
    }

    /// The KVM system fd the VM came from.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The KVM system fd, shared (for jobs on vCPU threads).
    pub(crate) fn kvm_shared(&self) -> Arc<Kvm> {
        self.kvm.clone()
    }

    /// The spec the VM was built from.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// Stops every thread of the VM and frees it.
    pub fn shutdown(self) {
        let Vm {
            vcpus,
            virtio,
            bench,
            fd,
            mem,
            ..
        } = self;
        stop_all(vcpus);
        if let Some(l) = virtio.event_loop {
            l.stop();
        }
        // The rest of `virtio` (the --vsock socket file) goes when this returns.
        bench.stop();
        drop(fd);
        drop(mem);
    }
}

fn describe(reason: &StopReason) -> String {
    match reason {
        StopReason::TripleFault { registers } => format!("triple fault\n{registers}"),
        StopReason::InternalError {
            suberror,
            registers,
        } => {
            format!("KVM internal error (suberror {suberror}): the host could not emulate a guest instruction\n{registers}")
        }
        StopReason::FailEntry { reason, registers } => {
            format!("VM entry failed (hardware reason {reason:#x})\n{registers}")
        }
        StopReason::Unhandled { exit, registers } => format!("unhandled exit {exit}\n{registers}"),
        StopReason::RunFailed { errno } => {
            format!("KVM_RUN failed: {}", io::Error::from_raw_os_error(*errno))
        }
        StopReason::GuestCrash => "guest reported a crash (KVM_SYSTEM_EVENT_CRASH)".to_string(),
        other => format!("{other:?}"),
    }
}
