//! The kiln exit-test device: the target of the exit benchmark and the `exits` scenario.

use std::sync::atomic::{AtomicU64, Ordering};

use kiln_bus::{MmioAddress, MmioDevice, PioAddress, PioDevice};

/// A counter on its own cache line, so PIO and MMIO exits on different vCPUs don't bounce one
/// line between them.
#[derive(Debug, Default)]
#[repr(align(64))]
struct PaddedCounter(AtomicU64);

/// Counts guest writes on its PIO window (0x700..0x704) and MMIO window
/// (0xC000_0000..0xC000_1000) separately.
///
/// Any write counts one exit on its window. A 4-byte read returns that window's count as a
/// little-endian `u32` (wrapping); reads of other sizes return zeros. A write is one relaxed
/// atomic add and nothing else: this is what the exit benchmark measures.
#[derive(Debug, Default)]
pub struct ExitTestDevice {
    pio: PaddedCounter,
    mmio: PaddedCounter,
}

impl ExitTestDevice {
    /// A device that has seen no write.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes seen on the PIO window.
    pub fn pio_writes(&self) -> u64 {
        self.pio.0.load(Ordering::Relaxed)
    }

    /// Writes seen on the MMIO window.
    pub fn mmio_writes(&self) -> u64 {
        self.mmio.0.load(Ordering::Relaxed)
    }
}

#[inline]
fn read_count(counter: &PaddedCounter, data: &mut [u8]) {
    if data.len() == 4 {
        // Truncation is the contract: the guest sees a wrapping u32.
        let count = counter.0.load(Ordering::Relaxed) as u32;
        data.copy_from_slice(&count.to_le_bytes());
    } else {
        data.fill(0);
    }
}

impl PioDevice for ExitTestDevice {
    #[inline]
    fn pio_read(&self, _base: PioAddress, _offset: u16, data: &mut [u8]) {
        read_count(&self.pio, data);
    }

    #[inline]
    fn pio_write(&self, _base: PioAddress, _offset: u16, _data: &[u8]) {
        self.pio.0.fetch_add(1, Ordering::Relaxed);
    }
}

impl MmioDevice for ExitTestDevice {
    #[inline]
    fn mmio_read(&self, _base: MmioAddress, _offset: u64, data: &mut [u8]) {
        read_count(&self.mmio, data);
    }

    #[inline]
    fn mmio_write(&self, _base: MmioAddress, _offset: u64, _data: &[u8]) {
        self.mmio.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consts::{
        EXIT_TEST_MMIO_BASE, EXIT_TEST_MMIO_SIZE, EXIT_TEST_PORT, EXIT_TEST_PORT_SIZE,
    };
    use kiln_bus::{MmioBus, PioBus};
    use std::sync::Arc;

    fn setup() -> (Arc<ExitTestDevice>, PioBus, MmioBus) {
        let dev = Arc::new(ExitTestDevice::new());
        let mut pio = PioBus::new();
        pio.insert(PioAddress(EXIT_TEST_PORT), EXIT_TEST_PORT_SIZE, dev.clone())
            .unwrap();
        let mut mmio = MmioBus::new();
        mmio.insert(
            MmioAddress(EXIT_TEST_MMIO_BASE),
            EXIT_TEST_MMIO_SIZE,
            dev.clone(),
        )
        .unwrap();
        (dev, pio, mmio)
    }

    fn pio_count(pio: &PioBus) -> u32 {
        let mut d = [0u8; 4];
        pio.read(PioAddress(EXIT_TEST_PORT), &mut d).unwrap();
        u32::from_le_bytes(d)
    }

    fn mmio_count(mmio: &MmioBus, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        mmio.read(MmioAddress(EXIT_TEST_MMIO_BASE + offset), &mut d)
            .unwrap();
        u32::from_le_bytes(d)
    }

    #[test]
    fn windows_count_separately_and_read_back() {
        let (dev, pio, mmio) = setup();
        for i in 0..37u16 {
            let port = EXIT_TEST_PORT + i % 4;
            pio.write(PioAddress(port), &[i as u8]).unwrap();
        }
        pio.write(PioAddress(EXIT_TEST_PORT), &[0; 4]).unwrap();
        pio.write(PioAddress(EXIT_TEST_PORT + 2), &[0; 2]).unwrap();
        for i in 0..1000u64 {
            let len = [1, 2, 4, 8][(i % 4) as usize];
            let off = (i * 8) % EXIT_TEST_MMIO_SIZE;
            mmio.write(MmioAddress(EXIT_TEST_MMIO_BASE + off), &[0xff; 8][..len])
                .unwrap();
        }
        assert_eq!(dev.pio_writes(), 39);
        assert_eq!(dev.mmio_writes(), 1000);
        assert_eq!(pio_count(&pio), 39);
        assert_eq!(mmio_count(&mmio, 0), 1000);
        assert_eq!(mmio_count(&mmio, 0xffc), 1000);
        // Reads don't count.
        assert_eq!(dev.pio_writes(), 39);
        assert_eq!(dev.mmio_writes(), 1000);
    }

    #[test]
    fn other_read_sizes_return_zero() {
        let (_dev, pio, mmio) = setup();
        pio.write(PioAddress(EXIT_TEST_PORT), &[1]).unwrap();
        mmio.write(MmioAddress(EXIT_TEST_MMIO_BASE), &[1]).unwrap();
        for len in [1, 2] {
            let mut d = [0xaau8; 2];
            pio.read(PioAddress(EXIT_TEST_PORT), &mut d[..len]).unwrap();
            assert!(d[..len].iter().all(|&b| b == 0));
        }
        for len in [1, 2, 8] {
            let mut d = [0xaau8; 8];
            mmio.read(MmioAddress(EXIT_TEST_MMIO_BASE), &mut d[..len])
                .unwrap();
            assert!(d[..len].iter().all(|&b| b == 0), "{len}: {d:?}");
        }
        // Direct hostile calls: odd sizes and far offsets.
        let dev = ExitTestDevice::new();
        let mut d = [0xaau8; 3];
        dev.mmio_read(MmioAddress(0), u64::MAX, &mut d);
        assert_eq!(d, [0; 3]);
        dev.pio_read(PioAddress(0), u16::MAX, &mut []);
        dev.mmio_write(MmioAddress(0), u64::MAX, &[]);
        assert_eq!(dev.mmio_writes(), 1);
    }

    #[test]
    fn read_back_wraps_at_u32() {
        let dev = ExitTestDevice::new();
        dev.pio.0.store(u64::from(u32::MAX), Ordering::Relaxed);
        let mut d = [0u8; 4];
        dev.pio_read(PioAddress(EXIT_TEST_PORT), 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), u32::MAX);
        dev.pio_write(PioAddress(EXIT_TEST_PORT), 0, &[0]);
        dev.pio_write(PioAddress(EXIT_TEST_PORT), 0, &[0]);
        dev.pio_read(PioAddress(EXIT_TEST_PORT), 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1);
        assert_eq!(dev.pio_writes(), u64::from(u32::MAX) + 2);
    }

    #[test]
    fn counts_from_many_threads() {
        let (dev, pio, mmio) = setup();
        let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (pio, mmio) = (pio.clone(), mmio.clone());
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        if t % 2 == 0 {
                            pio.write(PioAddress(EXIT_TEST_PORT), &[0]).unwrap();
                        } else {
                            mmio.write(MmioAddress(EXIT_TEST_MMIO_BASE), &[0; 4])
                                .unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!((dev.pio_writes(), dev.mmio_writes()), (1000, 1000));
    }
}
