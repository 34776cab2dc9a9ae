//! Snapshots of a paused VM and restoring them in a new process (issue 6).
//!
//! - [`Vm::capture_state`]: everything guest-visible except memory, as a serde
//!   [`VmState`] (vCPUs saved on their own threads while paused, interrupt controllers, PIT,
//!   KVM clock, serial, virtio transports and devices, and the machine's configuration).
//! - [`Vm::snapshot`]: writes the state file and the memory file (sparse; or, for a diff,
//!   only the pages dirtied since the last full snapshot) with [`kiln_snapshot`].
//! - [`run_restore`] (`kiln --restore`): reads and checks the state, maps the memory file
//!   privately (pages come in lazily on first touch; a diff is copied on top), rebuilds the
//!   same machine with [`Vm::restore_from`] and runs it.
//!
//! Migration uses the same pieces: [`Vm::capture_state`] on the source, then on the
//! destination [`restore_spec`] and [`Vm::restore_from`] with memory it filled itself.
//!
//! Devices are quiet while the VM is paused: vCPUs are out of the guest and the device
//! event loop is paused, and every virtio request completes on the event loop before the
//! next is taken, so no request is in flight in a snapshot.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use kiln_irq::state::IrqChipState;
use kiln_memory::{DirtyTracker, GuestMemoryMmap};
use kiln_snapshot::memory::Pages;
use kiln_snapshot::{CpuFeatures, Header, MemoryDesc};
use kiln_vcpu::VcpuSnapshot;
use kiln_virtio::mmio::TransportState;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::config::{BalloonArg, Cli, DiskArg, RateLimitArg, RngArg};
use crate::control::{ControlReceiver, SnapshotParams};
use crate::virtio::VirtioDevices;
use crate::vm::{Outcome, Vm, VmSpec, VmmError};

/// How long a vCPU thread may take to save its state.
const VCPU_SAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of snapshots and restores; each says what it was about.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Snapshots are of paused VMs only (as in Firecracker).
    #[error("snapshot: the VM is running; pause it first (a snapshot is taken of a paused VM)")]
    NotPaused,
    /// A snapshot file could not be written, or is unusable.
    #[error(transparent)]
    File(#[from] kiln_snapshot::Error),
    /// A vCPU's state could not be saved or restored.
    #[error("vCPU {index}: {source}")]
    Vcpu {
        /// The vCPU.
        index: u32,
        /// Why.
        #[source]
        source: kiln_vcpu::Error,
    },
    /// The interrupt controllers, PIT or clock could not be saved or restored.
    #[error("interrupt controller and clock state: {0}")]
    Irq(#[from] kiln_irq::Error),
    /// The serial port's saved state is unusable.
    #[error("serial port state: {0}")]
    Serial(#[from] kiln_legacy::Error),
    /// A virtio device can't be saved, or its saved state doesn't fit.
    #[error("virtio device at {base:#x}: {source}")]
    Virtio {
        /// The device's MMIO base.
        base: u64,
        /// Why.
        #[source]
        source: kiln_virtio::Error,
    },
    /// `--restore` is malformed or names files that don't fit together.
    #[error("--restore {value:?}: {why}")]
    RestoreArg {
        /// What the user gave.
        value: String,
        /// Why it is wrong.
        why: String,
    },
    /// A diff snapshot can't be taken now.
    #[error("diff snapshot: {0}")]
    Diff(String),
    /// The state doesn't describe this machine (a bug or a hand-edited file).
    #[error("snapshot state: {0}")]
    Mismatch(String),
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

/// A token bucket as saved (see `kiln_ratelimit::BucketConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketSnapshot {
    /// Tokens per refill time.
    pub size: u64,
    /// One-time burst.
    pub one_time_burst: u64,
    /// Refill time.
    pub refill_time: Duration,
}

/// A rate limit as saved (the budget starts afresh on restore).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimitSnapshot {
    /// Bandwidth bucket.
    pub bandwidth: Option<BucketSnapshot>,
    /// Operations bucket.
    pub ops: Option<BucketSnapshot>,
}

fn bucket_to(b: kiln_ratelimit::BucketConfig) -> BucketSnapshot {
    BucketSnapshot {
        size: b.size,
        one_time_burst: b.one_time_burst,
        refill_time: b.refill_time,
    }
}

fn bucket_from(b: BucketSnapshot) -> kiln_ratelimit::BucketConfig {
    kiln_ratelimit::BucketConfig {
        size: b.size,
        one_time_burst: b.one_time_burst,
        refill_time: b.refill_time,
    }
}

impl From<&RateLimitArg> for RateLimitSnapshot {
    fn from(r: &RateLimitArg) -> Self {
        RateLimitSnapshot {
            bandwidth: r.bandwidth.map(bucket_to),
            ops: r.ops.map(bucket_to),
        }
    }
}

impl From<RateLimitSnapshot> for RateLimitArg {
    fn from(r: RateLimitSnapshot) -> Self {
        RateLimitArg {
            bandwidth: r.bandwidth.map(bucket_from),
            ops: r.ops.map(bucket_from),
        }
    }
}

/// A `--disk` as saved: the same image must be there on restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSnapshot {
    /// Image path.
    pub path: PathBuf,
    /// `readonly=on`.
    pub read_only: bool,
    /// GET_ID string.
    pub id: Option<String>,
    /// Throttling.
    pub rate_limit: RateLimitSnapshot,
}

/// `--balloon` as saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonSnapshot {
    /// Initial target in bytes (the current target is in the device state).
    pub size: u64,
    /// `deflate-on-oom`.
    pub deflate_on_oom: bool,
    /// `free-page-reporting`.
    pub free_page_reporting: bool,
    /// `stats-interval` in seconds.
    pub stats_interval_s: u64,
}

/// The machine a snapshot needs: what `kiln --restore` rebuilds before loading the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Disks, in slot order.
    pub disks: Vec<DiskSnapshot>,
    /// The entropy device's rate limit, if it exists.
    pub rng: Option<RateLimitSnapshot>,
    /// The balloon, if any.
    pub balloon: Option<BalloonSnapshot>,
}

impl MachineConfig {
    /// The machine `spec` describes.
    pub fn of(spec: &VmSpec) -> Self {
        MachineConfig {
            cpus: spec.cpus,
            memory: spec.memory,
            disks: spec
                .disks
                .iter()
                .map(|d| DiskSnapshot {
                    path: d.path.clone(),
                    read_only: d.read_only,
                    id: d.id.clone(),
                    rate_limit: (&d.rate_limit).into(),
                })
                .collect(),
            rng: spec
                .rng
                .enabled
                .then(|| RateLimitSnapshot::from(&spec.rng.rate_limit)),
            balloon: spec.balloon.as_ref().map(|b| BalloonSnapshot {
                size: b.size,
                deflate_on_oom: b.deflate_on_oom,
                free_page_reporting: b.free_page_reporting,
                stats_interval_s: b.stats_interval_s,
            }),
        }
    }
}

/// The 16550's registers and RX FIFO (vm-superio's `SerialState`, which has no serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub regs: [u8; 9],
    /// Received bytes the guest has not read.
    pub in_buffer: Vec<u8>,
}

impl SerialSnapshot {
    fn of(s: &kiln_legacy::SerialState) -> Self {
        SerialSnapshot {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer.clone(),
        }
    }

    /// Back to vm-superio's form.
    pub fn to_state(&self) -> kiln_legacy::SerialState {
        let [dll, dlm, ier, iir, lcr, lsr, mcr, msr, scr] = self.regs;
        kiln_legacy::SerialState {
            baud_divisor_low: dll,
            baud_divisor_high: dlm,
            interrupt_enable: ier,
            interrupt_identification: iir,
            line_control: lcr,
            line_status: lsr,
            modem_control: mcr,
            modem_status: msr,
            scratch: scr,
            in_buffer: self.in_buffer.clone(),
        }
    }
}

/// Everything of a VM except its memory: what a snapshot's state file (and a migration's
/// final message) carries. The i8042, power and POST devices have no state to keep.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The machine to rebuild.
    pub machine: MachineConfig,
    /// Each vCPU, in index order.
    pub vcpus: Vec<VcpuSnapshot>,
    /// PIC, IOAPIC, PIT and KVM clock.
    pub irq: IrqChipState,
    /// COM1.
    pub serial: SerialSnapshot,
    /// Each virtio-mmio device, in slot order.
    pub virtio: Vec<TransportState>,
}

impl VmState {
    /// The CPU features the guest was given that this host really has: what a host that
    /// restores it must have (see [`CpuFeatures::satisfies`]).
    pub fn required_cpu(&self, host: &CpuFeatures) -> CpuFeatures {
        let Some(v) = self.vcpus.first() else {
            return host.clone();
        };
        let guest = CpuFeatures::from_cpuid(|leaf, sub| {
            v.cpuid
                .iter()
                .find(|e| {
                    e.function == leaf
                        && (e.index == sub
                            || e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
                })
                .map(|e| (e.eax, e.ebx, e.ecx, e.edx))
        });
        guest.intersect(host)
    }
}

/// What [`Vm::restore_from`] gets besides the spec.
pub struct RestoreInput {
    /// The saved state.
    pub state: VmState,
    /// Guest memory holding the saved contents.
    pub mem: GuestMemoryMmap,
    /// Stay paused after the restore.
    pub paused: bool,
}

/// Diff snapshot bookkeeping of one VM.
///
/// vCPU writes are in KVM's dirty log; devices write guest memory through the host mapping,
/// which the log doesn't see. So the last full snapshot also left a keyed fingerprint of
/// every page, and a diff adds each page whose fingerprint changed.
#[derive(Debug, Default)]
pub struct DirtyTracking {
    /// KVM's dirty log, on for every slot since the first full snapshot (`None` before).
    log: Option<DirtyTracker>,
    /// Pages dirtied since the last full snapshot, per region (KVM bitmap layout).
    since_full: Vec<Vec<u64>>,
    /// Each page's fingerprint at the last full snapshot, per region.
    prints: Vec<Vec<u64>>,
    /// The fingerprint key (differs per full snapshot, so a guest can't aim at it).
    key: u64,
    /// The id of the last full snapshot's memory file (what diffs apply over).
    base_id: u64,
}

impl DirtyTracking {
    /// Starts a new base: every page's fingerprint now, nothing dirty.
    fn new_base(&mut self, ram: &[(u64, &[u8])]) {
        let page = kiln_memory::PAGE_SIZE as usize;
        self.key = kiln_migration::random_key();
        let key = self.key;
        self.prints = ram
            .iter()
            .map(|(_, d)| {
                d.chunks(page)
                    .map(|p| kiln_migration::fingerprint(key, p))
                    .collect()
            })
            .collect();
        self.since_full = ram
            .iter()
            .map(|(_, d)| vec![0u64; d.len().div_ceil(page).div_ceil(64)])
            .collect();
    }

    /// Adds KVM's dirty `log` and every page whose fingerprint changed (device writes).
    fn add_changes(&mut self, log: Vec<Vec<u64>>, ram: &[(u64, &[u8])]) {
        let page = kiln_memory::PAGE_SIZE as usize;
        for ((acc, new), ((_, data), prints)) in self
            .since_full
            .iter_mut()
            .zip(log)
            .zip(ram.iter().zip(&self.prints))
        {
            for (a, n) in acc.iter_mut().zip(new) {
                *a |= n;
            }
            for (i, (p, before)) in data.chunks(page).zip(prints).enumerate() {
                let bit = 1u64 << (i % 64);
                if acc[i / 64] & bit == 0 && kiln_migration::fingerprint(self.key, p) != *before {
                    acc[i / 64] |= bit;
                }
            }
        }
    }
}

impl DirtyTracking {
    /// Whether diff snapshots rely on KVM's dirty log (then nobody else may turn it off).
    pub(crate) fn logging(&self) -> bool {
        self.log.is_some()
    }

    /// Adds pages someone else read (and so cleared) from KVM's dirty log, e.g. a live
    /// migration's rounds, so the next diff snapshot still has them.
    pub(crate) fn note(&mut self, log: &[Vec<u64>]) {
        if self.log.is_none() {
            return;
        }
        for (acc, new) in self.since_full.iter_mut().zip(log) {
            for (a, n) in acc.iter_mut().zip(new) {
                *a |= n;
            }
        }
    }
}

/// Guest RAM as `(guest address, bytes)` per region.
///
/// # Safety
///
/// Nothing may write guest memory while the slices live: the VM is paused (vCPUs out of the
/// guest, device event loop paused).
unsafe fn ram_slices(mem: &GuestMemoryMmap) -> Vec<(u64, &[u8])> {
    mem.iter()
        .map(|r| {
            // SAFETY: the region is a live mapping of `len` bytes owned by `mem`, which the
            // slices borrow; the caller guarantees nobody writes it meanwhile.
            let bytes = unsafe { std::slice::from_raw_parts(r.as_ptr(), r.len() as usize) };
            (r.start_addr().0, bytes)
        })
        .collect()
}

/// Same as [`ram_slices`], writable.
///
/// # Safety
///
/// The VM must not run (no vCPU, no device thread touches guest memory) while they live.
#[allow(clippy::mut_from_ref)]
unsafe fn ram_slices_mut(mem: &GuestMemoryMmap) -> Vec<(u64, &mut [u8])> {
    mem.iter()
        .map(|r| {
            // SAFETY: as above; regions don't overlap, so the slices are disjoint, and the
            // caller guarantees exclusive access.
            let bytes = unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), r.len() as usize) };
            (r.start_addr().0, bytes)
        })
        .collect()
}

/// Reads (and so clears) KVM's dirty log of every slot, as one bitmap per region.
fn take_dirty_log(
    log: &DirtyTracker,
    vm: &kvm_ioctls::VmFd,
) -> Result<Vec<Vec<u64>>, SnapshotError> {
    let maps = log.get_and_clear(vm).map_err(dirty_log_error)?;
    Ok(maps.into_iter().map(|m| m.bits).collect())
}

fn dirty_log_error(e: kiln_memory::Error) -> SnapshotError {
    SnapshotError::Os {
        what: "KVM dirty log",
        source: io::Error::other(e.to_string()),
    }
}

impl Vm {
    /// Everything guest-visible of the (paused) VM except its memory. Fails with
    /// [`SnapshotError::NotPaused`] on a running VM, and names any device that can't be
    /// saved.
    pub fn capture_state(&self) -> Result<VmState, SnapshotError> {
        if !self.is_paused() {
            return Err(SnapshotError::NotPaused);
        }
        let mut vcpus = Vec::with_capacity(self.vcpu_handles().len());
        for h in self.vcpu_handles() {
            let kvm = self.kvm_shared();
            let index = h.index();
            let saved = h
                .with_paused_fd(VCPU_SAVE_TIMEOUT, move |fd| VcpuSnapshot::save(fd, &kvm))
                .and_then(|r| r)
                .map_err(|source| SnapshotError::Vcpu { index, source })?;
            vcpus.push(saved);
        }
        let irq = self.irq_chip().save(self.vm_fd())?;
        let virtio = self
            .virtio()
            .transports
            .iter()
            .map(|(base, t)| {
                t.save_state().map_err(|source| SnapshotError::Virtio {
                    base: *base,
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(VmState {
            machine: MachineConfig::of(self.spec()),
            vcpus,
            irq,
            serial: SerialSnapshot::of(&self.serial().state()),
            virtio,
        })
    }

    /// Writes a snapshot of the paused VM: the memory file first, then the state file
    /// (each atomically). A full snapshot turns on dirty tracking, so later diff snapshots
    /// (`params.diff`) write only the pages dirtied since it. Returns a one-line report.
    pub fn snapshot(&mut self, params: &SnapshotParams) -> Result<String, SnapshotError> {
        let started = Instant::now();
        let state = self.capture_state()?;
        let captured = started.elapsed();
        if params.diff {
            let Some(log) = &self.dirty.log else {
                return Err(SnapshotError::Diff(
                    "no full snapshot of this VM was taken by this process yet; take one \
                     first (diffs hold the pages dirtied since the last full snapshot)"
                        .into(),
                ));
            };
            let log = take_dirty_log(log, self.vm_fd())?;
            // A clone shares the mappings; it only frees `self` for the update below.
            let mem = self.memory().clone();
            // SAFETY: paused (checked by capture_state): nothing writes guest memory.
            let ram = unsafe { ram_slices(&mem) };
            self.dirty.add_changes(log, &ram);
        }
        // SAFETY: the VM is paused (capture_state checked it): no vCPU runs and the device
        // event loop is paused, so nothing writes guest memory while the file is written.
        let ram = unsafe { ram_slices(self.memory()) };
        let pages = if params.diff {
            Pages::Dirty(&self.dirty.since_full)
        } else {
            Pages::NonZero
        };
        let mem_started = Instant::now();
        let base = params.diff.then_some(self.dirty.base_id);
        let desc = kiln_snapshot::memory::write_memory(&params.mem_path, &ram, pages, base)?;
        let mem_written = mem_started.elapsed();
        drop(ram);
        let host = CpuFeatures::host();
        let header = Header {
            kiln_version: env!("CARGO_PKG_VERSION").to_string(),
            required: state.required_cpu(&host),
            host,
            memory: desc.clone(),
        };
        kiln_snapshot::write_state(&params.state_path, &header, &state)?;
        let track_started = Instant::now();
        if !params.diff {
            // Dirty pages count from here on.
            match &self.dirty.log {
                Some(log) => {
                    take_dirty_log(log, self.vm_fd())?;
                }
                None => {
                    let mut log = DirtyTracker::new(self.memory());
                    log.enable(self.vm_fd()).map_err(dirty_log_error)?;
                    self.dirty.log = Some(log);
                }
            }
            let mem = self.memory().clone();
            // SAFETY: still paused: nothing writes guest memory.
            let ram = unsafe { ram_slices(&mem) };
            self.dirty.new_base(&ram);
            self.dirty.base_id = desc.id;
        }
        Ok(format!(
            "{} snapshot: {} vCPUs, {} MiB of memory, {} KiB of it written, state {} in {:.1} ms \
             (capture {:.1} ms, memory file {:.1} ms, dirty tracking {:.1} ms)",
            if params.diff { "diff" } else { "full" },
            state.vcpus.len(),
            desc.file_len() >> 20,
            desc.data_bytes() >> 10,
            params.state_path.display(),
            started.elapsed().as_secs_f64() * 1e3,
            captured.as_secs_f64() * 1e3,
            mem_written.as_secs_f64() * 1e3,
            track_started.elapsed().as_secs_f64() * 1e3,
        ))
    }
}

/// The VM-level state, into a VM whose irqchip was just created (before any vCPU).
pub(crate) fn restore_vm_state(
    vm: &kvm_ioctls::VmFd,
    state: &VmState,
) -> Result<(), SnapshotError> {
    state.irq.restore(vm)?;
    Ok(())
}

/// The virtio transports' and devices' state, into freshly built devices (same slots).
pub(crate) fn restore_devices(
    virtio: &VirtioDevices,
    state: &VmState,
) -> Result<(), SnapshotError> {
    if virtio.transports.len() != state.virtio.len() {
        return Err(SnapshotError::Mismatch(format!(
            "{} virtio devices saved, {} built",
            state.virtio.len(),
            virtio.transports.len()
        )));
    }
    for ((base, t), s) in virtio.transports.iter().zip(&state.virtio) {
        t.restore_state(s).map_err(|source| SnapshotError::Virtio {
            base: *base,
            source,
        })?;
    }
    Ok(())
}

/// vCPU `index`'s state, into its freshly created fd (before its thread starts).
pub(crate) fn restore_vcpu(
    fd: &kvm_ioctls::VcpuFd,
    state: &VmState,
    index: u32,
) -> Result<(), SnapshotError> {
    let v = state
        .vcpus
        .get(index as usize)
        .ok_or_else(|| SnapshotError::Mismatch(format!("no saved state for vCPU {index}")))?;
    v.restore(fd)
        .map_err(|source| SnapshotError::Vcpu { index, source })
}

/// The VM spec for restoring `state`: the machine from the state, the rest (serial,
/// seccomp, affinity, ...) from the restoring process's command line `cli`.
pub fn restore_spec(mut cli: Cli, state: &VmState) -> Result<VmSpec, VmmError> {
    let m = &state.machine;
    if state.vcpus.len() != m.cpus as usize {
        return Err(SnapshotError::Mismatch(format!(
            "{} vCPU states for {} vCPUs",
            state.vcpus.len(),
            m.cpus
        ))
        .into());
    }
    cli.cpus = m.cpus;
    cli.memory = format!("{}K", m.memory >> 10);
    cli.disk = m
        .disks
        .iter()
        .map(|d| DiskArg {
            path: d.path.clone(),
            read_only: d.read_only,
            id: d.id.clone(),
            rate_limit: d.rate_limit.into(),
        })
        .collect();
    cli.rng = match m.rng {
        Some(r) => RngArg {
            enabled: true,
            rate_limit: r.into(),
        },
        None => RngArg {
            enabled: false,
            rate_limit: RateLimitArg::default(),
        },
    };
    cli.balloon = m.balloon.map(|b| BalloonArg {
        size: b.size,
        deflate_on_oom: b.deflate_on_oom,
        free_page_reporting: b.free_page_reporting,
        stats_interval_s: b.stats_interval_s,
    });
    VmSpec::from_cli(cli)
}

/// Where `--restore` takes the snapshot from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreArg {
    /// The state file.
    pub state: PathBuf,
    /// The (full) memory file.
    pub mem: PathBuf,
    /// A diff memory file to apply over `mem` (the state is then the diff's).
    pub diff_mem: Option<PathBuf>,
}

impl std::str::FromStr for RestoreArg {
    type Err = SnapshotError;
    fn from_str(s: &str) -> Result<Self, SnapshotError> {
        let err = |why: &str| SnapshotError::RestoreArg {
            value: s.to_string(),
            why: why.to_string(),
        };
        if !s.contains('=') {
            if s.is_empty() {
                return Err(err("expected DIR or state=PATH,mem=PATH[,diff-mem=PATH]"));
            }
            let dir = Path::new(s);
            return Ok(RestoreArg {
                state: dir.join("state"),
                mem: dir.join("memory"),
                diff_mem: None,
            });
        }
        let (mut state, mut mem, mut diff_mem) = (None, None, None);
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| err("expected KEY=PATH items"))?;
            if v.is_empty() {
                return Err(err("empty path"));
            }
            let slot = match k {
                "state" => &mut state,
                "mem" => &mut mem,
                "diff-mem" => &mut diff_mem,
                _ => return Err(err("unknown key (known: state, mem, diff-mem)")),
            };
            if slot.replace(PathBuf::from(v)).is_some() {
                return Err(err("a key is given twice"));
            }
        }
        Ok(RestoreArg {
            state: state.ok_or_else(|| err("state=PATH is required"))?,
            mem: mem.ok_or_else(|| err("mem=PATH is required"))?,
            diff_mem,
        })
    }
}

/// Maps the memory file `file` (laid out as `desc` says) as guest RAM, privately: pages are
/// read from the file when the guest (or a device) first touches them, and writes stay in
/// this process. The file must not change while the VM runs.
///
/// Each region is first reserved as anonymous memory (which vm-memory owns and unmaps), then
/// the file is mapped over it, so the region carries no file offset: to the balloon it is
/// private memory, released with `MADV_DONTNEED`.
fn map_memory_file(
    path: &Path,
    file: &std::fs::File,
    desc: &MemoryDesc,
) -> Result<GuestMemoryMmap, SnapshotError> {
    use std::os::fd::AsRawFd;
    let os = |what| move |source| SnapshotError::Os { what, source };
    let mut regions = Vec::with_capacity(desc.regions.len());
    for r in &desc.regions {
        let region = MmapRegionBuilder::<()>::new(r.len as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| SnapshotError::Os {
                what: "reserving guest memory",
                source: io::Error::other(e.to_string()),
            })?;
        let offset = libc::off_t::try_from(r.file_offset).map_err(|_| {
            SnapshotError::Mismatch(format!("memory file offset {:#x}", r.file_offset))
        })?;
        // SAFETY: MAP_FIXED over the anonymous mapping just made for exactly this range
        // (nothing else uses it yet); the file is open and at least `file_offset + len`
        // long (checked by open_memory).
        let p = unsafe {
            libc::mmap(
                region.as_ptr().cast(),
                r.len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os("mapping the memory file")(io::Error::other(format!(
                "{}: {}",
                path.display(),
                io::Error::last_os_error()
            ))));
        }
        // Guest RAM stays out of core dumps, as at boot.
        // SAFETY: advice on our own mapping; it doesn't change its contents.
        unsafe { libc::madvise(p, r.len as usize, libc::MADV_DONTDUMP) };
        let region = GuestRegionMmap::new(region, vm_memory::GuestAddress(r.guest_addr))
            .ok_or_else(|| SnapshotError::Mismatch(format!("region at {:#x}", r.guest_addr)))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| SnapshotError::Os {
        what: "assembling guest memory",
        source: io::Error::other(e.to_string()),
    })
}

/// Guest memory for a restore: `arg.mem` mapped privately, with `arg.diff_mem` copied on
/// top when the state is a diff's. Checks both files against the state's header.
pub fn load_memory(arg: &RestoreArg, header: &Header) -> Result<GuestMemoryMmap, SnapshotError> {
    let desc = &header.memory;
    let wrong = |why: &str| SnapshotError::RestoreArg {
        value: arg.state.display().to_string(),
        why: why.to_string(),
    };
    // The right files for this state, before anything is opened.
    let diff = match (desc.diff, &arg.diff_mem) {
        (false, None) => None,
        (true, Some(diff)) => Some(diff),
        (true, None) => {
            return Err(wrong(
                "this is a diff snapshot: give the full snapshot's memory file as mem= and \
                 this one's as diff-mem=",
            ))
        }
        (false, Some(_)) => {
            return Err(wrong(
                "diff-mem= is for diff snapshots; this state is a full snapshot's",
            ))
        }
    };
    let layout: Vec<(u64, u64)> = desc.regions.iter().map(|r| (r.guest_addr, r.len)).collect();
    // The full file's layout: the same regions, whatever data it holds (holes read as 0).
    let base_desc = MemoryDesc::full(&layout);
    // A full snapshot's own memory file, or the one a diff was taken over.
    let base_id = desc.base.unwrap_or(desc.id);
    let base = kiln_snapshot::memory::open_memory(&arg.mem, &base_desc, base_id)?;
    let mem = map_memory_file(&arg.mem, &base, &base_desc)?;
    if let Some(diff) = diff {
        // SAFETY: the VM doesn't exist yet; nothing else touches this memory.
        let mut ram = unsafe { ram_slices_mut(&mem) };
        kiln_snapshot::memory::read_memory(diff, desc, &mut ram)?;
    }
    Ok(mem)
}

/// A snapshot read, checked and mapped: everything [`Vm::restore_from`] needs.
#[derive(Debug)]
pub struct PreparedRestore {
    /// The VM to rebuild: the snapshot's machine over the restoring command line.
    pub spec: VmSpec,
    /// The saved vCPU, VM and device state.
    pub state: VmState,
    /// Guest memory, mapped from the snapshot's memory file(s).
    pub mem: GuestMemoryMmap,
    /// Time spent reading and checking the state file.
    pub read: Duration,
    /// Time spent mapping memory (after `read`).
    pub mapped: Duration,
}

/// Reads and checks the snapshot `arg` (state file, memory layout, memory files) and
/// derives its [`VmSpec`] over the restoring process's command line `cli`. Shared by
/// `--restore` and the API's `PUT /snapshot/load`.
pub fn prepare_restore(cli: Cli, arg: &RestoreArg) -> Result<PreparedRestore, VmmError> {
    let started = Instant::now();
    let (header, state): (Header, VmState) =
        kiln_snapshot::read_state(&arg.state).map_err(SnapshotError::from)?;
    // The header's layout must be the one kiln gives this much RAM (a crafted file could
    // otherwise map memory anywhere).
    let expected = kiln_memory::MemoryLayout::new(state.machine.memory)
        .map_err(|e| SnapshotError::Mismatch(format!("memory size: {e}")))?
        .regions()
        .iter()
        .map(|(a, l)| (a.0, *l))
        .collect::<Vec<_>>();
    let regions_ok = header.memory.same_layout(&expected)
        && header
            .memory
            .regions
            .iter()
            .zip(&MemoryDesc::full(&expected).regions)
            .all(|(a, b)| a.file_offset == b.file_offset);
    if !regions_ok {
        return Err(SnapshotError::Mismatch(format!(
            "{}: the memory layout in the header is not kiln's for {} bytes",
            arg.state.display(),
            state.machine.memory
        ))
        .into());
    }
    let spec = restore_spec(cli, &state)?;
    let read = started.elapsed();
    let mem = load_memory(arg, &header)?;
    let mapped = started.elapsed() - read;
    Ok(PreparedRestore {
        spec,
        state,
        mem,
        read,
        mapped,
    })
}

/// `kiln --restore`: reads and checks the snapshot, rebuilds the VM in this process, runs it
/// (paused if `--restore-paused`) until it ends, and says how it ended.
pub fn run_restore(cli: Cli, control: Option<ControlReceiver>) -> Result<Outcome, VmmError> {
    let started = Instant::now();
    let text = cli.restore.clone().unwrap_or_default();
    let arg: RestoreArg = text.parse()?;
    let paused = cli.restore_paused;
    let p = prepare_restore(cli, &arg)?;
    let (read, mapped) = (p.read, p.mapped);
    // Before any thread exists, so every thread inherits the blocked signals.
    let signals = crate::vm::signal_fd()?;
    let mut vm = Vm::restore_from(p.spec, p.state, p.mem, paused)?;
    eprintln!(
        "kiln: restored {} in {:.1} ms (state {:.1} ms, memory {:.1} ms, VM {:.1} ms){}",
        arg.state.display(),
        started.elapsed().as_secs_f64() * 1e3,
        read.as_secs_f64() * 1e3,
        mapped.as_secs_f64() * 1e3,
        (started.elapsed() - read - mapped).as_secs_f64() * 1e3,
        if paused { "; paused" } else { "" }
    );
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
    fn restore_arg_forms() {
        let a: RestoreArg = "/snap".parse().unwrap();
        assert_eq!(a.state, PathBuf::from("/snap/state"));
        assert_eq!(a.mem, PathBuf::from("/snap/memory"));
        let a: RestoreArg = "state=/a/s,mem=/b/m,diff-mem=/a/m".parse().unwrap();
        assert_eq!(a.diff_mem, Some(PathBuf::from("/a/m")));
        for bad in [
            "",
            "state=/a",
            "mem=/m",
            "state=/a,mem=",
            "x=1,state=/a,mem=/m",
            "state=/a,state=/b,mem=/m",
        ] {
            let e = bad.parse::<RestoreArg>().unwrap_err().to_string();
            assert!(e.starts_with("--restore"), "{bad}: {e}");
        }
    }

    #[test]
    fn diffs_catch_device_writes_by_fingerprint() {
        let page = kiln_memory::PAGE_SIZE as usize;
        let mut low = vec![0u8; 130 * page];
        let high = vec![7u8; 4 * page];
        let mut t = DirtyTracking::default();
        t.new_base(&[(0, &low), (1 << 32, &high)]);
        assert_eq!(t.since_full[0].len(), 3);
        // A "device" writes page 100 behind KVM's back; KVM logged page 3.
        low[100 * page + 17] = 1;
        let log = vec![vec![1u64 << 3, 0, 0], vec![0]];
        t.add_changes(log, &[(0, &low), (1 << 32, &high)]);
        assert_eq!(t.since_full[0], vec![1 << 3, 1 << (100 - 64), 0]);
        assert_eq!(t.since_full[1], vec![0]);
        // Cumulative: a later diff still holds both, even with an empty log.
        t.add_changes(vec![vec![0; 3], vec![0]], &[(0, &low), (1 << 32, &high)]);
        assert_eq!(t.since_full[0], vec![1 << 3, 1 << (100 - 64), 0]);
        // A new key each base.
        let k = t.key;
        t.new_base(&[(0, &low), (1 << 32, &high)]);
        assert_ne!(t.key, k);
        assert_eq!(t.since_full[0], vec![0, 0, 0]);
    }

    #[test]
    fn serial_state_round_trips() {
        let s = kiln_legacy::SerialState {
            baud_divisor_low: 1,
            baud_divisor_high: 2,
            interrupt_enable: 3,
            interrupt_identification: 4,
            line_control: 5,
            line_status: 6,
            modem_control: 7,
            modem_status: 8,
            scratch: 9,
            in_buffer: vec![10, 11],
        };
        let back = SerialSnapshot::of(&s).to_state();
        assert_eq!(format!("{back:?}"), format!("{s:?}"));
    }
}
