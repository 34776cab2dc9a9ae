//! The virtio-mmio v2 register interface (virtio 1.x, 4.2.2) and the driver's side of the
//! status handshake (3.1.1).

use super::ring::{QueueMem, SplitQueue};
use super::Platform;
use crate::line::{Describe, LineBuf};

/// Register offsets.
pub mod regs {
    /// "virt".
    pub const MAGIC_VALUE: u64 = 0x000;
    /// 2 for virtio 1.x devices (1: legacy).
    pub const VERSION: u64 = 0x004;
    /// Device type (0: placeholder, no device).
    pub const DEVICE_ID: u64 = 0x008;
    /// Device features, 32 bits selected by `DEVICE_FEATURES_SEL`.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Device features word selector.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// Driver features, 32 bits selected by `DRIVER_FEATURES_SEL`.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Driver features word selector.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Queue selector.
    pub const QUEUE_SEL: u64 = 0x030;
    /// Largest size of the selected queue (0: no such queue).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size of the selected queue.
    pub const QUEUE_NUM: u64 = 0x038;
    /// The selected queue is ready.
    pub const QUEUE_READY: u64 = 0x044;
    /// Queue notifier.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Interrupt status (bit 0 used buffer, bit 1 configuration change).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Interrupt acknowledge.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status.
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low 32 bits (high at +4).
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Available ring address, low 32 bits (high at +4).
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// Used ring address, low 32 bits (high at +4).
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// Configuration generation.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Device configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest can drive it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation done.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up.
    pub const FAILED: u32 = 0x80;
}

/// `MagicValue`: "virt" little-endian.
pub const MAGIC: u32 = 0x7472_6976;
/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_F_RING_INDIRECT_DESC.
pub const F_INDIRECT_DESC: u64 = 1 << 28;
/// Device type: block.
pub const ID_BLOCK: u32 = 2;
/// Device type: entropy source.
pub const ID_RNG: u32 = 4;

/// Why a device could not be brought up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitError {
    /// `MagicValue` is not "virt".
    BadMagic(u32),
    /// `Version` is not 2 (1 is a legacy device, which this driver does not drive).
    BadVersion(u32),
    /// Writing 0 to `Status` did not read back 0.
    ResetStuck(u32),
    /// The device does not offer VIRTIO_F_VERSION_1 (features, high word).
    NoVersion1(u32),
    /// `FEATURES_OK` did not stick (status read back).
    FeaturesRefused(u32),
    /// `QueueNumMax` is 0 for the queue (index).
    NoQueue(u32),
    /// The queue was already ready before setup (index).
    QueueAlreadyReady(u32),
    /// `QueueReady` read 0 after writing 1 (index).
    QueueRefused(u32),
    /// After `DRIVER_OK` the status was this.
    DriverOkRefused(u32),
}

impl Describe for InitError {
    fn describe(&self, out: &mut LineBuf) {
        let (what, v) = match *self {
            InitError::BadMagic(v) => ("bad MagicValue ", v),
            InitError::BadVersion(v) => ("Version is not 2 (legacy devices unsupported): ", v),
            InitError::ResetStuck(v) => ("Status did not read 0 after reset: ", v),
            InitError::NoVersion1(v) => ("no VIRTIO_F_VERSION_1, device features[63:32]=", v),
            InitError::FeaturesRefused(v) => ("FEATURES_OK refused, status ", v),
            InitError::NoQueue(v) => ("QueueNumMax is 0 for queue ", v),
            InitError::QueueAlreadyReady(v) => ("QueueReady already set before setup, queue ", v),
            InitError::QueueRefused(v) => ("QueueReady reads 0 after writing 1, queue ", v),
            InitError::DriverOkRefused(v) => ("DRIVER_OK refused, status ", v),
        };
        out.push_str(what);
        out.push_hex(u64::from(v));
    }
}

/// One device's registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transport {
    /// Window base.
    pub base: u64,
}

impl Transport {
    /// The device at `base`.
    pub const fn new(base: u64) -> Self {
        Transport { base }
    }

    /// Reads a register.
    pub fn read<P: Platform>(&self, p: &P, off: u64) -> u32 {
        p.reg_read(self.base + off)
    }

    /// Writes a register.
    pub fn write<P: Platform>(&self, p: &P, off: u64, v: u32) {
        p.reg_write(self.base + off, v)
    }

    /// Checks magic and version; returns the device ID (0 for an empty slot).
    pub fn identify<P: Platform>(&self, p: &P) -> Result<u32, InitError> {
        let magic = self.read(p, regs::MAGIC_VALUE);
        if magic != MAGIC {
            return Err(InitError::BadMagic(magic));
        }
        let version = self.read(p, regs::VERSION);
        if version != 2 {
            return Err(InitError::BadVersion(version));
        }
        Ok(self.read(p, regs::DEVICE_ID))
    }

    /// The device status.
    pub fn status<P: Platform>(&self, p: &P) -> u32 {
        self.read(p, regs::STATUS)
    }

    /// Writes the device status.
    pub fn set_status<P: Platform>(&self, p: &P, v: u32) {
        self.write(p, regs::STATUS, v)
    }

    /// Resets the device (writes 0 to `Status`) and checks it reads back 0.
    pub fn reset<P: Platform>(&self, p: &P) -> Result<(), InitError> {
        self.set_status(p, 0);
        match self.status(p) {
            0 => Ok(()),
            s => Err(InitError::ResetStuck(s)),
        }
    }

    /// All 64 feature bits the device offers.
    pub fn device_features<P: Platform>(&self, p: &P) -> u64 {
        self.write(p, regs::DEVICE_FEATURES_SEL, 0);
        let lo = self.read(p, regs::DEVICE_FEATURES);
        self.write(p, regs::DEVICE_FEATURES_SEL, 1);
        let hi = self.read(p, regs::DEVICE_FEATURES);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, then writes exactly `features` and sets FEATURES_OK.
    /// Returns whether FEATURES_OK stuck.
    pub fn offer_features<P: Platform>(&self, p: &P, features: u64) -> Result<bool, InitError> {
        self.reset(p)?;
        self.set_status(p, status::ACKNOWLEDGE);
        self.set_status(p, status::ACKNOWLEDGE | status::DRIVER);
        self.write(p, regs::DRIVER_FEATURES_SEL, 0);
        self.write(p, regs::DRIVER_FEATURES, features as u32);
        self.write(p, regs::DRIVER_FEATURES_SEL, 1);
        self.write(p, regs::DRIVER_FEATURES, (features >> 32) as u32);
        self.set_status(
            p,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        Ok(self.status(p) & status::FEATURES_OK != 0)
    }

    /// The first half of initialisation: reset, ACKNOWLEDGE, DRIVER, and feature
    /// negotiation accepting VIRTIO_F_VERSION_1 plus whatever of `wanted` the device offers.
    /// Returns the accepted features.
    pub fn negotiate<P: Platform>(&self, p: &P, wanted: u64) -> Result<u64, InitError> {
        self.reset(p)?;
        let offered = self.device_features(p);
        if offered & F_VERSION_1 == 0 {
            return Err(InitError::NoVersion1((offered >> 32) as u32));
        }
        let features = offered & (wanted | F_VERSION_1);
        if self.offer_features(p, features)? {
            Ok(features)
        } else {
            Err(InitError::FeaturesRefused(self.status(p)))
        }
    }

    /// `QueueNumMax` of queue `index`.
    pub fn queue_max<P: Platform>(&self, p: &P, index: u32) -> u32 {
        self.write(p, regs::QUEUE_SEL, index);
        self.read(p, regs::QUEUE_NUM_MAX)
    }

    /// Writes queue `index`'s size and ring addresses and sets it ready; returns whether
    /// `QueueReady` reads back 1. Checks nothing else (hostile tests use it).
    pub fn try_setup_queue<P: Platform>(&self, p: &P, index: u32, q: &QueueMem, num: u32) -> bool {
        self.write(p, regs::QUEUE_SEL, index);
        self.write(p, regs::QUEUE_NUM, num);
        for (reg, addr) in [
            (regs::QUEUE_DESC_LOW, q.desc),
            (regs::QUEUE_DRIVER_LOW, q.avail),
            (regs::QUEUE_DEVICE_LOW, q.used),
        ] {
            self.write(p, reg, addr as u32);
            self.write(p, reg + 4, (addr >> 32) as u32);
        }
        self.write(p, regs::QUEUE_READY, 1);
        self.read(p, regs::QUEUE_READY) == 1
    }

    /// Sets up queue `index` at `area` with the largest power-of-two size up to `want` the
    /// device allows, and zeroed rings; returns the driver's side of it.
    pub fn setup_queue<P: Platform>(
        &self,
        p: &P,
        index: u32,
        area: u64,
        want: u16,
    ) -> Result<SplitQueue, InitError> {
        let max = self.queue_max(p, index);
        if max == 0 {
            return Err(InitError::NoQueue(index));
        }
        if self.read(p, regs::QUEUE_READY) != 0 {
            return Err(InitError::QueueAlreadyReady(index));
        }
        let limit = max.min(u32::from(want.max(1)));
        // Largest power of two <= limit.
        let size = 1u32 << (31 - limit.leading_zeros());
        let q = SplitQueue::new(p, QueueMem::at(area, size as u16));
        if self.try_setup_queue(p, index, &q.mem, size) {
            Ok(q)
        } else {
            Err(InitError::QueueRefused(index))
        }
    }

    /// Sets DRIVER_OK and checks the device took it without asking for a reset.
    pub fn driver_ok<P: Platform>(&self, p: &P) -> Result<(), InitError> {
        let s = self.status(p);
        self.set_status(p, s | status::DRIVER_OK);
        let s = self.status(p);
        if s & status::DRIVER_OK == 0 || s & status::DEVICE_NEEDS_RESET != 0 {
            return Err(InitError::DriverOkRefused(s));
        }
        Ok(())
    }

    /// The whole initialisation of a one-queue device: negotiate, queue 0 at `area` (up to
    /// `want` entries), DRIVER_OK. Returns the accepted features and the queue.
    pub fn init<P: Platform>(
        &self,
        p: &P,
        wanted: u64,
        area: u64,
        want: u16,
    ) -> Result<(u64, SplitQueue), InitError> {
        let features = self.negotiate(p, wanted)?;
        let q = self.setup_queue(p, 0, area, want)?;
        self.driver_ok(p)?;
        Ok((features, q))
    }

    /// Notifies queue `index`.
    pub fn notify<P: Platform>(&self, p: &P, index: u32) {
        self.write(p, regs::QUEUE_NOTIFY, index)
    }

    /// A 32-bit configuration field.
    pub fn config32<P: Platform>(&self, p: &P, off: u64) -> u32 {
        self.read(p, regs::CONFIG + off)
    }

    /// A 64-bit configuration field, read as two 32-bit halves until the configuration
    /// generation is stable (virtio 1.x, 2.5.1).
    pub fn config64<P: Platform>(&self, p: &P, off: u64) -> u64 {
        for _ in 0..16 {
            let g = self.read(p, regs::CONFIG_GENERATION);
            let lo = self.config32(p, off);
            let hi = self.config32(p, off + 4);
            if self.read(p, regs::CONFIG_GENERATION) == g {
                return u64::from(lo) | (u64::from(hi) << 32);
            }
        }
        u64::MAX
    }
}
