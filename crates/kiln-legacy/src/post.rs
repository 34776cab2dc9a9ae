//! The POST / debug port (0x80).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use kiln_bus::{PioAddress, PioDevice};

/// The POST code port: firmware and kernels write progress codes (or use it as an I/O delay).
/// Writes are accepted silently; the last code is kept for diagnostics. Reads return 0.
#[derive(Debug, Default)]
pub struct PostDevice {
    last: AtomicU8,
    writes: AtomicU64,
}

impl PostDevice {
    /// A port that has seen no write.
    pub fn new() -> Self {
        Self::default()
    }

    /// The last byte written to the port itself (0 before any write).
    pub fn last_value(&self) -> u8 {
        self.last.load(Ordering::Relaxed)
    }

    /// How many writes the port has seen.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

impl PioDevice for PostDevice {
    fn pio_read(&self, _base: PioAddress, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&self, _base: PioAddress, offset: u16, data: &[u8]) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        // Lane 0 of an access at offset 0 is the POST register; other lanes are other ports.
        if let (0, Some(&code)) = (offset, data.first()) {
            self.last.store(code, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consts::POST_PORT;

    #[test]
    fn records_last_code_and_reads_zero() {
        let dev = PostDevice::new();
        let base = PioAddress(POST_PORT);
        dev.pio_write(base, 0, &[0x12]);
        dev.pio_write(base, 0, &[0x34, 0x56]);
        assert_eq!(dev.last_value(), 0x34);
        assert_eq!(dev.writes(), 2);
        // Writes at other offsets (a wide range registration) are counted, not recorded.
        dev.pio_write(base, 3, &[0x99]);
        dev.pio_write(base, 0, &[]);
        assert_eq!(dev.last_value(), 0x34);
        assert_eq!(dev.writes(), 4);
        let mut d = [0xffu8; 8];
        dev.pio_read(base, 0, &mut d);
        assert_eq!(d, [0; 8]);
    }
}
