//! A per-vCPU memo of the last range each bus dispatched to.
//!
//! After a VM exit the vCPU thread comes back from a world switch with cold caches, so what a
//! dispatch costs is mostly the number of dependent cache misses on its way to the device:
//! the handler, the bus, the binary search, the device. A [`DispatchCache`] lives in the
//! vCPU thread's own stack frame and holds the last range hit on each bus with a borrowed
//! device, so a repeated access (a guest polls one device many times in a row) is checked
//! and dispatched without touching the bus at all; the very same access as last time (same
//! address and size: a status register polled, a queue notified) is recognised by two
//! compares, without the range and size checks. It holds its devices as the bus slot's
//! copyable borrow ([`PioSlot::Ref`]): for the default `Arc<dyn PioDevice>` a [`RawPio`],
//! the data pointer with the concrete type's functions, so a hit does not read the device's
//! vtable; for an enum of device types an enum of references, so a hit is a `match` and a
//! static call.

use std::cell::Cell;
use std::marker::PhantomData;
use std::ptr::NonNull;

use std::sync::Arc;

use crate::{MmioAddress, MmioDevice, MmioSlot, PioAddress, PioDevice, PioSlot};

/// A borrowed PIO device without its vtable: the device's address and its two methods,
/// monomorphised for its concrete type. Made only by [`AsRawPio::as_raw_pio`].
#[derive(Clone, Copy)]
pub struct RawPio<'a> {
    data: NonNull<()>,
    read: unsafe fn(NonNull<()>, PioAddress, u16, &mut [u8]),
    write: unsafe fn(NonNull<()>, PioAddress, u16, &[u8]),
    _dev: PhantomData<&'a ()>,
}

impl<'a> RawPio<'a> {
    fn of<T: PioDevice>(dev: &'a T) -> Self {
        /// # Safety
        /// `p` must come from a `&T` that is still alive.
        unsafe fn read<T: PioDevice>(p: NonNull<()>, base: PioAddress, off: u16, d: &mut [u8]) {
            // SAFETY: per this function's contract, `p` is a live `&T`.
            unsafe { p.cast::<T>().as_ref() }.pio_read(base, off, d);
        }
        /// # Safety
        /// `p` must come from a `&T` that is still alive.
        unsafe fn write<T: PioDevice>(p: NonNull<()>, base: PioAddress, off: u16, d: &[u8]) {
            // SAFETY: per this function's contract, `p` is a live `&T`.
            unsafe { p.cast::<T>().as_ref() }.pio_write(base, off, d);
        }
        RawPio {
            data: NonNull::from(dev).cast(),
            read: read::<T>,
            write: write::<T>,
            _dev: PhantomData,
        }
    }

    #[inline(always)]
    pub(crate) fn pio_read(&self, base: PioAddress, offset: u16, data: &mut [u8]) {
        // SAFETY: `data` and `read` were made together by `of::<T>` from a `&'a T`, and
        // `self` cannot outlive `'a`.
        unsafe { (self.read)(self.data, base, offset, data) }
    }

    #[inline(always)]
    pub(crate) fn pio_write(&self, base: PioAddress, offset: u16, data: &[u8]) {
        // SAFETY: as in `pio_read`.
        unsafe { (self.write)(self.data, base, offset, data) }
    }
}

/// A borrowed MMIO device without its vtable (see [`RawPio`]).
#[derive(Clone, Copy)]
pub struct RawMmio<'a> {
    data: NonNull<()>,
    read: unsafe fn(NonNull<()>, MmioAddress, u64, &mut [u8]),
    write: unsafe fn(NonNull<()>, MmioAddress, u64, &[u8]),
    _dev: PhantomData<&'a ()>,
}

impl<'a> RawMmio<'a> {
    fn of<T: MmioDevice>(dev: &'a T) -> Self {
        /// # Safety
        /// `p` must come from a `&T` that is still alive.
        unsafe fn read<T: MmioDevice>(p: NonNull<()>, base: MmioAddress, off: u64, d: &mut [u8]) {
            // SAFETY: per this function's contract, `p` is a live `&T`.
            unsafe { p.cast::<T>().as_ref() }.mmio_read(base, off, d);
        }
        /// # Safety
        /// `p` must come from a `&T` that is still alive.
        unsafe fn write<T: MmioDevice>(p: NonNull<()>, base: MmioAddress, off: u64, d: &[u8]) {
            // SAFETY: per this function's contract, `p` is a live `&T`.
            unsafe { p.cast::<T>().as_ref() }.mmio_write(base, off, d);
        }
        RawMmio {
            data: NonNull::from(dev).cast(),
            read: read::<T>,
            write: write::<T>,
            _dev: PhantomData,
        }
    }

    #[inline(always)]
    pub(crate) fn mmio_read(&self, base: MmioAddress, offset: u64, data: &mut [u8]) {
        // SAFETY: `data` and `read` were made together by `of::<T>` from a `&'a T`, and
        // `self` cannot outlive `'a`.
        unsafe { (self.read)(self.data, base, offset, data) }
    }

    #[inline(always)]
    pub(crate) fn mmio_write(&self, base: MmioAddress, offset: u64, data: &[u8]) {
        // SAFETY: as in `mmio_read`.
        unsafe { (self.write)(self.data, base, offset, data) }
    }
}

/// How the bus gets a [`RawPio`] out of an `Arc<dyn PioDevice>`: a supertrait of
/// [`PioDevice`], implemented for every device type by the blanket impl below (so device
/// authors never see it).
#[doc(hidden)]
pub trait AsRawPio {
    /// This device as a vtable-free handle.
    fn as_raw_pio(&self) -> RawPio<'_>;
}

impl<T: PioDevice> AsRawPio for T {
    fn as_raw_pio(&self) -> RawPio<'_> {
        RawPio::of(self)
    }
}

/// The MMIO counterpart of [`AsRawPio`].
#[doc(hidden)]
pub trait AsRawMmio {
    /// This device as a vtable-free handle.
    fn as_raw_mmio(&self) -> RawMmio<'_>;
}

impl<T: MmioDevice> AsRawMmio for T {
    fn as_raw_mmio(&self) -> RawMmio<'_> {
        RawMmio::of(self)
    }
}

/// One remembered range: `[base, base + span]` and its device, and the last access that hit
/// it, so a guest polling one register (the usual case: a status register, a queue notify)
/// is recognised by two compares.
///
/// Laid out so that a repeated access reads one cache line: the remembered access, the
/// device and the base come first, in one aligned line for a device borrow of up to three
/// words; `span`, read only by a new access in the range, comes last.
#[repr(C, align(64))]
struct Memo<D> {
    /// The last access that hit: address, length ([`NO_ACCESS`]: none since `dev` was set)
    /// and offset in the range. `Cell`s, so dispatching stays `&self`; a cache belongs to
    /// one thread.
    memo_addr: Cell<u64>,
    memo_len: Cell<u64>,
    memo_offset: Cell<u64>,
    dev: Option<D>,
    base: u64,
    /// `last - base`: kept instead of `last` so a range hit is one subtraction and two
    /// compares.
    span: u64,
}

/// `memo_len` of a memo that remembers no access: no slice is this long (a slice holds at
/// most `isize::MAX` bytes), so no access's length equals it.
const NO_ACCESS: u64 = u64::MAX;

// The repeat path's fields of the default device borrow fit one cache line.
const _: () = assert!(std::mem::offset_of!(Memo<RawPio<'static>>, base) + 8 <= 64);

impl<D: Copy> Memo<D> {
    /// Nothing remembered.
    const fn empty() -> Self {
        Memo {
            base: 0,
            span: 0,
            dev: None,
            memo_addr: Cell::new(0),
            memo_len: Cell::new(NO_ACCESS),
            memo_offset: Cell::new(0),
        }
    }

    /// The device and offset if this is the very access that hit last (same address, same
    /// length, which was a valid size then).
    #[inline(always)]
    fn repeat(&self, addr: u64, len: usize) -> Option<(D, u64)> {
        if addr == self.memo_addr.get() && len as u64 == self.memo_len.get() {
            debug_assert!(self.dev.is_some());
            // SAFETY: `memo_len` is set to a real length only by `hit`, after it found `dev`
            // to be `Some`; `dev` changes only by replacing the whole memo (`set`, `clear`),
            // which starts from `empty()`'s `NO_ACCESS`, a length no access has. So an
            // access equal to the remembered one means `dev` is `Some`. (Checking it anyway
            // was one more load and branch on every cached exit.)
            let dev = unsafe { self.dev.unwrap_unchecked() };
            return Some((dev, self.memo_offset.get()));
        }
        None
    }

    /// The device and the access's offset in its range, if the whole access of `len`
    /// bytes at `addr` lies in the remembered range. Same checks as the bus's own lookup.
    /// Remembers the access for [`repeat`](Self::repeat).
    #[inline(always)]
    fn hit(&self, addr: u64, len: usize) -> Option<(D, u64)> {
        let dev = self.dev?;
        // The access's first byte at `offset` and its last at `offset + len - 1` must both be
        // within `span`: `offset <= span - (len - 1)`. Below `base` the offset wraps to a huge
        // value; a range shorter than the access can't hold it. `len` is 1..=8 here (the
        // callers check sizes first) and nothing is added, so nothing overflows even at the
        // top of the address space.
        let offset = addr.wrapping_sub(self.base);
        let room = self.span.checked_sub((len as u64).wrapping_sub(1))?;
        if offset > room {
            return None;
        }
        self.memo_addr.set(addr);
        self.memo_len.set(len as u64);
        self.memo_offset.set(offset);
        Some((dev, offset))
    }

    /// [`repeat`](Self::repeat), else — for an access of a valid size — [`hit`](Self::hit).
    /// The size is checked only on the second path: a repeat's size was valid when it was
    /// remembered (computed up front, the compiler did the check on every exit).
    #[inline(always)]
    fn lookup(
        &self,
        addr: u64,
        len: usize,
        valid_size: impl FnOnce(usize) -> bool,
    ) -> Option<(D, u64)> {
        match self.repeat(addr, len) {
            Some(h) => Some(h),
            None => self.range(addr, len, valid_size),
        }
    }

    /// The range path of [`lookup`](Self::lookup), out of line and cold: inlined, its code
    /// sat between the repeat check and the device call, so a repeated access (the exit
    /// benchmark, a guest polling a register) ran through more instruction cache lines —
    /// which a world switch evicts — than it executes. A new access in the range pays a
    /// call instead; it is on its way to an exit of microseconds.
    #[cold]
    #[inline(never)]
    fn range(
        &self,
        addr: u64,
        len: usize,
        valid_size: impl FnOnce(usize) -> bool,
    ) -> Option<(D, u64)> {
        if valid_size(len) {
            self.hit(addr, len)
        } else {
            None
        }
    }

    #[inline]
    fn set(&mut self, base: u64, last: u64, dev: D) {
        *self = Memo {
            base,
            span: last.wrapping_sub(base),
            dev: Some(dev),
            ..Self::empty()
        };
    }
}

/// The last PIO and MMIO range one vCPU's accesses went to, for [`PioBus`](crate::PioBus)
/// and [`MmioBus`](crate::MmioBus) dispatch without a lookup.
///
/// Keep one per vCPU thread, on its stack, for one pair of buses. The `*_caching` methods of
/// the buses ([`PioBus::read_caching`](crate::PioBus::read_caching) and friends) dispatch
/// and remember the range they hit; the methods here dispatch only when the access lies
/// entirely inside the remembered range and has a valid size, and otherwise return
/// `false` without side effects, so the caller falls back to the bus. The borrow (`'a`) keeps
/// the devices alive; buses are immutable once shared, so a remembered range never goes
/// stale. A cache filled from one bus must not be used with another (it would dispatch to
/// the first bus's devices).
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use kiln_bus::{DispatchCache, PioAddress, PioBus, PioDevice};
///
/// #[derive(Default)]
/// struct Counter(AtomicU32);
/// impl PioDevice for Counter {
///     fn pio_read(&self, _: PioAddress, _: u16, data: &mut [u8]) {
///         data.fill(self.0.load(Ordering::Relaxed) as u8);
///     }
///     fn pio_write(&self, _: PioAddress, _: u16, _: &[u8]) {
///         self.0.fetch_add(1, Ordering::Relaxed);
///     }
/// }
///
/// let mut bus = PioBus::new();
/// bus.insert(PioAddress(0x700), 4, Arc::new(Counter::default())).unwrap();
/// let bus = Arc::new(bus);
///
/// // On a vCPU thread: try the cache, fall back to the bus (which fills the cache).
/// let mut cache = DispatchCache::new();
/// for _ in 0..3 {
///     if !cache.pio_write(PioAddress(0x701), &[1]) {
///         bus.write_caching(&mut cache, PioAddress(0x701), &[1]).unwrap();
///     }
/// }
/// let mut n = [0u8; 1];
/// assert!(cache.pio_read(PioAddress(0x700), &mut n));
/// assert_eq!(n, [3]);
/// ```
///
/// The cache borrows the bus, so it cannot outlive it:
///
/// ```compile_fail
/// use kiln_bus::{DispatchCache, PioBus, PioAddress};
/// let mut cache = DispatchCache::new();
/// {
///     let bus = PioBus::new();
///     let _ = bus.write_caching(&mut cache, PioAddress(0x80), &[0]);
/// } // `bus` dropped while `cache` still borrows it
/// cache.pio_write(PioAddress(0x80), &[0]);
/// ```
pub struct DispatchCache<'a, P = Arc<dyn PioDevice>, M = Arc<dyn MmioDevice>>
where
    P: PioSlot + 'a,
    M: MmioSlot + 'a,
{
    pio: Memo<P::Ref<'a>>,
    mmio: Memo<M::Ref<'a>>,
}

impl<'a, P: PioSlot + 'a, M: MmioSlot + 'a> Default for DispatchCache<'a, P, M> {
    fn default() -> Self {
        Self::empty()
    }
}

impl<'a, P: PioSlot + 'a, M: MmioSlot + 'a> std::fmt::Debug for DispatchCache<'a, P, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let range = |base: u64, span: u64, set: bool| set.then_some(base..=base.wrapping_add(span));
        f.debug_struct("DispatchCache")
            .field(
                "pio",
                &range(self.pio.base, self.pio.span, self.pio.dev.is_some()),
            )
            .field(
                "mmio",
                &range(self.mmio.base, self.mmio.span, self.mmio.dev.is_some()),
            )
            .finish()
    }
}

impl DispatchCache<'_> {
    /// An empty cache for buses of `Arc<dyn PioDevice>` and `Arc<dyn MmioDevice>` (the
    /// buses' defaults); for other device types use [`Default::default`].
    pub const fn new() -> Self {
        Self::empty()
    }
}

impl<'a, P: PioSlot + 'a, M: MmioSlot + 'a> DispatchCache<'a, P, M> {
    /// Nothing remembered (`new` and `default` both make one).
    const fn empty() -> Self {
        DispatchCache {
            pio: Memo::empty(),
            mmio: Memo::empty(),
        }
    }

    /// Forgets both remembered ranges.
    pub fn clear(&mut self) {
        *self = Self::empty();
    }

    /// Dispatches a PIO read if it hits the remembered range; `false`: not dispatched.
    // Always: on the vCPU's hot path, and a call here is one more jump after a world
    // switch.
    #[inline(always)]
    pub fn pio_read(&self, addr: PioAddress, data: &mut [u8]) -> bool {
        let len = data.len();
        match self
            .pio
            .lookup(u64::from(addr.0), len, |l| matches!(l, 1 | 2 | 4))
        {
            Some((dev, offset)) => {
                // Both fit in u16: the range was checked against 0xffff when inserted.
                P::read(dev, PioAddress(self.pio.base as u16), offset as u16, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a PIO write if it hits the remembered range; `false`: not dispatched.
    // Always: on the vCPU's hot path, and a call here is one more jump after a world
    // switch.
    #[inline(always)]
    pub fn pio_write(&self, addr: PioAddress, data: &[u8]) -> bool {
        let len = data.len();
        match self
            .pio
            .lookup(u64::from(addr.0), len, |l| matches!(l, 1 | 2 | 4))
        {
            Some((dev, offset)) => {
                P::write(dev, PioAddress(self.pio.base as u16), offset as u16, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches an MMIO read if it hits the remembered range; `false`: not dispatched.
    // Always: on the vCPU's hot path, and a call here is one more jump after a world
    // switch.
    #[inline(always)]
    pub fn mmio_read(&self, addr: MmioAddress, data: &mut [u8]) -> bool {
        let len = data.len();
        match self
            .mmio
            .lookup(addr.0, len, |l| matches!(l, 1 | 2 | 4 | 8))
        {
            Some((dev, offset)) => {
                M::read(dev, MmioAddress(self.mmio.base), offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches an MMIO write if it hits the remembered range; `false`: not dispatched.
    // Always: on the vCPU's hot path, and a call here is one more jump after a world
    // switch.
    #[inline(always)]
    pub fn mmio_write(&self, addr: MmioAddress, data: &[u8]) -> bool {
        let len = data.len();
        match self
            .mmio
            .lookup(addr.0, len, |l| matches!(l, 1 | 2 | 4 | 8))
        {
            Some((dev, offset)) => {
                M::write(dev, MmioAddress(self.mmio.base), offset, data);
                true
            }
            None => false,
        }
    }

    #[inline]
    pub(crate) fn remember_pio(&mut self, base: u64, last: u64, dev: &'a P) {
        self.pio.set(base, last, dev.borrow());
    }

    #[inline]
    pub(crate) fn remember_mmio(&mut self, base: u64, last: u64, dev: &'a M) {
        self.mmio.set(base, last, dev.borrow());
    }
}

#[cfg(test)]
mod tests {
    use super::Memo;
    use proptest::prelude::*;

    proptest! {
        /// The hit check agrees with plain wide arithmetic: the whole access
        /// `[addr, addr + len - 1]` lies inside `[base, last]`, anywhere in the 64-bit space.
        #[test]
        fn hit_means_the_whole_access_is_inside(
            base in prop_oneof![any::<u64>(), (u64::MAX - 64)..=u64::MAX, 0u64..64],
            span in prop_oneof![0u64..16, any::<u64>()],
            delta in -16i128..32,
            len in prop_oneof![Just(1usize), Just(2), Just(4), Just(8)],
        ) {
            let last = base.saturating_add(span);
            let mut slot = Memo::<u8>::empty();
            prop_assert!(slot.hit(base, len).is_none(), "an empty slot never hits");
            slot.set(base, last, 9);
            // Clamped rather than rejected: the ends of the address space are the cases of
            // interest, and rejects would fail runs with many cases (PROPTEST_CASES).
            let addr = base.saturating_add_signed(delta as i64);
            let inside = u128::from(addr) >= u128::from(base)
                && u128::from(addr) + len as u128 - 1 <= u128::from(last);
            let got = slot.hit(addr, len);
            prop_assert_eq!(got.is_some(), inside, "addr {:#x} len {} in [{:#x}, {:#x}]", addr, len, base, last);
            if let Some((dev, offset)) = got {
                prop_assert_eq!(dev, 9);
                prop_assert_eq!(offset, addr - base);
                // The same access again is recognised without the range check; any other
                // length or address is not.
                prop_assert_eq!(slot.repeat(addr, len), got);
                prop_assert_eq!(slot.repeat(addr, len * 2), None);
                prop_assert_eq!(slot.repeat(addr.wrapping_add(1), len), None);
            } else {
                prop_assert_eq!(slot.repeat(addr, len), None, "a miss is never remembered");
            }
            // Refilling forgets the remembered access.
            slot.set(base, last, 9);
            prop_assert_eq!(slot.repeat(addr, len), None);
        }
    }
}
