//! The virtio-mmio transport, version 2 (virtio 1.x "modern" devices only).
//!
//! [`MmioTransport`] is a [`kiln_bus::MmioDevice`]: register it on the MMIO bus at a base
//! address with [`MMIO_SIZE`] bytes. The guest drives the status state machine through the
//! registers; on `DRIVER_OK` the transport builds the queues and activates the device; queue
//! notifications either arrive as `QueueNotify` writes (processed on the vCPU thread) or, when
//! the VMM registers an ioeventfd at `base + `[`QUEUE_NOTIFY_OFFSET`] with the queue index as
//! datamatch, through [`MmioTransport::notify_queue`] called from an event loop.
//!
//! Every register access takes the transport's register lock once; queue processing takes
//! only the device lock, so a long disk request never blocks a vCPU acknowledging an
//! interrupt.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kiln_bus::{MmioAddress, MmioDevice, RateLimitedWarn};
use kiln_irq::InterruptLine;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory};

use crate::{
    Error, InterruptKind, QueueOutcome, Result, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};

/// `MagicValue`: "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// `Version`: 2, the virtio 1.x register layout.
pub const MMIO_VERSION: u32 = 2;
/// `VendorID` reported (the same value as QEMU uses for its devices is not needed: any).
pub const MMIO_VENDOR_ID: u32 = 0x4b49_4c4e; // "KILN"
/// Bytes of MMIO space one transport occupies (registers plus configuration space), the
/// size to register on the bus and to give the guest (`virtio_mmio.device=4K@...`, DSDT).
pub const MMIO_SIZE: u64 = 0x1000;
/// Offset of `QueueNotify`: register an ioeventfd at `base + QUEUE_NOTIFY_OFFSET`, 4 bytes,
/// datamatch = queue index.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// Offset of the device configuration space.
pub const CONFIG_OFFSET: u64 = 0x100;

/// Register offsets.
pub mod regs {
    /// Magic value (R).
    pub const MAGIC_VALUE: u64 = 0x000;
    /// Version (R).
    pub const VERSION: u64 = 0x004;
    /// Device ID (R).
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor ID (R).
    pub const VENDOR_ID: u64 = 0x00c;
    /// Device features, 32 bits selected by `DEVICE_FEATURES_SEL` (R).
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Device features word selector (W).
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// Driver features, 32 bits selected by `DRIVER_FEATURES_SEL` (W).
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Driver features word selector (W).
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Queue selector (W).
    pub const QUEUE_SEL: u64 = 0x030;
    /// Maximum size of the selected queue, 0 if it doesn't exist (R).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size of the selected queue (W).
    pub const QUEUE_NUM: u64 = 0x038;
    /// Selected queue ready (RW).
    pub const QUEUE_READY: u64 = 0x044;
    /// Queue notifier: the queue index (W).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Interrupt status (R).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Interrupt acknowledge (W).
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status (RW).
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low 32 bits (W).
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high 32 bits (W).
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available (driver) ring address, low (W).
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// Available (driver) ring address, high (W).
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// Used (device) ring address, low (W).
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// Used (device) ring address, high (W).
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// Shared memory region selector (W).
    pub const SHM_SEL: u64 = 0x0ac;
    /// Shared memory region length, low (R): all ones, no region.
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// Shared memory region length, high (R).
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// Shared memory region base, low (R).
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// Shared memory region base, high (R).
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// Configuration generation (R).
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// Device status bits.
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// `InterruptStatus` bit: a used ring was updated.
pub const INT_VRING: u32 = 1;
/// `InterruptStatus` bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

static BAD_ACCESS: RateLimitedWarn = RateLimitedWarn::new();
static BAD_STATE: RateLimitedWarn = RateLimitedWarn::new();
static DEVICE_ERROR: RateLimitedWarn = RateLimitedWarn::new();

/// The MMIO flavour of [`VirtioInterrupt`]: sets `InterruptStatus` bits and triggers the
/// transport's single interrupt line.
pub struct MmioInterrupt {
    status: AtomicU32,
    generation: AtomicU32,
    line: Arc<dyn InterruptLine>,
}

impl std::fmt::Debug for MmioInterrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioInterrupt")
            .field("status", &self.status.load(Ordering::Relaxed))
            .finish()
    }
}

impl MmioInterrupt {
    /// The current `InterruptStatus` value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        let bit = match kind {
            InterruptKind::Queue(_) => INT_VRING,
            InterruptKind::Config => {
                self.generation.fetch_add(1, Ordering::AcqRel);
                INT_CONFIG
            }
        };
        // Set the bit before raising the line, so the handler that runs sees it.
        self.status.fetch_or(bit, Ordering::AcqRel);
        self.line.trigger()
    }
}

/// What the driver has configured for one queue (raw register values until `QueueReady`).
#[derive(Debug, Clone, Copy)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    /// The last `QueueNum` write was acceptable (Queue::set_size silently keeps the old size).
    size_ok: bool,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: max_size,
            size_ok: true,
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }

    /// Builds the virtio-queue `Queue` from the registers, checking size, alignment and that
    /// the rings are in guest memory.
    fn build<M: GuestMemory>(&self, mem: &M, event_idx: bool) -> Option<Queue> {
        if !self.size_ok {
            return None;
        }
        let mut q = Queue::new(self.max_size).ok()?;
        q.try_set_size(self.size).ok()?;
        q.try_set_desc_table_address(GuestAddress(self.desc)).ok()?;
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .ok()?;
        q.try_set_used_ring_address(GuestAddress(self.used)).ok()?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q.is_valid(mem).then_some(q)
    }
}

/// One queue's registers in a [`TransportState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueRegs {
    /// `QueueNum` as the driver set it.
    pub size: u16,
    /// Whether the last `QueueNum` write was acceptable.
    pub size_ok: bool,
    /// `QueueReady`.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available (driver) ring address.
    pub avail: u64,
    /// Used (device) ring address.
    pub used: u64,
}

/// Everything guest-visible of a virtio-mmio transport and its device, for snapshots
/// ([`MmioTransport::save_state`], [`MmioTransport::restore_state`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    /// The virtio device ID (checked on restore).
    pub device_type: u32,
    /// `Status` (without `DEVICE_NEEDS_RESET`, which is `needs_reset`).
    pub status: u32,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// The features the driver wrote.
    pub driver_features: u64,
    /// The driver wrote feature bits beyond 64.
    pub driver_features_invalid: bool,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// `SHMSel`.
    pub shm_sel: u32,
    /// Each queue's registers.
    pub queues: Vec<QueueRegs>,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// The device had failed and waits for a reset.
    pub needs_reset: bool,
    /// The device was running (activated at `DRIVER_OK`).
    pub active: bool,
    /// The device's own state.
    pub device: crate::DeviceState,
}

/// The register file (everything the guest can write).
#[derive(Debug)]
struct Registers {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    /// The driver wrote a nonzero word beyond the 64 feature bits we know.
    driver_features_invalid: bool,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
    shm_sel: u32,
}

impl Registers {
    fn new(max_sizes: &[u16]) -> Self {
        Registers {
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            driver_features_invalid: false,
            queue_sel: 0,
            queues: max_sizes.iter().map(|&m| QueueConfig::new(m)).collect(),
            shm_sel: 0,
        }
    }

    fn selected(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }
}

/// The device and whether it is running.
struct Slot<D> {
    dev: D,
    active: bool,
}

/// A virtio device on the virtio-mmio v2 transport.
///
/// `M` is the guest memory (e.g. `vm_memory::GuestMemoryMmap<()>`, which clones cheaply);
/// `D` the device model.
pub struct MmioTransport<M, D> {
    mem: M,
    device_type: u32,
    device_features: u64,
    regs: Mutex<Registers>,
    slot: Mutex<Slot<D>>,
    interrupt: Arc<MmioInterrupt>,
    needs_reset: AtomicBool,
    on_activate: std::sync::OnceLock<ActivateHook>,
}

/// Called (on the vCPU thread that wrote `DRIVER_OK`) after the device activated.
pub type ActivateHook = Box<dyn Fn() + Send + Sync>;

impl<M, D> std::fmt::Debug for MmioTransport<M, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device_type)
            .field("interrupt", &self.interrupt)
            .finish()
    }
}

/// Locks `m`, recovering the data if a thread panicked while holding it (the register file
/// stays consistent: every write is a single assignment).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<M, D> MmioTransport<M, D>
where
    M: GuestMemory + Clone + Send + Sync,
    D: VirtioDevice<M>,
{
    /// Wraps `device`, reaching guest memory through `mem` and raising interrupts on `line`.
    pub fn new(mem: M, device: D, line: Arc<dyn InterruptLine>) -> Self {
        let regs = Registers::new(device.queue_max_sizes());
        MmioTransport {
            mem,
            device_type: device.device_type(),
            device_features: device.device_features(),
            regs: Mutex::new(regs),
            slot: Mutex::new(Slot {
                dev: device,
                active: false,
            }),
            interrupt: Arc::new(MmioInterrupt {
                status: AtomicU32::new(0),
                generation: AtomicU32::new(0),
                line,
            }),
            needs_reset: AtomicBool::new(false),
            on_activate: std::sync::OnceLock::new(),
        }
    }

    /// Runs `hook` every time the device activates. The VMM uses it to signal each queue's
    /// notification eventfd, so buffers the driver made available (and notified) before
    /// `DRIVER_OK` — Linux's balloon driver kicks its statistics queue that early — are
    /// processed by the event loop, with its retry timers, instead of waiting for a kick that
    /// never comes. Only the first hook set is kept.
    pub fn set_activate_hook(&self, hook: ActivateHook) {
        let _ = self.on_activate.set(hook);
    }

    /// Offset of `QueueNotify` for ioeventfd registration (`base + this`, 4 bytes,
    /// datamatch = queue index).
    pub const fn queue_notify_offset() -> u64 {
        QUEUE_NOTIFY_OFFSET
    }

    /// Number of queues of the device.
    pub fn num_queues(&self) -> usize {
        lock(&self.regs).queues.len()
    }

    /// Whether the device is running (the driver set `DRIVER_OK` and activation worked).
    pub fn is_active(&self) -> bool {
        lock(&self.slot).active
    }

    /// The device status register as the guest reads it.
    pub fn status(&self) -> u32 {
        let s = lock(&self.regs).status;
        if self.needs_reset.load(Ordering::Acquire) {
            s | status::DEVICE_NEEDS_RESET
        } else {
            s
        }
    }

    /// The interrupt state shared with the device.
    pub fn interrupt(&self) -> &Arc<MmioInterrupt> {
        &self.interrupt
    }

    /// Runs `f` on the device (for the VMM: statistics, tests). Takes the device lock.
    pub fn with_device<R>(&self, f: impl FnOnce(&mut D) -> R) -> R {
        f(&mut lock(&self.slot).dev)
    }

    /// Handles a notification of queue `index`: processes it if the device is active.
    ///
    /// Call this from the event loop when the queue's ioeventfd fires, and again when a
    /// [`QueueOutcome::Throttled`] timer expires or right away after
    /// [`QueueOutcome::Pending`]. Notifications before `DRIVER_OK`, after a reset, for a
    /// queue that doesn't exist, or while the device needs a reset are ignored (`Done`). A
    /// device error sets `DEVICE_NEEDS_RESET`, raises a configuration interrupt and is
    /// returned for logging.
    pub fn notify_queue(&self, index: u32) -> Result<QueueOutcome> {
        let mut slot = lock(&self.slot);
        if !slot.active || self.needs_reset.load(Ordering::Acquire) {
            return Ok(QueueOutcome::Done);
        }
        let Ok(i) = usize::try_from(index) else {
            return Ok(QueueOutcome::Done);
        };
        if i >= slot.dev.queue_max_sizes().len() {
            BAD_STATE.warn(format_args!(
                "virtio-mmio: notify for missing queue {index}"
            ));
            return Ok(QueueOutcome::Done);
        }
        let r = slot.dev.process_queue(i);
        drop(slot);
        if let Err(e) = &r {
            DEVICE_ERROR.warn(format_args!("virtio-mmio: device needs reset: {e}"));
            self.set_needs_reset();
        }
        r
    }

    /// The device's backend event sources (see [`VirtioDevice::backend_fds`]).
    pub fn backend_fds(&self) -> Vec<(u32, std::os::fd::RawFd)> {
        lock(&self.slot).dev.backend_fds()
    }

    /// Handles readiness of backend source `token`: like [`notify_queue`](Self::notify_queue),
    /// ignored (`Done`) unless the device is active; a device error sets
    /// `DEVICE_NEEDS_RESET`.
    pub fn notify_backend(&self, token: u32) -> Result<QueueOutcome> {
        let mut slot = lock(&self.slot);
        if !slot.active || self.needs_reset.load(Ordering::Acquire) {
            return Ok(QueueOutcome::Done);
        }
        let r = slot.dev.process_backend(token);
        drop(slot);
        if let Err(e) = &r {
            DEVICE_ERROR.warn(format_args!("virtio-mmio: device needs reset: {e}"));
            self.set_needs_reset();
        }
        r
    }

    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::Release);
        // The spec asks for a configuration change notification; if even that fails there is
        // nobody left to tell.
        let _ = self.interrupt.trigger(InterruptKind::Config);
    }

    /// The transport's and device's state, for a snapshot. Call it only while nothing else
    /// drives the device (vCPUs and the device event loop paused): then no request is in
    /// flight, because devices complete each request on the event loop before taking the
    /// next. Fails if the device can't be saved ([`Error::NotSnapshottable`]).
    pub fn save_state(&self) -> Result<TransportState> {
        let regs = lock(&self.regs);
        let slot = lock(&self.slot);
        let device = slot.dev.save_state()?;
        Ok(TransportState {
            device_type: self.device_type,
            status: regs.status,
            device_features_sel: regs.device_features_sel,
            driver_features_sel: regs.driver_features_sel,
            driver_features: regs.driver_features,
            driver_features_invalid: regs.driver_features_invalid,
            queue_sel: regs.queue_sel,
            shm_sel: regs.shm_sel,
            queues: regs
                .queues
                .iter()
                .map(|q| QueueRegs {
                    size: q.size,
                    size_ok: q.size_ok,
                    ready: q.ready,
                    desc: q.desc,
                    avail: q.avail,
                    used: q.used,
                })
                .collect(),
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.generation.load(Ordering::Acquire),
            needs_reset: self.needs_reset.load(Ordering::Acquire),
            active: slot.active,
            device,
        })
    }

    /// Puts a freshly built transport (same device type and queues, guest memory already
    /// restored) into `state`. An active device gets its queues, positions and memory back
    /// and runs again without the driver redoing the handshake; then the activation hook
    /// runs, so requests made available while the VM was saved are looked at.
    ///
    /// Everything is checked before anything changes: on error the transport is untouched.
    /// The interrupt line is not raised: the interrupt controller's restored state holds
    /// any interrupt that was pending.
    pub fn restore_state(&self, state: &TransportState) -> Result<()> {
        let bad = |why: String| Error::BadState {
            device: crate::device_name(self.device_type),
            why,
        };
        if state.device_type != self.device_type {
            return Err(bad(format!(
                "the snapshot has a {} here",
                crate::device_name(state.device_type)
            )));
        }
        let mut regs = lock(&self.regs);
        if state.queues.len() != regs.queues.len() {
            return Err(bad(format!(
                "{} queues saved, the device has {}",
                state.queues.len(),
                regs.queues.len()
            )));
        }
        if state.driver_features & !self.device_features != 0 {
            return Err(bad(format!(
                "driver features {:#x} are not all offered ({:#x})",
                state.driver_features, self.device_features
            )));
        }
        let mut new_regs =
            Registers::new(&regs.queues.iter().map(|q| q.max_size).collect::<Vec<_>>());
        new_regs.status = state.status & !status::DEVICE_NEEDS_RESET;
        new_regs.device_features_sel = state.device_features_sel;
        new_regs.driver_features_sel = state.driver_features_sel;
        new_regs.driver_features = state.driver_features;
        new_regs.driver_features_invalid = state.driver_features_invalid;
        new_regs.queue_sel = state.queue_sel;
        new_regs.shm_sel = state.shm_sel;
        for (q, saved) in new_regs.queues.iter_mut().zip(&state.queues) {
            if saved.size > q.max_size || (saved.size_ok && !saved.size.is_power_of_two()) {
                return Err(bad(format!(
                    "queue size {} (the device allows {})",
                    saved.size, q.max_size
                )));
            }
            q.size = saved.size;
            q.size_ok = saved.size_ok;
            q.ready = saved.ready;
            q.desc = saved.desc;
            q.avail = saved.avail;
            q.used = saved.used;
        }
        let mut queues = Vec::new();
        if state.active {
            if state.device.queues.len() != new_regs.queues.len() {
                return Err(bad(format!(
                    "{} queue positions saved for {} queues",
                    state.device.queues.len(),
                    new_regs.queues.len()
                )));
            }
            let event_idx = state.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
            for (i, (qc, pos)) in new_regs.queues.iter().zip(&state.device.queues).enumerate() {
                let mut q = if qc.ready {
                    qc.build(&self.mem, event_idx)
                        .ok_or_else(|| bad(format!("queue {i} is not valid in guest memory")))?
                } else {
                    Queue::new(qc.max_size).map_err(|e| bad(format!("queue {i}: {e}")))?
                };
                q.set_next_avail(pos.next_avail);
                q.set_next_used(pos.next_used);
                queues.push(q);
            }
        }
        let mut slot = lock(&self.slot);
        if slot.active {
            slot.dev.reset();
            slot.active = false;
        }
        if state.status & status::FEATURES_OK != 0 {
            slot.dev.ack_features(state.driver_features);
        }
        if state.active {
            let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
            slot.dev.activate(self.mem.clone(), queues, interrupt)?;
            if let Err(e) = slot.dev.restore_state(&state.device.data) {
                slot.dev.reset();
                return Err(e);
            }
            slot.active = true;
        }
        drop(slot);
        *regs = new_regs;
        drop(regs);
        self.interrupt
            .status
            .store(state.interrupt_status, Ordering::Release);
        self.interrupt
            .generation
            .store(state.config_generation, Ordering::Release);
        self.needs_reset.store(state.needs_reset, Ordering::Release);
        if state.active {
            if let Some(hook) = self.on_activate.get() {
                hook();
            }
        }
        Ok(())
    }

    /// Writing 0 to `Status`: back to the power-on state, device included.
    fn reset(&self, regs: &mut Registers) {
        let mut slot = lock(&self.slot);
        if slot.active {
            slot.dev.reset();
            slot.active = false;
        }
        *regs = Registers::new(slot.dev.queue_max_sizes());
        self.needs_reset.store(false, Ordering::Release);
        self.interrupt.status.store(0, Ordering::Release);
    }

    fn write_status(&self, regs: &mut Registers, val: u32) {
        if val == 0 {
            self.reset(regs);
            return;
        }
        let old = regs.status;
        // NEEDS_RESET is the device's bit; the driver can't set or clear it.
        let val = val & !status::DEVICE_NEEDS_RESET;
        if old & !val != 0 {
            BAD_STATE.warn(format_args!(
                "virtio-mmio: status {old:#x} -> {val:#x} clears bits; ignored"
            ));
            return;
        }
        let new = val & !old;
        let mut accepted = val;
        if new & status::FEATURES_OK != 0 {
            let f = regs.driver_features;
            let ok = val & (status::ACKNOWLEDGE | status::DRIVER)
                == status::ACKNOWLEDGE | status::DRIVER
                && !regs.driver_features_invalid
                && f & !self.device_features == 0
                && f & VIRTIO_F_VERSION_1 != 0;
            if ok {
                lock(&self.slot).dev.ack_features(f);
            } else {
                BAD_STATE.warn(format_args!(
                    "virtio-mmio: FEATURES_OK refused (driver features {f:#x}, device {:#x})",
                    self.device_features
                ));
                accepted &= !status::FEATURES_OK;
            }
        }
        if new & status::DRIVER_OK != 0 {
            if accepted & status::FEATURES_OK == 0 {
                BAD_STATE.warn(format_args!(
                    "virtio-mmio: DRIVER_OK without FEATURES_OK; ignored"
                ));
                accepted &= !status::DRIVER_OK;
            } else {
                self.activate(regs);
            }
        }
        regs.status = accepted;
    }

    fn activate(&self, regs: &Registers) {
        let event_idx = regs.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(regs.queues.len());
        for (i, qc) in regs.queues.iter().enumerate() {
            let q = if qc.ready {
                match qc.build(&self.mem, event_idx) {
                    Some(q) => q,
                    None => {
                        // Ready queues were checked at QueueReady; memory doesn't shrink.
                        BAD_STATE.warn(format_args!("virtio-mmio: queue {i} invalid at DRIVER_OK"));
                        self.set_needs_reset();
                        return;
                    }
                }
            } else {
                match Queue::new(qc.max_size) {
                    Ok(q) => q,
                    Err(_) => {
                        self.set_needs_reset();
                        return;
                    }
                }
            };
            queues.push(q);
        }
        let mut slot = lock(&self.slot);
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        match slot.dev.activate(self.mem.clone(), queues, interrupt) {
            Ok(()) => {
                slot.active = true;
                drop(slot);
                if let Some(hook) = self.on_activate.get() {
                    hook();
                }
            }
            Err(e) => {
                drop(slot);
                DEVICE_ERROR.warn(format_args!("virtio-mmio: activation failed: {e}"));
                self.set_needs_reset();
            }
        }
    }

    /// Queue registers are writable between FEATURES_OK and DRIVER_OK, for a queue that
    /// exists and is not ready yet.
    fn queue_writable(regs: &mut Registers) -> Option<&mut QueueConfig> {
        let s = regs.status;
        if s & status::FEATURES_OK == 0 || s & status::DRIVER_OK != 0 {
            BAD_STATE.warn(format_args!(
                "virtio-mmio: queue register written in status {s:#x}; ignored"
            ));
            return None;
        }
        let sel = regs.queue_sel;
        match regs.selected() {
            Some(q) if !q.ready => Some(q),
            Some(_) => {
                BAD_STATE.warn(format_args!(
                    "virtio-mmio: queue {sel} written while ready; ignored"
                ));
                None
            }
            None => {
                BAD_STATE.warn(format_args!("virtio-mmio: queue {sel} doesn't exist"));
                None
            }
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let mut regs = lock(&self.regs);
        match offset {
            regs::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            regs::VERSION => MMIO_VERSION,
            regs::DEVICE_ID => self.device_type,
            regs::VENDOR_ID => MMIO_VENDOR_ID,
            regs::DEVICE_FEATURES => match regs.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            regs::QUEUE_NUM_MAX => regs.selected().map_or(0, |q| u32::from(q.max_size)),
            regs::QUEUE_READY => regs.selected().map_or(0, |q| u32::from(q.ready)),
            regs::INTERRUPT_STATUS => self.interrupt.status(),
            regs::STATUS => {
                let s = regs.status;
                drop(regs);
                if self.needs_reset.load(Ordering::Acquire) {
                    s | status::DEVICE_NEEDS_RESET
                } else {
                    s
                }
            }
            // No shared memory regions: length reads as all ones.
            regs::SHM_LEN_LOW | regs::SHM_LEN_HIGH => u32::MAX,
            regs::SHM_BASE_LOW | regs::SHM_BASE_HIGH => u32::MAX,
            regs::CONFIG_GENERATION => self.interrupt.generation.load(Ordering::Acquire),
            _ => {
                BAD_ACCESS.warn(format_args!(
                    "virtio-mmio: read of write-only or unknown register {offset:#x}"
                ));
                0
            }
        }
    }

    fn write_reg(&self, offset: u64, val: u32) {
        let mut regs = lock(&self.regs);
        match offset {
            regs::DEVICE_FEATURES_SEL => regs.device_features_sel = val,
            regs::DRIVER_FEATURES_SEL => regs.driver_features_sel = val,
            regs::DRIVER_FEATURES => {
                let s = regs.status;
                if s & status::DRIVER == 0 || s & status::FEATURES_OK != 0 {
                    BAD_STATE.warn(format_args!(
                        "virtio-mmio: driver features written in status {s:#x}; ignored"
                    ));
                    return;
                }
                match regs.driver_features_sel {
                    0 => {
                        regs.driver_features =
                            (regs.driver_features & !0xffff_ffff) | u64::from(val)
                    }
                    1 => {
                        regs.driver_features =
                            (regs.driver_features & 0xffff_ffff) | (u64::from(val) << 32)
                    }
                    _ => regs.driver_features_invalid |= val != 0,
                }
            }
            regs::QUEUE_SEL => regs.queue_sel = val,
            regs::QUEUE_NUM => {
                if let Some(q) = Self::queue_writable(&mut regs) {
                    let ok = u16::try_from(val)
                        .ok()
                        .filter(|&n| n != 0 && n.is_power_of_two() && n <= q.max_size);
                    q.size_ok = ok.is_some();
                    if let Some(n) = ok {
                        q.size = n;
                    } else {
                        BAD_STATE.warn(format_args!("virtio-mmio: invalid queue size {val}"));
                    }
                }
            }
            regs::QUEUE_READY => {
                let sel = regs.queue_sel;
                let s = regs.status;
                if val == 0 {
                    // Only meaningful before DRIVER_OK (no VIRTIO_F_RING_RESET).
                    if s & status::DRIVER_OK == 0 {
                        if let Some(q) = regs.selected() {
                            q.ready = false;
                        }
                    }
                    return;
                }
                if let Some(q) = Self::queue_writable(&mut regs) {
                    // Event-idx doesn't change validity; build only to check.
                    if q.build(&self.mem, false).is_some() {
                        q.ready = true;
                    } else {
                        BAD_STATE.warn(format_args!(
                            "virtio-mmio: queue {sel} rejected (size {}, desc {:#x}, avail {:#x}, used {:#x})",
                            if q.size_ok { q.size } else { 0 },
                            q.desc,
                            q.avail,
                            q.used
                        ));
                    }
                }
            }
            regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_DRIVER_LOW
            | regs::QUEUE_DRIVER_HIGH
            | regs::QUEUE_DEVICE_LOW
            | regs::QUEUE_DEVICE_HIGH => {
                if let Some(q) = Self::queue_writable(&mut regs) {
                    let field = match offset {
                        regs::QUEUE_DESC_LOW | regs::QUEUE_DESC_HIGH => &mut q.desc,
                        regs::QUEUE_DRIVER_LOW | regs::QUEUE_DRIVER_HIGH => &mut q.avail,
                        _ => &mut q.used,
                    };
                    if offset & 4 == 0 {
                        *field = (*field & !0xffff_ffff) | u64::from(val);
                    } else {
                        *field = (*field & 0xffff_ffff) | (u64::from(val) << 32);
                    }
                }
            }
            regs::QUEUE_NOTIFY => {
                let s = regs.status;
                drop(regs);
                if s & status::DRIVER_OK == 0 {
                    BAD_STATE.warn(format_args!(
                        "virtio-mmio: notify before DRIVER_OK; ignored"
                    ));
                    return;
                }
                self.notify_from_vcpu(val);
            }
            regs::INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!val, Ordering::AcqRel);
            }
            regs::STATUS => self.write_status(&mut regs, val),
            regs::SHM_SEL => regs.shm_sel = val,
            _ => {
                BAD_ACCESS.warn(format_args!(
                    "virtio-mmio: write of read-only or unknown register {offset:#x}"
                ));
            }
        }
    }

    /// A `QueueNotify` MMIO write reached us (no ioeventfd): process on the vCPU thread.
    /// `Pending` is processed again at once, or the driver, seeing notifications disabled,
    /// would wait forever; a throttled queue needs the VMM's retry timer, which only the
    /// event-loop path has.
    fn notify_from_vcpu(&self, index: u32) {
        loop {
            match self.notify_queue(index) {
                Ok(QueueOutcome::Pending) => continue,
                Ok(QueueOutcome::Throttled(_)) => {
                    BAD_STATE.warn(format_args!(
                        "virtio-mmio: queue {index} throttled without an event loop to retry it"
                    ));
                    break;
                }
                Ok(QueueOutcome::Done) | Err(_) => break,
            }
        }
    }
}

impl<M, D> MmioDevice for MmioTransport<M, D>
where
    M: GuestMemory + Clone + Send + Sync,
    D: VirtioDevice<M>,
{
    fn mmio_read(&self, _base: MmioAddress, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            lock(&self.slot)
                .dev
                .read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            BAD_ACCESS.warn(format_args!(
                "virtio-mmio: {}-byte read at register offset {offset:#x}; registers are 32-bit",
                data.len()
            ));
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn mmio_write(&self, _base: MmioAddress, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            lock(&self.slot)
                .dev
                .write_config(offset - CONFIG_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            BAD_ACCESS.warn(format_args!(
                "virtio-mmio: {}-byte write at register offset {offset:#x}; registers are 32-bit",
                data.len()
            ));
            return;
        };
        if offset % 4 != 0 {
            BAD_ACCESS.warn(format_args!(
                "virtio-mmio: unaligned write at register offset {offset:#x}"
            ));
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use kiln_irq::EventFdLine;
    use vm_memory::Bytes;

    use super::*;
    use crate::test_util::*;
    use crate::{Error, QueuePosition, Result, Rng};

    /// What the fake device saw, shared with the test.
    #[derive(Default)]
    struct Seen {
        activations: AtomicUsize,
        resets: AtomicUsize,
        processed: AtomicUsize,
        acked: Mutex<u64>,
        config_writes: Mutex<Vec<(u64, Vec<u8>)>>,
        fail_process: AtomicBool,
        fail_activate: AtomicBool,
        ready_queues: AtomicUsize,
    }

    struct Fake {
        seen: Arc<Seen>,
        sizes: [u16; 2],
    }

    const FAKE_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 0b101;

    impl VirtioDevice<Mem> for Fake {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn device_features(&self) -> u64 {
            FAKE_FEATURES
        }
        fn ack_features(&mut self, features: u64) {
            *self.seen.acked.lock().unwrap() = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::read_config_bytes(&[1, 2, 3, 4, 5, 6, 7, 8], offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.seen
                .config_writes
                .lock()
                .unwrap()
                .push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            _mem: Mem,
            queues: Vec<Queue>,
            _interrupt: Arc<dyn VirtioInterrupt>,
        ) -> Result<()> {
            if self.seen.fail_activate.load(Ordering::Relaxed) {
                return Err(Error::NotActivated { device: "fake" });
            }
            assert_eq!(queues.len(), 2);
            let ready = queues.iter().filter(|q| q.ready()).count();
            self.seen.ready_queues.store(ready, Ordering::Relaxed);
            self.seen.activations.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn reset(&mut self) {
            self.seen.resets.fetch_add(1, Ordering::Relaxed);
        }
        fn process_queue(&mut self, index: usize) -> Result<QueueOutcome> {
            assert!(index < 2);
            self.seen.processed.fetch_add(1, Ordering::Relaxed);
            if self.seen.fail_process.load(Ordering::Relaxed) {
                return Err(Error::NotActivated { device: "fake" });
            }
            Ok(QueueOutcome::Done)
        }
    }

    type T = MmioTransport<Mem, Fake>;

    fn fake() -> (T, Arc<Seen>, Arc<EventFdLine>) {
        let seen = Arc::new(Seen::default());
        let line = Arc::new(EventFdLine::new().unwrap());
        let dev = Fake {
            seen: seen.clone(),
            sizes: [QS, 8],
        };
        (MmioTransport::new(mem(), dev, line.clone()), seen, line)
    }

    const BASE: MmioAddress = MmioAddress(0xd000_0000);

    fn r<D: VirtioDevice<Mem>>(t: &MmioTransport<Mem, D>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.mmio_read(BASE, off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w<D: VirtioDevice<Mem>>(t: &MmioTransport<Mem, D>, off: u64, v: u32) {
        t.mmio_write(BASE, off, &v.to_le_bytes());
    }

    fn negotiate<D: VirtioDevice<Mem>>(t: &MmioTransport<Mem, D>, features: u64) -> bool {
        w(t, regs::STATUS, status::ACKNOWLEDGE);
        w(t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, regs::DRIVER_FEATURES_SEL, 0);
        w(t, regs::DRIVER_FEATURES, features as u32);
        w(t, regs::DRIVER_FEATURES_SEL, 1);
        w(t, regs::DRIVER_FEATURES, (features >> 32) as u32);
        w(
            t,
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        r(t, regs::STATUS) & status::FEATURES_OK != 0
    }

    fn setup_queue<D: VirtioDevice<Mem>>(t: &MmioTransport<Mem, D>, sel: u32, size: u32) -> bool {
        w(t, regs::QUEUE_SEL, sel);
        w(t, regs::QUEUE_NUM, size);
        w(t, regs::QUEUE_DESC_LOW, DESC as u32);
        w(t, regs::QUEUE_DESC_HIGH, 0);
        w(t, regs::QUEUE_DRIVER_LOW, AVAIL as u32);
        w(t, regs::QUEUE_DRIVER_HIGH, 0);
        w(t, regs::QUEUE_DEVICE_LOW, USED as u32);
        w(t, regs::QUEUE_DEVICE_HIGH, 0);
        w(t, regs::QUEUE_READY, 1);
        r(t, regs::QUEUE_READY) == 1
    }

    const ALL_OK: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identity_registers() {
        let (t, _, _) = fake();
        assert_eq!(r(&t, regs::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(&t, regs::VERSION), 2);
        assert_eq!(r(&t, regs::DEVICE_ID), 42);
        assert_eq!(r(&t, regs::VENDOR_ID), MMIO_VENDOR_ID);
        assert_eq!(r(&t, regs::DEVICE_FEATURES), FAKE_FEATURES as u32);
        w(&t, regs::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&t, regs::DEVICE_FEATURES), 1);
        w(&t, regs::DEVICE_FEATURES_SEL, 2);
        assert_eq!(r(&t, regs::DEVICE_FEATURES), 0);
        assert_eq!(r(&t, regs::QUEUE_NUM_MAX), u32::from(QS));
        w(&t, regs::QUEUE_SEL, 1);
        assert_eq!(r(&t, regs::QUEUE_NUM_MAX), 8);
        w(&t, regs::QUEUE_SEL, 2);
        assert_eq!(r(&t, regs::QUEUE_NUM_MAX), 0);
        assert_eq!(r(&t, regs::QUEUE_READY), 0);
        assert_eq!(r(&t, regs::SHM_LEN_LOW), u32::MAX);
        assert_eq!(MmioTransport::<Mem, Fake>::queue_notify_offset(), 0x50);
        assert_eq!(t.num_queues(), 2);
    }

    #[test]
    fn bad_access_sizes_are_ignored() {
        let (t, _, _) = fake();
        let mut b2 = [0xffu8; 2];
        t.mmio_read(BASE, regs::MAGIC_VALUE, &mut b2);
        assert_eq!(b2, [0, 0]);
        let mut b8 = [0xffu8; 8];
        t.mmio_read(BASE, regs::MAGIC_VALUE, &mut b8);
        assert_eq!(b8, [0; 8]);
        let mut b4 = [0xffu8; 4];
        t.mmio_read(BASE, 2, &mut b4);
        assert_eq!(b4, [0; 4]);
        t.mmio_write(BASE, regs::STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
        t.mmio_write(BASE, regs::STATUS, &[1]);
        t.mmio_write(BASE, regs::STATUS + 1, &[1, 0, 0, 0]);
        assert_eq!(r(&t, regs::STATUS), 0);
        // Read-only and unknown registers.
        w(&t, regs::MAGIC_VALUE, 0);
        w(&t, 0x0f8, 0);
        assert_eq!(r(&t, regs::MAGIC_VALUE), MMIO_MAGIC_VALUE);
        assert_eq!(r(&t, regs::QUEUE_NOTIFY), 0);
    }

    #[test]
    fn feature_negotiation() {
        let (t, seen, _) = fake();
        // Without VERSION_1: refused.
        assert!(!negotiate(&t, 0b1));
        w(&t, regs::STATUS, 0);
        // A feature the device didn't offer: refused.
        assert!(!negotiate(&t, VIRTIO_F_VERSION_1 | 0b10));
        w(&t, regs::STATUS, 0);
        // A nonzero word past bit 63: refused.
        w(&t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&t, regs::DRIVER_FEATURES_SEL, 2);
        w(&t, regs::DRIVER_FEATURES, 1);
        assert!(!negotiate(&t, VIRTIO_F_VERSION_1));
        w(&t, regs::STATUS, 0);
        // FEATURES_OK without DRIVER: refused.
        w(&t, regs::DRIVER_FEATURES_SEL, 1);
        w(&t, regs::STATUS, status::ACKNOWLEDGE | status::FEATURES_OK);
        assert_eq!(r(&t, regs::STATUS), status::ACKNOWLEDGE);
        w(&t, regs::STATUS, 0);
        assert!(negotiate(&t, VIRTIO_F_VERSION_1 | 0b100));
        assert_eq!(*seen.acked.lock().unwrap(), VIRTIO_F_VERSION_1 | 0b100);
        // Driver features are frozen after FEATURES_OK.
        w(&t, regs::DRIVER_FEATURES_SEL, 0);
        w(&t, regs::DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(lock(&t.regs).driver_features, VIRTIO_F_VERSION_1 | 0b100);
    }

    #[test]
    fn activate_hook_runs_on_each_activation_only() {
        let (t, _, _) = fake();
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let c = calls.clone();
        t.set_activate_hook(Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        }));
        // A refused DRIVER_OK doesn't call it.
        w(
            &t,
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        for round in 1..=2 {
            w(&t, regs::STATUS, 0);
            assert!(negotiate(&t, VIRTIO_F_VERSION_1));
            assert!(setup_queue(&t, 0, 8));
            w(&t, regs::STATUS, ALL_OK);
            assert!(t.is_active());
            assert_eq!(calls.load(Ordering::SeqCst), round);
        }
    }

    #[test]
    fn status_state_machine() {
        let (t, seen, _) = fake();
        // DRIVER_OK without FEATURES_OK is refused.
        w(
            &t,
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert_eq!(r(&t, regs::STATUS), status::ACKNOWLEDGE | status::DRIVER);
        assert_eq!(seen.activations.load(Ordering::Relaxed), 0);
        // Clearing a bit (other than by writing 0) is refused.
        w(&t, regs::STATUS, status::ACKNOWLEDGE);
        assert_eq!(r(&t, regs::STATUS), status::ACKNOWLEDGE | status::DRIVER);
        // The driver can't set NEEDS_RESET.
        w(
            &t,
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DEVICE_NEEDS_RESET,
        );
        assert_eq!(r(&t, regs::STATUS), status::ACKNOWLEDGE | status::DRIVER);
        assert!(negotiate(&t, VIRTIO_F_VERSION_1));
        assert!(setup_queue(&t, 0, 8));
        w(&t, regs::STATUS, ALL_OK);
        assert_eq!(r(&t, regs::STATUS), ALL_OK);
        assert!(t.is_active());
        assert_eq!(seen.activations.load(Ordering::Relaxed), 1);
        assert_eq!(seen.ready_queues.load(Ordering::Relaxed), 1);
        // FAILED may be added.
        w(&t, regs::QUEUE_SEL, 1);
        w(&t, regs::STATUS, ALL_OK | status::FAILED);
        assert_eq!(r(&t, regs::STATUS), ALL_OK | status::FAILED);
        // Reset: device reset, registers back to power-on.
        w(&t, regs::STATUS, 0);
        assert_eq!(r(&t, regs::STATUS), 0);
        assert_eq!(seen.resets.load(Ordering::Relaxed), 1);
        assert!(!t.is_active());
        assert_eq!(r(&t, regs::QUEUE_READY), 0);
        assert_eq!(lock(&t.regs).queue_sel, 0);
        assert_eq!(lock(&t.regs).driver_features, 0);
        // And it can be brought up again.
        assert!(negotiate(&t, VIRTIO_F_VERSION_1));
        w(&t, regs::STATUS, ALL_OK);
        assert_eq!(seen.activations.load(Ordering::Relaxed), 2);
        assert_eq!(seen.ready_queues.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn queue_setup_rejects_bad_values() {
        let (t, _, _) = fake();
        // Before FEATURES_OK queue registers are ignored.
        assert!(!setup_queue(&t, 0, 8));
        assert!(negotiate(&t, VIRTIO_F_VERSION_1));
        for size in [0, 3, 12, u32::from(QS) * 2, 0x1_0010] {
            assert!(!setup_queue(&t, 0, size), "size {size}");
        }
        // A rejected size isn't silently replaced by the old one.
        w(&t, regs::QUEUE_NUM, 8);
        w(&t, regs::QUEUE_NUM, 5);
        w(&t, regs::QUEUE_READY, 1);
        assert_eq!(r(&t, regs::QUEUE_READY), 0);
        // Rings outside guest memory or misaligned.
        let bad: [(u64, u64, u64); 5] = [
            (MEM_SIZE, AVAIL, USED),
            (DESC, MEM_SIZE - 2, USED),
            (DESC, AVAIL, MEM_SIZE - 8),
            (DESC + 8, AVAIL, USED),
            (DESC, AVAIL, USED + 2),
        ];
        for (d, a, u) in bad {
            w(&t, regs::QUEUE_SEL, 0);
            w(&t, regs::QUEUE_NUM, 8);
            for (lo, v) in [
                (regs::QUEUE_DESC_LOW, d),
                (regs::QUEUE_DRIVER_LOW, a),
                (regs::QUEUE_DEVICE_LOW, u),
            ] {
                w(&t, lo, v as u32);
                w(&t, lo + 4, (v >> 32) as u32);
            }
            w(&t, regs::QUEUE_READY, 1);
            assert_eq!(
                r(&t, regs::QUEUE_READY),
                0,
                "desc {d:#x} avail {a:#x} used {u:#x}"
            );
        }
        // 64-bit addresses far beyond memory.
        w(&t, regs::QUEUE_DESC_HIGH, 0xffff_ffff);
        w(&t, regs::QUEUE_READY, 1);
        assert_eq!(r(&t, regs::QUEUE_READY), 0);
        // A missing queue.
        assert!(!setup_queue(&t, 7, 8));
        // A good one; then it is frozen.
        assert!(setup_queue(&t, 0, 8));
        w(&t, regs::QUEUE_NUM, 4);
        assert_eq!(lock(&t.regs).queues[0].size, 8);
        w(&t, regs::QUEUE_READY, 0);
        assert_eq!(r(&t, regs::QUEUE_READY), 0);
        assert!(setup_queue(&t, 0, 8));
        w(&t, regs::STATUS, ALL_OK);
        // After DRIVER_OK queue registers are frozen, ready included.
        w(&t, regs::QUEUE_READY, 0);
        assert_eq!(r(&t, regs::QUEUE_READY), 1);
    }

    #[test]
    fn notify_before_driver_ok_is_ignored() {
        let (t, seen, _) = fake();
        w(&t, regs::QUEUE_NOTIFY, 0);
        assert_eq!(t.notify_queue(0).unwrap(), QueueOutcome::Done);
        assert!(negotiate(&t, VIRTIO_F_VERSION_1));
        assert!(setup_queue(&t, 0, 8));
        w(&t, regs::QUEUE_NOTIFY, 0);
        assert_eq!(seen.processed.load(Ordering::Relaxed), 0);
        w(&t, regs::STATUS, ALL_OK);
        w(&t, regs::QUEUE_NOTIFY, 0);
        w(&t, regs::QUEUE_NOTIFY, 1);
        assert_eq!(seen.processed.load(Ordering::Relaxed), 2);
        // Queues that don't exist.
        w(&t, regs::QUEUE_NOTIFY, 2);
        w(&t, regs::QUEUE_NOTIFY, u32::MAX);
        assert_eq!(t.notify_queue(9).unwrap(), QueueOutcome::Done);
        assert_eq!(seen.processed.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn device_error_sets_needs_reset() {
        let (t, seen, line) = fake();
        assert!(negotiate(&t, VIRTIO_F_VERSION_1));
        w(&t, regs::STATUS, ALL_OK);
        let gen = r(&t, regs::CONFIG_GENERATION);
        seen.fail_process.store(true, Ordering::Relaxed);
        assert!(t.notify_queue(0).is_err());
        assert_eq!(r(&t, regs::STATUS), ALL_OK | status::DEVICE_NEEDS_RESET);
        assert_eq!(r(&t, regs::INTERRUPT_STATUS), INT_CONFIG);
        assert_eq!(line.take_count(), 1);
        assert_ne!(r(&t, regs::CONFIG_GENERATION), gen);
        // A broken device isn't driven further.
        w(&t, regs::QUEUE_NOTIFY, 0);
        assert_eq!(seen.processed.load(Ordering::Relaxed), 1);
        w(&t, regs::INTERRUPT_ACK, INT_CONFIG);
        assert_eq!(r(&t, regs::INTERRUPT_STATUS), 0);
        w(&t, regs::STATUS, 0);
        assert_eq!(r(&t, regs::STATUS), 0);
        // Activation failure also asks for a reset.
        seen.fail_activate.store(true, Ordering::Relaxed);
        assert!(negotiate(&t, VIRTIO_F_VERSION_1));
        w(&t, regs::STATUS, ALL_OK);
        assert_ne!(r(&t, regs::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert!(!t.is_active());
    }

    #[test]
    fn config_space_goes_to_the_device() {
        let (t, seen, _) = fake();
        let mut b = [0u8; 4];
        t.mmio_read(BASE, CONFIG_OFFSET + 2, &mut b);
        assert_eq!(b, [3, 4, 5, 6]);
        let mut b8 = [0u8; 8];
        t.mmio_read(BASE, CONFIG_OFFSET, &mut b8);
        assert_eq!(b8, [1, 2, 3, 4, 5, 6, 7, 8]);
        let mut b1 = [0xffu8; 1];
        t.mmio_read(BASE, MMIO_SIZE - 1, &mut b1);
        assert_eq!(b1, [0]);
        t.mmio_write(BASE, CONFIG_OFFSET + 5, &[9, 9]);
        assert_eq!(*seen.config_writes.lock().unwrap(), vec![(5, vec![9, 9])]);
    }

    /// The whole path with a real device: driver init, a request, the interrupt.
    #[test]
    fn rng_end_to_end() {
        let line = Arc::new(EventFdLine::new().unwrap());
        let m = mem();
        let t = MmioTransport::new(m.clone(), Rng::new(QS, None).unwrap(), line.clone());
        assert_eq!(r(&t, regs::DEVICE_ID), 4);
        assert!(negotiate(
            &t,
            VIRTIO_F_VERSION_1 | crate::VIRTIO_RING_F_EVENT_IDX
        ));
        assert!(setup_queue(&t, 0, u32::from(QS)));
        w(&t, regs::STATUS, ALL_OK);
        let mut drv = Driver::default();
        drv.add(&m, &[(DATA, 32, true)]);
        // used_event = 0: interrupt after the first used entry.
        w(&t, regs::QUEUE_NOTIFY, 0);
        assert_eq!(Driver::used_idx(&m), 1);
        assert_eq!(Driver::used(&m, 0).1, 32);
        assert_eq!(r(&t, regs::INTERRUPT_STATUS), INT_VRING);
        assert_eq!(line.take_count(), 1);
        w(&t, regs::INTERRUPT_ACK, INT_VRING);
        assert_eq!(r(&t, regs::INTERRUPT_STATUS), 0);
        // The event-loop path does the same.
        drv.add(&m, &[(DATA, 8, true)]);
        m.write_obj(1u16, vm_memory::GuestAddress(AVAIL + 4 + 2 * u64::from(QS)))
            .unwrap();
        assert_eq!(t.notify_queue(0).unwrap(), QueueOutcome::Done);
        assert_eq!(Driver::used_idx(&m), 2);
        assert_eq!(line.take_count(), 1);
        // Reset drops the queues: a later notify is ignored.
        w(&t, regs::STATUS, 0);
        drv.add(&m, &[(DATA, 8, true)]);
        assert_eq!(t.notify_queue(0).unwrap(), QueueOutcome::Done);
        assert_eq!(Driver::used_idx(&m), 2);
    }

    #[test]
    fn rng_state_moves_to_a_fresh_transport() {
        let line = Arc::new(EventFdLine::new().unwrap());
        let m = mem();
        let t = MmioTransport::new(m.clone(), Rng::new(QS, None).unwrap(), line.clone());
        assert!(negotiate(&t, VIRTIO_F_VERSION_1));
        assert!(setup_queue(&t, 0, u32::from(QS)));
        w(&t, regs::STATUS, ALL_OK);
        let mut drv = Driver::default();
        drv.add(&m, &[(DATA, 16, true)]);
        assert_eq!(t.notify_queue(0).unwrap(), QueueOutcome::Done);
        assert_eq!(Driver::used_idx(&m), 1);
        let state = t.save_state().unwrap();
        assert!(state.active);
        assert_eq!(state.device.queues[0].next_used, 1);
        assert_eq!(state.interrupt_status, INT_VRING);
        // Through serde, as a snapshot carries it.
        let bytes = postcard::to_stdvec(&state).unwrap();
        let state: TransportState = postcard::from_bytes(&bytes).unwrap();

        let line2 = Arc::new(EventFdLine::new().unwrap());
        let t2 = MmioTransport::new(m.clone(), Rng::new(QS, None).unwrap(), line2.clone());
        let kicked = Arc::new(AtomicUsize::new(0));
        let k = kicked.clone();
        t2.set_activate_hook(Box::new(move || {
            k.fetch_add(1, Ordering::Relaxed);
        }));
        t2.restore_state(&state).unwrap();
        assert!(t2.is_active());
        assert_eq!(kicked.load(Ordering::Relaxed), 1);
        assert_eq!(r(&t2, regs::STATUS), ALL_OK);
        assert_eq!(r(&t2, regs::INTERRUPT_STATUS), INT_VRING);
        assert_eq!(line2.take_count(), 0, "restoring raises no interrupt");
        // The next request lands in the next used slot, without a new handshake.
        drv.add(&m, &[(DATA, 8, true)]);
        assert_eq!(t2.notify_queue(0).unwrap(), QueueOutcome::Done);
        assert_eq!(Driver::used_idx(&m), 2);
        assert_eq!(Driver::used(&m, 1).1, 8);
        assert_eq!(t2.save_state().unwrap().device.queues[0].next_avail, 2);
    }

    #[test]
    fn state_that_does_not_fit_is_refused_untouched() {
        let (t, seen, _) = fake();
        let e = t.save_state().unwrap_err();
        assert!(e.to_string().contains("can't be saved"), "{e}");
        let line = Arc::new(EventFdLine::new().unwrap());
        let m = mem();
        let rng = MmioTransport::new(m.clone(), Rng::new(QS, None).unwrap(), line.clone());
        let mut state = rng.save_state().unwrap();
        assert!(!state.active);
        state.device_type = 2;
        let e = rng.restore_state(&state).unwrap_err();
        assert!(e.to_string().contains("virtio-blk"), "{e}");
        state.device_type = 4;
        state.active = true;
        state.status = ALL_OK;
        state.queues[0].ready = true;
        state.queues[0].desc = u64::MAX - 15;
        state.device.queues = vec![QueuePosition {
            next_avail: 0,
            next_used: 0,
        }];
        let e = rng.restore_state(&state).unwrap_err();
        assert!(e.to_string().contains("not valid"), "{e}");
        assert!(!rng.is_active());
        assert_eq!(r(&rng, regs::STATUS), 0);
        assert_eq!(seen.activations.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn bus_registration() {
        let (t, _, _) = fake();
        let mut bus = kiln_bus::MmioBus::new();
        bus.insert(BASE, MMIO_SIZE, Arc::new(t)).unwrap();
        let mut b = [0u8; 4];
        bus.read(BASE, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), MMIO_MAGIC_VALUE);
    }
}
