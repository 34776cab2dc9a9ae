//! Pushes a virtio-blk write and read through the MMIO transport the way a guest driver
//! would: status handshake, feature negotiation and queue setup through registers, requests
//! laid out with virtio-queue's `MockSplitQueue`, a `QueueNotify` write, then the used ring,
//! the status bytes and the interrupt.
//!
//! Run with `cargo run -p kiln-virtio --example blk_mock`.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use kiln_bus::{MmioAddress, MmioBus};
use kiln_irq::EventFdLine;
use kiln_virtio::block::{request_type, status as blk_status};
use kiln_virtio::mmio::{regs, status, MMIO_SIZE};
use kiln_virtio::{Block, BlockConfig, MmioTransport, VIRTIO_F_VERSION_1};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const BASE: MmioAddress = MmioAddress(0xd000_0000);
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
    let disk = vmm_sys_util::tempfile::TempFile::new()?;
    disk.as_file().set_len(1 << 20)?;
    let cfg = BlockConfig {
        id: b"example-disk".to_vec(),
        ..Default::default()
    };
    let blk = Block::new(disk.as_file().try_clone()?, cfg)?;
    let line = Arc::new(EventFdLine::new()?);
    let transport = Arc::new(MmioTransport::new(mem.clone(), blk, line.clone()));
    let mut bus = MmioBus::new();
    bus.insert(BASE, MMIO_SIZE, transport.clone())?;

    let w = |off: u64, v: u32| bus.write(MmioAddress(BASE.0 + off), &v.to_le_bytes());
    let r = |off: u64| -> Result<u32, kiln_bus::Error> {
        let mut b = [0u8; 4];
        bus.read(MmioAddress(BASE.0 + off), &mut b)?;
        Ok(u32::from_le_bytes(b))
    };
    println!(
        "magic {:#x} version {} device id {}",
        r(regs::MAGIC_VALUE)?,
        r(regs::VERSION)?,
        r(regs::DEVICE_ID)?
    );

    // Driver bring-up.
    let ack_drv = status::ACKNOWLEDGE | status::DRIVER;
    w(regs::STATUS, status::ACKNOWLEDGE)?;
    w(regs::STATUS, ack_drv)?;
    w(regs::DRIVER_FEATURES_SEL, 1)?;
    w(regs::DRIVER_FEATURES, (VIRTIO_F_VERSION_1 >> 32) as u32)?;
    w(regs::STATUS, ack_drv | status::FEATURES_OK)?;
    assert_ne!(r(regs::STATUS)? & status::FEATURES_OK, 0);
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    w(regs::QUEUE_SEL, 0)?;
    w(regs::QUEUE_NUM, 16)?;
    w(regs::QUEUE_DESC_LOW, vq.desc_table_addr().0 as u32)?;
    w(regs::QUEUE_DRIVER_LOW, vq.avail_addr().0 as u32)?;
    w(regs::QUEUE_DEVICE_LOW, vq.used_addr().0 as u32)?;
    w(regs::QUEUE_READY, 1)?;
    w(
        regs::STATUS,
        ack_drv | status::FEATURES_OK | status::DRIVER_OK,
    )?;
    println!(
        "status {:#x}, active: {}",
        r(regs::STATUS)?,
        transport.is_active()
    );

    // Request 1: write "hello" padded to a sector at sector 4. Request 2: read it back.
    let (hdr1, hdr2, data, back, st) = (0x1_0000u64, 0x1_0100, 0x2_0000, 0x3_0000, 0x4_0000);
    mem.write_obj(request_type::OUT, GuestAddress(hdr1))?;
    mem.write_obj(4u64, GuestAddress(hdr1 + 8))?;
    mem.write_obj(request_type::IN, GuestAddress(hdr2))?;
    mem.write_obj(4u64, GuestAddress(hdr2 + 8))?;
    let mut sector = [0u8; 512];
    sector[..5].copy_from_slice(b"hello");
    mem.write_slice(&sector, GuestAddress(data))?;
    let d = |addr: u64, len: u32, flags: u16, next: u16| {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    };
    vq.add_desc_chains(
        &[
            d(hdr1, 16, F_NEXT, 1),
            d(data, 512, F_NEXT, 2),
            d(st, 1, F_WRITE, 0),
            d(hdr2, 16, F_NEXT, 4),
            d(back, 512, F_NEXT | F_WRITE, 5),
            d(st + 1, 1, F_WRITE, 0),
        ],
        0,
    )?;
    // The kick: on a real VM an ioeventfd would catch this write instead.
    w(regs::QUEUE_NOTIFY, 0)?;

    let used = vq.used().idx().load();
    let s: [u8; 2] = mem.read_obj(GuestAddress(st))?;
    let mut got = [0u8; 5];
    mem.read_slice(&mut got, GuestAddress(back))?;
    let mut on_disk = [0u8; 5];
    disk.as_file().read_exact_at(&mut on_disk, 4 * 512)?;
    println!(
        "used idx {used}, statuses {s:?} (OK = {}), read back {:?}, on disk {:?}",
        blk_status::OK,
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&on_disk)
    );
    println!(
        "interrupt status {:#x}, line triggered {} time(s)",
        r(regs::INTERRUPT_STATUS)?,
        line.take_count()
    );
    w(regs::INTERRUPT_ACK, r(regs::INTERRUPT_STATUS)?)?;
    assert_eq!((used, s, &got), (2, [0, 0], b"hello"));
    Ok(())
}
