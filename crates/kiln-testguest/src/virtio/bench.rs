//! `blk-bench`: 4 KiB random read and write IOPS, 128 KiB sequential read and write MiB/s at
//! a fixed queue depth, measured in the guest with kvmclock. Data is neither written nor
//! checked by the guest; writes store whatever the buffers hold.
//!
//! The request loop is lean: every slot has a pre-built three-descriptor chain (header,
//! data, status); a completion costs a status check, a sector store and an available-ring
//! entry, and each batch of completions one notification. Used-buffer interrupts are
//! suppressed (`VRING_AVAIL_F_NO_INTERRUPT`): the loop polls.

use super::blk::{self, req, Blk, F_RO, S_OK, S_UNTOUCHED};
use super::layout::{self, DATA};
use super::ring::{write_desc, DESC_F_NEXT, DESC_F_WRITE};
use super::transport::ID_BLOCK;
use super::{Env, Platform, SECOND};
use crate::line::{Describe, LineBuf};

/// Default queue depth (`kiln.blk.qd`).
pub const DEFAULT_QD: u64 = 16;
/// Deepest queue the bench drives (three descriptors per request in a 256-entry queue,
/// 128 KiB of buffer each).
pub const MAX_QD: u64 = 64;
/// Default length of each phase in ms (`kiln.blk.bench_ms`).
pub const DEFAULT_MS: u64 = 1000;
/// Longest phase allowed.
pub const MAX_MS: u64 = 60_000;
/// The span of the disk used: the first 64 MiB (or the whole disk if smaller).
pub const SPAN_SECTORS: u64 = (64 << 20) / blk::SECTOR;
/// Sequential request size.
pub const SEQ_LEN: u32 = 128 << 10;
/// Random request size.
pub const RAND_LEN: u32 = 4 << 10;
/// A phase fails if no request completes for this long.
pub const STALL_NS: u64 = 5 * SECOND;

/// One measured phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Phase {
    /// Requests completed.
    pub ops: u64,
    /// Nanoseconds from the first submission to the last completion.
    pub ns: u64,
    /// Bytes per request.
    pub len: u32,
}

impl Phase {
    /// Requests per second.
    pub fn iops(&self) -> u64 {
        if self.ns == 0 {
            return 0;
        }
        ((u128::from(self.ops) * u128::from(SECOND)) / u128::from(self.ns)) as u64
    }

    /// MiB per second in tenths.
    pub fn mibs_tenths(&self) -> u64 {
        if self.ns == 0 {
            return 0;
        }
        let bytes = u128::from(self.ops) * u128::from(self.len);
        ((bytes * 10 * u128::from(SECOND)) / (u128::from(self.ns) << 20)) as u64
    }
}

/// Appends `tenths / 10` with one decimal.
pub fn push_tenths(out: &mut LineBuf, tenths: u64) {
    out.push_dec(tenths / 10);
    out.push_str(".");
    out.push_dec(tenths % 10);
}

/// xorshift64: cheap, integer-only sector picks.
#[derive(Clone, Copy, Debug)]
pub struct XorShift(pub u64);

impl XorShift {
    /// The next value (never 0 for a nonzero seed).
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Why a phase stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchError {
    /// A request finished with this status (id, status).
    Status(u32, u8),
    /// The device returned an id no slot has.
    BadId(u32),
    /// Nothing completed for [`STALL_NS`] (device status).
    Stalled(u32),
}

impl Describe for BenchError {
    fn describe(&self, out: &mut LineBuf) {
        match *self {
            BenchError::Status(id, s) => {
                out.push_str("request ");
                out.push_dec(u64::from(id));
                out.push_str(" finished with status ");
                out.push_dec(u64::from(s));
            }
            BenchError::BadId(id) => {
                out.push_str("used ring returned id ");
                out.push_dec(u64::from(id));
            }
            BenchError::Stalled(s) => {
                out.push_str("no completion for 5 s (device status ");
                out.push_hex(u64::from(s));
                out.push_str(")");
            }
        }
    }
}

/// Picks request sectors for a phase.
#[derive(Clone, Copy, Debug)]
pub struct Picker {
    rng: Option<XorShift>,
    /// Sectors per request.
    step: u64,
    /// Requests that fit the span.
    slots: u64,
    next: u64,
}

impl Picker {
    /// Random `len`-byte-aligned picks over `span` sectors (seeded), or sequential ones.
    pub fn new(random: bool, len: u32, span: u64, seed: u64) -> Picker {
        let step = u64::from(len) / blk::SECTOR;
        Picker {
            rng: random.then_some(XorShift(seed | 1)),
            step,
            slots: (span / step).max(1),
            next: 0,
        }
    }

    /// The next request's first sector.
    pub fn sector(&mut self) -> u64 {
        let i = match &mut self.rng {
            Some(r) => r.next_u64() % self.slots,
            None => {
                let i = self.next;
                self.next = if i + 1 == self.slots { 0 } else { i + 1 };
                i
            }
        };
        i * self.step
    }
}

/// Runs one phase: `qd` requests of `kind` kept in flight for `dur_ns`.
fn phase<P: Platform>(
    p: &P,
    b: &mut Blk,
    qd: usize,
    kind: u32,
    mut pick: Picker,
    len: u32,
    dur_ns: u64,
) -> Result<Phase, BenchError> {
    let desc = b.q.mem.desc;
    let data_flags = DESC_F_NEXT | if kind == req::IN { DESC_F_WRITE } else { 0 };
    for i in 0..qd {
        let d = (3 * i) as u16;
        write_desc(p, desc, d, layout::header(i), 16, DESC_F_NEXT, d + 1);
        write_desc(
            p,
            desc,
            d + 1,
            DATA + u64::from(SEQ_LEN) * i as u64,
            len,
            data_flags,
            d + 2,
        );
        write_desc(p, desc, d + 2, layout::status(i), 1, DESC_F_WRITE, 0);
        p.write32(layout::header(i), kind);
        p.write32(layout::header(i) + 4, 0);
    }
    let start = p.now_ns();
    let deadline = start + dur_ns;
    for i in 0..qd {
        p.write64(layout::header(i) + 8, pick.sector());
        p.write8(layout::status(i), S_UNTOUCHED);
        b.q.push_head(p, (3 * i) as u16);
    }
    b.q.publish(p);
    b.t.notify(p, 0);
    let (mut inflight, mut ops) = (qd, 0u64);
    let mut last_progress = start;
    loop {
        let now = p.now_ns();
        if b.q.pending(p) == 0 {
            if now.wrapping_sub(last_progress) > STALL_NS {
                return Err(BenchError::Stalled(b.t.status(p)));
            }
            core::hint::spin_loop();
            continue;
        }
        let more = now < deadline;
        let mut again = false;
        while let Some((id, _)) = b.q.pop_used(p) {
            let slot = (id / 3) as usize;
            if id % 3 != 0 || slot >= qd {
                return Err(BenchError::BadId(id));
            }
            let st = p.read8(layout::status(slot));
            if st != S_OK {
                return Err(BenchError::Status(id, st));
            }
            ops += 1;
            if more {
                p.write64(layout::header(slot) + 8, pick.sector());
                p.write8(layout::status(slot), S_UNTOUCHED);
                b.q.push_head(p, id as u16);
                again = true;
            } else {
                inflight -= 1;
            }
        }
        last_progress = now;
        if again {
            b.q.publish(p);
            b.t.notify(p, 0);
        }
        if inflight == 0 {
            return Ok(Phase {
                ops,
                ns: p.now_ns() - start,
                len,
            });
        }
    }
}

/// The `blk-bench` scenario.
pub fn run_bench<P: Platform>(p: &P, env: &Env<'_>, out: &mut LineBuf) -> bool {
    let (Some(qd), Some(ms)) = (
        env.num("kiln.blk.qd", DEFAULT_QD, out),
        env.num("kiln.blk.bench_ms", DEFAULT_MS, out),
    ) else {
        return false;
    };
    if !(1..=MAX_QD).contains(&qd) || !(1..=MAX_MS).contains(&ms) {
        out.push_str("kiln.blk.qd must be 1..=64 and kiln.blk.bench_ms 1..=60000");
        return false;
    }
    let data_end = DATA + u64::from(SEQ_LEN) * qd;
    if !env.region_ok(layout::START, data_end, out) {
        return false;
    }
    let Some(dev) = env.find(p, ID_BLOCK, |p, d| {
        let (cap, f) = blk::probe(p, d);
        f & F_RO == 0 && cap >= u64::from(SEQ_LEN) / blk::SECTOR && cap != u64::MAX
    }) else {
        env.none_found(p, "writable virtio-blk", out);
        return false;
    };
    let mut b = match Blk::open(p, dev, layout::BLK_QA) {
        Ok(b) => b,
        Err(e) => {
            out.push_str("init: ");
            e.describe(out);
            return false;
        }
    };
    let qd = qd as usize;
    if 3 * qd > usize::from(b.q.size()) {
        out.push_str("queue too small for kiln.blk.qd: ");
        out.push_dec(u64::from(b.q.size()));
        out.push_str(" entries");
        let _ = b.t.reset(p);
        return false;
    }
    b.q.set_no_interrupt(p, true);
    let span = b.capacity.min(SPAN_SECTORS);
    let dur = ms * 1_000_000;
    let phases = [
        (req::IN, RAND_LEN, true),
        (req::OUT, RAND_LEN, true),
        (req::IN, SEQ_LEN, false),
        (req::OUT, SEQ_LEN, false),
    ];
    let mut res = [Phase {
        ops: 0,
        ns: 0,
        len: 0,
    }; 4];
    for (i, &(kind, len, random)) in phases.iter().enumerate() {
        let pick = Picker::new(random, len, span, 0x9e37_79b9_7f4a_7c15 ^ i as u64);
        match phase(p, &mut b, qd, kind, pick, len, dur) {
            Ok(r) => res[i] = r,
            Err(e) => {
                out.push_str(["randread", "randwrite", "seqread", "seqwrite"][i]);
                out.push_str(": ");
                e.describe(out);
                let _ = b.t.reset(p);
                return false;
            }
        }
    }
    let _ = b.t.reset(p);
    let mut l = LineBuf::new();
    l.push_str("KBENCH blk randread_iops=");
    l.push_dec(res[0].iops());
    l.push_str(" randwrite_iops=");
    l.push_dec(res[1].iops());
    l.push_str(" seqread_mibs=");
    push_tenths(&mut l, res[2].mibs_tenths());
    l.push_str(" seqwrite_mibs=");
    push_tenths(&mut l, res[3].mibs_tenths());
    l.push_str(" qd=");
    l.push_dec(qd as u64);
    p.info(l.as_bytes());
    out.push_str("qd=");
    out.push_dec(qd as u64);
    out.push_str(" ms=");
    out.push_dec(ms);
    out.push_str(" span_sectors=");
    out.push_dec(span);
    out.push_str(" ops=");
    for (i, r) in res.iter().enumerate() {
        if i > 0 {
            out.push_str(",");
        }
        out.push_dec(r.ops);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        let r = Phase {
            ops: 5000,
            ns: 500_000_000,
            len: 4096,
        };
        assert_eq!(r.iops(), 10_000);
        let s = Phase {
            ops: 100,
            ns: SECOND,
            len: SEQ_LEN,
        };
        assert_eq!(s.mibs_tenths(), 125);
        let mut l = LineBuf::new();
        push_tenths(&mut l, s.mibs_tenths());
        assert_eq!(l.as_str(), "12.5");
        assert_eq!(
            Phase {
                ops: 1,
                ns: 0,
                len: 1
            }
            .iops(),
            0
        );
    }

    #[test]
    fn pickers_stay_in_the_span() {
        let mut r = Picker::new(true, RAND_LEN, 1000, 42);
        for _ in 0..10_000 {
            let s = r.sector();
            assert!(s % 8 == 0 && s + 8 <= 1000, "{s}");
        }
        let mut q = Picker::new(false, SEQ_LEN, 1024, 0);
        let seen: std::vec::Vec<u64> = (0..6).map(|_| q.sector()).collect();
        assert_eq!(seen, [0, 256, 512, 768, 0, 256]);
        // Spans smaller than one request still pick sector 0.
        assert_eq!(Picker::new(false, SEQ_LEN, 10, 0).sector(), 0);
    }
}
