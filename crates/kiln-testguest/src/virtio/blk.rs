//! virtio-blk (device ID 2): requests, the test image's pattern, and the `virtio-blk`
//! scenario.
//!
//! The host prepares the image so that every u64 of 512-byte sector `s` is
//! [`fresh_word`]`(s)`; reads check the first and last u64 of each sector (the guest runs
//! emulated on some hosts, so whole buffers are never compared).

use super::layout::{self, DATA, SCRATCH};
use super::ring::{Buf, SplitQueue};
use super::transport::{InitError, Transport, F_INDIRECT_DESC, ID_BLOCK};
use super::{info_line, wait_until, Env, MmioDev, Platform, SECOND};
use crate::line::{Describe, LineBuf};

/// Request types.
pub mod req {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Device ID string (20 bytes).
    pub const GET_ID: u32 = 8;
    /// Discard.
    pub const DISCARD: u32 = 11;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Request status: success.
pub const S_OK: u8 = 0;
/// Request status: I/O error.
pub const S_IOERR: u8 = 1;
/// Request status: unsupported.
pub const S_UNSUPP: u8 = 2;
/// What the driver writes in a status byte before posting, so an untouched one shows.
pub const S_UNTOUCHED: u8 = 0xff;

/// VIRTIO_BLK_F_RO.
pub const F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_FLUSH.
pub const F_FLUSH: u64 = 1 << 9;
/// VIRTIO_BLK_F_DISCARD.
pub const F_DISCARD: u64 = 1 << 13;
/// VIRTIO_BLK_F_WRITE_ZEROES.
pub const F_WRITE_ZEROES: u64 = 1 << 14;
/// The features the scenarios use (the device's RO bit is taken to learn about it).
pub const WANTED: u64 = F_RO | F_FLUSH | F_DISCARD | F_WRITE_ZEROES | F_INDIRECT_DESC;
/// Write-zeroes segment flag: the device may unmap.
pub const WZ_UNMAP: u32 = 1;

/// Bytes per sector.
pub const SECTOR: u64 = 512;
/// Smallest disk the functional scenarios accept (16 MiB).
pub const MIN_SECTORS: u64 = 32768;
/// Length of the GET_ID answer.
pub const ID_LEN: u32 = 20;
/// Queue entries the scenarios ask for.
pub const QUEUE_SIZE: u16 = 256;
/// How long one request may take.
pub const TIMEOUT_NS: u64 = 5 * SECOND;

/// Every u64 of sector `s` of a fresh test image.
pub const fn fresh_word(s: u64) -> u64 {
    0x4b49_4c4e_0000_0000 | s
}

/// Every u64 of a sector `virtio-blk` writes.
pub const fn written_word(s: u64) -> u64 {
    0x5752_4954_0000_0000 | s
}

/// Marks a buffer word the device should overwrite.
pub const fn poison_word(k: u64) -> u64 {
    0x504f_4953_4f4e_0000 ^ k
}

/// Writes [`poison_word`] into the first and last u64 of `n` sectors at `buf`.
pub fn poison<P: Platform>(p: &P, buf: u64, n: u64) {
    for k in 0..n {
        p.write64(buf + k * SECTOR, poison_word(k));
        p.write64(buf + k * SECTOR + SECTOR - 8, poison_word(k));
    }
}

/// A sector whose first or last u64 was not what it should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The disk sector.
    pub sector: u64,
    /// What was read.
    pub got: u64,
    /// What was expected.
    pub want: u64,
}

impl Describe for Mismatch {
    fn describe(&self, out: &mut LineBuf) {
        out.push_str("sector ");
        out.push_dec(self.sector);
        out.push_str(" holds ");
        out.push_hex(self.got);
        out.push_str(", expected ");
        out.push_hex(self.want);
    }
}

/// Checks the first and last u64 of `n` sectors at `buf`, read from disk sector `first`,
/// against `want(sector)`.
pub fn check_sectors<P: Platform>(
    p: &P,
    buf: u64,
    first: u64,
    n: u64,
    want: impl Fn(u64) -> u64,
) -> Result<(), Mismatch> {
    for k in 0..n {
        let w = want(first + k);
        for off in [0, SECTOR - 8] {
            let got = p.read64(buf + k * SECTOR + off);
            if got != w {
                return Err(Mismatch {
                    sector: first + k,
                    got,
                    want: w,
                });
            }
        }
    }
    Ok(())
}

/// A finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    /// The status byte.
    pub status: u8,
    /// Bytes the device says it wrote (used ring `len`).
    pub len: u32,
}

/// Why a request did not finish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReqError {
    /// Not enough free descriptors.
    QueueFull,
    /// No used entry in time (device status then).
    Timeout(u32),
    /// A used entry for another chain (its id).
    WrongId(u32),
}

impl Describe for ReqError {
    fn describe(&self, out: &mut LineBuf) {
        match *self {
            ReqError::QueueFull => out.push_str("no free descriptors"),
            ReqError::Timeout(s) => {
                out.push_str("no completion within 5 s (device status ");
                out.push_hex(u64::from(s));
                out.push_str(")");
            }
            ReqError::WrongId(id) => {
                out.push_str("used ring returned unknown id ");
                out.push_dec(u64::from(id));
            }
        }
    }
}

/// A virtio-blk device brought up with one queue.
pub struct Blk {
    /// Where it is.
    pub dev: MmioDev,
    /// Its registers.
    pub t: Transport,
    /// Its request queue.
    pub q: SplitQueue,
    /// Accepted features.
    pub features: u64,
    /// Capacity in sectors.
    pub capacity: u64,
}

/// Capacity (sectors) and offered features of the block device at `dev`.
pub fn probe<P: Platform>(p: &P, dev: &MmioDev) -> (u64, u64) {
    let t = Transport::new(dev.base);
    (t.config64(p, 0), t.device_features(p))
}

/// The first block device that is writable and has at least [`MIN_SECTORS`].
pub fn find_writable<P: Platform>(p: &P, env: &Env<'_>) -> Option<MmioDev> {
    env.find(p, ID_BLOCK, |p, d| {
        let (cap, f) = probe(p, d);
        f & F_RO == 0 && cap >= MIN_SECTORS && cap != u64::MAX
    })
}

impl Blk {
    /// Resets and initialises the device at `dev` with its queue at `area`.
    pub fn open<P: Platform>(p: &P, dev: MmioDev, area: u64) -> Result<Blk, InitError> {
        let t = Transport::new(dev.base);
        let (features, q) = t.init(p, WANTED, area, QUEUE_SIZE)?;
        let capacity = t.config64(p, 0);
        Ok(Blk {
            dev,
            t,
            q,
            features,
            capacity,
        })
    }

    /// Writes the header of request slot `slot` and poisons its status byte.
    pub fn header<P: Platform>(p: &P, slot: usize, kind: u32, sector: u64) {
        let h = layout::header(slot);
        p.write32(h, kind);
        p.write32(h + 4, 0);
        p.write64(h + 8, sector);
        p.write8(layout::status(slot), S_UNTOUCHED);
    }

    /// Posts a request: header (slot `slot`), `data`, status byte. Does not notify.
    pub fn post<P: Platform>(
        &mut self,
        p: &P,
        slot: usize,
        kind: u32,
        sector: u64,
        data: &[Buf],
    ) -> Result<u16, ReqError> {
        Self::header(p, slot, kind, sector);
        let mut bufs = [Buf::r(0, 0); 20];
        let n = data.len().min(bufs.len() - 2);
        bufs[0] = Buf::r(layout::header(slot), 16);
        bufs[1..1 + n].copy_from_slice(&data[..n]);
        bufs[1 + n] = Buf::w(layout::status(slot), 1);
        self.q.add(p, &bufs[..n + 2]).ok_or(ReqError::QueueFull)
    }

    /// Waits for the next used entry.
    pub fn next_used<P: Platform>(&mut self, p: &P) -> Result<(u32, u32), ReqError> {
        let mut got = None;
        let q = &mut self.q;
        wait_until(p, TIMEOUT_NS, || {
            got = q.pop_used(p);
            got.is_some()
        });
        got.ok_or_else(|| ReqError::Timeout(self.t.status(p)))
    }

    /// Posts one request, notifies and waits for it.
    pub fn request<P: Platform>(
        &mut self,
        p: &P,
        kind: u32,
        sector: u64,
        data: &[Buf],
    ) -> Result<Done, ReqError> {
        let head = self.post(p, 0, kind, sector, data)?;
        self.t.notify(p, 0);
        let (id, len) = self.next_used(p)?;
        if id != u32::from(head) {
            return Err(ReqError::WrongId(id));
        }
        Ok(Done {
            status: p.read8(layout::status(0)),
            len,
        })
    }
}

/// Buffers of `total` bytes from `addr`, `chunk` bytes each, device-writable or not.
pub fn chunks(addr: u64, total: u32, chunk: u32, write: bool, out: &mut [Buf]) -> usize {
    let mut n = 0;
    let mut off = 0;
    while off < total && n < out.len() {
        let len = chunk.min(total - off);
        out[n] = Buf {
            addr: addr + u64::from(off),
            len,
            write,
        };
        n += 1;
        off += len;
    }
    n
}

/// Describes a request that did not end as expected: `step: what`.
fn req_fail(out: &mut LineBuf, step: &str, e: &dyn Describe) -> bool {
    out.push_str(step);
    out.push_str(": ");
    e.describe(out);
    false
}

/// Checks a finished request's status (and, when `len` is given, its used length).
fn expect(out: &mut LineBuf, step: &str, d: Done, status: u8, len: Option<u32>) -> bool {
    if d.status == status && len.is_none_or(|l| l == d.len) {
        return true;
    }
    out.push_str(step);
    out.push_str(": status ");
    out.push_dec(u64::from(d.status));
    out.push_str(" used len ");
    out.push_dec(u64::from(d.len));
    out.push_str(", expected status ");
    out.push_dec(u64::from(status));
    if let Some(l) = len {
        out.push_str(" len ");
        out.push_dec(u64::from(l));
    }
    false
}

/// Reads `n` sectors from `sector` into `buf` (in `chunk`-byte descriptors) after
/// poisoning it, and checks them against `want`.
pub fn read_check<P: Platform>(
    p: &P,
    b: &mut Blk,
    out: &mut LineBuf,
    step: &str,
    (sector, n, buf, chunk): (u64, u64, u64, u32),
    want: impl Fn(u64) -> u64,
) -> bool {
    poison(p, buf, n);
    let bytes = (n * SECTOR) as u32;
    let mut bufs = [Buf::r(0, 0); 16];
    let k = chunks(buf, bytes, chunk, true, &mut bufs);
    let d = match b.request(p, req::IN, sector, &bufs[..k]) {
        Ok(d) => d,
        Err(e) => return req_fail(out, step, &e),
    };
    if !expect(out, step, d, S_OK, Some(bytes + 1)) {
        return false;
    }
    match check_sectors(p, buf, sector, n, want) {
        Ok(()) => true,
        Err(m) => req_fail(out, step, &m),
    }
}

/// `kiln.blk.id` / GET_ID and `kiln.blk.sectors` / capacity.
fn identity<P: Platform>(p: &P, env: &Env<'_>, b: &mut Blk, out: &mut LineBuf) -> bool {
    let id_buf = SCRATCH + 0x100;
    p.write64(id_buf, 0);
    let d = match b.request(p, req::GET_ID, 0, &[Buf::w(id_buf, ID_LEN)]) {
        Ok(d) => d,
        Err(e) => return req_fail(out, "GET_ID", &e),
    };
    if d.status != S_OK {
        return expect(out, "GET_ID", d, S_OK, None);
    }
    let mut id = [0u8; ID_LEN as usize];
    for (i, c) in id.iter_mut().enumerate() {
        *c = p.read8(id_buf + i as u64);
    }
    let id_len = id.iter().position(|&c| c == 0).unwrap_or(id.len());
    let id = &id[..id_len];
    if let Some(want) = env.cmdline.get("kiln.blk.id") {
        if want != id {
            out.push_str("GET_ID returned '");
            out.push_escaped(id);
            out.push_str("', kiln.blk.id says '");
            out.push_escaped(want);
            out.push_str("'");
            return false;
        }
    }
    let Some(sectors) = env.num("kiln.blk.sectors", b.capacity, out) else {
        return false;
    };
    if sectors != b.capacity {
        out.push_str("capacity ");
        out.push_dec(b.capacity);
        out.push_str(" sectors, kiln.blk.sectors says ");
        out.push_dec(sectors);
        return false;
    }
    let mut l = info_line("virtio-blk");
    l.push_str("id='");
    l.push_escaped(id);
    l.push_str("' capacity=");
    l.push_dec(b.capacity);
    l.push_str(" features=");
    l.push_hex(b.features);
    p.info(l.as_bytes());
    true
}

/// Discard or write-zeroes one range, then read it back as zeros.
fn zero_range<P: Platform>(
    p: &P,
    b: &mut Blk,
    out: &mut LineBuf,
    (kind, step): (u32, &str),
    (sector, n, flags): (u64, u64, u32),
) -> bool {
    let seg = SCRATCH;
    p.write64(seg, sector);
    p.write32(seg + 8, n as u32);
    p.write32(seg + 12, flags);
    match b.request(p, kind, 0, &[Buf::r(seg, 16)]) {
        Ok(d) if expect(out, step, d, S_OK, Some(1)) => {}
        Ok(_) => return false,
        Err(e) => return req_fail(out, step, &e),
    }
    read_check(
        p,
        b,
        out,
        step,
        (sector, n, DATA + 0x10_0000, 0x1_0000),
        |_| 0,
    )
}

/// The `virtio-blk` scenario (README / docs/guest-contract.md).
pub fn run_blk<P: Platform>(p: &P, env: &Env<'_>, out: &mut LineBuf) -> bool {
    if !env.region_ok(layout::START, layout::FUNCTIONAL_END, out) {
        return false;
    }
    let Some(dev) = find_writable(p, env) else {
        env.none_found(p, "writable virtio-blk of 32768 sectors or more", out);
        return false;
    };
    let mut b = match Blk::open(p, dev, layout::BLK_QA) {
        Ok(b) => b,
        Err(e) => return req_fail(out, "init", &e),
    };
    let ok = blk_steps(p, env, &mut b, out);
    p.irq_disable(&dev);
    let _ = b.t.reset(p);
    ok
}

/// Sectors of the requests `virtio-blk` keeps in flight together (8 each).
const IN_FLIGHT: [u64; 8] = [8, 100, 1000, 4200, 9000, 17000, 25000, 32760];

fn blk_steps<P: Platform>(p: &P, env: &Env<'_>, b: &mut Blk, out: &mut LineBuf) -> bool {
    let dev = b.dev;
    // 1. Sectors 0..64 in one request of eight 4 KiB buffers, completion by interrupt.
    if !p.irq_enable(&dev) {
        out.push_str("cannot route GSI ");
        out.push_dec(u64::from(dev.gsi));
        out.push_str(" through the IOAPIC");
        return false;
    }
    if !read_by_interrupt(p, b, out, "read 0..64 (irq)", (0, 64, DATA)) {
        return false;
    }
    // 2. Eight reads in flight at once: post all, notify once, match by head.
    let mut heads = [0u16; 8];
    for (i, &s) in IN_FLIGHT.iter().enumerate() {
        let buf = DATA + 0x1_0000 + 0x1000 * i as u64;
        poison(p, buf, 8);
        match b.post(p, i, req::IN, s, &[Buf::w(buf, 4096)]) {
            Ok(h) => heads[i] = h,
            Err(e) => return req_fail(out, "8 in flight", &e),
        }
    }
    b.t.notify(p, 0);
    let mut seen = 0u32;
    for _ in 0..IN_FLIGHT.len() {
        let (id, len) = match b.next_used(p) {
            Ok(u) => u,
            Err(e) => return req_fail(out, "8 in flight", &e),
        };
        let Some(i) = heads.iter().position(|&h| u32::from(h) == id) else {
            return req_fail(out, "8 in flight", &ReqError::WrongId(id));
        };
        if seen & (1 << i) != 0 {
            return req_fail(out, "8 in flight (twice)", &ReqError::WrongId(id));
        }
        seen |= 1 << i;
        let d = Done {
            status: p.read8(layout::status(i)),
            len,
        };
        if !expect(out, "8 in flight", d, S_OK, Some(4097)) {
            return false;
        }
        let buf = DATA + 0x1_0000 + 0x1000 * i as u64;
        if let Err(m) = check_sectors(p, buf, IN_FLIGHT[i], 8, fresh_word) {
            return req_fail(out, "8 in flight", &m);
        }
    }
    // 3. Write sectors 64..72, flush, read back.
    let wbuf = DATA + 0x2_0000;
    for k in 0..8 * SECTOR / 8 {
        p.write64(wbuf + 8 * k, written_word(64 + k / (SECTOR / 8)));
    }
    match b.request(p, req::OUT, 64, &[Buf::r(wbuf, 4096)]) {
        Ok(d) if expect(out, "write 64..72", d, S_OK, Some(1)) => {}
        Ok(_) => return false,
        Err(e) => return req_fail(out, "write 64..72", &e),
    }
    let flush = b.features & F_FLUSH != 0;
    if flush {
        match b.request(p, req::FLUSH, 0, &[]) {
            Ok(d) if expect(out, "flush", d, S_OK, Some(1)) => {}
            Ok(_) => return false,
            Err(e) => return req_fail(out, "flush", &e),
        }
    }
    if !read_check(
        p,
        b,
        out,
        "read back 64..72",
        (64, 8, DATA + 0x3_0000, 4096),
        written_word,
    ) {
        return false;
    }
    if env.cmdline.get("kiln.blk.hold") == Some(b"1") {
        let mut l = info_line("virtio-blk");
        l.push_str("flushed");
        p.info(l.as_bytes());
        p.hold();
    }
    // 4. Discard 2048..4096 and write zeroes (unmap) 4096..4104; both read back as zeros.
    let discard = b.features & F_DISCARD != 0;
    if discard
        && !zero_range(
            p,
            b,
            out,
            (req::DISCARD, "discard 2048..4096"),
            (2048, 2048, 0),
        )
    {
        return false;
    }
    let wz = b.features & F_WRITE_ZEROES != 0;
    if wz
        && !zero_range(
            p,
            b,
            out,
            (req::WRITE_ZEROES, "write zeroes 4096..4104"),
            (4096, 8, WZ_UNMAP),
        )
    {
        return false;
    }
    // 5. Reads at and across the end of the disk fail; an unknown type is unsupported.
    let cap = b.capacity;
    for (step, sector) in [("read at capacity", cap), ("read across the end", cap - 4)] {
        match b.request(p, req::IN, sector, &[Buf::w(DATA + 0x4_0000, 4096)]) {
            Ok(d) if expect(out, step, d, S_IOERR, None) => {}
            Ok(_) => return false,
            Err(e) => return req_fail(out, step, &e),
        }
    }
    match b.request(p, 0xff, 0, &[]) {
        Ok(d) if expect(out, "request type 0xff", d, S_UNSUPP, None) => {}
        Ok(_) => return false,
        Err(e) => return req_fail(out, "request type 0xff", &e),
    }
    // 6. Identity.
    if !identity(p, env, b, out) {
        return false;
    }
    let irqs = p.irq_count(&dev);
    out.push_str("dev=");
    out.push_hex(dev.base);
    out.push_str(" gsi=");
    out.push_dec(u64::from(dev.gsi));
    out.push_str(" capacity=");
    out.push_dec(cap);
    out.push_str(" irqs=");
    out.push_dec(u64::from(irqs));
    out.push_str(" in_flight=8 flush=");
    out.push_str(if flush { "ok" } else { "not-offered" });
    out.push_str(" discard=");
    out.push_str(if discard { "zeroed" } else { "not-offered" });
    out.push_str(" write_zeroes=");
    out.push_str(if wz { "zeroed" } else { "not-offered" });
    true
}

/// Reads `n` sectors at `sector` into `buf` as 4 KiB buffers and waits for the device's
/// interrupt (not the used ring) before taking the completion; checks the data.
pub fn read_by_interrupt<P: Platform>(
    p: &P,
    b: &mut Blk,
    out: &mut LineBuf,
    step: &str,
    (sector, n, buf): (u64, u64, u64),
) -> bool {
    let dev = b.dev;
    poison(p, buf, n);
    let bytes = (n * SECTOR) as u32;
    let mut bufs = [Buf::r(0, 0); 16];
    let k = chunks(buf, bytes, 4096, true, &mut bufs);
    let before = p.irq_count(&dev);
    let head = match b.post(p, 0, req::IN, sector, &bufs[..k]) {
        Ok(h) => h,
        Err(e) => return req_fail(out, step, &e),
    };
    b.t.notify(p, 0);
    if !wait_until(p, TIMEOUT_NS, || p.irq_count(&dev) != before) {
        out.push_str(step);
        out.push_str(": no interrupt on GSI ");
        out.push_dec(u64::from(dev.gsi));
        out.push_str(" within 5 s (used entries pending: ");
        out.push_dec(u64::from(b.q.pending(p)));
        out.push_str(")");
        return false;
    }
    let (id, len) = match b.q.pop_used(p) {
        Some(u) => u,
        None => {
            out.push_str(step);
            out.push_str(": interrupt without a used entry");
            return false;
        }
    };
    if id != u32::from(head) {
        return req_fail(out, step, &ReqError::WrongId(id));
    }
    let d = Done {
        status: p.read8(layout::status(0)),
        len,
    };
    if !expect(out, step, d, S_OK, Some(bytes + 1)) {
        return false;
    }
    match check_sectors(p, buf, sector, n, fresh_word) {
        Ok(()) => true,
        Err(m) => req_fail(out, step, &m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words() {
        assert_eq!(fresh_word(0x40), 0x4b49_4c4e_0000_0040);
        assert_eq!(&fresh_word(0).to_be_bytes()[..4], b"KILN");
        assert_eq!(&written_word(0).to_be_bytes()[..4], b"WRIT");
        assert_ne!(poison_word(3), fresh_word(3));
    }

    #[test]
    fn chunking() {
        let mut b = [Buf::r(0, 0); 16];
        assert_eq!(chunks(0x1000, 32768, 4096, true, &mut b), 8);
        assert_eq!(b[7], Buf::w(0x1000 + 7 * 4096, 4096));
        assert_eq!(chunks(0, 5000, 4096, false, &mut b), 2);
        assert_eq!(b[1], Buf::r(4096, 904));
        let mut small = [Buf::r(0, 0); 2];
        assert_eq!(chunks(0, 1 << 20, 4096, true, &mut small), 2);
    }
}
