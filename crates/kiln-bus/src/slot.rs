//! What a bus stores for each range, and how a vCPU's [`DispatchCache`](crate::DispatchCache)
//! holds it.
//!
//! A bus is generic over its device type. The default, `Arc<dyn PioDevice>`, takes any
//! device and calls it through a function pointer. A VMM that knows its device types can
//! instead put an enum of them on the bus and implement [`PioSlot`] for it: the cache then
//! holds a copyable borrow of the enum (an enum of references) and an exit reaches its device
//! through a `match`, whose arms inline the device's code — no dynamic call, which after a
//! world switch is a branch the predictor has usually forgotten. Firecracker's `BusDevice`
//! enum is the same idea.

use std::sync::Arc;

use crate::cache::{RawMmio, RawPio};
use crate::{MmioAddress, MmioDevice, PioAddress, PioDevice};

/// What a [`PioBus`](crate::PioBus) holds for a range: a device, or an enum of the VMM's
/// device types.
///
/// [`Ref`](Self::Ref) is a cheap copyable borrow of it (an enum of references, say), which a
/// vCPU's [`DispatchCache`](crate::DispatchCache) keeps for the range it hit last;
/// [`read`](Self::read) and [`write`](Self::write) dispatch an access through it.
///
/// `Arc<T>` for any [`PioDevice`] `T` (including `dyn PioDevice`, the bus's default) is a
/// slot already. An enum of device types, for static dispatch:
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU8, Ordering};
/// use kiln_bus::{PioAddress, PioBus, PioDevice, PioSlot};
///
/// #[derive(Default)]
/// struct Latch(AtomicU8);
/// impl PioDevice for Latch {
///     fn pio_read(&self, _: PioAddress, _: u16, data: &mut [u8]) {
///         data.fill(self.0.load(Ordering::Relaxed));
///     }
///     fn pio_write(&self, _: PioAddress, _: u16, data: &[u8]) {
///         self.0.store(data[0], Ordering::Relaxed);
///     }
/// }
///
/// /// Every device this VMM puts on its PIO bus.
/// enum Dev {
///     Latch(Arc<Latch>),
///     Other(Arc<dyn PioDevice>),
/// }
///
/// #[derive(Clone, Copy)]
/// enum DevRef<'a> {
///     Latch(&'a Latch),
///     Other(&'a dyn PioDevice),
/// }
///
/// impl PioSlot for Dev {
///     type Ref<'a> = DevRef<'a>;
///     fn borrow(&self) -> DevRef<'_> {
///         match self {
///             Dev::Latch(d) => DevRef::Latch(d),
///             Dev::Other(d) => DevRef::Other(&**d),
///         }
///     }
///     fn read(dev: DevRef<'_>, base: PioAddress, offset: u16, data: &mut [u8]) {
///         match dev {
///             DevRef::Latch(d) => d.pio_read(base, offset, data),
///             DevRef::Other(d) => d.pio_read(base, offset, data),
///         }
///     }
///     fn write(dev: DevRef<'_>, base: PioAddress, offset: u16, data: &[u8]) {
///         match dev {
///             DevRef::Latch(d) => d.pio_write(base, offset, data),
///             DevRef::Other(d) => d.pio_write(base, offset, data),
///         }
///     }
/// }
///
/// let mut bus = PioBus::<Dev>::default();
/// bus.insert(PioAddress(0x80), 1, Dev::Latch(Arc::default())).unwrap();
/// bus.write(PioAddress(0x80), &[7]).unwrap();
/// let mut b = [0u8; 1];
/// bus.read(PioAddress(0x80), &mut b).unwrap();
/// assert_eq!(b, [7]);
/// ```
pub trait PioSlot: Send + Sync {
    /// A borrow of the slot's device, cheap to copy.
    type Ref<'a>: Copy
    where
        Self: 'a;
    /// The device, borrowed.
    fn borrow(&self) -> Self::Ref<'_>;
    /// Dispatches a read to `dev` (same contract as [`PioDevice::pio_read`]).
    fn read(dev: Self::Ref<'_>, base: PioAddress, offset: u16, data: &mut [u8]);
    /// Dispatches a write to `dev` (same contract as [`PioDevice::pio_write`]).
    fn write(dev: Self::Ref<'_>, base: PioAddress, offset: u16, data: &[u8]);
}

/// The MMIO counterpart of [`PioSlot`]: what an [`MmioBus`](crate::MmioBus) holds for a
/// range.
pub trait MmioSlot: Send + Sync {
    /// A borrow of the slot's device, cheap to copy.
    type Ref<'a>: Copy
    where
        Self: 'a;
    /// The device, borrowed.
    fn borrow(&self) -> Self::Ref<'_>;
    /// Dispatches a read to `dev` (same contract as [`MmioDevice::mmio_read`]).
    fn read(dev: Self::Ref<'_>, base: MmioAddress, offset: u64, data: &mut [u8]);
    /// Dispatches a write to `dev` (same contract as [`MmioDevice::mmio_write`]).
    fn write(dev: Self::Ref<'_>, base: MmioAddress, offset: u64, data: &[u8]);
}

/// Any shared device. Its borrow is a [`RawPio`]: the data pointer with the concrete type's
/// functions, so a cached dispatch skips the vtable (one dependent load fewer than a
/// `&dyn PioDevice`).
impl<T: PioDevice + ?Sized> PioSlot for Arc<T> {
    type Ref<'a>
        = RawPio<'a>
    where
        Self: 'a;

    #[inline]
    fn borrow(&self) -> RawPio<'_> {
        (**self).as_raw_pio()
    }

    #[inline(always)]
    fn read(dev: RawPio<'_>, base: PioAddress, offset: u16, data: &mut [u8]) {
        dev.pio_read(base, offset, data);
    }

    #[inline(always)]
    fn write(dev: RawPio<'_>, base: PioAddress, offset: u16, data: &[u8]) {
        dev.pio_write(base, offset, data);
    }
}

/// Any shared device (see the [`PioSlot`] impl for `Arc<T>`).
impl<T: MmioDevice + ?Sized> MmioSlot for Arc<T> {
    type Ref<'a>
        = RawMmio<'a>
    where
        Self: 'a;

    #[inline]
    fn borrow(&self) -> RawMmio<'_> {
        (**self).as_raw_mmio()
    }

    #[inline(always)]
    fn read(dev: RawMmio<'_>, base: MmioAddress, offset: u64, data: &mut [u8]) {
        dev.mmio_read(base, offset, data);
    }

    #[inline(always)]
    fn write(dev: RawMmio<'_>, base: MmioAddress, offset: u64, data: &[u8]) {
        dev.mmio_write(base, offset, data);
    }
}
