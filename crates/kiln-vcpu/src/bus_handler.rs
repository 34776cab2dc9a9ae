//! An [`ExitHandler`] that routes PIO and MMIO exits through kiln-bus.

use std::sync::Arc;

use kiln_bus::{MmioAddress, MmioBus, PioAddress, PioBus, RateLimitedWarn};

use crate::exit::{ExitHandler, StopReason};

/// Called on a vCPU thread when that vCPU stops for good.
pub type StopCallback = Box<dyn Fn(u32, &StopReason) + Send + Sync>;

/// Answers `rdmsr` of MSRs KVM forwards to user space: `Some(value)` or `None` for #GP.
pub type MsrReadFn = Box<dyn Fn(u32) -> Option<u64> + Send + Sync>;

/// Routes exits to the devices on a PIO and an MMIO bus. The buses are immutable and shared
/// (`Arc`), so vCPU threads dispatch without any lock; a device that needs mutability holds
/// its own. Accesses nothing claims read as all-ones (like an empty ISA/PCI bus) and writes
/// to them are dropped, with a rate-limited warning.
pub struct BusExitHandler {
    pio: Arc<PioBus>,
    mmio: Arc<MmioBus>,
    on_stop: Option<StopCallback>,
    msr_read: Option<MsrReadFn>,
    misses: RateLimitedWarn,
}

impl BusExitHandler {
    /// A handler over `pio` and `mmio`; `on_stop` (if any) runs when a vCPU stops.
    pub fn new(pio: Arc<PioBus>, mmio: Arc<MmioBus>, on_stop: Option<StopCallback>) -> Self {
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

impl ExitHandler for BusExitHandler {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        let len = data.len();
        let chunk = if len > 4 { 1 } else { len.max(1) };
        for part in data.chunks_mut(chunk) {
            if let Err(e) = self.pio.read(PioAddress(port), part) {
                part.fill(0xff);
                self.miss("port read", u64::from(port), len, &e);
            }
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        // A `rep outs` exit carries count * size bytes; KVM's exit doesn't say the size, so
        // anything wider than a single access goes out a byte at a time.
        let chunk = if data.len() > 4 { 1 } else { data.len().max(1) };
        for part in data.chunks(chunk) {
            if let Err(e) = self.pio.write(PioAddress(port), part) {
                self.miss("port write", u64::from(port), data.len(), &e);
                return;
            }
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if let Err(e) = self.mmio.read(MmioAddress(addr), data) {
            data.fill(0xff);
            self.miss("MMIO read", addr, data.len(), &e);
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Err(e) = self.mmio.write(MmioAddress(addr), data) {
            self.miss("MMIO write", addr, data.len(), &e);
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
}
