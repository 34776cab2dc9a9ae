//! Per-thread seccomp filters for a Kiln VMM, built with `seccompiler`, and the SIGSYS
//! reporter that turns a forbidden system call into a log line and exit status 148.
//!
//! Each thread installs the filter for its [`ThreadKind`] itself, before it handles any guest
//! or client input, with [`install`]. Filters are allow-lists: anything else traps, the
//! process-wide SIGSYS handler ([`install_sigsys_handler`]) writes which thread made which
//! call, and the process exits with [`EXIT_SECCOMP`] (like Firecracker).
//!
//! Where an argument decides whether a call is dangerous, the rule checks it: `ioctl` only
//! with the KVM requests a thread needs, `mmap`/`mprotect` never with `PROT_EXEC`, `fcntl`
//! only `F_GETFD`/`F_SETFD`, `socket` only `AF_UNIX`.
#![warn(missing_docs)]
#![doc = include_str!("../README.md")]

mod names;

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Exit status of a process killed for a forbidden system call (Firecracker's value).
pub const EXIT_SECCOMP: i32 = 148;

/// Errors building or installing filters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// seccompiler refused a filter.
    #[error("seccomp filter for the {kind} thread: {source}")]
    Build {
        /// The thread kind.
        kind: &'static str,
        /// seccompiler's error.
        #[source]
        source: seccompiler::BackendError,
    },
    /// A custom filter file could not be read or compiled.
    #[error("--seccomp-filter {path}: {why}")]
    Custom {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
    /// Installing a filter failed.
    #[error("installing the {kind} thread's seccomp filter: {source}")]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// seccompiler's error.
        #[source]
        source: seccompiler::Error,
    },
    /// Installing the SIGSYS handler failed.
    #[error("installing the SIGSYS handler: {0}")]
    Sigaction(#[source] std::io::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// The kinds of thread a Kiln VMM runs; each gets its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread once the VM runs: waits for events and signals, kicks and joins
    /// vCPUs, tears down.
    Vmm,
    /// A vCPU thread: `KVM_RUN` and the devices it reaches through exits.
    Vcpu,
    /// The virtio device event loop: epoll, eventfds, timers, disk I/O, getrandom.
    Device,
    /// The serial console's stdin reader.
    Stdin,
    /// The exit benchmark's irqfd injector (only with `kiln --exit-bench`).
    Bench,
    /// The Firecracker-compatible API server (`--api-sock`): the accepting thread, the
    /// connection threads it spawns (they inherit its filter) and the metrics flusher.
    Api,
}

impl ThreadKind {
    /// Every kind, in a fixed order.
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Stdin,
        ThreadKind::Bench,
        ThreadKind::Api,
    ];

    /// Kinds a custom filter file must cover (the others exist only on request).
    pub const REQUIRED: [ThreadKind; 4] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Stdin,
    ];

    /// The name used in custom filter files and log lines.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::Stdin => "stdin",
            ThreadKind::Bench => "bench",
            ThreadKind::Api => "api",
        }
    }

    fn from_u8(v: u8) -> Option<ThreadKind> {
        ThreadKind::ALL.get(usize::from(v).checked_sub(1)?).copied()
    }

    fn to_u8(self) -> u8 {
        self as u8 + 1
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Compiled filters, one per thread kind (a custom file may leave out the kinds that exist
/// only on request).
#[derive(Debug, Clone)]
pub struct Filters {
    programs: HashMap<ThreadKind, BpfProgram>,
    source: Option<String>,
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    // Only fails for an argument index above 5, which no caller here passes.
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .unwrap_or_else(|_| unreachable!("argument index {arg} is valid"))
}

fn rule(conds: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conds).unwrap_or_else(|_| unreachable!("a non-empty condition list"))
}

/// Allows `nr` unconditionally.
fn allow(r: &mut Rules, nr: libc::c_long) {
    r.insert(nr, Vec::new());
}

/// Allows `nr` when argument `arg` equals one of `values`.
fn allow_values(r: &mut Rules, nr: libc::c_long, arg: u8, values: &[u64]) {
    r.entry(nr).or_default().extend(
        values
            .iter()
            .map(|&v| rule(vec![cond(arg, SeccompCmpOp::Eq, v)])),
    );
}

/// What every thread needs: memory allocation (never executable), locks, signals,
/// clocks, logging to stderr, dropping fds, and exiting. `restart_syscall` is how the kernel
/// resumes a sleep or timed wait that a stop signal interrupted (`SIGSTOP`/`SIGCONT` from a
/// debugger, a shell's job control, an orchestrator pausing the process): without it a
/// stopped kiln died on `SIGCONT`. It can only resume the call the thread was already in.
fn common(r: &mut Rules) {
    for nr in [
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_restart_syscall,
        libc::SYS_sigaltstack,
        libc::SYS_sched_yield,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_close,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_gettid,
        libc::SYS_getpid,
    ] {
        allow(r, nr);
    }
    // Anonymous or file mappings for the allocator and thread exit, never executable.
    for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
        r.entry(nr).or_default().push(rule(vec![cond(
            2,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )]));
    }
    // Rust's std checks an fd is still open before closing it (debug builds).
    allow_values(
        r,
        libc::SYS_fcntl,
        1,
        &[libc::F_GETFD as u64, libc::F_SETFD as u64],
    );
}

/// Disk and entropy I/O of the virtio devices.
fn device_io(r: &mut Rules) {
    for nr in [
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_fdatasync,
        libc::SYS_fsync,
        libc::SYS_fallocate,
        libc::SYS_getrandom,
        // virtio-net frames from the tap (writev is common).
        libc::SYS_readv,
    ] {
        allow(r, nr);
    }
}

/// `TUNSETOFFLOAD`: virtio-net sets the tap's offloads to what the driver negotiated when it
/// activates the device (on the vCPU thread that wrote `DRIVER_OK`).
pub const TUNSETOFFLOAD: u64 = 0x4004_54D0;
/// The vsock device's Unix sockets: accepting host connections, connecting to `<uds>_PORT`
/// (non-blocking Unix stream sockets only), its inner epoll set, peeking at `CONNECT`
/// lines and half-closing.
fn vsock_sockets(r: &mut Rules) {
    let flags = (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64;
    allow_values(r, libc::SYS_accept4, 3, &[flags]);
    r.entry(libc::SYS_socket).or_default().push(rule(vec![
        cond(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64),
        cond(1, SeccompCmpOp::Eq, libc::SOCK_STREAM as u64 | flags),
    ]));
    allow(r, libc::SYS_connect);
    allow_values(
        r,
        libc::SYS_epoll_ctl,
        1,
        &[libc::EPOLL_CTL_ADD as u64, libc::EPOLL_CTL_DEL as u64],
    );
    allow_values(
        r,
        libc::SYS_recvfrom,
        3,
        &[0, (libc::MSG_PEEK | libc::MSG_DONTWAIT) as u64],
    );
    // std writes to sockets with send(MSG_NOSIGNAL): connected sockets only (no address).
    r.entry(libc::SYS_sendto).or_default().push(rule(vec![
        cond(3, SeccompCmpOp::Eq, libc::MSG_NOSIGNAL as u64),
        cond(4, SeccompCmpOp::Eq, 0),
    ]));
    allow_values(
        r,
        libc::SYS_shutdown,
        1,
        &[libc::SHUT_RD as u64, libc::SHUT_WR as u64],
    );
}

// KVM ioctl request numbers (linux/kvm.h), computed like the kernel's _IO/_IOR macros.
/// The API server threads: HTTP over the accepted Unix-socket connections (with read and
/// write timeouts), a thread per connection, the logger's and metrics' files or FIFOs, the
/// configuration files a request names (e.g. a `--config-file`'s kernel), and the control
/// channel to the main thread (an eventfd write and a futex). No KVM, no other socket
/// families, no exec.
fn api(r: &mut Rules) {
    let cloexec = libc::SOCK_CLOEXEC as u64;
    allow_values(r, libc::SYS_accept4, 3, &[cloexec]);
    // Timeouts on the connection: SO_RCVTIMEO / SO_SNDTIMEO only.
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        r.entry(libc::SYS_setsockopt).or_default().push(rule(vec![
            cond(1, SeccompCmpOp::Eq, libc::SOL_SOCKET as u64),
            cond(2, SeccompCmpOp::Eq, opt as u64),
        ]));
    }
    allow_values(r, libc::SYS_recvfrom, 3, &[0]);
    r.entry(libc::SYS_sendto).or_default().push(rule(vec![
        cond(3, SeccompCmpOp::Eq, libc::MSG_NOSIGNAL as u64),
        cond(4, SeccompCmpOp::Eq, 0),
    ]));
    allow_values(r, libc::SYS_shutdown, 1, &[libc::SHUT_RDWR as u64]);
    // Files the requests name, and the log and metrics destinations.
    for nr in [
        libc::SYS_openat,
        libc::SYS_read,
        libc::SYS_pread64,
        libc::SYS_lseek,
        libc::SYS_statx,
        libc::SYS_newfstatat,
        libc::SYS_fstat,
        libc::SYS_getrandom,
    ] {
        allow(r, nr);
    }
    // A thread per connection: std's spawn (clone3, or clone where clone3 is missing), and
    // what a new thread does first.
    allow(r, libc::SYS_clone3);
    allow_values(
        r,
        libc::SYS_clone,
        0,
        &[(libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID) as u64],
    );
    for nr in [
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_sched_getaffinity,
    ] {
        allow(r, nr);
    }
    allow_values(r, libc::SYS_prctl, 0, &[libc::PR_SET_NAME as u64]);
}

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xAE << 8) | nr
}
/// `KVM_RUN`.
pub const KVM_RUN: u64 = ioc(0, 0x80, 0);
/// `KVM_GET_REGS` (crash reports).
pub const KVM_GET_REGS: u64 = ioc(2, 0x81, std::mem::size_of::<kvm_bindings::kvm_regs>());
/// `KVM_GET_SREGS` (crash reports).
pub const KVM_GET_SREGS: u64 = ioc(2, 0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>());
/// `KVM_GET_CLOCK` (the benchmark injector's timestamps).
pub const KVM_GET_CLOCK: u64 = ioc(2, 0x7c, std::mem::size_of::<kvm_bindings::kvm_clock_data>());

/// The `KVM_GET_*` calls that save a paused vCPU (`kiln_vcpu::VcpuSnapshot::save`, run on
/// the vCPU's thread), plus the two read-only system queries it makes.
pub const VCPU_SAVE_IOCTLS: [u64; 12] = [
    ioc(2, 0x98, std::mem::size_of::<kvm_bindings::kvm_mp_state>()), // KVM_GET_MP_STATE
    ioc(2, 0xa4, std::mem::size_of::<kvm_bindings::kvm_xsave>()),    // KVM_GET_XSAVE
    ioc(2, 0xa6, std::mem::size_of::<kvm_bindings::kvm_xcrs>()),     // KVM_GET_XCRS
    ioc(2, 0xa1, std::mem::size_of::<kvm_bindings::kvm_debugregs>()), // KVM_GET_DEBUGREGS
    ioc(
        2,
        0x8e,
        std::mem::size_of::<kvm_bindings::kvm_lapic_state>(),
    ), // KVM_GET_LAPIC
    ioc(0, 0xa3, 0),                                                 // KVM_GET_TSC_KHZ
    ioc(3, 0x91, std::mem::size_of::<kvm_bindings::kvm_cpuid2>()),   // KVM_GET_CPUID2
    ioc(3, 0x88, std::mem::size_of::<kvm_bindings::kvm_msrs>()),     // KVM_GET_MSRS
    ioc(
        2,
        0x9f,
        std::mem::size_of::<kvm_bindings::kvm_vcpu_events>(),
    ), // KVM_GET_VCPU_EVENTS
    ioc(2, 0x8c, std::mem::size_of::<kvm_bindings::kvm_fpu>()),      // KVM_GET_FPU
    ioc(0, 0x03, 0),                                                 // KVM_CHECK_EXTENSION
    ioc(3, 0x02, std::mem::size_of::<kvm_bindings::kvm_msr_list>()), // KVM_GET_MSR_INDEX_LIST
];

/// The VM-level calls of a snapshot on the main thread: interrupt controllers, PIT, clock,
/// and the dirty log (diff snapshots; re-registering a slot turns logging on).
pub const VM_SAVE_IOCTLS: [u64; 5] = [
    ioc(3, 0x62, std::mem::size_of::<kvm_bindings::kvm_irqchip>()), // KVM_GET_IRQCHIP
    ioc(2, 0x9f, std::mem::size_of::<kvm_bindings::kvm_pit_state2>()), // KVM_GET_PIT2
    KVM_GET_CLOCK,
    ioc(1, 0x42, std::mem::size_of::<kvm_bindings::kvm_dirty_log>()), // KVM_GET_DIRTY_LOG
    ioc(
        1,
        0x46,
        std::mem::size_of::<kvm_bindings::kvm_userspace_memory_region>(),
    ), // KVM_SET_USER_MEMORY_REGION
];

fn rules(kind: ThreadKind) -> Rules {
    let mut r = Rules::new();
    common(&mut r);
    match kind {
        ThreadKind::Vmm => {
            for nr in [
                libc::SYS_poll,
                libc::SYS_ppoll,
                libc::SYS_read,
                libc::SYS_tgkill,
                // Snapshots: the state and memory files (temporary file, fsync, rename,
                // directory fsync; a failed write removes its temporary file).
                libc::SYS_openat,
                libc::SYS_pwrite64,
                libc::SYS_ftruncate,
                libc::SYS_fsync,
                libc::SYS_fstat,
                libc::SYS_statx,
                libc::SYS_rename,
                libc::SYS_renameat,
                libc::SYS_renameat2,
                libc::SYS_unlink,
                libc::SYS_unlinkat,
            ] {
                allow(&mut r, nr);
            }
            // Live migration: the outgoing connection (TCP or Unix; connect with a timeout
            // makes the socket non-blocking with FIONBIO and polls it).
            for nr in [
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_setsockopt,
                libc::SYS_getsockopt,
                libc::SYS_sendto,
                libc::SYS_recvfrom,
                libc::SYS_shutdown,
                // /proc/self/pagemap: which guest pages were never touched.
                libc::SYS_pread64,
                // Disk image locks handed to the destination (and taken back on failure).
                libc::SYS_flock,
            ] {
                allow(&mut r, nr);
            }
            allow_values(&mut r, libc::SYS_ioctl, 1, &[libc::FIONBIO]);
            allow_values(&mut r, libc::SYS_ioctl, 1, &VM_SAVE_IOCTLS);
        }
        ThreadKind::Vcpu => {
            allow_values(
                &mut r,
                libc::SYS_ioctl,
                1,
                &[KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS, TUNSETOFFLOAD],
            );
            // Saving the vCPU's state while it is paused (snapshots, migration).
            allow_values(&mut r, libc::SYS_ioctl, 1, &VCPU_SAVE_IOCTLS);
            // A QueueNotify that no ioeventfd matched is processed on the vCPU thread.
            device_io(&mut r);
            // The exit benchmark's CPU-time marks (kiln-legacy's bench device).
            allow_values(
                &mut r,
                libc::SYS_getrusage,
                0,
                &[libc::RUSAGE_THREAD as u64],
            );
        }
        ThreadKind::Device => {
            device_io(&mut r);
            // Eventfds and timerfds.
            for nr in [libc::SYS_epoll_wait, libc::SYS_epoll_pwait, libc::SYS_read] {
                allow(&mut r, nr);
            }
            // Relative timers only (flags 0).
            allow_values(&mut r, libc::SYS_timerfd_settime, 1, &[0]);
            allow_values(&mut r, libc::SYS_ioctl, 1, &[TUNSETOFFLOAD]);
            vsock_sockets(&mut r);
        }
        ThreadKind::Stdin => {
            allow(&mut r, libc::SYS_read);
        }
        ThreadKind::Bench => {
            allow_values(&mut r, libc::SYS_ioctl, 1, &[KVM_GET_CLOCK]);
        }
        ThreadKind::Api => api(&mut r),
    }
    r
}

/// How many system calls the built-in filter for `kind` allows (for documentation and
/// reports).
pub fn allowed_count(kind: ThreadKind) -> usize {
    rules(kind).len()
}

/// The system calls the built-in filter for `kind` allows, by name, and whether the rule
/// also checks arguments.
pub fn allowed_syscalls(kind: ThreadKind) -> Vec<(&'static str, bool)> {
    rules(kind)
        .iter()
        .map(|(nr, r)| (syscall_name(*nr).unwrap_or("?"), !r.is_empty()))
        .collect()
}

impl Filters {
    /// The built-in allow-lists.
    pub fn builtin() -> Result<Self> {
        let mut programs = HashMap::new();
        for kind in ThreadKind::ALL {
            let filter = SeccompFilter::new(
                rules(kind),
                SeccompAction::Trap,
                SeccompAction::Allow,
                TargetArch::x86_64,
            )
            .map_err(|source| Error::Build {
                kind: kind.name(),
                source,
            })?;
            let prog: BpfProgram = filter.try_into().map_err(|source| Error::Build {
                kind: kind.name(),
                source,
            })?;
            programs.insert(kind, prog);
        }
        Ok(Filters {
            programs,
            source: None,
        })
    }

    /// Filters from a seccompiler JSON file (the format Firecracker's `--seccomp-filter`
    /// takes): an object with one filter per thread kind name (`vmm`, `vcpu`, `device`,
    /// `stdin` required; `bench` needed only with `--exit-bench`).
    pub fn from_json(path: &std::path::Path, reader: impl Read) -> Result<Self> {
        let err = |why: String| Error::Custom {
            path: path.display().to_string(),
            why,
        };
        let mut map = seccompiler::compile_from_json(reader, TargetArch::x86_64)
            .map_err(|e| err(e.to_string()))?;
        let mut programs = HashMap::new();
        for kind in ThreadKind::ALL {
            match map.remove(kind.name()) {
                Some(prog) => {
                    programs.insert(kind, prog);
                }
                None if ThreadKind::REQUIRED.contains(&kind) => {
                    return Err(err(format!("no filter for the \"{}\" thread", kind.name())));
                }
                None => {}
            }
        }
        if let Some(extra) = map.keys().next() {
            return Err(err(format!(
                "unknown thread kind \"{extra}\" (known: vmm, vcpu, device, stdin, bench, api)"
            )));
        }
        Ok(Filters {
            programs,
            source: Some(path.display().to_string()),
        })
    }

    /// The compiled program for `kind`, if there is one.
    pub fn program(&self, kind: ThreadKind) -> Option<&BpfProgram> {
        self.programs.get(&kind)
    }

    /// Installs the filter for `kind` on the calling thread (and records the kind for the
    /// SIGSYS report). Call it before the thread handles any guest or client input.
    pub fn install(&self, kind: ThreadKind) -> Result<()> {
        match self.program(kind) {
            Some(p) => install(kind, p),
            None => Err(Error::Custom {
                path: self.source.clone().unwrap_or_default(),
                why: format!("no filter for the \"{}\" thread", kind.name()),
            }),
        }
    }
}

thread_local! {
    /// The kind of filter this thread installed, for the SIGSYS report (const-initialised
    /// plain data: safe to read from a signal handler).
    static THREAD_KIND: Cell<u8> = const { Cell::new(0) };
}

/// Installs `prog` on the calling thread as the filter for `kind`.
pub fn install(kind: ThreadKind, prog: &BpfProgram) -> Result<()> {
    THREAD_KIND.with(|k| k.set(kind.to_u8()));
    seccompiler::apply_filter(prog).map_err(|source| Error::Install {
        kind: kind.name(),
        source,
    })
}

/// Records that the calling thread runs under `kind`'s filter, inherited from the thread that
/// spawned it (threads inherit their creator's filters), so a forbidden call is reported
/// with the right thread kind.
pub fn note_inherited(kind: ThreadKind) {
    THREAD_KIND.with(|k| k.set(kind.to_u8()));
}

/// The kind of filter the calling thread runs under (installed or noted as inherited), if
/// any: a thread that already has one must not install another (`seccomp(2)` and
/// `prctl(PR_SET_NO_NEW_PRIVS)` are not on any allow-list).
pub fn current_kind() -> Option<ThreadKind> {
    THREAD_KIND.with(|k| ThreadKind::from_u8(k.get()))
}

/// The name of system call `nr` on x86_64, if it has one.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    usize::try_from(nr)
        .ok()
        .and_then(|i| names::NAMES.get(i))
        .copied()
        .filter(|n| !n.is_empty())
}

/// Appends `s` to `buf` at `*len` (truncating), for the allocation-free report.
fn push(buf: &mut [u8], len: &mut usize, s: &[u8]) {
    for &b in s {
        if let Some(slot) = buf.get_mut(*len) {
            *slot = b;
            *len += 1;
        }
    }
}

fn push_num(buf: &mut [u8], len: &mut usize, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    push(buf, len, &digits[i..]);
}

/// Formats the report line into `buf`; returns its length.
fn report(buf: &mut [u8], kind: Option<ThreadKind>, nr: i64) -> usize {
    let mut len = 0;
    push(buf, &mut len, b"kiln: seccomp: the ");
    push(
        buf,
        &mut len,
        kind.map_or("unfiltered", ThreadKind::name).as_bytes(),
    );
    push(buf, &mut len, b" thread made a forbidden system call ");
    push_num(buf, &mut len, nr as u64);
    if let Some(name) = syscall_name(nr) {
        push(buf, &mut len, b" (");
        push(buf, &mut len, name.as_bytes());
        push(buf, &mut len, b")");
    }
    push(buf, &mut len, b"; exiting with status 148\n");
    len
}

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // For SIGSYS the siginfo union holds { void *call_addr; int syscall; unsigned arch; }
    // right after the three ints and padding of the header (offset 16 on x86_64).
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; offset 24 is
    // inside it (siginfo_t is 128 bytes).
    let nr = unsafe { (info as *const u8).add(24).cast::<i32>().read_unaligned() };
    let kind = THREAD_KIND.with(|k| ThreadKind::from_u8(k.get()));
    let mut buf = [0u8; 160];
    let len = report(&mut buf, kind, i64::from(nr));
    // SAFETY: write and _exit are async-signal-safe and allowed by every filter; `buf` is
    // valid for `len` bytes.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(EXIT_SECCOMP);
    }
}

/// Installs the process-wide SIGSYS handler that reports a forbidden call and exits with
/// [`EXIT_SECCOMP`]. Call once, before any filter is installed.
pub fn install_sigsys_handler() -> Result<()> {
    // SAFETY: sigaction is plain data; zeroed is a valid empty action.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
        sigsys_handler;
    act.sa_sigaction = handler as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `act.sa_mask` is a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    // SAFETY: valid action pointer; a null old-action pointer is allowed.
    if unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) } != 0 {
        return Err(Error::Sigaction(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Makes a system call that no built-in filter allows (`getppid`), for tests that check a
/// filter is really installed on a thread: with the filter in place the process exits with
/// [`EXIT_SECCOMP`].
pub fn forbidden_call_for_tests() {
    // SAFETY: getppid has no arguments and no side effects.
    unsafe { libc::syscall(libc::SYS_getppid) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_filter_compiles_and_names_are_right() {
        let f = Filters::builtin().unwrap();
        for k in ThreadKind::ALL {
            assert!(!f.program(k).unwrap().is_empty());
            assert!(allowed_count(k) > 10, "{k}");
            assert_eq!(ThreadKind::from_u8(k.to_u8()), Some(k));
        }
        assert_eq!(syscall_name(0), Some("read"));
        assert_eq!(syscall_name(16), Some("ioctl"));
        assert_eq!(syscall_name(110), Some("getppid"));
        assert_eq!(syscall_name(9999), None);
        assert_eq!(syscall_name(-1), None);
    }

    #[test]
    fn kvm_ioctl_numbers_match_kvm_ioctls() {
        assert_eq!(KVM_RUN, 0xAE80);
        assert_eq!(KVM_GET_REGS, 0x8090_AE81);
        assert_eq!(KVM_GET_SREGS, 0x8138_AE83);
        assert_eq!(KVM_GET_CLOCK, 0x8030_AE7C);
        // From linux/kvm.h as compiled for x86_64.
        assert_eq!(VCPU_SAVE_IOCTLS[0], 0x8004_AE98); // KVM_GET_MP_STATE
        assert_eq!(VCPU_SAVE_IOCTLS[1], 0x9000_AEA4); // KVM_GET_XSAVE
        assert_eq!(VCPU_SAVE_IOCTLS[4], 0x8400_AE8E); // KVM_GET_LAPIC
        assert_eq!(VCPU_SAVE_IOCTLS[6], 0xC008_AE91); // KVM_GET_CPUID2
        assert_eq!(VCPU_SAVE_IOCTLS[7], 0xC008_AE88); // KVM_GET_MSRS
        assert_eq!(VCPU_SAVE_IOCTLS[8], 0x8040_AE9F); // KVM_GET_VCPU_EVENTS
        assert_eq!(VM_SAVE_IOCTLS[0], 0xC208_AE62); // KVM_GET_IRQCHIP
        assert_eq!(VM_SAVE_IOCTLS[1], 0x8070_AE9F); // KVM_GET_PIT2
        assert_eq!(VM_SAVE_IOCTLS[3], 0x4010_AE42); // KVM_GET_DIRTY_LOG
        assert_eq!(VM_SAVE_IOCTLS[4], 0x4020_AE46); // KVM_SET_USER_MEMORY_REGION
        assert_eq!(TUNSETOFFLOAD as libc::c_ulong, libc::TUNSETOFFLOAD);
    }

    #[test]
    fn the_test_hook_call_is_in_no_allow_list() {
        for k in ThreadKind::ALL {
            assert!(!rules(k).contains_key(&libc::SYS_getppid), "{k}");
        }
    }

    #[test]
    fn report_names_thread_and_call() {
        let mut buf = [0u8; 160];
        let n = report(&mut buf, Some(ThreadKind::Vcpu), 110);
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "kiln: seccomp: the vcpu thread made a forbidden system call 110 (getppid); exiting with status 148\n"
        );
        let n = report(&mut buf, None, 4000);
        assert!(std::str::from_utf8(&buf[..n])
            .unwrap()
            .contains("unfiltered thread made a forbidden system call 4000;"));
    }

    #[test]
    fn custom_filters_need_every_thread_kind() {
        let one = r#"{"vmm": {"mismatch_action": "trap", "match_action": "allow", "filter": [{"syscall": "read"}]}}"#;
        let e = Filters::from_json("f.json".as_ref(), one.as_bytes()).unwrap_err();
        assert!(
            e.to_string().contains("no filter for the \"vcpu\" thread"),
            "{e}"
        );
        let all: String = ThreadKind::REQUIRED
            .iter()
            .map(|k| {
                format!(
                    r#""{}": {{"mismatch_action": "trap", "match_action": "allow", "filter": [{{"syscall": "read"}}]}}"#,
                    k.name()
                )
            })
            .collect::<Vec<_>>()
            .join(",");
        let f = Filters::from_json("f.json".as_ref(), format!("{{{all}}}").as_bytes()).unwrap();
        let e = f.install(ThreadKind::Bench).unwrap_err();
        assert!(
            e.to_string().contains("no filter for the \"bench\" thread"),
            "{e}"
        );
        // The optional kinds are taken when present.
        let with_api = format!(
            r#"{{{all}, "api": {{"mismatch_action": "trap", "match_action": "allow", "filter": []}}}}"#
        );
        let f = Filters::from_json("f.json".as_ref(), with_api.as_bytes()).unwrap();
        assert!(f.program(ThreadKind::Api).is_some());
        assert!(f.program(ThreadKind::Bench).is_none());
        let extra = format!(
            r#"{{{all}, "jailer": {{"mismatch_action": "trap", "match_action": "allow", "filter": []}}}}"#
        );
        let e = Filters::from_json("f.json".as_ref(), extra.as_bytes()).unwrap_err();
        assert!(
            e.to_string().contains("unknown thread kind \"jailer\""),
            "{e}"
        );
        let e = Filters::from_json("f.json".as_ref(), &b"{not json"[..]).unwrap_err();
        assert!(e.to_string().starts_with("--seccomp-filter f.json"), "{e}");
    }

    #[test]
    fn a_forbidden_call_kills_with_148() {
        // In a child process, so the filter doesn't stay on a test thread.
        // SAFETY: fork in a test; the child only makes raw calls and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = (|| {
                install_sigsys_handler().ok()?;
                Filters::builtin().ok()?.install(ThreadKind::Stdin).ok()?;
                forbidden_call_for_tests();
                Some(0)
            })()
            .unwrap_or(1);
            // SAFETY: leaving the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), EXIT_SECCOMP);
    }
}
