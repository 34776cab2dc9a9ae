//! Virtio device models for Kiln: the transport-independent [`VirtioDevice`] trait, the
//! virtio-mmio (version 2) transport [`MmioTransport`], and the [`Block`], [`Rng`] and
//! [`Balloon`] devices.
//!
//! Everything here is KVM-free: devices see guest memory through vm-memory's
//! [`GuestMemory`] trait, raise interrupts through [`VirtioInterrupt`] (the MMIO transport
//! maps it onto a `kiln_irq::InterruptLine`) and are driven by whoever sees a queue
//! notification: the vCPU thread on a `QueueNotify` MMIO write, or an event loop reading an
//! ioeventfd (see [`MmioTransport::notify_queue`]).
#![warn(missing_docs)]
#![doc = include_str!("../README.md")]

pub mod balloon;
pub mod block;
pub mod event_loop;
pub mod mmio;
pub mod net;
mod queue;
pub mod rng;
pub mod vsock;

use std::io;
use std::sync::Arc;
use std::time::Duration;

pub use balloon::{Balloon, BalloonConfig, BalloonStats};
pub use block::{Block, BlockConfig};
pub use event_loop::{EventLoop, EventLoopHandle, QueueHandler};
pub use mmio::MmioTransport;
pub use net::{Net, NetConfig, Tap};
pub use rng::Rng;
pub use virtio_queue::Queue;
pub use vm_memory::GuestMemory;
pub use vsock::{Vsock, VsockConfig};

/// `VIRTIO_F_VERSION_1`: the device is a virtio 1.x ("modern") device. Every device here
/// offers it and the transport refuses drivers that don't accept it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_INDIRECT_DESC`: the driver may use indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_RING_F_EVENT_IDX`: interrupt/notification suppression through ring event indices.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Virtio device ID of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// Virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Virtio device ID of an entropy source.
pub const VIRTIO_ID_RNG: u32 = 4;

/// Errors of the virtio devices and transport.
///
/// Errors of a running device (a broken queue, an interrupt that can't be raised) put the
/// device in `DEVICE_NEEDS_RESET`; they never panic the VMM. I/O errors of a single request
/// are reported to the guest in the request's status, not here.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A queue index the device doesn't have.
    #[error("{device}: no queue {index} (the device has {count})")]
    QueueIndex {
        /// The device ("virtio-blk", ...).
        device: &'static str,
        /// The index asked for.
        index: usize,
        /// Queues the device has.
        count: usize,
    },
    /// The device was asked to process a queue before it was activated.
    #[error("{device}: not activated")]
    NotActivated {
        /// The device.
        device: &'static str,
    },
    /// `activate` got the wrong number of queues.
    #[error("{device}: activated with {got} queues, expected {expected}")]
    QueueCount {
        /// The device.
        device: &'static str,
        /// Queues the device has.
        expected: usize,
        /// Queues passed.
        got: usize,
    },
    /// The guest broke a queue (bad available index, used ring not writable, ...).
    #[error("{device}: queue {queue}: {source}")]
    Queue {
        /// The device.
        device: &'static str,
        /// The queue index.
        queue: usize,
        /// What virtio-queue reported.
        #[source]
        source: virtio_queue::Error,
    },
    /// Raising an interrupt failed.
    #[error("{device}: raising the {what} interrupt: {source}")]
    Interrupt {
        /// The device.
        device: &'static str,
        /// "used buffer" or "config change".
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The disk image could not be sized or opened.
    #[error("virtio-blk: disk image: {0}")]
    Disk(#[source] io::Error),
    /// The block device's id string is longer than 20 bytes.
    #[error("virtio-blk: id string is {0} bytes, the limit is 20")]
    IdTooLong(usize),
    /// `getrandom` failed.
    #[error("virtio-rng: getrandom: {0}")]
    Entropy(#[source] io::Error),
    /// The device can't be saved in a snapshot (yet): the VM refuses to snapshot.
    #[error("{device}: this device can't be saved in a snapshot yet")]
    NotSnapshottable {
        /// The device ("virtio-net", or the virtio device ID).
        device: String,
    },
    /// A saved device state doesn't fit this device (another device type, queue count or
    /// a state that doesn't decode).
    #[error("{device}: saved state doesn't fit: {why}")]
    BadState {
        /// The device.
        device: String,
        /// What is wrong.
        why: String,
    },
    /// A tap interface could not be opened or configured.
    #[error("virtio-net: tap {name}: {what}: {source}")]
    Tap {
        /// The interface name.
        name: String,
        /// The step that failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The vsock device's host Unix socket could not be set up.
    #[error("virtio-vsock: {what} {}: {source}", path.display())]
    VsockBackend {
        /// What was being done ("binding", ...).
        what: &'static str,
        /// The listener path.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The backend refused the offloads the driver negotiated.
    #[error("virtio-net: setting the backend offloads: {0}")]
    NetOffload(#[source] io::Error),
    /// An MTU outside 68..=65517.
    #[error("virtio-net: MTU {0} is outside 68..=65517")]
    Mtu(u16),
    /// A guest CID that is reserved or too large.
    #[error("virtio-vsock: guest CID {0} is reserved or out of range (3 to 4294967294)")]
    VsockCid(u64),
    /// A queue size that isn't a power of two in 1..=32768.
    #[error("{device}: invalid queue size {size} (a power of two up to 32768)")]
    QueueSize {
        /// The device.
        device: &'static str,
        /// The size given.
        size: u16,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Which interrupt a device raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// Buffers were added to the used ring of this queue.
    Queue(u16),
    /// The configuration space changed (or the device needs a reset).
    Config,
}

/// How a device signals the driver; implemented by each transport (MMIO: one line plus the
/// `InterruptStatus` register; PCI later: one MSI-X vector per queue).
pub trait VirtioInterrupt: Send + Sync {
    /// Raises `kind`. Must be cheap and must not block.
    fn trigger(&self, kind: InterruptKind) -> io::Result<()>;
}

/// What [`VirtioDevice::process_queue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueOutcome {
    /// The available ring is empty (notifications are re-enabled).
    Done,
    /// The per-call budget ran out with requests left: call `process_queue` again soon
    /// (notifications stay disabled meanwhile, so the driver won't kick).
    Pending,
    /// The rate limiter refused the next request: call `process_queue` again after this long
    /// (arm a timerfd); notifications stay disabled meanwhile.
    Throttled(Duration),
}

/// A virtio device, independent of the transport that exposes it.
///
/// The transport calls, in order: [`device_type`](Self::device_type),
/// [`queue_max_sizes`](Self::queue_max_sizes) and [`device_features`](Self::device_features)
/// (cached at construction), [`read_config`](Self::read_config) /
/// [`write_config`](Self::write_config) at any time, [`ack_features`](Self::ack_features)
/// when the driver sets `FEATURES_OK`, [`activate`](Self::activate) on `DRIVER_OK`,
/// [`process_queue`](Self::process_queue) on each notification once active, and
/// [`reset`](Self::reset) when the driver writes 0 to the status register.
pub trait VirtioDevice<M: GuestMemory>: Send {
    /// The virtio device ID ([`VIRTIO_ID_BLOCK`], ...).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue (powers of two); the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered (including [`VIRTIO_F_VERSION_1`]).
    fn device_features(&self) -> u64;
    /// The features the driver accepted (a subset of `device_features`, checked by the
    /// transport).
    fn ack_features(&mut self, features: u64);
    /// Reads `data.len()` bytes of the device configuration space at `offset`. Bytes past the
    /// end of the configuration space read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (most fields are read-only: ignore those).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the queues the driver configured (one per entry of
    /// `queue_max_sizes`, in order; a queue the driver didn't enable has `ready() == false`).
    fn activate(
        &mut self,
        mem: M,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<()>;
    /// Stops the device and drops its queues and memory; it may be activated again.
    fn reset(&mut self);
    /// Processes the available requests of queue `index` (a notification arrived, or a retry
    /// timer fired).
    fn process_queue(&mut self, index: usize) -> Result<QueueOutcome>;

    /// The device's state for a snapshot (see [`DeviceState`]); called only while nothing
    /// processes its queues (the VM and its event loop are paused). The default refuses: a
    /// device that doesn't implement this makes the VM refuse to snapshot, naming it.
    fn save_state(&self) -> Result<DeviceState> {
        Err(Error::NotSnapshottable {
            device: device_name(self.device_type()),
        })
    }

    /// Takes back the device-specific part of a [`save_state`](Self::save_state), called
    /// by the transport on a restored device after [`ack_features`](Self::ack_features) and
    /// [`activate`](Self::activate) (queue positions are already in the queues).
    fn restore_state(&mut self, data: &[u8]) -> Result<()> {
        let _ = data;
        Err(Error::NotSnapshottable {
            device: device_name(self.device_type()),
        })
    }

    /// Host-side event sources of the device (a tap, the epoll fd of a vsock backend), each
    /// with a token of the device's choosing. Called once, when the VMM wires the device to
    /// its event loop; the fds must stay open for as long as the device exists.
    ///
    /// They are polled **edge-triggered** for input: when one fires,
    /// [`process_backend`](Self::process_backend) runs with its token and must take in what it
    /// can (until `EAGAIN`, or until the guest has no buffer left). Input it had to leave
    /// behind for lack of guest buffers gets no new wake-up: the device picks it up again in
    /// [`process_queue`](Self::process_queue) when the driver makes buffers available. That
    /// is the back-pressure: no busy loop, no queue in the VMM.
    fn backend_fds(&self) -> Vec<(u32, std::os::fd::RawFd)> {
        Vec::new()
    }

    /// Handles readiness of the backend source `token` (see [`backend_fds`](Self::backend_fds)).
    /// The outcomes mean what they mean for [`process_queue`](Self::process_queue).
    fn process_backend(&mut self, token: u32) -> Result<QueueOutcome> {
        let _ = token;
        Ok(QueueOutcome::Done)
    }
}

/// Where a device is in one of its queues (what `virtio_queue::QueueState` adds to the
/// transport's registers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueuePosition {
    /// The next available-ring entry the device will read.
    pub next_avail: u16,
    /// The next used-ring entry the device will write.
    pub next_used: u16,
}

/// A device's own part of a snapshot, beside the transport registers.
///
/// Devices process requests to completion on the event loop thread, so once the event
/// loop is paused no request is in flight: the queue positions and `data` are all there is.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceState {
    /// Each queue's position, in queue order (empty while the device is not active).
    pub queues: Vec<QueuePosition>,
    /// Device-specific state in the device's own encoding (empty for stateless devices).
    pub data: Vec<u8>,
}

/// The name of a virtio device type, for messages.
pub fn device_name(device_type: u32) -> String {
    match device_type {
        1 => "virtio-net".into(),
        VIRTIO_ID_BLOCK => "virtio-blk".into(),
        VIRTIO_ID_RNG => "virtio-rng".into(),
        5 => "virtio-balloon".into(),
        19 => "virtio-vsock".into(),
        n => format!("virtio device type {n}"),
    }
}

fn positions<'a>(queues: impl IntoIterator<Item = &'a Queue>) -> Vec<QueuePosition> {
    use virtio_queue::QueueT;
    queues
        .into_iter()
        .map(|q| QueuePosition {
            next_avail: q.next_avail(),
            next_used: q.next_used(),
        })
        .collect()
}

/// Checks a queue size given at device construction.
fn check_queue_size(device: &'static str, size: u16) -> Result<()> {
    if size == 0 || !size.is_power_of_two() || size > 32768 {
        return Err(Error::QueueSize { device, size });
    }
    Ok(())
}

/// Copies `data.len()` bytes of a configuration space image at `offset` (zeros past its end).
fn read_config_bytes(space: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| space.get(o))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod test_util;
