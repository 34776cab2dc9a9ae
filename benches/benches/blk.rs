//! virtio-blk request processing without a guest: a driver built here puts a batch of ready
//! requests in the available ring of a `MmioTransport<_, Block>` (brought up to DRIVER_OK
//! through its registers), and each iteration is one `notify_queue` call, the path the
//! event loop takes when the queue's ioeventfd fires. Guest memory is a vm-memory
//! `GuestMemoryMmap`, the image a memfd (page cache only: this measures the device model
//! and syscalls, not a disk).
//!
//! Reported as requests/s (criterion `Throughput::Elements`), per request type and mixed.

use std::fs::File;
use std::hint::black_box;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln_bus::{MmioAddress, MmioDevice};
use kiln_virtio::block::{request_type, status as blk_status};
use kiln_virtio::mmio::{regs, status};
use kiln_virtio::{Block, BlockConfig, MmioTransport, QueueOutcome, VIRTIO_F_VERSION_1};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

const MEM_SIZE: usize = 8 << 20;
const QS: u16 = 256;
/// Requests per notification: three descriptors each, so 64 fit the 256-entry table, and
/// 256 % 64 == 0 lets the available ring be filled once and reused lap after lap.
const BATCH: u16 = 64;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x4000;
const STATUS: u64 = 0x5000;
/// 64 KiB of data buffer per request.
const DATA: u64 = 0x10_0000;
const DATA_STRIDE: u64 = 64 << 10;
/// Each request gets its own 64 KiB of the image.
const IMAGE_LEN: u64 = BATCH as u64 * DATA_STRIDE;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

#[derive(Debug, Clone, Copy)]
enum Req {
    Read4k,
    Write4k,
    Flush,
    Read64k,
}

impl Req {
    fn name(self) -> &'static str {
        match self {
            Req::Read4k => "read_4k",
            Req::Write4k => "write_4k",
            Req::Flush => "flush",
            Req::Read64k => "read_64k",
        }
    }
}

/// The interrupt line: counting is all a guest-less benchmark needs.
#[derive(Default)]
struct Line(AtomicU64);

impl kiln_irq::InterruptLine for Line {
    fn trigger(&self) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn memfd(len: u64) -> File {
    // SAFETY: the name is a NUL-terminated string; memfd_create takes no other pointer.
    let fd = unsafe { libc::memfd_create(c"kiln-bench-blk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("size the image");
    f
}

fn put<T: vm_memory::ByteValued>(mem: &Mem, at: u64, v: T) {
    mem.write_obj(v, GuestAddress(at)).expect("guest write");
}

fn write_desc(mem: &Mem, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let at = DESC + 16 * u64::from(i);
    put(mem, at, addr);
    put(mem, at + 8, len);
    put(mem, at + 12, flags);
    put(mem, at + 14, next);
}

/// A running device with `BATCH` requests laid out; `kick` publishes them all once more.
struct Bench {
    mem: Mem,
    t: MmioTransport<Mem, Block<Mem>>,
    avail_idx: u16,
}

impl Bench {
    fn new(kinds: &[Req]) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("memory");
        let blk = Block::new(memfd(IMAGE_LEN), BlockConfig::default()).expect("block device");
        let t = MmioTransport::new(mem.clone(), blk, Arc::new(Line::default()));
        let base = MmioAddress(0xd000_0000);
        let w = |off: u64, v: u32| t.mmio_write(base, off, &v.to_le_bytes());
        w(regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(regs::DRIVER_FEATURES_SEL, 1);
        w(regs::DRIVER_FEATURES, (VIRTIO_F_VERSION_1 >> 32) as u32);
        w(
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        w(regs::QUEUE_SEL, 0);
        w(regs::QUEUE_NUM, u32::from(QS));
        w(regs::QUEUE_DESC_LOW, DESC as u32);
        w(regs::QUEUE_DRIVER_LOW, AVAIL as u32);
        w(regs::QUEUE_DEVICE_LOW, USED as u32);
        w(regs::QUEUE_READY, 1);
        w(
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert!(t.is_active(), "device did not come up");

        // Request c: header, data (unless flush), status; descriptors 3c..3c+2.
        for c in 0..BATCH {
            let kind = kinds[usize::from(c) % kinds.len()];
            let (t_type, len, writable) = match kind {
                Req::Read4k => (request_type::IN, 4096, true),
                Req::Write4k => (request_type::OUT, 4096, false),
                Req::Flush => (request_type::FLUSH, 0, false),
                Req::Read64k => (request_type::IN, 64 << 10, true),
            };
            let hdr = HDR + 16 * u64::from(c);
            put(&mem, hdr, t_type);
            put(&mem, hdr + 4, 0u32);
            put(&mem, hdr + 8, u64::from(c) * DATA_STRIDE / 512);
            let st = STATUS + u64::from(c);
            let d = 3 * c;
            if len == 0 {
                write_desc(&mem, d, hdr, 16, F_NEXT, d + 1);
                write_desc(&mem, d + 1, st, 1, F_WRITE, 0);
            } else {
                let data = DATA + u64::from(c) * DATA_STRIDE;
                let dflags = F_NEXT | if writable { F_WRITE } else { 0 };
                write_desc(&mem, d, hdr, 16, F_NEXT, d + 1);
                write_desc(&mem, d + 1, data, len, dflags, d + 2);
                write_desc(&mem, d + 2, st, 1, F_WRITE, 0);
            }
        }
        for slot in 0..QS {
            put(&mem, AVAIL + 4 + 2 * u64::from(slot), 3 * (slot % BATCH));
        }
        let mut b = Bench {
            mem,
            t,
            avail_idx: 0,
        };
        // One checked round: every request completes with OK.
        for c in 0..BATCH {
            put(&b.mem, STATUS + u64::from(c), 0xffu8);
        }
        b.kick();
        let used: u16 = b.mem.read_obj(GuestAddress(USED + 2)).expect("used idx");
        assert_eq!(used, BATCH, "not every request was used");
        for c in 0..BATCH {
            let s: u8 = b
                .mem
                .read_obj(GuestAddress(STATUS + u64::from(c)))
                .expect("status");
            assert_eq!(s, blk_status::OK, "request {c} failed");
        }
        b
    }

    /// Publishes the batch and processes it, as the event loop does on an ioeventfd.
    fn kick(&mut self) {
        self.avail_idx = self.avail_idx.wrapping_add(BATCH);
        put(&self.mem, AVAIL + 2, self.avail_idx);
        let r = self.t.notify_queue(0).expect("process queue");
        assert_eq!(r, QueueOutcome::Done);
    }
}

fn blk(c: &mut Criterion) {
    let mut g = c.benchmark_group("blk_requests");
    g.throughput(Throughput::Elements(u64::from(BATCH)));
    g.measurement_time(Duration::from_secs(3));
    let mixed = [Req::Read4k, Req::Write4k, Req::Flush, Req::Read64k];
    for kind in mixed {
        let mut b = Bench::new(&[kind]);
        g.bench_function(BenchmarkId::new(kind.name(), BATCH), |it| {
            it.iter(|| black_box(&mut b).kick())
        });
    }
    let mut b = Bench::new(&mixed);
    g.bench_function(BenchmarkId::new("mixed", BATCH), |it| {
        it.iter(|| black_box(&mut b).kick())
    });
    g.finish();
}

criterion_group!(benches, blk);
criterion_main!(benches);
