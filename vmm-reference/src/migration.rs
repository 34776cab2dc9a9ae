//! Live migration in kiln: [`kiln_migration`]'s two ends on kiln's [`Vm`].
//!
//! - Source: `VmRequest::Migrate` (the control socket's `migrate ADDR`) runs [`migrate`]
//!   on the VM's main thread while the vCPUs keep running: it connects, sends memory with
//!   KVM's dirty log on ([`kiln_memory::DirtyTracker`]), pauses, sends the rest and the
//!   state, and on `Running` the VM ends here (`Outcome::Migrated`, exit status 0). On any
//!   failure before that the VM is resumed and keeps running, and the request fails with
//!   the reason.
//! - Destination: `kiln --migrate-listen tcp:HOST:PORT|unix:PATH` waits for one incoming
//!   VM, builds its memory from the source's layout (with this process's `--memory`
//!   backing options), receives the pages, restores the state exactly as `--restore`
//!   does and runs it.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_memory::{DirtyTracker, GuestMemoryMmap, MemoryLayout};
use kiln_migration::{DestVm, Hello, HostInfo, Params, Region, Report, SourceVm, PAGE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use kiln_snapshot::{CpuFeatures, Header, MemoryDesc};

use crate::config::Cli;
use crate::control::{ControlReceiver, MigrateParams};
use crate::snapshot::VmState;
use crate::vm::{Outcome, Vm, VmmError};

/// What the state blob is called in error messages (it has no file).
const STATE_NAME: &str = "<migration state>";

/// How long connecting to a destination may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one read or write on the stream may block (a silent peer is a failed peer).
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a vCPU found running after the pause may take to leave the guest.
const PAUSE_AGAIN: Duration = Duration::from_secs(5);

/// `tcp:HOST:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrateAddr {
    /// A TCP address (`HOST:PORT`).
    Tcp(String),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl std::str::FromStr for MigrateAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(a) = s.strip_prefix("tcp:") {
            match a.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                    Ok(MigrateAddr::Tcp(a.to_string()))
                }
                _ => Err(format!("'{s}': expected tcp:HOST:PORT")),
            }
        } else if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(format!("'{s}': expected unix:PATH"));
            }
            Ok(MigrateAddr::Unix(PathBuf::from(p)))
        } else {
            Err(format!("'{s}': expected tcp:HOST:PORT or unix:PATH"))
        }
    }
}

impl std::fmt::Display for MigrateAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrateAddr::Tcp(a) => write!(f, "tcp:{a}"),
            MigrateAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A connected migration stream.
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix socket.
    Unix(UnixStream),
}

impl Stream {
    /// Sets both read and write timeouts.
    pub fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// Connects to a destination.
pub fn connect(addr: &MigrateAddr) -> io::Result<Stream> {
    let s = match addr {
        MigrateAddr::Tcp(a) => {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            let mut got = None;
            for sa in a.to_socket_addrs()? {
                match TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT) {
                    Ok(s) => {
                        got = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let s = got.ok_or(last)?;
            s.set_nodelay(true)?;
            Stream::Tcp(s)
        }
        MigrateAddr::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
    };
    s.set_timeouts(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Listens on `addr` and accepts one connection (removes a Unix socket file after).
pub fn accept_one(addr: &MigrateAddr) -> io::Result<Stream> {
    let s = match addr {
        MigrateAddr::Tcp(a) => {
            let l = TcpListener::bind(a)?;
            eprintln!(
                "kiln: waiting for an incoming VM on tcp:{}",
                l.local_addr()?
            );
            let (s, _) = l.accept()?;
            s.set_nodelay(true)?;
            Stream::Tcp(s)
        }
        MigrateAddr::Unix(p) => {
            let l = UnixListener::bind(p)?;
            eprintln!("kiln: waiting for an incoming VM on unix:{}", p.display());
            let r = l.accept();
            let _ = std::fs::remove_file(p);
            Stream::Unix(r?.0)
        }
    };
    s.set_timeouts(Some(IO_TIMEOUT))?;
    Ok(s)
}

fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let r = std::arch::x86_64::__cpuid_count(leaf, sub);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// This host as the protocol describes it: kiln's version, the CPU vendor and the feature
/// words a guest's CPUID is drawn from (1 ECX/EDX, 7.0 EBX/ECX/EDX, 0xD.1 EAX,
/// 0x8000_0001 ECX/EDX). The hypervisor and OSXSAVE bits are left out: they describe this
/// host's own setting, not what the guest gets.
pub fn host_info() -> HostInfo {
    let v = cpuid(0, 0);
    let mut vendor = [0u8; 12];
    vendor[..4].copy_from_slice(&v[1].to_le_bytes());
    vendor[4..8].copy_from_slice(&v[3].to_le_bytes());
    vendor[8..].copy_from_slice(&v[2].to_le_bytes());
    let max = v[0];
    let ext_max = cpuid(0x8000_0000, 0)[0];
    let l1 = cpuid(1, 0);
    let l7 = if max >= 7 { cpuid(7, 0) } else { [0; 4] };
    let ld = if max >= 0xd { cpuid(0xd, 1) } else { [0; 4] };
    let le = if ext_max >= 0x8000_0001 {
        cpuid(0x8000_0001, 0)
    } else {
        [0; 4]
    };
    HostInfo {
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        cpu_vendor: vendor,
        cpu_features: vec![
            l1[2] & !((1 << 31) | (1 << 27)),
            l1[3],
            l7[1],
            l7[2],
            l7[3],
            ld[0],
            le[2],
            le[3],
        ],
    }
}

/// The memory regions of `mem`, in slot order.
pub fn regions(mem: &GuestMemoryMmap) -> Vec<Region> {
    mem.iter()
        .map(|r| Region {
            gpa: r.start_addr().0,
            len: r.len(),
        })
        .collect()
}

/// kiln's running [`Vm`] as a migration source.
pub struct VmSource<'a> {
    vm: &'a mut Vm,
    tracker: DirtyTracker,
    /// `/proc/self/pagemap`, for private anonymous guest memory only (see `known_zero`).
    pagemap: Option<std::fs::File>,
    /// The VM was paused before the migration: a failed one leaves it paused.
    was_paused: bool,
}

impl<'a> VmSource<'a> {
    /// Wraps `vm`.
    pub fn new(vm: &'a mut Vm) -> Self {
        let tracker = DirtyTracker::new(vm.memory());
        let anonymous = matches!(
            vm.spec().memory_options.config.backing,
            kiln_memory::Backing::Anonymous
        );
        let pagemap = anonymous
            .then(|| std::fs::File::open("/proc/self/pagemap").ok())
            .flatten();
        VmSource {
            was_paused: vm.is_paused(),
            vm,
            tracker,
            pagemap,
        }
    }
}

/// pagemap entry bits: page present in RAM, page swapped out.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;

impl SourceVm for VmSource<'_> {
    fn regions(&self) -> Vec<Region> {
        regions(self.vm.memory())
    }
    fn vcpus(&self) -> u32 {
        self.vm.spec().cpus
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        self.vm
            .memory()
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| format!("reading guest memory at {gpa:#x}: {e}"))
    }
    fn start_dirty_log(&mut self) -> Result<(), String> {
        self.tracker
            .enable(self.vm.vm_fd())
            .map_err(|e| format!("turning KVM's dirty log on: {e}"))
    }
    fn dirty_log(&mut self) -> Result<Vec<Vec<u64>>, String> {
        let log: Vec<Vec<u64>> = self
            .tracker
            .get_and_clear(self.vm.vm_fd())
            .map(|v| v.into_iter().map(|b| b.bits).collect())
            .map_err(|e| e.to_string())?;
        // Reading the log cleared it for diff snapshots too: keep their count right.
        self.vm.dirty.note(&log);
        Ok(log)
    }
    fn stop_dirty_log(&mut self) {
        // Diff snapshots keep the log on for themselves.
        if self.tracker.is_enabled() && !self.vm.dirty.logging() {
            if let Err(e) = self.tracker.disable(self.vm.vm_fd()) {
                eprintln!("kiln: turning KVM's dirty log off: {e}");
            }
        }
    }
    fn pause(&mut self) -> Result<(), String> {
        self.vm.pause()?;
        // The final dirty log is only complete if no vCPU runs after it: check that every
        // vCPU really is parked (a vCPU found running is paused again, and said so).
        for h in self.vm.vcpu_handles() {
            if h.state() == kiln_vcpu::VcpuState::Running {
                eprintln!(
                    "kiln: migration: vCPU {} was running after the pause; pausing it again",
                    h.index()
                );
                if h.pause(PAUSE_AGAIN) == kiln_vcpu::VcpuState::Running {
                    return Err(format!("vCPU {} does not pause", h.index()));
                }
            }
        }
        Ok(())
    }
    fn resume(&mut self) {
        if !self.was_paused {
            self.vm.resume()
        }
    }
    /// Private anonymous memory that is neither present nor swapped out was never written
    /// (or was dropped by the balloon): it reads as zeros. Reading it would cost a fault
    /// per page. Other backings (memfd, hugetlb, files) can hold data this process never
    /// mapped, so they get no hint.
    fn known_zero(&self) -> Option<Vec<Vec<u64>>> {
        use std::os::unix::fs::FileExt;
        let f = self.pagemap.as_ref()?;
        let mut out = Vec::new();
        for r in self.vm.memory().iter() {
            let pages = (r.len() / PAGE) as usize;
            let mut raw = vec![0u8; pages * 8];
            let off = (r.as_ptr() as u64 / PAGE) * 8;
            f.read_exact_at(&mut raw, off).ok()?;
            let mut bits = vec![0u64; pages.div_ceil(64)];
            for (i, e) in raw.chunks_exact(8).enumerate() {
                let mut w = [0u8; 8];
                w.copy_from_slice(e);
                if u64::from_le_bytes(w) & (PM_PRESENT | PM_SWAPPED) == 0 {
                    bits[i / 64] |= 1 << (i % 64);
                }
            }
            out.push(bits);
        }
        Some(out)
    }
    fn hand_over(&mut self) -> Result<(), String> {
        for f in &self.vm.disk_locks {
            // SAFETY: flock takes no pointers; `f` is an open file.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
        }
        Ok(())
    }
    fn take_back(&mut self) -> Result<(), String> {
        for (f, d) in self.vm.disk_locks.iter().zip(&self.vm.spec().disks) {
            if let Err(e) = crate::virtio::lock_disk(f, d.read_only) {
                return Err(format!(
                    "--disk path={}: can't lock the image again ({e})",
                    d.path.display()
                ));
            }
        }
        Ok(())
    }
    fn save_state(&mut self) -> Result<Vec<u8>, String> {
        let state = self.vm.capture_state().map_err(|e| {
            let states: Vec<String> = self
                .vm
                .vcpu_handles()
                .iter()
                .map(|h| format!("{}:{:?}", h.index(), h.state()))
                .collect();
            format!("{e} (vCPU states now: {})", states.join(" "))
        })?;
        let host = CpuFeatures::host();
        let layout: Vec<(u64, u64)> = regions(self.vm.memory())
            .iter()
            .map(|r| (r.gpa, r.len))
            .collect();
        let header = Header {
            kiln_version: env!("CARGO_PKG_VERSION").to_string(),
            required: state.required_cpu(&host),
            host,
            memory: MemoryDesc::full(&layout),
        };
        kiln_snapshot::encode_state(Path::new(STATE_NAME), &header, &state)
            .map_err(|e| e.to_string())
    }
}

/// Migrates `vm` as `p` says. On success the VM runs on the destination and this one is
/// paused for good; on failure it runs here as before.
pub fn migrate(vm: &mut Vm, p: &MigrateParams) -> Result<Report, String> {
    let addr: MigrateAddr = p.to.parse()?;
    let mut s = connect(&addr).map_err(|e| format!("connecting to {addr}: {e}"))?;
    let params = Params {
        max_downtime: p.max_downtime,
        max_iterations: p.max_iterations,
    };
    let mut src = VmSource::new(vm);
    kiln_migration::send(&mut src, &mut s, &host_info(), &params).map_err(|e| {
        let msg = format!("migration to {addr} failed, the VM keeps running here: {e}");
        eprintln!("kiln: {msg}");
        msg
    })
}

/// The destination's VM while it arrives: memory first, then the restored [`Vm`].
pub struct Incoming {
    /// This process's command line: serial, seccomp, ... (taken by the restore).
    cli: Option<Cli>,
    /// Its `--memory`: the backing options for the source's size.
    memory_arg: String,
    mem: Option<GuestMemoryMmap>,
    /// Pages written so far (a zero marker for a page never written needs no work: fresh
    /// memory is zero, and touching it would only make the host allocate it).
    touched: Vec<Vec<u64>>,
    vm: Option<Vm>,
}

impl Incoming {
    /// An arrival for a VM run with `cli`'s options (its `--memory` backing; the size,
    /// vCPUs and devices come from the source's state).
    pub fn new(cli: Cli) -> Self {
        Incoming {
            memory_arg: cli.memory.clone(),
            cli: Some(cli),
            mem: None,
            touched: Vec::new(),
            vm: None,
        }
    }

    /// The VM, once it runs.
    pub fn take_vm(&mut self) -> Option<Vm> {
        self.vm.take()
    }

    fn mem(&self) -> Result<&GuestMemoryMmap, String> {
        self.mem.as_ref().ok_or_else(|| "no memory yet".to_string())
    }

    fn touch(&mut self, gpa: u64, len: u64) -> bool {
        let mut fresh = true;
        let Some(mem) = self.mem.as_ref() else {
            return false;
        };
        for (r, reg) in mem.iter().enumerate() {
            let (s, e) = (reg.start_addr().0, reg.start_addr().0 + reg.len());
            if gpa >= s && gpa < e {
                let first = (gpa - s) / PAGE;
                for p in first..first + len.div_ceil(PAGE) {
                    if let Some(w) = self.touched[r].get_mut((p / 64) as usize) {
                        if *w & (1 << (p % 64)) != 0 {
                            fresh = false;
                        }
                        *w |= 1 << (p % 64);
                    }
                }
            }
        }
        fresh
    }
}

impl DestVm for Incoming {
    fn prepare(&mut self, hello: &Hello) -> Result<(), String> {
        let size = hello
            .regions
            .iter()
            .try_fold(0u64, |a, r| a.checked_add(r.len))
            .ok_or("source memory: region lengths overflow")?;
        let layout = MemoryLayout::new(size).map_err(|e| format!("source memory: {e}"))?;
        let want: Vec<Region> = layout
            .regions()
            .into_iter()
            .map(|(a, l)| Region { gpa: a.0, len: l })
            .collect();
        if want != hello.regions {
            return Err(format!(
                "source memory regions {:?} are not kiln's layout for {size} bytes",
                hello.regions
            ));
        }
        if hello.vcpus == 0 || hello.vcpus > kiln_vcpu::cpuid::MAX_VCPUS {
            return Err(format!("{} vCPUs", hello.vcpus));
        }
        let opts = crate::config::parse_memory_arg(&self.memory_arg)
            .map_err(|e| format!("--memory here: {e}"))?;
        let mut cfg = opts.config.clone();
        cfg.size = size;
        cfg.validate().map_err(|e| format!("--memory here: {e}"))?;
        let mem = kiln_memory::create_guest_memory_with(&cfg, &opts.policy)
            .map_err(|e| format!("--memory here: {e}"))?;
        self.touched = mem
            .iter()
            .map(|r| vec![0; (r.len() / PAGE).div_ceil(64) as usize])
            .collect();
        self.mem = Some(mem);
        Ok(())
    }
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), String> {
        self.touch(gpa, data.len() as u64);
        self.mem()?
            .write_slice(data, GuestAddress(gpa))
            .map_err(|e| format!("writing guest memory at {gpa:#x}: {e}"))
    }
    fn zero(&mut self, gpa: u64, len: u64) -> Result<(), String> {
        if self.touch(gpa, len) {
            return Ok(());
        }
        static ZERO: [u8; PAGE as usize] = [0; PAGE as usize];
        let mem = self.mem()?;
        let mut a = gpa;
        while a < gpa + len {
            mem.write_slice(&ZERO, GuestAddress(a))
                .map_err(|e| format!("zeroing guest memory at {a:#x}: {e}"))?;
            a += PAGE;
        }
        Ok(())
    }
    fn restore_and_run(&mut self, state: &[u8]) -> Result<(), String> {
        let (header, state): (Header, VmState) =
            kiln_snapshot::decode_state(Path::new(STATE_NAME), state, &CpuFeatures::host())
                .map_err(|e| e.to_string())?;
        let mem = self.mem.take().ok_or("no memory")?;
        let layout: Vec<(u64, u64)> = regions(&mem).iter().map(|r| (r.gpa, r.len)).collect();
        if header.memory.regions.len() != layout.len()
            || header
                .memory
                .regions
                .iter()
                .zip(&layout)
                .any(|(h, l)| (h.guest_addr, h.len) != *l)
        {
            return Err("the state's memory layout differs from the hello's".into());
        }
        let cli = self.cli.take().ok_or("restored once already")?;
        let spec = crate::snapshot::restore_spec(cli, &state).map_err(|e| e.to_string())?;
        let vm = Vm::restore_from(spec, state, mem, false).map_err(|e| e.to_string())?;
        self.vm = Some(vm);
        Ok(())
    }
}

/// `--migrate-listen`: waits for one VM, receives it and runs it until it ends, serving
/// `control` meanwhile (so a migrated VM can be migrated again).
pub fn run_incoming(cli: Cli, control: Option<ControlReceiver>) -> Result<Outcome, VmmError> {
    let Some(addr) = cli.migrate_listen.clone() else {
        return Err(VmmError::Migration("--migrate-listen is not set".into()));
    };
    // Before any thread exists, so every thread inherits the blocked signals.
    let signals = crate::vm::signal_fd()?;
    let mut s = accept_one(&addr)
        .map_err(|e| VmmError::Migration(format!("--migrate-listen {addr}: {e}")))?;
    let mut inc = Incoming::new(cli);
    let t = std::time::Instant::now();
    let got = kiln_migration::receive(&mut inc, &mut s, &host_info()).map_err(|e| {
        VmmError::Migration(format!(
            "--migrate-listen {addr}: incoming migration failed: {e}"
        ))
    })?;
    eprintln!(
        "kiln: migrated VM running: pages={} zero_pages={} rounds={} restore_ms={:.1} total_ms={:.1}",
        got.pages,
        got.zero_pages,
        got.rounds,
        got.restore.as_secs_f64() * 1e3,
        t.elapsed().as_secs_f64() * 1e3
    );
    let mut vm = inc
        .take_vm()
        .ok_or_else(|| VmmError::Migration("no VM after commit".into()))?;
    let outcome = vm.wait(&signals, control.as_ref());
    if let Some(c) = &control {
        c.refuse_all("the VM has ended");
    }
    vm.shutdown();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<MigrateAddr>(),
            Ok(MigrateAddr::Tcp("127.0.0.1:4444".into()))
        );
        assert_eq!(
            "tcp:[::1]:1".parse::<MigrateAddr>(),
            Ok(MigrateAddr::Tcp("[::1]:1".into()))
        );
        assert_eq!(
            "unix:/tmp/x".parse::<MigrateAddr>(),
            Ok(MigrateAddr::Unix("/tmp/x".into()))
        );
        for bad in ["tcp:host", "tcp::1", "tcp:h:99999", "unix:", "udp:x:1", ""] {
            assert!(bad.parse::<MigrateAddr>().is_err(), "{bad}");
        }
        assert_eq!(
            "unix:/a".parse::<MigrateAddr>().unwrap().to_string(),
            "unix:/a"
        );
    }

    #[test]
    fn host_info_accepts_itself() {
        let h = host_info();
        assert!(h.accepts(&h).is_ok());
        assert_eq!(h.cpu_features.len(), 8);
    }
}
