//! Port-I/O and MMIO address spaces for Kiln's VM-exit dispatch.
//!
//! A [`PioBus`] or [`MmioBus`] maps non-overlapping address ranges to devices. It is built
//! mutably ([`PioBus::insert`], [`PioBus::remove`]) while the VM is set up, then shared
//! immutably (typically in an `Arc`) by the vCPU threads: a lookup is a binary search over a
//! sorted `Vec`, allocates nothing and takes no lock. Devices take `&self`; a device that needs
//! mutable state keeps its own lock or atomics, so two vCPUs touching different devices never
//! contend.
//!
//! The bus validates every access before a device sees it: PIO accesses are 1, 2 or 4 bytes,
//! MMIO accesses 1, 2, 4 or 8 bytes, and an access must lie entirely inside one device's range.
//! Devices therefore only ever see `offset + data.len() <= size` for the range they were
//! registered with.
#![warn(missing_docs)]
#![doc = include_str!("../README.md")]

mod cache;
mod ratelimit;
mod slot;

pub use cache::{AsRawMmio, AsRawPio, DispatchCache, RawMmio, RawPio};
pub use ratelimit::RateLimitedWarn;
pub use slot::{MmioSlot, PioSlot};

use std::fmt;
use std::sync::Arc;

/// Errors of the bus: building it (bad or overlapping ranges) and dispatching accesses.
///
/// Every variant names the address space and the address; none allocates, so dispatch errors
/// are cheap to return from the vCPU hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A range was given with size 0.
    #[error("{space} range at {base:#x} has size 0")]
    ZeroSize {
        /// The address space.
        space: AddressSpace,
        /// Base address of the rejected range.
        base: u64,
    },
    /// A range runs past the end of its address space.
    #[error(
        "{space} range at {base:#x} with size {size:#x} wraps past the end of the address space"
    )]
    Wraps {
        /// The address space.
        space: AddressSpace,
        /// Base address of the rejected range.
        base: u64,
        /// Size of the rejected range.
        size: u64,
    },
    /// A range overlaps one that is already registered.
    #[error(
        "{space} range {base:#x}..={last:#x} overlaps the registered range {other_base:#x}..={other_last:#x}"
    )]
    Overlap {
        /// The address space.
        space: AddressSpace,
        /// First address of the rejected range.
        base: u64,
        /// Last address (inclusive) of the rejected range.
        last: u64,
        /// First address of the registered range it overlaps.
        other_base: u64,
        /// Last address (inclusive) of the registered range it overlaps.
        other_last: u64,
    },
    /// [`PioBus::remove`]/[`MmioBus::remove`] found no range starting at that base.
    #[error("{space}: no range is registered with base {base:#x}")]
    NotRegistered {
        /// The address space.
        space: AddressSpace,
        /// The base address asked for.
        base: u64,
    },
    /// No device covers the accessed address.
    #[error("{space} access of {len} bytes at {addr:#x}: no device there")]
    NoDevice {
        /// The address space.
        space: AddressSpace,
        /// The accessed address.
        addr: u64,
        /// The access size in bytes.
        len: usize,
    },
    /// The access size is not one the address space allows (PIO 1/2/4, MMIO 1/2/4/8).
    #[error("{space} access of {len} bytes at {addr:#x}: invalid access size")]
    InvalidAccessSize {
        /// The address space.
        space: AddressSpace,
        /// The accessed address.
        addr: u64,
        /// The access size in bytes.
        len: usize,
    },
    /// The access starts inside a device's range but runs past its end.
    #[error(
        "{space} access of {len} bytes at {addr:#x} straddles the end of the device range {base:#x}..={last:#x}"
    )]
    Straddle {
        /// The address space.
        space: AddressSpace,
        /// The accessed address.
        addr: u64,
        /// The access size in bytes.
        len: usize,
        /// First address of the device's range.
        base: u64,
        /// Last address (inclusive) of the device's range.
        last: u64,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Which address space an address or error belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressSpace {
    /// x86 port I/O (16-bit addresses).
    Pio,
    /// Memory-mapped I/O (64-bit guest-physical addresses).
    Mmio,
}

impl fmt::Display for AddressSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressSpace::Pio => "PIO",
            AddressSpace::Mmio => "MMIO",
        })
    }
}

/// A port-I/O address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PioAddress(pub u16);

/// A guest-physical MMIO address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MmioAddress(pub u64);

impl fmt::Display for PioAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for MmioAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A device on the port-I/O bus.
///
/// The bus calls these from vCPU threads, possibly several at once, so they take `&self`:
/// keep mutable state behind the device's own lock or in atomics. `base` is the base of the
/// range the access hit (one device may be registered at several ranges) and the bus
/// guarantees `offset as usize + data.len() <= size` of that range and `data.len()` in
/// {1, 2, 4}.
///
/// (`AsRawPio`, the supertrait, is implemented for every device by a blanket impl; it lets
/// a [`DispatchCache`] call the device without its vtable.)
pub trait PioDevice: Send + Sync + AsRawPio {
    /// Guest reads `data.len()` bytes at `base + offset`; fill `data`.
    fn pio_read(&self, base: PioAddress, offset: u16, data: &mut [u8]);
    /// Guest writes `data` at `base + offset`.
    fn pio_write(&self, base: PioAddress, offset: u16, data: &[u8]);
}

/// A device on the MMIO bus.
///
/// Same contract as [`PioDevice`], with 64-bit offsets and access sizes in {1, 2, 4, 8}.
pub trait MmioDevice: Send + Sync + AsRawMmio {
    /// Guest reads `data.len()` bytes at `base + offset`; fill `data`.
    fn mmio_read(&self, base: MmioAddress, offset: u64, data: &mut [u8]);
    /// Guest writes `data` at `base + offset`.
    fn mmio_write(&self, base: MmioAddress, offset: u64, data: &[u8]);
}

/// One registered range: `[base, last]` inclusive, so a range may end at the very last
/// address of its space without overflowing.
struct Entry<D> {
    base: u64,
    last: u64,
    dev: D,
}

/// The shared core of both buses: sorted, non-overlapping ranges over raw `u64` addresses.
struct RangeMap<D> {
    space: AddressSpace,
    /// Highest address of the space (0xffff for PIO).
    max: u64,
    /// Sorted by `base`; ranges never overlap, so also sorted by `last`.
    entries: Vec<Entry<D>>,
}

impl<D> RangeMap<D> {
    const fn new(space: AddressSpace, max: u64) -> Self {
        RangeMap {
            space,
            max,
            entries: Vec::new(),
        }
    }

    fn insert(&mut self, base: u64, size: u64, dev: D) -> Result<()> {
        let space = self.space;
        if size == 0 {
            return Err(Error::ZeroSize { space, base });
        }
        let last = match base.checked_add(size - 1) {
            Some(last) if last <= self.max => last,
            _ => return Err(Error::Wraps { space, base, size }),
        };
        // Index of the first range starting after `base`: the new range goes there, and only
        // its two neighbours can overlap it.
        let idx = self.entries.partition_point(|e| e.base <= base);
        let neighbours = [idx.checked_sub(1), Some(idx)];
        for e in neighbours
            .into_iter()
            .flatten()
            .filter_map(|i| self.entries.get(i))
        {
            if e.base <= last && base <= e.last {
                return Err(Error::Overlap {
                    space,
                    base,
                    last,
                    other_base: e.base,
                    other_last: e.last,
                });
            }
        }
        self.entries.insert(idx, Entry { base, last, dev });
        Ok(())
    }

    fn remove(&mut self, base: u64) -> Result<D> {
        match self.entries.binary_search_by_key(&base, |e| e.base) {
            Ok(i) => Ok(self.entries.remove(i).dev),
            Err(_) => Err(Error::NotRegistered {
                space: self.space,
                base,
            }),
        }
    }

    /// The entry whose range contains `addr`, if any. O(log n), no allocation.
    #[inline]
    fn find(&self, addr: u64) -> Option<&Entry<D>> {
        let idx = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries.get(idx.checked_sub(1)?)?;
        (addr <= e.last).then_some(e)
    }

    /// Validates an access of `len` bytes at `addr` against the allowed sizes (`size_ok`) and
    /// the covering range; returns the entry and the offset inside it.
    #[inline]
    fn resolve(&self, addr: u64, len: usize, size_ok: bool) -> Result<(&Entry<D>, u64)> {
        let space = self.space;
        if !size_ok {
            return Err(Error::InvalidAccessSize { space, addr, len });
        }
        let e = self
            .find(addr)
            .ok_or(Error::NoDevice { space, addr, len })?;
        let offset = addr - e.base;
        // Compare last byte offsets so a range ending at the top of the space cannot overflow.
        if (len as u64).saturating_sub(1) > e.last - addr {
            return Err(Error::Straddle {
                space,
                addr,
                len,
                base: e.base,
                last: e.last,
            });
        }
        Ok((e, offset))
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// The port-I/O address space of a VM.
///
/// Build it with [`insert`](Self::insert), then share it (`Arc<PioBus>`) with the vCPU threads.
///
/// `D` is what the bus holds per range (see [`PioSlot`]): by default any device as an
/// `Arc<dyn PioDevice>` ([`PioBus::new`]); a VMM that knows its device types can use an enum
/// of them (`PioBus::<MyDevices>::default()`) so exits reach devices without a dynamic call.
pub struct PioBus<D = Arc<dyn PioDevice>> {
    map: RangeMap<D>,
}

impl<D> Default for PioBus<D> {
    fn default() -> Self {
        Self::empty()
    }
}

impl<D> PioBus<D> {
    /// An empty bus of any device type (`new` and `default` both make one).
    const fn empty() -> Self {
        PioBus {
            map: RangeMap::new(AddressSpace::Pio, u16::MAX as u64),
        }
    }
}

impl<D> fmt::Debug for PioBus<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.map.entries.iter().map(|e| e.base..=e.last))
            .finish()
    }
}

impl PioBus {
    /// An empty bus of `Arc<dyn PioDevice>`s.
    pub const fn new() -> Self {
        Self::empty()
    }
}

impl<D: PioSlot> PioBus<D> {
    /// Registers `dev` for the ports `[base, base + size)`.
    ///
    /// Fails if `size` is 0, if the range runs past port 0xffff, or if it overlaps a registered
    /// range (adjacent ranges are fine). The same device may be registered at several ranges.
    pub fn insert(&mut self, base: PioAddress, size: u16, dev: D) -> Result<()> {
        self.map.insert(u64::from(base.0), u64::from(size), dev)
    }

    /// Unregisters the range that starts exactly at `base` and returns its device.
    pub fn remove(&mut self, base: PioAddress) -> Result<D> {
        self.map.remove(u64::from(base.0))
    }

    /// The device covering `addr`, with the base and size of its range.
    pub fn get(&self, addr: PioAddress) -> Option<(PioAddress, u16, &D)> {
        let e = self.map.find(u64::from(addr.0))?;
        // Both fit in u16: ranges are checked against 0xffff at insertion, and a range of
        // 0x10000 ports cannot be inserted because `size` is a u16.
        let base = u16::try_from(e.base).ok()?;
        let size = u16::try_from(e.last - e.base + 1).ok()?;
        Some((PioAddress(base), size, &e.dev))
    }

    /// Number of registered ranges.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no range is registered.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    #[inline]
    fn resolve(&self, addr: PioAddress, len: usize) -> Result<(&Entry<D>, PioAddress, u16)> {
        let (e, offset) = self
            .map
            .resolve(u64::from(addr.0), len, matches!(len, 1 | 2 | 4))?;
        // Bases and offsets inside a PIO range are below 0x10000 by construction.
        Ok((e, PioAddress(e.base as u16), offset as u16))
    }

    /// Dispatches a guest read of `data.len()` bytes at `addr`.
    ///
    /// On error `data` is left untouched; the caller decides what the guest sees (all ones,
    /// as an unclaimed ISA port, is the usual choice).
    #[inline]
    pub fn read(&self, addr: PioAddress, data: &mut [u8]) -> Result<()> {
        let (e, base, offset) = self.resolve(addr, data.len())?;
        D::read(e.dev.borrow(), base, offset, data);
        Ok(())
    }

    /// Dispatches a guest write of `data` at `addr`.
    #[inline]
    pub fn write(&self, addr: PioAddress, data: &[u8]) -> Result<()> {
        let (e, base, offset) = self.resolve(addr, data.len())?;
        D::write(e.dev.borrow(), base, offset, data);
        Ok(())
    }

    /// Like [`read`](Self::read), and remembers the range it hit in `cache`, so the next
    /// access there can go through [`DispatchCache::pio_read`] without a lookup. An error
    /// leaves the cache as it was.
    pub fn read_caching<'a, M: MmioSlot + 'a>(
        &'a self,
        cache: &mut DispatchCache<'a, D, M>,
        addr: PioAddress,
        data: &mut [u8],
    ) -> Result<()> {
        let (e, base, offset) = self.resolve(addr, data.len())?;
        D::read(e.dev.borrow(), base, offset, data);
        cache.remember_pio(e.base, e.last, &e.dev);
        Ok(())
    }

    /// Like [`write`](Self::write), and remembers the range it hit in `cache` (see
    /// [`read_caching`](Self::read_caching)).
    pub fn write_caching<'a, M: MmioSlot + 'a>(
        &'a self,
        cache: &mut DispatchCache<'a, D, M>,
        addr: PioAddress,
        data: &[u8],
    ) -> Result<()> {
        let (e, base, offset) = self.resolve(addr, data.len())?;
        D::write(e.dev.borrow(), base, offset, data);
        cache.remember_pio(e.base, e.last, &e.dev);
        Ok(())
    }
}

/// The MMIO address space of a VM (the regions that are not guest RAM).
///
/// Build it with [`insert`](Self::insert), then share it (`Arc<MmioBus>`) with the vCPU
/// threads. `D` is what it holds per range, as for [`PioBus`] (see [`MmioSlot`]).
pub struct MmioBus<D = Arc<dyn MmioDevice>> {
    map: RangeMap<D>,
}

impl<D> Default for MmioBus<D> {
    fn default() -> Self {
        Self::empty()
    }
}

impl<D> MmioBus<D> {
    /// An empty bus of any device type (`new` and `default` both make one).
    const fn empty() -> Self {
        MmioBus {
            map: RangeMap::new(AddressSpace::Mmio, u64::MAX),
        }
    }
}

impl<D> fmt::Debug for MmioBus<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.map.entries.iter().map(|e| e.base..=e.last))
            .finish()
    }
}

impl MmioBus {
    /// An empty bus of `Arc<dyn MmioDevice>`s.
    pub const fn new() -> Self {
        Self::empty()
    }
}

impl<D: MmioSlot> MmioBus<D> {
    /// Registers `dev` for the addresses `[base, base + size)`.
    ///
    /// Fails if `size` is 0, if the range wraps past the end of the 64-bit address space
    /// (it may end at its very last byte), or if it overlaps a registered range (adjacent
    /// ranges are fine). The same device may be registered at several ranges.
    pub fn insert(&mut self, base: MmioAddress, size: u64, dev: D) -> Result<()> {
        self.map.insert(base.0, size, dev)
    }

    /// Unregisters the range that starts exactly at `base` and returns its device.
    pub fn remove(&mut self, base: MmioAddress) -> Result<D> {
        self.map.remove(base.0)
    }

    /// The device covering `addr`, with the base and the last address (inclusive) of its
    /// range. (The last address, not the size: a range may cover the whole 64-bit space.)
    pub fn get(&self, addr: MmioAddress) -> Option<(MmioAddress, MmioAddress, &D)> {
        let e = self.map.find(addr.0)?;
        Some((MmioAddress(e.base), MmioAddress(e.last), &e.dev))
    }

    /// Number of registered ranges.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no range is registered.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    #[inline]
    fn resolve(&self, addr: MmioAddress, len: usize) -> Result<(&Entry<D>, u64)> {
        self.map.resolve(addr.0, len, matches!(len, 1 | 2 | 4 | 8))
    }

    /// Dispatches a guest read of `data.len()` bytes at `addr`.
    ///
    /// On error `data` is left untouched; the caller decides what the guest sees.
    #[inline]
    pub fn read(&self, addr: MmioAddress, data: &mut [u8]) -> Result<()> {
        let (e, offset) = self.resolve(addr, data.len())?;
        D::read(e.dev.borrow(), MmioAddress(e.base), offset, data);
        Ok(())
    }

    /// Dispatches a guest write of `data` at `addr`.
    #[inline]
    pub fn write(&self, addr: MmioAddress, data: &[u8]) -> Result<()> {
        let (e, offset) = self.resolve(addr, data.len())?;
        D::write(e.dev.borrow(), MmioAddress(e.base), offset, data);
        Ok(())
    }

    /// Like [`read`](Self::read), and remembers the range it hit in `cache`, so the next
    /// access there can go through [`DispatchCache::mmio_read`] without a lookup. An error
    /// leaves the cache as it was.
    pub fn read_caching<'a, P: PioSlot + 'a>(
        &'a self,
        cache: &mut DispatchCache<'a, P, D>,
        addr: MmioAddress,
        data: &mut [u8],
    ) -> Result<()> {
        let (e, offset) = self.resolve(addr, data.len())?;
        D::read(e.dev.borrow(), MmioAddress(e.base), offset, data);
        cache.remember_mmio(e.base, e.last, &e.dev);
        Ok(())
    }

    /// Like [`write`](Self::write), and remembers the range it hit in `cache` (see
    /// [`read_caching`](Self::read_caching)).
    pub fn write_caching<'a, P: PioSlot + 'a>(
        &'a self,
        cache: &mut DispatchCache<'a, P, D>,
        addr: MmioAddress,
        data: &[u8],
    ) -> Result<()> {
        let (e, offset) = self.resolve(addr, data.len())?;
        D::write(e.dev.borrow(), MmioAddress(e.base), offset, data);
        cache.remember_mmio(e.base, e.last, &e.dev);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
