//! Bus dispatch: one PIO or MMIO access routed to the right device among 1, 8 and 64, by
//! the bus's lookup and by a vCPU's dispatch cache (the hit path of kiln's run loop), for a
//! bus of `Arc<dyn …>` devices and, for PIO, a bus of an enum of device types (static
//! dispatch, as kiln's own buses). Target: under 50 ns per access.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kiln_bus::{DispatchCache, MmioAddress, MmioBus, PioAddress, PioBus, PioDevice, PioSlot};
use kiln_legacy::{ExitTestDevice, PostDevice};

/// A two-type device set, dispatched by `match` (kiln's `PioDev` has seven).
enum Devs {
    ExitTest(Arc<ExitTestDevice>),
    Post(Arc<PostDevice>),
}

#[derive(Clone, Copy)]
enum DevsRef<'a> {
    ExitTest(&'a ExitTestDevice),
    Post(&'a PostDevice),
}

impl PioSlot for Devs {
    type Ref<'a> = DevsRef<'a>;
    fn borrow(&self) -> DevsRef<'_> {
        match self {
            Devs::ExitTest(d) => DevsRef::ExitTest(d),
            Devs::Post(d) => DevsRef::Post(d),
        }
    }
    #[inline(always)]
    fn read(dev: DevsRef<'_>, base: PioAddress, offset: u16, data: &mut [u8]) {
        match dev {
            DevsRef::ExitTest(d) => d.pio_read(base, offset, data),
            DevsRef::Post(d) => d.pio_read(base, offset, data),
        }
    }
    #[inline(always)]
    fn write(dev: DevsRef<'_>, base: PioAddress, offset: u16, data: &[u8]) {
        match dev {
            DevsRef::ExitTest(d) => d.pio_write(base, offset, data),
            DevsRef::Post(d) => d.pio_write(base, offset, data),
        }
    }
}

fn buses(n: u16) -> (PioBus, MmioBus) {
    let mut pio = PioBus::new();
    let mut mmio = MmioBus::new();
    for i in 0..n {
        let dev = Arc::new(ExitTestDevice::default());
        pio.insert(PioAddress(0x1000 + i * 8), 4, dev.clone())
            .expect("pio insert");
        mmio.insert(
            MmioAddress(0xd000_0000 + u64::from(i) * 0x1000),
            0x1000,
            dev,
        )
        .expect("mmio insert");
    }
    (pio, mmio)
}

fn dispatch(c: &mut Criterion) {
    let mut g = c.benchmark_group("bus_dispatch");
    for n in [1u16, 8, 64] {
        let (pio, mmio) = buses(n);
        // The last device: the deepest binary search path.
        let port = PioAddress(0x1000 + (n - 1) * 8);
        let addr = MmioAddress(0xd000_0000 + u64::from(n - 1) * 0x1000 + 0x10);
        g.bench_with_input(BenchmarkId::new("pio_write", n), &n, |b, _| {
            b.iter(|| pio.write(black_box(port), black_box(&[1, 0, 0, 0])))
        });
        g.bench_with_input(BenchmarkId::new("pio_read", n), &n, |b, _| {
            let mut buf = [0u8; 4];
            b.iter(|| pio.read(black_box(port), black_box(&mut buf)))
        });
        g.bench_with_input(BenchmarkId::new("mmio_write", n), &n, |b, _| {
            b.iter(|| mmio.write(black_box(addr), black_box(&[1, 0, 0, 0])))
        });
        let mut cache = DispatchCache::new();
        pio.write_caching(&mut cache, port, &[0; 4])
            .expect("pio fill");
        mmio.write_caching(&mut cache, addr, &[0; 4])
            .expect("mmio fill");
        g.bench_with_input(BenchmarkId::new("pio_write_cached", n), &n, |b, _| {
            b.iter(|| assert!(cache.pio_write(black_box(port), black_box(&[1, 0, 0, 0]))))
        });
        g.bench_with_input(BenchmarkId::new("mmio_write_cached", n), &n, |b, _| {
            b.iter(|| assert!(cache.mmio_write(black_box(addr), black_box(&[1, 0, 0, 0]))))
        });
        // The same device set as an enum: the cache hit is a `match`, no function pointer.
        let mut static_pio = PioBus::<Devs>::default();
        static_pio
            .insert(PioAddress(0x80), 1, Devs::Post(Arc::default()))
            .expect("static insert");
        for i in 0..n {
            static_pio
                .insert(
                    PioAddress(0x1000 + i * 8),
                    4,
                    Devs::ExitTest(Arc::default()),
                )
                .expect("static insert");
        }
        let mut static_cache = DispatchCache::<Devs>::default();
        static_pio
            .write_caching(&mut static_cache, port, &[0; 4])
            .expect("static fill");
        g.bench_with_input(
            BenchmarkId::new("pio_write_cached_static", n),
            &n,
            |b, _| {
                b.iter(
                    || assert!(static_cache.pio_write(black_box(port), black_box(&[1, 0, 0, 0]))),
                )
            },
        );
        g.bench_with_input(BenchmarkId::new("mmio_miss", n), &n, |b, _| {
            b.iter(|| mmio.write(black_box(MmioAddress(0x1234)), black_box(&[1])))
        });
    }
    g.finish();
}

criterion_group!(benches, dispatch);
criterion_main!(benches);
