//! Test helpers: mock guest memory and a minimal driver side of a split virtqueue.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{InterruptKind, VirtioInterrupt};

pub type Mem = GuestMemoryMmap<()>;

/// Guest memory size of the mock: 1 MiB at 0.
pub const MEM_SIZE: u64 = 0x10_0000;
/// Queue size the driver helper uses.
pub const QS: u16 = 16;
pub const DESC: u64 = 0x0;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;
/// Where tests put data buffers.
pub const DATA: u64 = 0x1_0000;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

pub fn mem() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("mock memory")
}

/// Writes a raw descriptor at `table[index]`.
pub fn write_desc(mem: &Mem, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let base = GuestAddress(table + 16 * u64::from(index));
    mem.write_obj(addr.to_le(), base).unwrap();
    mem.write_obj(len.to_le(), GuestAddress(base.0 + 8))
        .unwrap();
    mem.write_obj(flags.to_le(), GuestAddress(base.0 + 12))
        .unwrap();
    mem.write_obj(next.to_le(), GuestAddress(base.0 + 14))
        .unwrap();
}

/// The driver side of one split queue at [`DESC`]/[`AVAIL`]/[`USED`].
#[derive(Debug, Default)]
pub struct Driver {
    next_desc: u16,
    avail_idx: u16,
}

impl Driver {
    /// A device-side `Queue` for this driver's rings, ready.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(QS).unwrap();
        q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        q.set_ready(true);
        q
    }

    /// Adds a chain of `(addr, len, device_writable)` buffers; returns its head index.
    pub fn add(&mut self, mem: &Mem, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let idx = self.next_desc;
            self.next_desc = (self.next_desc + 1) % QS;
            let last = i + 1 == bufs.len();
            let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            write_desc(mem, DESC, idx, addr, len, flags, self.next_desc);
        }
        self.publish(mem, head);
        head
    }

    /// Adds a one-descriptor chain with raw `flags`; returns its head index.
    pub fn add_raw(&mut self, mem: &Mem, addr: u64, len: u32, flags: u16) -> u16 {
        let head = self.next_desc;
        self.next_desc = (self.next_desc + 1) % QS;
        write_desc(mem, DESC, head, addr, len, flags, 0);
        self.publish(mem, head);
        head
    }

    /// Puts `head` in the available ring.
    pub fn publish(&mut self, mem: &Mem, head: u16) {
        let slot = u64::from(self.avail_idx % QS);
        mem.write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// The used ring's idx.
    pub fn used_idx(mem: &Mem) -> u16 {
        mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Used ring entry `i`: (descriptor id, length).
    pub fn used(mem: &Mem, i: u16) -> (u32, u32) {
        let base = USED + 4 + 8 * u64::from(i % QS);
        (
            mem.read_obj(GuestAddress(base)).unwrap(),
            mem.read_obj(GuestAddress(base + 4)).unwrap(),
        )
    }
}

/// Counts the interrupts a device raises.
#[derive(Debug, Default)]
pub struct CountingInterrupt {
    pub queue: AtomicU32,
    pub config: AtomicU32,
}

impl CountingInterrupt {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    pub fn queue_count(&self) -> u32 {
        self.queue.load(Ordering::Relaxed)
    }
}

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        match kind {
            InterruptKind::Queue(_) => self.queue.fetch_add(1, Ordering::Relaxed),
            InterruptKind::Config => self.config.fetch_add(1, Ordering::Relaxed),
        };
        Ok(())
    }
}
