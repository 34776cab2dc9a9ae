//! An [`ExitHandler`] that routes PIO and MMIO exits through kiln-bus.

use std::sync::Arc;

use kiln_bus::{
    DispatchCache, MmioAddress, MmioBus, MmioDevice, MmioSlot, PioAddress, PioBus, PioDevice,
    PioSlot, RateLimitedWarn,
};

use crate::exit::{ExitHandler, StopReason};

/// Called on a vCPU thread when that vCPU stops for good.
pub type StopCallback = Box<dyn Fn(u32, &StopReason) + Send + Sync>;

/// Answers `rdmsr` of MSRs KVM forwards to user space: `Some(value)` or `None` for #GP.
pub type MsrReadFn = Box<dyn Fn(u32) -> Option<u64> + Send + Sync>;

/// Routes exits to the devices on a PIO and an MMIO bus. The buses are immutable and shared
/// (`Arc`), so vCPU threads dispatch without any lock; a device that needs mutability holds
/// its own. Accesses nothing claims read as all-ones (like an empty ISA/PCI bus) and writes
/// to them are dropped, with a rate-limited warning.
///
/// With the run loop's per-vCPU [`DispatchCache`] (the `*_cached` methods), an access to the
/// range the vCPU hit last goes straight to its device: the handler and the buses are not
/// touched at all, which after a world switch saves a chain of cache misses.
///
/// `P` and `M` are what the buses hold per range (see [`PioSlot`]): by default any device,
/// called through a function pointer; with an enum of the VMM's device types, the exit path
/// from `KVM_RUN` to the device is static calls.
pub struct BusExitHandler<P = Arc<dyn PioDevice>, M = Arc<dyn MmioDevice>> {
    pio: Arc<PioBus<P>>,
    mmio: Arc<MmioBus<M>>,
    on_stop: Option<StopCallback>,
    msr_read: Option<MsrReadFn>,
    misses: RateLimitedWarn,
}

impl<P: PioSlot, M: MmioSlot> BusExitHandler<P, M> {
    /// A handler over `pio` and `mmio`; `on_stop` (if any) runs when a vCPU stops.
    pub fn new(pio: Arc<PioBus<P>>, mmio: Arc<MmioBus<M>>, on_stop: Option<StopCallback>) -> Self {
        BusExitHandler {
            pio,
            mmio,
            on_stop,
            msr_read: None,
            misses: RateLimitedWarn::new(),
        }
    }

    /// Answers forwarded `rdmsr`s with `f` (writes still get #GP).
    pub fn with_msr_read(mut self, f: MsrReadFn) -> Self {
        self.msr_read = Some(f);
        self
    }

    /// How many accesses found no device (or were malformed) so far.
    pub fn misses(&self) -> u64 {
        self.misses.count()
    }

    #[cold]
    fn miss(&self, what: &str, addr: u64, len: usize, err: &kiln_bus::Error) {
        self.misses.warn(format_args!(
            "guest {what} of {len} byte(s) at {addr:#x} ignored: {err}"
        ));
    }
}

impl<P: PioSlot, M: MmioSlot> BusExitHandler<P, M> {
    /// The bus path of a PIO read: a lookup that fills `cache`, or a `rep ins` split into
    /// byte accesses.
    #[cold]
    #[inline(never)]
    fn pio_read_bus<'a>(&'a self, cache: &mut DispatchCache<'a, P, M>, port: u16, data: &mut [u8]) {
        let len = data.len();
        // A `rep ins` exit carries count * size bytes; KVM's exit doesn't say the size, so
        // anything wider than a single access comes in a byte at a time.
        let chunk = if len > 4 { 1 } else { len.max(1) };
        for part in data.chunks_mut(chunk) {
            if cache.pio_read(PioAddress(port), part) {
                continue;
            }
            if let Err(e) = self.pio.read_caching(cache, PioAddress(port), part) {
                part.fill(0xff);
                self.miss("port read", u64::from(port), len, &e);
            }
        }
    }

    /// The bus path of a PIO write (see [`pio_read_bus`](Self::pio_read_bus)).
    #[cold]
    #[inline(never)]
    fn pio_write_bus<'a>(&'a self, cache: &mut DispatchCache<'a, P, M>, port: u16, data: &[u8]) {
        let chunk = if data.len() > 4 { 1 } else { data.len().max(1) };
        for part in data.chunks(chunk) {
            if cache.pio_write(PioAddress(port), part) {
                continue;
            }
            if let Err(e) = self.pio.write_caching(cache, PioAddress(port), part) {
                self.miss("port write", u64::from(port), data.len(), &e);
                return;
            }
        }
    }

    #[cold]
    #[inline(never)]
    fn mmio_read_bus<'a>(
        &'a self,
        cache: &mut DispatchCache<'a, P, M>,
        addr: u64,
        data: &mut [u8],
    ) {
        if let Err(e) = self.mmio.read_caching(cache, MmioAddress(addr), data) {
            data.fill(0xff);
            self.miss("MMIO read", addr, data.len(), &e);
        }
    }

    #[cold]
    #[inline(never)]
    fn mmio_write_bus<'a>(&'a self, cache: &mut DispatchCache<'a, P, M>, addr: u64, data: &[u8]) {
        if let Err(e) = self.mmio.write_caching(cache, MmioAddress(addr), data) {
            self.miss("MMIO write", addr, data.len(), &e);
        }
    }
}

impl<P: PioSlot, M: MmioSlot> ExitHandler for BusExitHandler<P, M> {
    type Cache<'a>
        = DispatchCache<'a, P, M>
    where
        Self: 'a;

    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.pio_read_bus(&mut DispatchCache::default(), port, data);
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        self.pio_write_bus(&mut DispatchCache::default(), port, data);
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.mmio_read_bus(&mut DispatchCache::default(), addr, data);
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.mmio_write_bus(&mut DispatchCache::default(), addr, data);
    }

    // The hit paths check the cache before touching `self`: on a hit neither the handler nor
    // a bus is read.
    #[inline]
    fn pio_read_cached<'a>(
        &'a self,
        cache: &mut DispatchCache<'a, P, M>,
        port: u16,
        data: &mut [u8],
    ) {
        if !cache.pio_read(PioAddress(port), data) {
            self.pio_read_bus(cache, port, data);
        }
    }

    #[inline]
    fn pio_write_cached<'a>(&'a self, cache: &mut DispatchCache<'a, P, M>, port: u16, data: &[u8]) {
        if !cache.pio_write(PioAddress(port), data) {
            self.pio_write_bus(cache, port, data);
        }
    }

    #[inline]
    fn mmio_read_cached<'a>(
        &'a self,
        cache: &mut DispatchCache<'a, P, M>,
        addr: u64,
        data: &mut [u8],
    ) {
        if !cache.mmio_read(MmioAddress(addr), data) {
            self.mmio_read_bus(cache, addr, data);
        }
    }

    #[inline]
    fn mmio_write_cached<'a>(
        &'a self,
        cache: &mut DispatchCache<'a, P, M>,
        addr: u64,
        data: &[u8],
    ) {
        if !cache.mmio_write(MmioAddress(addr), data) {
            self.mmio_write_bus(cache, addr, data);
        }
    }

    fn msr_read(&self, index: u32) -> Option<u64> {
        self.msr_read.as_ref().and_then(|f| f(index))
    }

    fn vcpu_stopped(&self, cpu: u32, reason: &StopReason) {
        if let Some(cb) = &self.on_stop {
            cb(cpu, reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_bus::PioDevice;
    use std::sync::atomic::{AtomicU8, Ordering};

    struct Latch(AtomicU8);
    impl PioDevice for Latch {
        fn pio_read(&self, _base: PioAddress, _offset: u16, data: &mut [u8]) {
            data.fill(self.0.load(Ordering::Relaxed));
        }
        fn pio_write(&self, _base: PioAddress, _offset: u16, data: &[u8]) {
            if let Some(b) = data.first() {
                self.0.store(*b, Ordering::Relaxed);
            }
        }
    }

    #[test]
    fn routes_hits_and_survives_misses() {
        let mut pio = PioBus::new();
        pio.insert(PioAddress(0x80), 1, Arc::new(Latch(AtomicU8::new(0))))
            .unwrap();
        let h = BusExitHandler::new(Arc::new(pio), Arc::new(MmioBus::new()), None);
        h.pio_write(0x80, &[0x42]);
        let mut b = [0u8; 1];
        h.pio_read(0x80, &mut b);
        assert_eq!(b, [0x42]);
        assert_eq!(h.misses(), 0);
        let mut w = [0u8; 4];
        h.pio_read(0x81, &mut w);
        assert_eq!(w, [0xff; 4]);
        h.mmio_write(0xdead_beef, &[1; 8]);
        let mut m = [0u8; 8];
        h.mmio_read(u64::MAX, &mut m);
        assert_eq!(m, [0xff; 8]);
        assert_eq!(h.misses(), 3);
    }

    #[test]
    fn string_pio_is_split_into_byte_accesses() {
        let mut pio = PioBus::new();
        let latch = Arc::new(Latch(AtomicU8::new(0)));
        pio.insert(PioAddress(0x80), 1, latch.clone()).unwrap();
        let h = BusExitHandler::new(Arc::new(pio), Arc::new(MmioBus::new()), None);
        // `rep outsb` with count 6: six one-byte writes, the last one wins.
        h.pio_write(0x80, &[1, 2, 3, 4, 5, 6]);
        assert_eq!(latch.0.load(Ordering::Relaxed), 6);
        assert_eq!(h.misses(), 0);
        let mut buf = [0u8; 6];
        h.pio_read(0x80, &mut buf);
        assert_eq!(buf, [6; 6]);
    }

    #[test]
    fn cached_paths_route_like_the_plain_ones() {
        let mut pio = PioBus::new();
        let a = Arc::new(Latch(AtomicU8::new(0)));
        let b = Arc::new(Latch(AtomicU8::new(0)));
        pio.insert(PioAddress(0x80), 1, a.clone()).unwrap();
        pio.insert(PioAddress(0x81), 1, b.clone()).unwrap();
        let h = BusExitHandler::new(Arc::new(pio), Arc::new(MmioBus::new()), None);
        let mut cache = DispatchCache::new();
        let mut r = [0u8; 1];
        // Alternating devices: each access misses the cache and refills it.
        for i in 1..=4u8 {
            h.pio_write_cached(&mut cache, 0x80, &[i]);
            h.pio_write_cached(&mut cache, 0x81, &[i + 10]);
            h.pio_read_cached(&mut cache, 0x80, &mut r);
            assert_eq!(r, [i]);
        }
        assert_eq!(b.0.load(Ordering::Relaxed), 14);
        // `rep outsb` through the cache: byte accesses, the last one wins.
        h.pio_write_cached(&mut cache, 0x81, &[1, 2, 3, 4, 5, 6]);
        assert_eq!(b.0.load(Ordering::Relaxed), 6);
        let mut six = [0u8; 6];
        h.pio_read_cached(&mut cache, 0x81, &mut six);
        assert_eq!(six, [6; 6]);
        assert_eq!(h.misses(), 0);
        // Unclaimed ports and MMIO read as all-ones and count as misses, cache or not.
        let mut w = [0u8; 4];
        h.pio_read_cached(&mut cache, 0x82, &mut w);
        assert_eq!(w, [0xff; 4]);
        let mut m = [0u8; 8];
        h.mmio_read_cached(&mut cache, 0x1000, &mut m);
        assert_eq!(m, [0xff; 8]);
        h.mmio_write_cached(&mut cache, 0x1000, &[0; 4]);
        assert_eq!(h.misses(), 3);
        // The failed accesses left the last hit in place.
        h.pio_write_cached(&mut cache, 0x81, &[9]);
        assert_eq!(b.0.load(Ordering::Relaxed), 9);
    }
}
