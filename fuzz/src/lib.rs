//! Shared pieces of the kiln-virtio fuzz targets: guest memory with a hole, a memfd disk, a
//! mock interrupt line, and a queue harness that checks device writes against a shadow copy.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arbitrary::Arbitrary;
use kiln_virtio::{InterruptKind, Queue, VirtioDevice, VirtioInterrupt};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory of the fuzz targets.
pub type Mem = GuestMemoryMmap<()>;

/// First region: `[0, REGION_A_END)`.
pub const REGION_A_END: u64 = 0x2_0000;
/// Second region starts after a one-page hole, so buffers can straddle a gap.
pub const REGION_B_START: u64 = 0x2_1000;
/// End of the second region.
pub const REGION_B_END: u64 = 0x4_1000;
/// Addresses the targets hand out span a little past the end of memory.
pub const ADDR_SPAN: u64 = REGION_B_END + 0x1000;

/// Two regions with a hole between them.
pub fn guest_memory() -> Mem {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION_A_END as usize),
        (
            GuestAddress(REGION_B_START),
            (REGION_B_END - REGION_B_START) as usize,
        ),
    ])
    .expect("guest memory")
}

/// Maps a fuzzer word to a guest address: mostly in (or just past) guest memory, a quarter
/// of the time near the top of the address space to reach the overflow paths.
pub fn map_addr(a: u32) -> u64 {
    if a >> 30 == 3 {
        u64::MAX - u64::from(a & 0xffff)
    } else {
        u64::from(a) % ADDR_SPAN
    }
}

/// Writes `bytes` at `addr`, region by region; what falls in the hole or past the end is
/// dropped (the fuzzer only chooses memory contents, it can't fail).
pub fn poke(mem: &Mem, addr: u64, bytes: &[u8]) {
    if mem.write_slice(bytes, GuestAddress(addr)).is_ok() {
        return;
    }
    for (i, b) in bytes.iter().enumerate() {
        if let Some(a) = addr.checked_add(i as u64) {
            let _ = mem.write_obj(*b, GuestAddress(a));
        }
    }
}

/// A zeroed disk image of `len` bytes in a memfd (no filesystem, nothing left behind).
pub fn memfd_disk(len: u64) -> File {
    // SAFETY: the name is a NUL-terminated string; memfd_create takes no other pointer.
    let fd = unsafe { libc::memfd_create(c"kiln-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("memfd set_len");
    f
}

/// An interrupt line that only counts.
#[derive(Debug, Default)]
pub struct CountingLine(pub AtomicU64);

impl kiln_irq::InterruptLine for CountingLine {
    fn trigger(&self) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl VirtioInterrupt for CountingLine {
    fn trigger(&self, _kind: InterruptKind) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Split-queue layout of the queue harness (fixed, so the used ring never moves onto the
/// driver's structures; the descriptors themselves may point anywhere).
pub const DESC: u64 = 0x0;
/// Available ring.
pub const AVAIL: u64 = 0x100;
/// Used ring.
pub const USED: u64 = 0x200;
/// Where the fuzzer's free-form bytes start.
pub const BLOB: u64 = 0x300;
/// Largest queue the harness builds (the descriptor table always has this many entries).
pub const MAX_QS: u16 = 16;

const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// One raw descriptor as the guest writes it.
#[derive(Debug, Arbitrary, Clone, Copy)]
pub struct Desc {
    /// Through [`map_addr`].
    pub addr: u32,
    /// Raw length.
    pub len: u32,
    /// Raw flags (only NEXT, WRITE and INDIRECT mean anything).
    pub flags: u16,
    /// Raw next index.
    pub next: u16,
}

/// Free-form bytes at an address.
#[derive(Debug, Arbitrary)]
pub struct Patch {
    /// Through [`map_addr`].
    pub addr: u32,
    /// Contents.
    pub bytes: Vec<u8>,
}

/// A guest-built queue: table, ring, memory contents, and how many chains to publish.
#[derive(Debug, Arbitrary)]
pub struct QueueInput {
    /// Queue size is `1 << (qs_log2 % 5)`: 1 to 16.
    pub qs_log2: u8,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// The descriptor table (always 16 entries; a smaller queue ignores the tail).
    pub descs: [Desc; MAX_QS as usize],
    /// Available ring entries (raw head indices).
    pub ring: [u16; MAX_QS as usize],
    /// `used_event` (event-idx only).
    pub used_event: u16,
    /// Chains published, one per step (at most 40: more than two laps of the ring).
    pub steps: u8,
    /// Written at [`BLOB`] (headers, indirect tables, data).
    pub blob: Vec<u8>,
    /// Written anywhere (after the blob, so they win).
    pub patches: Vec<Patch>,
}

/// Half-open guest ranges the device may write.
#[derive(Debug, Default)]
struct Allowed(Vec<(u64, u64)>);

impl Allowed {
    fn add(&mut self, addr: u64, len: u32) {
        if len > 0 {
            self.0.push((addr, addr.saturating_add(u64::from(len))));
        }
    }

    fn contains(&self, a: u64) -> bool {
        self.0.iter().any(|&(s, e)| s <= a && a < e)
    }

    fn overlaps(&self, s: u64, e: u64) -> bool {
        self.0.iter().any(|&(a, b)| a < e && s < b)
    }
}

/// A flat copy of guest memory, `[0, REGION_B_END)`, the hole left as zeros.
fn capture(mem: &Mem, buf: &mut Vec<u8>) {
    buf.resize(REGION_B_END as usize, 0);
    let (a, rest) = buf.split_at_mut(REGION_A_END as usize);
    mem.read_slice(a, GuestAddress(0)).expect("region a");
    mem.read_slice(
        &mut rest[(REGION_B_START - REGION_A_END) as usize..],
        GuestAddress(REGION_B_START),
    )
    .expect("region b");
}

/// Whether `[at, at + len)` lies in one region (what the device can read in one go).
fn in_region(at: u64, len: u64) -> bool {
    let Some(end) = at.checked_add(len) else {
        return false;
    };
    end <= REGION_A_END || (at >= REGION_B_START && end <= REGION_B_END)
}

/// The descriptor at `at` in the copy `m`: address, length, flags.
fn desc_at(m: &[u8], at: u64) -> Option<(u64, u32, u16)> {
    if !in_region(at, 16) {
        return None;
    }
    let d = m.get(at as usize..at as usize + 16)?;
    let addr = u64::from_le_bytes(d[0..8].try_into().ok()?);
    let len = u32::from_le_bytes(d[8..12].try_into().ok()?);
    let flags = u16::from_le_bytes(d[12..14].try_into().ok()?);
    Some((addr, len, flags))
}

/// Every buffer some descriptor marks device-writable, in the table or in any indirect table
/// it references, read from the copy `m` (a superset of what the next chain can use).
fn writable_ranges(m: &[u8], qs: u16) -> Allowed {
    let mut ok = Allowed::default();
    for i in 0..u64::from(qs) {
        let Some((addr, len, flags)) = desc_at(m, DESC + 16 * i) else {
            continue;
        };
        if flags & F_INDIRECT != 0 {
            // An indirect table holds at most u16::MAX entries; its reads stop at the end of
            // a region.
            for j in 0..u64::from(len / 16).min(u64::from(u16::MAX)) {
                let Some((a, l, f)) = addr.checked_add(16 * j).and_then(|at| desc_at(m, at)) else {
                    break;
                };
                if f & F_WRITE != 0 && f & F_INDIRECT == 0 {
                    ok.add(a, l);
                }
            }
        } else if flags & F_WRITE != 0 {
            ok.add(addr, len);
        }
    }
    ok
}

/// Addresses where `a` and `b` differ (whole-page compares first: memcmp is cheap).
fn changed<'a>(a: &'a [u8], b: &'a [u8]) -> impl Iterator<Item = u64> + 'a {
    const PAGE: usize = 4096;
    a.chunks(PAGE)
        .zip(b.chunks(PAGE))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .flat_map(|(p, (x, y))| {
            x.iter()
                .zip(y.iter())
                .enumerate()
                .filter(|(_, (u, v))| u != v)
                .map(move |(i, _)| (p * PAGE + i) as u64)
        })
}

/// Lays out `input`, activates `dev` on the queue, publishes the chains one at a time and
/// processes each. Panics (a fuzz finding) if the device writes guest memory outside the
/// used ring and the device-writable buffers of the descriptors.
///
/// Exactness: a chain is read completely before the device writes anything for it, and a
/// step is checked only when exactly one chain is available, so the superset computed before
/// the step covers every write of it. Steps with more (a throttled chain left behind, or a
/// writable buffer over the available index, which lets the device's own writes publish
/// chains built from what it wrote) are run but not checked.
pub fn run_queue<D: VirtioDevice<Mem>>(mut dev: D, mem: &Mem, input: &QueueInput) {
    let qs = 1u16 << (input.qs_log2 % 5);
    for (i, d) in input.descs.iter().enumerate() {
        let at = DESC + 16 * i as u64;
        poke(mem, at, &map_addr(d.addr).to_le_bytes());
        poke(mem, at + 8, &d.len.to_le_bytes());
        poke(mem, at + 12, &d.flags.to_le_bytes());
        poke(mem, at + 14, &d.next.to_le_bytes());
    }
    for (i, h) in input.ring.iter().enumerate() {
        poke(mem, AVAIL + 4 + 2 * i as u64, &h.to_le_bytes());
    }
    poke(
        mem,
        AVAIL + 4 + 2 * u64::from(qs),
        &input.used_event.to_le_bytes(),
    );
    poke(mem, BLOB, &input.blob);
    for p in &input.patches {
        poke(mem, map_addr(p.addr), &p.bytes);
    }

    let mut q = Queue::new(qs).expect("queue");
    q.try_set_desc_table_address(GuestAddress(DESC))
        .expect("desc");
    q.try_set_avail_ring_address(GuestAddress(AVAIL))
        .expect("avail");
    q.try_set_used_ring_address(GuestAddress(USED))
        .expect("used");
    q.set_event_idx(input.event_idx);
    q.set_ready(true);
    let irq: Arc<dyn VirtioInterrupt> = Arc::new(CountingLine::default());
    if dev.activate(mem.clone(), vec![q], irq).is_err() {
        return;
    }
    let used_end = USED + 6 + 8 * u64::from(qs);
    let avail_idx = (AVAIL + 2, AVAIL + 4);
    let (mut before, mut after) = (Vec::new(), Vec::new());
    for step in 0..input.steps % 41 {
        poke(mem, avail_idx.0, &u16::from(step + 1).to_le_bytes());
        capture(mem, &mut before);
        let allowed = writable_ranges(&before, qs);
        // The used index in memory is the device's count: add_used is the last write to it.
        let used_idx = u16::from_le_bytes([before[USED as usize + 2], before[USED as usize + 3]]);
        let checked = used_idx == u16::from(step) && !allowed.overlaps(avail_idx.0, avail_idx.1);
        let r = dev.process_queue(0);
        if checked {
            capture(mem, &mut after);
            for addr in changed(&before, &after) {
                let in_used = (USED..used_end).contains(&addr);
                assert!(
                    in_used || allowed.contains(addr),
                    "step {step}: device wrote {addr:#x}, not device-writable (allowed {:x?})",
                    allowed.0
                );
            }
        }
        if r.is_err() {
            // The transport would set DEVICE_NEEDS_RESET and stop driving the device.
            break;
        }
    }
}
