//! A guest connection through virtio-vsock to a host Unix listener, driven the way a guest
//! driver would through the device's queues (no MMIO transport here): the guest sends
//! REQUEST to port 1234, kiln connects to `<uds>_1234`, the guest gets RESPONSE, sends a
//! few bytes, and the host's answer comes back in an RX buffer.
//!
//! Run with `cargo run -p kiln-virtio --example vsock_unix`.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use kiln_virtio::vsock::packet::{Header, HDR_LEN, OP_REQUEST, OP_RW, TYPE_STREAM};
use kiln_virtio::vsock::{port_path, HOST_CID};
use kiln_virtio::{InterruptKind, VirtioDevice, VirtioInterrupt, Vsock, VsockConfig};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;
const QS: u16 = 8;
const GUEST_CID: u64 = 3;

struct NoIrq;
impl VirtioInterrupt for NoIrq {
    fn trigger(&self, _: InterruptKind) -> std::io::Result<()> {
        Ok(())
    }
}

/// One split queue at `base` (descriptors, then the available ring at +0x1000, the used
/// ring at +0x2000), with a driver-side cursor.
struct Ring {
    base: u64,
    next: u16,
    used_seen: u16,
}

impl Ring {
    fn queue(&self) -> Queue {
        let mut q = Queue::new(QS).expect("queue size");
        q.set_desc_table_address(Some(self.base as u32), Some((self.base >> 32) as u32));
        q.set_avail_ring_address(Some(self.base as u32 + 0x1000), Some(0));
        q.set_used_ring_address(Some(self.base as u32 + 0x2000), Some(0));
        q.set_size(QS);
        q.set_ready(true);
        q
    }

    /// Makes one buffer available (flags: 2 = device-writable).
    fn push(
        &mut self,
        mem: &Mem,
        addr: u64,
        len: u32,
        flags: u16,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let d = self.base + 16 * u64::from(self.next % QS);
        mem.write_obj(addr, GuestAddress(d))?;
        mem.write_obj(len, GuestAddress(d + 8))?;
        mem.write_obj(flags, GuestAddress(d + 12))?;
        mem.write_obj(
            self.next % QS,
            GuestAddress(self.base + 0x1000 + 4 + 2 * u64::from(self.next % QS)),
        )?;
        self.next = self.next.wrapping_add(1);
        mem.write_obj(self.next, GuestAddress(self.base + 0x1000 + 2))
    }

    /// The next used entry's (id, len), if the device returned one.
    fn pop(&mut self, mem: &Mem) -> Option<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.base + 0x2000 + 2)).ok()?;
        if idx == self.used_seen {
            return None;
        }
        let e = self.base + 0x2000 + 4 + 8 * u64::from(self.used_seen % QS);
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((
            mem.read_obj(GuestAddress(e)).ok()?,
            mem.read_obj(GuestAddress(e + 4)).ok()?,
        ))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("kiln-vsock-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let uds = dir.join("v.sock");
    let host = UnixListener::bind(port_path(&uds, 1234))?;

    let mem: Mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
    let mut dev = Vsock::<Mem>::new(VsockConfig {
        guest_cid: GUEST_CID,
        uds_path: uds.clone(),
        queue_size: QS,
    })?;
    let mut rings: Vec<Ring> = (0..3)
        .map(|i| Ring {
            base: 0x3000 * i,
            next: 0,
            used_seen: 0,
        })
        .collect();
    dev.activate(
        mem.clone(),
        rings.iter().map(Ring::queue).collect(),
        Arc::new(NoIrq),
    )?;

    // RX buffers for the device's packets.
    for i in 0..4u64 {
        rings[0].push(&mem, 0x1_0000 + i * 0x1000, 0x1000, 2)?;
    }
    let mut send = |rings: &mut Vec<Ring>,
                    op: u16,
                    data: &[u8],
                    at: u64|
     -> Result<(), Box<dyn std::error::Error>> {
        let h = Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: 5000,
            dst_port: 1234,
            len: data.len() as u32,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 << 10,
            fwd_cnt: 0,
        };
        mem.write_slice(&h.encode(), GuestAddress(at))?;
        mem.write_slice(data, GuestAddress(at + HDR_LEN as u64))?;
        rings[1].push(&mem, at, (HDR_LEN + data.len()) as u32, 0)?;
        dev.process_queue(1)?;
        Ok(())
    };
    send(&mut rings, OP_REQUEST, b"", 0x2_0000)?;
    let (mut conn, _) = host.accept()?;
    send(&mut rings, OP_RW, b"hello from the guest", 0x2_1000)?;
    let mut buf = [0u8; 20];
    conn.read_exact(&mut buf)?;
    println!("host got {:?}", String::from_utf8_lossy(&buf));
    conn.write_all(b"hello from the host")?;
    dev.process_backend(kiln_virtio::vsock::BACKEND_TOKEN)?;
    while let Some((id, len)) = rings[0].pop(&mem) {
        let a = 0x1_0000 + u64::from(id) * 0x1000;
        let mut hb = [0u8; HDR_LEN];
        mem.read_slice(&mut hb, GuestAddress(a))?;
        let h = Header::parse(&hb);
        let mut data = vec![0u8; h.len as usize];
        mem.read_slice(&mut data, GuestAddress(a + HDR_LEN as u64))?;
        println!(
            "guest got op {} ({len} bytes used): {:?}",
            h.op,
            String::from_utf8_lossy(&data)
        );
    }
    drop(dev);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
