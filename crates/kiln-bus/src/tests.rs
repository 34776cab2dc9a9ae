use super::*;
use std::sync::atomic::{AtomicU64, Ordering};

/// Records the last access it saw, as (base, offset, len), and answers reads with a tag byte.
struct Probe {
    tag: u8,
    last: AtomicU64,
    writes: AtomicU64,
}

impl Probe {
    fn new(tag: u8) -> Arc<Self> {
        Arc::new(Probe {
            tag,
            last: AtomicU64::new(u64::MAX),
            writes: AtomicU64::new(0),
        })
    }

    fn record(&self, base: u64, offset: u64, len: usize) {
        // base in the high 32 bits is enough for the addresses the tests use.
        self.last
            .store((base << 32) | (offset << 8) | len as u64, Ordering::Relaxed);
    }

    /// (base, offset, len) of the last access.
    fn last(&self) -> (u64, u64, usize) {
        let v = self.last.load(Ordering::Relaxed);
        (v >> 32, (v >> 8) & 0xff_ffff, (v & 0xff) as usize)
    }
}

impl PioDevice for Probe {
    fn pio_read(&self, base: PioAddress, offset: u16, data: &mut [u8]) {
        self.record(base.0.into(), offset.into(), data.len());
        data.fill(self.tag);
    }
    fn pio_write(&self, base: PioAddress, offset: u16, data: &[u8]) {
        self.record(base.0.into(), offset.into(), data.len());
        self.writes.fetch_add(1, Ordering::Relaxed);
    }
}

impl MmioDevice for Probe {
    fn mmio_read(&self, base: MmioAddress, offset: u64, data: &mut [u8]) {
        self.record(base.0 >> 12, offset, data.len());
        data.fill(self.tag);
    }
    fn mmio_write(&self, base: MmioAddress, offset: u64, data: &[u8]) {
        self.record(base.0 >> 12, offset, data.len());
        self.writes.fetch_add(1, Ordering::Relaxed);
    }
}

fn pio_read1(bus: &PioBus, port: u16) -> Result<u8> {
    let mut b = [0u8; 1];
    bus.read(PioAddress(port), &mut b)?;
    Ok(b[0])
}

#[test]
fn adjacent_ranges_are_accepted_overlapping_rejected() {
    let mut bus = PioBus::new();
    bus.insert(PioAddress(0x10), 0x10, Probe::new(1)).unwrap();
    // Adjacent on both sides.
    bus.insert(PioAddress(0x20), 0x10, Probe::new(2)).unwrap();
    bus.insert(PioAddress(0x08), 0x08, Probe::new(3)).unwrap();
    assert_eq!(bus.len(), 3);

    let cases: [(u16, u16); 6] = [
        (0x10, 0x10), // identical
        (0x0f, 0x02), // overlaps the first byte of 0x10
        (0x1f, 0x01), // last byte of 0x10..0x20
        (0x18, 0x02), // strictly inside
        (0x00, 0x40), // covers all three
        (0x2f, 0x05), // overlaps the tail of 0x20..0x30
    ];
    for (base, size) in cases {
        let err = bus
            .insert(PioAddress(base), size, Probe::new(9))
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Overlap {
                    space: AddressSpace::Pio,
                    ..
                }
            ),
            "{base:#x}+{size:#x}: {err}"
        );
    }
    assert_eq!(bus.len(), 3);
    // A rejected insert left the map intact.
    assert_eq!(pio_read1(&bus, 0x1f).unwrap(), 1);
    assert_eq!(pio_read1(&bus, 0x20).unwrap(), 2);
    assert_eq!(pio_read1(&bus, 0x0f).unwrap(), 3);
}

#[test]
fn zero_size_and_wrap_are_rejected() {
    let mut pio = PioBus::new();
    assert_eq!(
        pio.insert(PioAddress(0x10), 0, Probe::new(0)).unwrap_err(),
        Error::ZeroSize {
            space: AddressSpace::Pio,
            base: 0x10
        }
    );
    assert!(matches!(
        pio.insert(PioAddress(0xfff0), 0x11, Probe::new(0)),
        Err(Error::Wraps { .. })
    ));
    // Ending exactly at the last port is fine.
    pio.insert(PioAddress(0xfff0), 0x10, Probe::new(7)).unwrap();
    assert_eq!(pio_read1(&pio, 0xffff).unwrap(), 7);

    let mut mmio = MmioBus::new();
    assert!(matches!(
        mmio.insert(MmioAddress(0x1000), 0, Probe::new(0)),
        Err(Error::ZeroSize { .. })
    ));
    assert!(matches!(
        mmio.insert(MmioAddress(u64::MAX - 0xf), 0x11, Probe::new(0)),
        Err(Error::Wraps { .. })
    ));
    assert!(matches!(
        mmio.insert(MmioAddress(2), u64::MAX, Probe::new(0)),
        Err(Error::Wraps { .. })
    ));
    mmio.insert(MmioAddress(u64::MAX - 0xf), 0x10, Probe::new(5))
        .unwrap();
    let mut d = [0u8; 8];
    mmio.write(MmioAddress(u64::MAX - 7), &d).unwrap();
    mmio.read(MmioAddress(u64::MAX - 7), &mut d).unwrap();
    assert_eq!(d, [5; 8]);
    assert!(matches!(
        mmio.read(MmioAddress(u64::MAX - 3), &mut d),
        Err(Error::Straddle { .. })
    ));
}

#[test]
fn whole_mmio_space_can_be_one_range() {
    let mut mmio = MmioBus::new();
    mmio.insert(MmioAddress(0), u64::MAX, Probe::new(1))
        .unwrap();
    // Only the last byte is left.
    mmio.insert(MmioAddress(u64::MAX), 1, Probe::new(2))
        .unwrap();
    let mut b = [0u8; 1];
    mmio.read(MmioAddress(u64::MAX), &mut b).unwrap();
    assert_eq!(b, [2]);
    mmio.read(MmioAddress(u64::MAX - 1), &mut b).unwrap();
    assert_eq!(b, [1]);
}

#[test]
fn lookup_hits_first_and_last_byte_and_misses_between() {
    let mut bus = PioBus::new();
    let a = Probe::new(0xa);
    let b = Probe::new(0xb);
    bus.insert(PioAddress(0x3f8), 8, a.clone()).unwrap();
    bus.insert(PioAddress(0x600), 3, b.clone()).unwrap();

    assert_eq!(pio_read1(&bus, 0x3f8).unwrap(), 0xa);
    assert_eq!(a.last(), (0x3f8, 0, 1));
    assert_eq!(pio_read1(&bus, 0x3ff).unwrap(), 0xa);
    assert_eq!(a.last(), (0x3f8, 7, 1));
    assert_eq!(pio_read1(&bus, 0x602).unwrap(), 0xb);
    assert_eq!(b.last(), (0x600, 2, 1));

    for port in [0u16, 0x3f7, 0x400, 0x5ff, 0x603, 0xffff] {
        assert_eq!(
            pio_read1(&bus, port).unwrap_err(),
            Error::NoDevice {
                space: AddressSpace::Pio,
                addr: port.into(),
                len: 1
            }
        );
        assert_eq!(
            bus.write(PioAddress(port), &[0]).unwrap_err(),
            Error::NoDevice {
                space: AddressSpace::Pio,
                addr: port.into(),
                len: 1
            }
        );
    }
    assert_eq!(a.writes.load(Ordering::Relaxed), 0);
    assert_eq!(b.writes.load(Ordering::Relaxed), 0);

    let (base, size, _) = bus.get(PioAddress(0x3fc)).unwrap();
    assert_eq!((base, size), (PioAddress(0x3f8), 8));
    assert!(bus.get(PioAddress(0x400)).is_none());
}

#[test]
fn straddling_accesses_are_rejected_and_not_dispatched() {
    let mut bus = PioBus::new();
    let p = Probe::new(1);
    // Two adjacent ranges: an access crossing from one into the other is still rejected.
    bus.insert(PioAddress(0x700), 4, p.clone()).unwrap();
    bus.insert(PioAddress(0x704), 4, Probe::new(2)).unwrap();

    bus.write(PioAddress(0x700), &[0; 4]).unwrap();
    assert_eq!(p.last(), (0x700, 0, 4));
    bus.write(PioAddress(0x702), &[0; 2]).unwrap();
    assert_eq!(p.last(), (0x700, 2, 2));
    let err = bus.write(PioAddress(0x702), &[0; 4]).unwrap_err();
    assert_eq!(
        err,
        Error::Straddle {
            space: AddressSpace::Pio,
            addr: 0x702,
            len: 4,
            base: 0x700,
            last: 0x703
        }
    );
    let mut d = [0xeeu8; 2];
    assert!(matches!(
        bus.read(PioAddress(0x703), &mut d),
        Err(Error::Straddle { .. })
    ));
    assert_eq!(d, [0xee; 2], "a rejected read leaves the buffer alone");
    assert_eq!(p.writes.load(Ordering::Relaxed), 2);

    let mut mmio = MmioBus::new();
    mmio.insert(MmioAddress(0xc000_0000), 0x1000, p.clone())
        .unwrap();
    mmio.write(MmioAddress(0xc000_0ff8), &[0; 8]).unwrap();
    assert!(matches!(
        mmio.write(MmioAddress(0xc000_0ffc), &[0; 8]),
        Err(Error::Straddle { .. })
    ));
    assert!(matches!(
        mmio.write(MmioAddress(0xc000_0fff), &[0; 2]),
        Err(Error::Straddle { .. })
    ));
}

#[test]
fn access_sizes_are_checked() {
    let mut pio = PioBus::new();
    let p = Probe::new(1);
    pio.insert(PioAddress(0), 0x100, p.clone()).unwrap();
    for len in [1, 2, 4] {
        pio.write(PioAddress(0x10), &[0u8; 8][..len]).unwrap();
    }
    for len in [0, 3, 5, 8, 16] {
        let mut buf = [0u8; 16];
        assert_eq!(
            pio.read(PioAddress(0x10), &mut buf[..len]).unwrap_err(),
            Error::InvalidAccessSize {
                space: AddressSpace::Pio,
                addr: 0x10,
                len
            }
        );
        assert!(matches!(
            pio.write(PioAddress(0x10), &buf[..len]),
            Err(Error::InvalidAccessSize { .. })
        ));
    }
    // Size errors take precedence over misses, so the report says what was wrong.
    assert!(matches!(
        pio.write(PioAddress(0x200), &[0; 3]),
        Err(Error::InvalidAccessSize { .. })
    ));
    assert_eq!(p.writes.load(Ordering::Relaxed), 3);

    let mut mmio = MmioBus::new();
    mmio.insert(MmioAddress(0x1000), 0x100, p.clone()).unwrap();
    for len in [1, 2, 4, 8] {
        mmio.write(MmioAddress(0x1000), &[0u8; 8][..len]).unwrap();
    }
    for len in [0, 3, 6, 7, 16] {
        let mut buf = [0u8; 16];
        assert!(matches!(
            mmio.read(MmioAddress(0x1000), &mut buf[..len]),
            Err(Error::InvalidAccessSize { len: l, .. }) if l == len
        ));
    }
    assert_eq!(p.writes.load(Ordering::Relaxed), 7);
}

fn check_many(n: u64) {
    let mut bus = MmioBus::new();
    let probes: Vec<_> = (0..n).map(|i| Probe::new(i as u8)).collect();
    // Insert out of order, with gaps of one page between 0x1000-byte ranges.
    let mut order: Vec<u64> = (0..n).collect();
    order.reverse();
    order.rotate_left((n / 3) as usize);
    for &i in &order {
        bus.insert(
            MmioAddress(0x10_0000 + i * 0x2000),
            0x1000,
            probes[i as usize].clone(),
        )
        .unwrap();
    }
    assert_eq!(bus.len() as u64, n);
    for i in 0..n {
        let base = 0x10_0000 + i * 0x2000;
        let mut b = [0u8; 4];
        bus.read(MmioAddress(base), &mut b).unwrap();
        assert_eq!(b, [i as u8; 4]);
        bus.read(MmioAddress(base + 0xffc), &mut b).unwrap();
        assert_eq!(b, [i as u8; 4]);
        assert_eq!(probes[i as usize].last(), (base >> 12, 0xffc, 4));
        // The gap after each range.
        assert!(matches!(
            bus.read(MmioAddress(base + 0x1000), &mut b),
            Err(Error::NoDevice { .. })
        ));
        assert!(matches!(
            bus.read(MmioAddress(base + 0x1fff), &mut b[..1]),
            Err(Error::NoDevice { .. })
        ));
    }
    let mut b = [0u8; 1];
    assert!(bus.read(MmioAddress(0x10_0000 - 1), &mut b).is_err());
    assert!(bus.read(MmioAddress(0), &mut b).is_err());
    assert!(bus.read(MmioAddress(u64::MAX), &mut b).is_err());
}

#[test]
fn one_device() {
    check_many(1);
}

#[test]
fn eight_devices() {
    check_many(8);
}

#[test]
fn sixty_four_devices() {
    check_many(64);
}

#[test]
fn remove_unregisters_exact_base_only() {
    let mut bus = PioBus::new();
    let p = Probe::new(1);
    bus.insert(PioAddress(0x60), 1, p.clone()).unwrap();
    bus.insert(PioAddress(0x64), 1, p.clone()).unwrap();
    assert!(matches!(
        bus.remove(PioAddress(0x61)),
        Err(Error::NotRegistered { base: 0x61, .. })
    ));
    bus.remove(PioAddress(0x60)).unwrap();
    assert!(pio_read1(&bus, 0x60).is_err());
    // The same device at its other range still answers, with that range's base.
    assert_eq!(pio_read1(&bus, 0x64).unwrap(), 1);
    assert_eq!(p.last(), (0x64, 0, 1));
    // The freed range can be reused.
    bus.insert(PioAddress(0x60), 1, Probe::new(2)).unwrap();
    assert_eq!(pio_read1(&bus, 0x60).unwrap(), 2);
}

#[test]
fn bus_is_shareable_across_threads() {
    let mut bus = MmioBus::new();
    let p = Probe::new(3);
    bus.insert(MmioAddress(0xc000_0000), 0x1000, p.clone())
        .unwrap();
    let bus = Arc::new(bus);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let bus = Arc::clone(&bus);
            std::thread::spawn(move || {
                for i in 0..1000u64 {
                    bus.write(MmioAddress(0xc000_0000 + (i % 0x200) * 8), &[1; 8])
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(p.writes.load(Ordering::Relaxed), 4000);
}

#[test]
fn errors_name_space_address_and_size() {
    let e = Error::Straddle {
        space: AddressSpace::Mmio,
        addr: 0xc000_0ffc,
        len: 8,
        base: 0xc000_0000,
        last: 0xc000_0fff,
    };
    let s = e.to_string();
    assert!(
        s.contains("MMIO") && s.contains("0xc0000ffc") && s.contains("8 bytes"),
        "{s}"
    );
    let s = Error::NoDevice {
        space: AddressSpace::Pio,
        addr: 0x3f7,
        len: 2,
    }
    .to_string();
    assert!(
        s.contains("PIO") && s.contains("0x3f7") && s.contains("2 bytes"),
        "{s}"
    );
}

#[test]
fn cache_hits_only_inside_the_remembered_range() {
    let (a, b) = (Probe::new(1), Probe::new(2));
    let mut pio = PioBus::new();
    pio.insert(PioAddress(0x10), 8, a.clone()).unwrap();
    pio.insert(PioAddress(0x18), 8, b.clone()).unwrap();
    let mut cache = DispatchCache::new();
    // Empty: nothing hits, nothing is dispatched — not even an access that looks like the
    // empty memo (address 0, nothing read or written).
    assert!(!cache.pio_write(PioAddress(0x10), &[0]));
    assert!(!cache.pio_write(PioAddress(0), &[]));
    assert!(!cache.mmio_write(MmioAddress(0), &[]));
    assert!(!cache.mmio_read(MmioAddress(0), &mut []));
    assert_eq!(a.writes.load(Ordering::Relaxed), 0);

    pio.write_caching(&mut cache, PioAddress(0x12), &[0; 2])
        .unwrap();
    assert_eq!(a.writes.load(Ordering::Relaxed), 1);
    // Hits: first and last byte of 0x10..0x18, with the range's base and the offset.
    assert!(cache.pio_write(PioAddress(0x10), &[0]));
    assert_eq!(a.last(), (0x10, 0, 1));
    let mut d = [0u8; 4];
    assert!(cache.pio_read(PioAddress(0x14), &mut d));
    assert_eq!((d, a.last()), ([1; 4], (0x10, 4, 4)));
    assert!(cache.pio_write(PioAddress(0x17), &[0]));
    assert_eq!(a.last(), (0x17 - 0x7, 7, 1));
    assert_eq!(a.writes.load(Ordering::Relaxed), 3);
    // Misses: the next device, below the range, straddling its end, bad sizes.
    assert!(!cache.pio_write(PioAddress(0x18), &[0]));
    assert!(!cache.pio_write(PioAddress(0x0f), &[0]));
    assert!(!cache.pio_write(PioAddress(0x16), &[0; 4]));
    assert!(!cache.pio_write(PioAddress(0x10), &[0; 3]));
    assert!(!cache.pio_write(PioAddress(0x10), &[]));
    assert!(!cache.pio_write(PioAddress(0x10), &[0; 8]));
    let mut big = [0u8; 8];
    assert!(!cache.pio_read(PioAddress(0x10), &mut big));
    assert_eq!(big, [0; 8], "a miss leaves the buffer alone");
    assert_eq!(a.writes.load(Ordering::Relaxed), 3);
    assert_eq!(b.writes.load(Ordering::Relaxed), 0);

    // A failed access leaves the cache as it was; a hit elsewhere replaces it.
    assert!(matches!(
        pio.write_caching(&mut cache, PioAddress(0x30), &[0]),
        Err(Error::NoDevice { .. })
    ));
    assert!(cache.pio_write(PioAddress(0x10), &[0]));
    pio.read_caching(&mut cache, PioAddress(0x1a), &mut d[..1])
        .unwrap();
    assert_eq!(d[0], 2);
    assert!(cache.pio_write(PioAddress(0x1f), &[0]));
    assert!(!cache.pio_write(PioAddress(0x10), &[0]));
    assert_eq!(b.writes.load(Ordering::Relaxed), 1);
    assert_eq!(b.last(), (0x18, 7, 1));
    cache.clear();
    assert!(!cache.pio_write(PioAddress(0x1f), &[0]));
}

#[test]
fn mmio_cache_checks_sizes_and_the_top_of_the_space() {
    let top = Probe::new(7);
    let low = Probe::new(3);
    let mut mmio = MmioBus::new();
    mmio.insert(MmioAddress(u64::MAX - 0xf), 0x10, top.clone())
        .unwrap();
    mmio.insert(MmioAddress(0x1000), 0x1000, low.clone())
        .unwrap();
    let mut cache = DispatchCache::new();
    let mut d = [0u8; 8];
    mmio.read_caching(&mut cache, MmioAddress(u64::MAX - 7), &mut d)
        .unwrap();
    assert_eq!(d, [7; 8]);
    assert!(cache.mmio_write(MmioAddress(u64::MAX), &[0]));
    // (The probe keeps 32 bits of the base; offset and length tell the access apart.)
    assert_eq!((top.last().1, top.last().2), (0xf, 1));
    // Running past the end of the space is a miss, not an overflow.
    assert!(!cache.mmio_write(MmioAddress(u64::MAX - 3), &[0; 8]));
    assert!(!cache.mmio_write(MmioAddress(u64::MAX), &[0; 2]));
    for len in [0, 3, 5, 16] {
        assert!(!cache.mmio_write(MmioAddress(u64::MAX - 0xf), &vec![0; len]));
    }
    assert_eq!(top.writes.load(Ordering::Relaxed), 1);
    // PIO and MMIO are remembered separately.
    assert!(!cache.pio_write(PioAddress(0xffff), &[0]));
    mmio.write_caching(&mut cache, MmioAddress(0x1ff8), &[0; 8])
        .unwrap();
    assert!(cache.mmio_write(MmioAddress(0x1000), &[0; 4]));
    assert!(!cache.mmio_write(MmioAddress(u64::MAX), &[0]));
    assert_eq!(low.writes.load(Ordering::Relaxed), 2);
    assert!(format!("{cache:?}").contains("4096..=8191"), "{cache:?}");
}

#[test]
fn caches_are_per_thread_and_see_one_device_state() {
    let dev = Probe::new(1);
    let mut pio = PioBus::new();
    pio.insert(PioAddress(0x80), 1, dev.clone()).unwrap();
    let pio = Arc::new(pio);
    std::thread::scope(|s| {
        for _ in 0..4 {
            let pio = &pio;
            s.spawn(move || {
                let mut cache = DispatchCache::new();
                for _ in 0..250 {
                    if !cache.pio_write(PioAddress(0x80), &[1]) {
                        pio.write_caching(&mut cache, PioAddress(0x80), &[1])
                            .unwrap();
                    }
                }
            });
        }
    });
    assert_eq!(dev.writes.load(Ordering::Relaxed), 1000);
}
