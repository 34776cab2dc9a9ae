//! The virtio-mmio transport in front of a virtio-blk device: a guest's register reads and
//! writes (any offset, any size), event-loop notifications, and raw writes to guest memory
//! (so rings, descriptors and headers are the guest's too). Nothing may panic, and a reset
//! must always bring the transport back to power-on.
#![no_main]

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use arbitrary::Arbitrary;
use kiln_bus::{MmioAddress, MmioDevice};
use kiln_fuzz::{guest_memory, map_addr, memfd_disk, poke, CountingLine, Patch};
use kiln_virtio::mmio::{regs, status, MMIO_SIZE};
use kiln_virtio::{Block, BlockConfig, MmioTransport, VIRTIO_F_VERSION_1};
use libfuzzer_sys::fuzz_target;

const DISK_LEN: u64 = 64 << 10;
const BASE: MmioAddress = MmioAddress(0xd000_0000);

#[derive(Debug, Arbitrary, Clone, Copy)]
enum Size {
    B1,
    B2,
    B4,
    B8,
}

impl Size {
    fn len(self) -> usize {
        match self {
            Size::B1 => 1,
            Size::B2 => 2,
            Size::B4 => 4,
            Size::B8 => 8,
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Op {
    Read {
        off: u16,
        size: Size,
    },
    Write {
        off: u16,
        size: Size,
        val: u64,
    },
    /// The ioeventfd / event-loop path.
    Notify(u8),
    /// The guest writes its memory.
    Poke(Patch),
    /// A well-behaved driver bring-up with the fuzzer's features and queue placement, so
    /// short inputs reach a live device.
    BringUp {
        features: u64,
        size: u16,
        desc: u32,
        avail: u32,
        used: u32,
    },
}

#[derive(Debug, Arbitrary)]
struct Input {
    read_only: bool,
    queue_size_log2: u8,
    ops: Vec<Op>,
}

/// Register offsets mostly (high bit set: an aligned register), anything else otherwise;
/// the bus never passes an access that runs past the device's range.
fn offset(off: u16, len: usize) -> u64 {
    if off & 0x8000 != 0 {
        u64::from(off & 0x3f) * 4
    } else {
        u64::from(off) % (MMIO_SIZE - len as u64 + 1)
    }
}

fuzz_target!(|input: Input| {
    let mem = guest_memory();
    let disk = memfd_disk(DISK_LEN);
    let cfg = BlockConfig {
        read_only: input.read_only,
        queue_size: 1 << (input.queue_size_log2 % 9),
        ..Default::default()
    };
    let blk = Block::new(disk.try_clone().expect("dup"), cfg).expect("block");
    let t = MmioTransport::new(mem.clone(), blk, Arc::new(CountingLine::default()));
    let w = |off: u64, v: u32| t.mmio_write(BASE, off, &v.to_le_bytes());
    let r = |off: u64| {
        let mut b = [0u8; 4];
        t.mmio_read(BASE, off, &mut b);
        u32::from_le_bytes(b)
    };

    for op in &input.ops {
        match *op {
            Op::Read { off, size } => {
                let mut b = [0u8; 8];
                let len = size.len();
                t.mmio_read(BASE, offset(off, len), &mut b[..len]);
            }
            Op::Write { off, size, val } => {
                let len = size.len();
                t.mmio_write(BASE, offset(off, len), &val.to_le_bytes()[..len]);
            }
            Op::Notify(q) => {
                let _ = t.notify_queue(u32::from(q));
            }
            Op::Poke(ref p) => poke(&mem, map_addr(p.addr), &p.bytes),
            Op::BringUp {
                features,
                size,
                desc,
                avail,
                used,
            } => {
                w(regs::STATUS, 0);
                w(regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
                w(regs::DEVICE_FEATURES_SEL, 0);
                let lo = r(regs::DEVICE_FEATURES);
                w(regs::DEVICE_FEATURES_SEL, 1);
                let hi = r(regs::DEVICE_FEATURES);
                let f = (features & (u64::from(hi) << 32 | u64::from(lo))) | VIRTIO_F_VERSION_1;
                w(regs::DRIVER_FEATURES_SEL, 0);
                w(regs::DRIVER_FEATURES, f as u32);
                w(regs::DRIVER_FEATURES_SEL, 1);
                w(regs::DRIVER_FEATURES, (f >> 32) as u32);
                w(
                    regs::STATUS,
                    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
                );
                w(regs::QUEUE_SEL, 0);
                w(regs::QUEUE_NUM, u32::from(size));
                for (reg, a) in [
                    (regs::QUEUE_DESC_LOW, desc),
                    (regs::QUEUE_DRIVER_LOW, avail),
                    (regs::QUEUE_DEVICE_LOW, used),
                ] {
                    let a = map_addr(a);
                    w(reg, a as u32);
                    w(reg + 4, (a >> 32) as u32);
                }
                w(regs::QUEUE_READY, 1);
                w(
                    regs::STATUS,
                    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
                );
            }
        }
    }

    // Whatever happened, a reset brings the transport back to power-on.
    w(regs::STATUS, 0);
    assert_eq!(t.status(), 0);
    assert!(!t.is_active());
    assert_eq!(r(regs::INTERRUPT_STATUS), 0);
    assert_eq!(disk.metadata().expect("stat").len(), DISK_LEN);
    if input.read_only {
        let mut now = vec![0u8; DISK_LEN as usize];
        disk.read_exact_at(&mut now, 0).expect("read image");
        assert!(now.iter().all(|&b| b == 0), "read-only image changed");
    }
});
