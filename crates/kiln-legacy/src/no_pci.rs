//! An empty PCI configuration mechanism #1 (ports 0xcf8..0xd00): the answer of a machine
//! with no PCI host bridge. Kernels probe it at boot; without a device there every probe
//! would be an "unclaimed access" warning.

use std::sync::atomic::{AtomicU32, Ordering};

use kiln_bus::{PioAddress, PioDevice};

/// CONFIG_ADDRESS (0xcf8) reads back what was written (Linux's conf1 probe checks that);
/// CONFIG_DATA (0xcfc..0xd00) reads all-ones — no device at any bus/device/function — and
/// ignores writes.
#[derive(Debug, Default)]
pub struct NoPciHost {
    address: AtomicU32,
}

impl NoPciHost {
    /// A bus with nothing on it.
    pub fn new() -> Self {
        Self::default()
    }
}

impl PioDevice for NoPciHost {
    fn pio_read(&self, _base: PioAddress, offset: u16, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.address.load(Ordering::Relaxed).to_le_bytes());
        } else {
            data.fill(0xff);
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: u16, data: &[u8]) {
        if let (0, Ok(v)) = (offset, <[u8; 4]>::try_from(data)) {
            self.address.store(u32::from_le_bytes(v), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_latches_and_data_reads_all_ones() {
        let d = NoPciHost::new();
        let base = PioAddress(crate::consts::PCI_CONFIG_PORT);
        d.pio_write(base, 0, &0x8000_0000u32.to_le_bytes());
        let mut a = [0u8; 4];
        d.pio_read(base, 0, &mut a);
        assert_eq!(u32::from_le_bytes(a), 0x8000_0000);
        let mut v = [0u8; 2];
        d.pio_read(base, 6, &mut v);
        assert_eq!(v, [0xff, 0xff]);
        // Odd-sized accesses to CONFIG_ADDRESS don't latch or panic.
        d.pio_write(base, 0, &[1]);
        d.pio_write(base, 4, &[1, 2, 3, 4]);
        let mut b = [0u8; 1];
        d.pio_read(base, 0, &mut b);
        assert_eq!(b, [0xff]);
    }
}
