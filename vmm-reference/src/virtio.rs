//! The VM's virtio-mmio devices: where they sit, opening their backends, and wiring each
//! transport to the MMIO bus, an irqfd and per-queue ioeventfds served by the device event
//! loop.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use kiln_bus::{MmioAddress, MmioBus};
use kiln_irq::IrqChip;
use kiln_memory::GuestMemoryMmap;
use kiln_virtio::mmio::{MMIO_SIZE, QUEUE_NOTIFY_OFFSET};
use kiln_virtio::{
    Balloon, BalloonConfig, Block, BlockConfig, EventLoop, EventLoopHandle, MmioTransport, Net,
    NetConfig, Rng, Tap,
};

use crate::config::{BalloonArg, DiskArg, NetArg, RateLimitArg, RngArg, VsockArg};
use crate::devices::MmioDev;
use crate::vm::VmmError;

/// Base of the first virtio-mmio window; window `i` is at `VIRTIO_MMIO_BASE + i * MMIO_SIZE`
/// (docs/guest-contract.md).
pub const VIRTIO_MMIO_BASE: u64 = 0xD000_0000;
/// IOAPIC GSI of the first virtio-mmio device; device `i` raises `VIRTIO_GSI_BASE + i`.
pub const VIRTIO_GSI_BASE: u32 = 16;
/// GSIs 16..=22 are free for virtio (23 is the ACPI GED), so at most this many devices.
pub const MAX_VIRTIO_DEVICES: usize = 7;

/// What sits in one virtio-mmio slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioKind {
    /// The `--disk` with this index.
    Block(usize),
    /// The `--net` with this index.
    Net(usize),
    /// The entropy device.
    Rng,
    /// The memory balloon.
    Balloon,
    /// The vsock device.
    Vsock,
}

/// One virtio-mmio device's place in the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioSlot {
    /// What it is.
    pub kind: VirtioKind,
    /// MMIO window base.
    pub base: u64,
    /// IOAPIC GSI.
    pub gsi: u32,
}

/// Assigns windows and GSIs: disks in command-line order, then network devices, then the
/// entropy device, then the balloon, then the vsock device.
pub fn slots(
    disks: &[DiskArg],
    nets: &[NetArg],
    rng: &RngArg,
    balloon: Option<&BalloonArg>,
    vsock: Option<&VsockArg>,
) -> Result<Vec<VirtioSlot>, VmmError> {
    let kinds: Vec<VirtioKind> = (0..disks.len())
        .map(VirtioKind::Block)
        .chain((0..nets.len()).map(VirtioKind::Net))
        .chain(rng.enabled.then_some(VirtioKind::Rng))
        .chain(balloon.map(|_| VirtioKind::Balloon))
        .chain(vsock.map(|_| VirtioKind::Vsock))
        .collect();
    if kinds.len() > MAX_VIRTIO_DEVICES {
        return Err(VmmError::TooManyDevices {
            count: kinds.len(),
            max: MAX_VIRTIO_DEVICES,
        });
    }
    Ok(kinds
        .into_iter()
        .enumerate()
        .map(|(i, kind)| VirtioSlot {
            kind,
            base: VIRTIO_MMIO_BASE + i as u64 * MMIO_SIZE,
            gsi: VIRTIO_GSI_BASE + i as u32,
        })
        .collect())
}

/// What the DSDT announces for `slots`.
pub fn acpi_devices(slots: &[VirtioSlot]) -> Vec<kiln_acpi::VirtioMmioDevice> {
    slots
        .iter()
        .map(|s| kiln_acpi::VirtioMmioDevice {
            base: s.base,
            size: MMIO_SIZE,
            gsi: s.gsi,
        })
        .collect()
}

fn disk_err(d: &DiskArg, why: impl std::fmt::Display) -> VmmError {
    VmmError::Disk {
        path: d.path.display().to_string(),
        why: why.to_string(),
    }
}

/// Opens a disk image (read-write unless `readonly=on`) and locks it like Cloud Hypervisor
/// does, so two VMs can't write one image (shared lock for read-only users).
pub fn open_disk(d: &DiskArg) -> Result<File, VmmError> {
    let f = File::options()
        .read(true)
        .write(!d.read_only)
        .open(&d.path)
        .map_err(|e| disk_err(d, e))?;
    let ft = f.metadata().map_err(|e| disk_err(d, e))?.file_type();
    if !ft.is_file() && !ft.is_block_device() {
        return Err(disk_err(d, "not a regular file or block device"));
    }
    if let Err(e) = lock_disk(&f, d.read_only) {
        return Err(disk_err(
            d,
            format!("can't lock the image ({e}); is another VM using it?"),
        ));
    }
    Ok(f)
}

/// Takes the image lock without waiting: shared for a read-only disk, exclusive otherwise,
/// so two VMs never write one image. The lock goes away with the fd (or the process).
pub(crate) fn lock_disk(f: &File, read_only: bool) -> io::Result<()> {
    let op = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    } | libc::LOCK_NB;
    // SAFETY: flock takes no pointers; the fd is valid while `f` lives.
    if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens (or creates) the tap of each `--net`, on the main thread before any seccomp filter.
pub fn open_taps(nets: &[NetArg]) -> Result<Vec<Option<Tap>>, VmmError> {
    nets.iter()
        .map(|n| {
            Tap::open(&n.tap).map(Some).map_err(|e| VmmError::Net {
                tap: n.tap.clone(),
                why: e.to_string(),
            })
        })
        .collect()
}

/// A random locally administered unicast MAC (the `--net` default).
fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most 6 bytes into the 6-byte buffer.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if n != 6 {
        // Not fatal: a fixed fallback is still a valid address.
        mac = [0, 0x12, 0x34, 0x56, 0x78, 0x9a];
    }
    // Locally administered (bit 1), unicast (bit 0 clear).
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

fn limiter(
    flag: &str,
    arg: &RateLimitArg,
) -> Result<Option<kiln_ratelimit::RateLimiter>, VmmError> {
    if !arg.is_set() {
        return Ok(None);
    }
    kiln_ratelimit::RateLimiter::new(arg.bandwidth, arg.ops)
        .map(Some)
        .map_err(|e| VmmError::RateLimit {
            flag: flag.to_string(),
            why: e.to_string(),
        })
}

type Transport<D> = MmioTransport<GuestMemoryMmap, D>;

/// What the VMM needs of any virtio-mmio transport, whatever its device.
pub(crate) trait VirtioMmio:
    kiln_virtio::QueueHandler + kiln_bus::MmioDevice + SnapshotState
{
    fn queue_count(&self) -> usize;
    fn set_activate_hook(&self, hook: kiln_virtio::mmio::ActivateHook);
    fn backend_fds(&self) -> Vec<(u32, std::os::fd::RawFd)>;
}

impl<D: kiln_virtio::VirtioDevice<GuestMemoryMmap>> VirtioMmio for Transport<D> {
    fn queue_count(&self) -> usize {
        self.num_queues()
    }
    fn set_activate_hook(&self, hook: kiln_virtio::mmio::ActivateHook) {
        MmioTransport::set_activate_hook(self, hook);
    }
    fn backend_fds(&self) -> Vec<(u32, std::os::fd::RawFd)> {
        MmioTransport::backend_fds(self)
    }
}

/// Saving and restoring a virtio-mmio transport and its device, whatever the device.
pub trait SnapshotState: Send + Sync {
    /// See [`MmioTransport::save_state`].
    fn save_state(&self) -> kiln_virtio::Result<kiln_virtio::mmio::TransportState>;
    /// See [`MmioTransport::restore_state`].
    fn restore_state(&self, state: &kiln_virtio::mmio::TransportState) -> kiln_virtio::Result<()>;
}

impl<D: kiln_virtio::VirtioDevice<GuestMemoryMmap>> SnapshotState for Transport<D> {
    fn save_state(&self) -> kiln_virtio::Result<kiln_virtio::mmio::TransportState> {
        MmioTransport::save_state(self)
    }
    fn restore_state(&self, state: &kiln_virtio::mmio::TransportState) -> kiln_virtio::Result<()> {
        MmioTransport::restore_state(self, state)
    }
}

/// The balloon as the VMM holds it (to change its target, read its statistics).
pub type BalloonHandle = Arc<Transport<Balloon<GuestMemoryMmap>>>;

/// The running virtio devices.
#[derive(Default)]
pub struct VirtioDevices {
    /// The device event loop (none without devices).
    pub event_loop: Option<EventLoopHandle>,
    /// The balloon, if `--balloon` was given.
    pub balloon: Option<BalloonHandle>,
    /// Every transport with its MMIO base, in slot order (for snapshots).
    pub transports: Vec<(u64, Arc<dyn SnapshotState>)>,
    /// The `--vsock` listener's socket file, removed when this is dropped.
    pub vsock_uds: Option<SocketFile>,
}

/// A Unix socket file the VMM created, removed on drop (at shutdown, or when booting fails
/// after the device was created), so the next VM can bind the same path.
#[derive(Debug)]
pub struct SocketFile(pub std::path::PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What `--balloon` asks of the device.
fn balloon_config(b: &BalloonArg) -> BalloonConfig {
    BalloonConfig {
        // Checked against --memory (which fits in u32 pages) in VmSpec::from_cli.
        target_pages: u32::try_from(b.size / kiln_virtio::balloon::PAGE_SIZE).unwrap_or(u32::MAX),
        deflate_on_oom: b.deflate_on_oom,
        stats_interval: (b.stats_interval_s > 0)
            .then(|| std::time::Duration::from_secs(b.stats_interval_s)),
        free_page_reporting: b.free_page_reporting,
        ..BalloonConfig::default()
    }
}

/// Creates every device in `slots`, registers it on `mmio` and with KVM, and starts the
/// device event loop (if there is any device).
#[allow(clippy::too_many_arguments)]
pub(crate) fn build(
    vm: &VmFd,
    chip: &IrqChip,
    mem: &GuestMemoryMmap,
    slots: &[VirtioSlot],
    disks: &[DiskArg],
    mut disk_files: Vec<Option<File>>,
    nets: &[NetArg],
    mut taps: Vec<Option<Tap>>,
    rng: &RngArg,
    balloon: Option<&BalloonArg>,
    vsock: Option<&VsockArg>,
    mmio: &mut MmioBus<MmioDev>,
    thread_init: Box<dyn FnOnce() -> Result<(), String> + Send>,
) -> Result<VirtioDevices, VmmError> {
    let mut out = VirtioDevices::default();
    if slots.is_empty() {
        return Ok(out);
    }
    let os = |what: &'static str| move |source: io::Error| VmmError::Os { what, source };
    let mut event_loop = EventLoop::new().map_err(os("creating the device event loop"))?;
    let mut block_index = 0usize;
    for slot in slots {
        let line = Arc::new(chip.legacy_line(vm, slot.gsi)?);
        let (dev, name): (Arc<dyn VirtioMmio>, String) = match slot.kind {
            VirtioKind::Block(i) => {
                let d = &disks[i];
                let file = disk_files
                    .get_mut(i)
                    .and_then(Option::take)
                    .ok_or_else(|| disk_err(d, "image not opened"))?;
                let cfg = BlockConfig {
                    read_only: d.read_only,
                    id: d.id.clone().unwrap_or_default().into_bytes(),
                    rate_limiter: limiter("--disk", &d.rate_limit)?,
                    ..BlockConfig::default()
                };
                let blk = Block::new(file, cfg).map_err(|e| disk_err(d, e))?;
                block_index += 1;
                (
                    Arc::new(MmioTransport::new(mem.clone(), blk, line)),
                    format!("virtio-blk {}", block_index - 1),
                )
            }
            VirtioKind::Net(i) => {
                let n = &nets[i];
                let net_err = |why: String| VmmError::Net {
                    tap: n.tap.clone(),
                    why,
                };
                let tap = taps
                    .get_mut(i)
                    .and_then(Option::take)
                    .ok_or_else(|| net_err("tap not opened".into()))?;
                let cfg = NetConfig {
                    mac: n.mac.unwrap_or_else(random_mac),
                    mtu: n.mtu,
                    rx_rate_limiter: limiter("--net", &n.rx_rate_limit)?,
                    tx_rate_limiter: limiter("--net", &n.tx_rate_limit)?,
                    ..NetConfig::default()
                };
                let net = Net::new(tap, cfg).map_err(|e| net_err(e.to_string()))?;
                (
                    Arc::new(MmioTransport::new(mem.clone(), net, line)),
                    format!("virtio-net {}", n.id.as_deref().unwrap_or(&n.tap)),
                )
            }
            VirtioKind::Rng => {
                let rng = Rng::new(
                    kiln_virtio::rng::DEFAULT_QUEUE_SIZE,
                    limiter("--rng", &rng.rate_limit)?,
                )
                .map_err(|e| VmmError::RateLimit {
                    flag: "--rng".into(),
                    why: e.to_string(),
                })?;
                (
                    Arc::new(MmioTransport::new(mem.clone(), rng, line)),
                    "virtio-rng".into(),
                )
            }
            VirtioKind::Balloon => {
                let cfg = balloon.map(balloon_config).unwrap_or_default();
                let b = Balloon::new(cfg).map_err(|e| VmmError::Balloon(e.to_string()))?;
                let t: BalloonHandle = Arc::new(MmioTransport::new(mem.clone(), b, line));
                out.balloon = Some(t.clone());
                (t, "virtio-balloon".into())
            }
            VirtioKind::Vsock => {
                let v = vsock.ok_or_else(|| VmmError::Vsock("no --vsock options".into()))?;
                // Binds the listener: host programs can connect before the guest runs.
                let dev = kiln_virtio::Vsock::new(kiln_virtio::VsockConfig {
                    guest_cid: v.cid,
                    uds_path: v.uds.clone(),
                    queue_size: kiln_virtio::vsock::DEFAULT_QUEUE_SIZE,
                })
                .map_err(|e| VmmError::Vsock(e.to_string()))?;
                out.vsock_uds = Some(SocketFile(v.uds.clone()));
                let name = match &v.id {
                    Some(id) => format!("virtio-vsock {id}"),
                    None => "virtio-vsock".into(),
                };
                (Arc::new(MmioTransport::new(mem.clone(), dev, line)), name)
            }
        };
        let snap: Arc<dyn SnapshotState> = dev.clone();
        out.transports.push((slot.base, snap));
        let queues = dev.queue_count();
        let handler: Arc<dyn kiln_virtio::QueueHandler> = dev.clone();
        let bus_dev: Arc<dyn VirtioMmio> = dev.clone();
        mmio.insert(MmioAddress(slot.base), MMIO_SIZE, bus_dev.into())?;
        let mut kicks = Vec::with_capacity(queues);
        for q in 0..queues as u32 {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(os("creating a queue eventfd"))?;
            // A 4-byte write of the queue index to QueueNotify signals the eventfd inside
            // KVM; the vCPU never comes out to user space for it.
            vm.register_ioevent(
                &evt,
                &IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY_OFFSET),
                q,
            )
            .map_err(|source| VmmError::VmSetup {
                what: "KVM_IOEVENTFD for a virtio queue",
                source,
            })?;
            kicks.push(evt.try_clone().map_err(os("cloning a queue eventfd"))?);
            event_loop
                .add(handler.clone(), q, evt, format!("{name} queue {q}"))
                .map_err(os("adding a queue to the device event loop"))?;
        }
        // Tap, vsock backend...: the device owns the fds and lives as long as the loop.
        for (token, fd) in dev.backend_fds() {
            event_loop
                .add_backend(
                    handler.clone(),
                    token,
                    fd,
                    format!("{name} backend {token}"),
                )
                .map_err(os("adding a device backend to the event loop"))?;
        }
        // Look at every queue once the device is live: a driver may have made buffers
        // available (and notified, into the void) before DRIVER_OK.
        dev.set_activate_hook(Box::new(move || {
            for k in &kicks {
                // A full counter already means "look".
                let _ = k.write(1);
            }
        }));
    }
    out.event_loop = Some(
        event_loop
            .spawn_with(thread_init)
            .map_err(os("starting the device event loop"))?,
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(p: &str) -> DiskArg {
        format!("path={p}").parse().unwrap()
    }

    #[test]
    fn disks_first_then_rng() {
        let b: BalloonArg = "size=8".parse().unwrap();
        let s = slots(
            &[disk("/a"), disk("/b")],
            &[],
            &RngArg::default(),
            Some(&b),
            None,
        )
        .unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s[3].kind, VirtioKind::Balloon);
        assert_eq!(s[0].kind, VirtioKind::Block(0));
        assert_eq!(s[1].kind, VirtioKind::Block(1));
        assert_eq!(s[2].kind, VirtioKind::Rng);
        assert_eq!((s[0].base, s[0].gsi), (0xD000_0000, 16));
        assert_eq!((s[2].base, s[2].gsi), (0xD000_2000, 18));
        // The tables must accept what we hand out.
        let cfg = kiln_acpi::AcpiConfig {
            cpus: 1,
            serial: true,
            ged_gsi: kiln_legacy::GED_GSI,
            virtio_mmio: acpi_devices(&s),
        };
        kiln_acpi::build(&cfg).unwrap();
    }

    #[test]
    fn nets_after_disks_before_rng() {
        let n: NetArg = "tap=kt0".parse().unwrap();
        let s = slots(
            &[disk("/a")],
            &[n.clone(), n],
            &RngArg::default(),
            None,
            None,
        )
        .unwrap();
        let kinds: Vec<_> = s.iter().map(|s| s.kind).collect();
        assert_eq!(
            kinds,
            [
                VirtioKind::Block(0),
                VirtioKind::Net(0),
                VirtioKind::Net(1),
                VirtioKind::Rng
            ]
        );
        let m = random_mac();
        assert_eq!(m[0] & 3, 2, "locally administered unicast");
    }

    #[test]
    fn too_many_devices_is_an_error_naming_the_limit() {
        let disks: Vec<DiskArg> = (0..7).map(|i| disk(&format!("/d{i}"))).collect();
        let off: RngArg = "off".parse().unwrap();
        assert_eq!(slots(&disks, &[], &off, None, None).unwrap().len(), 7);
        let e = slots(&disks, &[], &RngArg::default(), None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("8 virtio devices") && e.contains("at most 7"),
            "{e}"
        );
        // The last possible slot's GSI stays clear of the GED's.
        assert!(VIRTIO_GSI_BASE + MAX_VIRTIO_DEVICES as u32 - 1 < kiln_legacy::GED_GSI);
    }
}
