//! Split virtqueues (virtio 1.x, 2.7) in guest memory.
//!
//! The descriptor free list and chain lengths live in the driver's own memory, not in the
//! descriptor table: a device that scribbles on the table can't corrupt the driver.

use core::sync::atomic::{compiler_fence, Ordering};

use super::Platform;

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors (VIRTIO_F_INDIRECT_DESC).
pub const DESC_F_INDIRECT: u16 = 4;
/// Available-ring flag: the driver doesn't want used-buffer interrupts.
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Largest queue the driver sets up (the free list is sized for it).
pub const MAX_SIZE: u16 = 256;

/// Where a queue's three parts are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueMem {
    /// Descriptor table (16-byte aligned, 16 bytes per entry).
    pub desc: u64,
    /// Available (driver) ring: flags, idx, `ring[size]`, used_event.
    pub avail: u64,
    /// Used (device) ring: flags, idx, `ring[size]` of (id, len), avail_event.
    pub used: u64,
    /// Entries.
    pub size: u16,
}

impl QueueMem {
    /// A queue of `size` entries laid out from `base` (16-byte aligned): the table, the
    /// available ring right after it, the used ring at the next 64-byte boundary.
    pub const fn at(base: u64, size: u16) -> QueueMem {
        let desc = base;
        let avail = desc + 16 * size as u64;
        let used = (avail + 6 + 2 * size as u64 + 63) & !63;
        QueueMem {
            desc,
            avail,
            used,
            size,
        }
    }

    /// Bytes a queue of `size` entries takes from its base.
    pub const fn bytes(size: u16) -> u64 {
        let q = QueueMem::at(0, size);
        q.used + 6 + 8 * size as u64
    }

    /// Address of descriptor `i`.
    pub const fn desc_addr(&self, i: u16) -> u64 {
        self.desc + 16 * i as u64
    }

    /// Address of the available ring's `idx`.
    pub const fn avail_idx_addr(&self) -> u64 {
        self.avail + 2
    }

    /// Address of the used ring's `idx`.
    pub const fn used_idx_addr(&self) -> u64 {
        self.used + 2
    }
}

/// One buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    /// Guest-physical address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// The device writes it.
    pub write: bool,
}

impl Buf {
    /// A buffer the device reads.
    pub const fn r(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            write: false,
        }
    }

    /// A buffer the device writes.
    pub const fn w(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            write: true,
        }
    }
}

/// Writes descriptor `i` of the table at `table` (also used for indirect tables).
pub fn write_desc<P: Platform>(
    p: &P,
    table: u64,
    i: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let a = table + 16 * u64::from(i);
    p.write64(a, addr);
    p.write32(a + 8, len);
    p.write16(a + 12, flags);
    p.write16(a + 14, next);
}

/// The driver side of one split virtqueue.
pub struct SplitQueue {
    /// Where it is.
    pub mem: QueueMem,
    /// Next available index (published by [`SplitQueue::publish`]).
    avail_idx: u16,
    /// Used entries consumed so far.
    last_used: u16,
    /// Free list and chain links: `links[i]` is the descriptor after `i`.
    links: [u16; MAX_SIZE as usize],
    /// Descriptors in the chain headed by `i` (0: not a head in flight).
    chain_len: [u16; MAX_SIZE as usize],
    free_head: u16,
    num_free: u16,
}

impl SplitQueue {
    /// Zeroes the rings' headers at `mem` and builds the free list. `mem.size` must be a
    /// power of two no larger than [`MAX_SIZE`] (it is clamped).
    pub fn new<P: Platform>(p: &P, mut mem: QueueMem) -> SplitQueue {
        mem.size = mem.size.clamp(1, MAX_SIZE);
        // flags = 0 and idx = 0 in both rings; the used ring is the device's from here on.
        p.write32(mem.avail, 0);
        p.write32(mem.used, 0);
        let mut links = [0u16; MAX_SIZE as usize];
        for (i, l) in links.iter_mut().enumerate() {
            *l = i as u16 + 1;
        }
        SplitQueue {
            mem,
            avail_idx: 0,
            last_used: 0,
            links,
            chain_len: [0; MAX_SIZE as usize],
            free_head: 0,
            num_free: mem.size,
        }
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.mem.size
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Writes a chain for `bufs`, puts its head in the available ring and publishes it.
    /// None if there are not enough free descriptors (or `bufs` is empty).
    pub fn add<P: Platform>(&mut self, p: &P, bufs: &[Buf]) -> Option<u16> {
        let n = u16::try_from(bufs.len()).ok()?;
        if n == 0 || n > self.num_free {
            return None;
        }
        let head = self.free_head;
        let mut i = head;
        for (k, b) in bufs.iter().enumerate() {
            let last = k + 1 == bufs.len();
            let next = self.links[usize::from(i)];
            let flags = if b.write { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
            write_desc(
                p,
                self.mem.desc,
                i,
                b.addr,
                b.len,
                flags,
                if last { 0 } else { next },
            );
            if !last {
                i = next;
            }
        }
        self.free_head = self.links[usize::from(i)];
        self.num_free -= n;
        self.chain_len[usize::from(head)] = n;
        self.push_head(p, head);
        self.publish(p);
        Some(head)
    }

    /// Puts `head` in the next available-ring slot without publishing it.
    pub fn push_head<P: Platform>(&mut self, p: &P, head: u16) {
        let slot = u64::from(self.avail_idx & (self.mem.size - 1));
        p.write16(self.mem.avail + 4 + 2 * slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Makes every pushed head visible to the device (writes `avail.idx`).
    pub fn publish<P: Platform>(&self, p: &P) {
        // The ring entries and descriptors are written before the index that exposes them.
        compiler_fence(Ordering::Release);
        p.write16(self.mem.avail_idx_addr(), self.avail_idx);
    }

    /// Writes `avail.idx = v` as given (for hostile tests), and remembers it.
    pub fn set_avail_idx_raw<P: Platform>(&mut self, p: &P, v: u16) {
        self.avail_idx = v;
        self.publish(p);
    }

    /// The available index the driver has reached.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Sets or clears `VRING_AVAIL_F_NO_INTERRUPT`.
    pub fn set_no_interrupt<P: Platform>(&self, p: &P, on: bool) {
        p.write16(self.mem.avail, if on { AVAIL_F_NO_INTERRUPT } else { 0 });
    }

    /// The device's `used.idx`.
    pub fn used_idx<P: Platform>(&self, p: &P) -> u16 {
        p.read16(self.mem.used_idx_addr())
    }

    /// Used entries the device has returned that [`SplitQueue::pop_used`] hasn't taken.
    pub fn pending<P: Platform>(&self, p: &P) -> u16 {
        self.used_idx(p).wrapping_sub(self.last_used)
    }

    /// Takes the next used entry, (id, len), and frees its chain if `id` heads one in
    /// flight (a bogus id frees nothing).
    pub fn pop_used<P: Platform>(&mut self, p: &P) -> Option<(u32, u32)> {
        if self.used_idx(p) == self.last_used {
            return None;
        }
        // The element is read after the index that published it.
        compiler_fence(Ordering::Acquire);
        let slot = u64::from(self.last_used & (self.mem.size - 1));
        let e = self.mem.used + 4 + 8 * slot;
        let (id, len) = (p.read32(e), p.read32(e + 4));
        self.last_used = self.last_used.wrapping_add(1);
        self.free(id);
        Some((id, len))
    }

    /// Returns the chain headed by `id` to the free list, if one is in flight.
    fn free(&mut self, id: u32) {
        let Ok(head) = u16::try_from(id) else { return };
        if head >= self.mem.size {
            return;
        }
        let n = core::mem::take(&mut self.chain_len[usize::from(head)]);
        if n == 0 {
            return;
        }
        let mut tail = head;
        for _ in 1..n {
            tail = self.links[usize::from(tail)];
        }
        self.links[usize::from(tail)] = self.free_head;
        self.free_head = head;
        self.num_free += n;
    }

    /// The descriptor that follows `i` in its chain (or on the free list).
    pub fn link(&self, i: u16) -> u16 {
        self.links[usize::from(i) % MAX_SIZE as usize]
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use core::cell::RefCell;
    use std::vec::Vec;

    /// Plain memory: enough Platform to test the rings without a device.
    pub struct Ram(pub RefCell<Vec<u8>>);

    impl Ram {
        pub fn new(len: usize) -> Self {
            Ram(RefCell::new(std::vec![0; len]))
        }
        fn get<const N: usize>(&self, a: u64) -> [u8; N] {
            let m = self.0.borrow();
            m[a as usize..a as usize + N].try_into().unwrap()
        }
        fn put(&self, a: u64, b: &[u8]) {
            self.0.borrow_mut()[a as usize..a as usize + b.len()].copy_from_slice(b);
        }
    }

    impl Platform for Ram {
        fn read8(&self, a: u64) -> u8 {
            self.get::<1>(a)[0]
        }
        fn read16(&self, a: u64) -> u16 {
            u16::from_le_bytes(self.get(a))
        }
        fn read32(&self, a: u64) -> u32 {
            u32::from_le_bytes(self.get(a))
        }
        fn read64(&self, a: u64) -> u64 {
            u64::from_le_bytes(self.get(a))
        }
        fn write8(&self, a: u64, v: u8) {
            self.put(a, &[v])
        }
        fn write16(&self, a: u64, v: u16) {
            self.put(a, &v.to_le_bytes())
        }
        fn write32(&self, a: u64, v: u32) {
            self.put(a, &v.to_le_bytes())
        }
        fn write64(&self, a: u64, v: u64) {
            self.put(a, &v.to_le_bytes())
        }
        fn reg_read(&self, _: u64) -> u32 {
            0
        }
        fn reg_write(&self, _: u64, _: u32) {}
        fn now_ns(&self) -> u64 {
            0
        }
        fn irq_enable(&self, _: &crate::virtio::MmioDev) -> bool {
            false
        }
        fn irq_disable(&self, _: &crate::virtio::MmioDev) {}
        fn irq_count(&self, _: &crate::virtio::MmioDev) -> u32 {
            0
        }
        fn info(&self, _: &[u8]) {}
        fn hold(&self) {}
    }

    /// Completes `head` as a device would: used ring entry, then idx.
    fn complete(p: &Ram, q: &QueueMem, head: u32, len: u32) {
        let idx = p.read16(q.used_idx_addr());
        let e = q.used + 4 + 8 * u64::from(idx % q.size);
        p.write32(e, head);
        p.write32(e + 4, len);
        p.write16(q.used_idx_addr(), idx.wrapping_add(1));
    }

    #[test]
    fn layout() {
        let q = QueueMem::at(0x1000, 256);
        assert_eq!((q.desc, q.avail, q.used), (0x1000, 0x2000, 0x2240));
        assert_eq!(QueueMem::bytes(256), 0x1240 + 6 + 2048);
        let q = QueueMem::at(0, 8);
        assert_eq!((q.avail, q.used), (128, 192));
        assert_eq!(q.used % 4, 0);
    }

    #[test]
    fn chains_descriptors_and_rings() {
        let p = Ram::new(0x4000);
        let qm = QueueMem::at(0, 8);
        let mut q = SplitQueue::new(&p, qm);
        let h = q
            .add(
                &p,
                &[Buf::r(0x3000, 16), Buf::w(0x3100, 512), Buf::w(0x3400, 1)],
            )
            .unwrap();
        assert_eq!((h, q.num_free()), (0, 5));
        // Descriptor 0: header, NEXT -> 1; 1: data, WRITE|NEXT -> 2; 2: status, WRITE.
        assert_eq!(p.read64(0), 0x3000);
        assert_eq!(
            (p.read32(8), p.read16(12), p.read16(14)),
            (16, DESC_F_NEXT, 1)
        );
        assert_eq!(
            (p.read16(16 + 12), p.read16(16 + 14)),
            (DESC_F_NEXT | DESC_F_WRITE, 2)
        );
        assert_eq!((p.read16(32 + 12), p.read16(32 + 14)), (DESC_F_WRITE, 0));
        assert_eq!(p.read16(qm.avail_idx_addr()), 1);
        assert_eq!(p.read16(qm.avail + 4), 0);
        let h2 = q.add(&p, &[Buf::r(0x3000, 16), Buf::w(0x3400, 1)]).unwrap();
        assert_eq!((h2, q.num_free()), (3, 3));
        assert_eq!(q.add(&p, &[Buf::r(0, 1); 4]), None, "only 3 free");
        assert_eq!(q.add(&p, &[]), None);
        assert_eq!(q.pop_used(&p), None);
        complete(&p, &qm, 3, 1);
        complete(&p, &qm, 0, 513);
        assert_eq!(q.pending(&p), 2);
        assert_eq!(q.pop_used(&p), Some((3, 1)));
        assert_eq!(q.pop_used(&p), Some((0, 513)));
        assert_eq!(q.num_free(), 8);
        // A bogus or repeated id frees nothing.
        complete(&p, &qm, 0, 0);
        complete(&p, &qm, 99, 0);
        assert_eq!(q.pop_used(&p), Some((0, 0)));
        assert_eq!(q.pop_used(&p), Some((99, 0)));
        assert_eq!(q.num_free(), 8);
        // Every descriptor can be used at once, and the ring wraps.
        for round in 0..3u16 {
            let heads: Vec<u16> = (0..8)
                .map(|_| q.add(&p, &[Buf::w(0x3000, 8)]).unwrap())
                .collect();
            assert_eq!(q.num_free(), 0);
            for h in &heads {
                complete(&p, &qm, u32::from(*h), 8);
            }
            while q.pop_used(&p).is_some() {}
            assert_eq!(q.num_free(), 8, "round {round}");
        }
        assert_eq!(q.avail_idx(), 2 + 24);
    }

    #[test]
    fn raw_controls() {
        let p = Ram::new(0x1000);
        let qm = QueueMem::at(0, 4);
        let mut q = SplitQueue::new(&p, qm);
        q.set_no_interrupt(&p, true);
        assert_eq!(p.read16(qm.avail), AVAIL_F_NO_INTERRUPT);
        q.push_head(&p, 2);
        assert_eq!(p.read16(qm.avail_idx_addr()), 0, "not published yet");
        q.publish(&p);
        assert_eq!(p.read16(qm.avail_idx_addr()), 1);
        q.set_avail_idx_raw(&p, 100);
        assert_eq!(p.read16(qm.avail_idx_addr()), 100);
        write_desc(&p, 0x800, 1, 0xdead, 7, DESC_F_INDIRECT, 3);
        assert_eq!((p.read64(0x810), p.read32(0x818)), (0xdead, 7));
    }
}
