//! The `counter` scenario: a guest that keeps running, dirtying and checking memory (and,
//! with a disk, blocks) while printing a clock-stamped sequence, so a host can pause,
//! snapshot, restore or migrate it and see from the output alone that nothing was lost.
//!
//! - Memory: `kiln.counter.mib=N` MiB of free RAM from [`layout::END`] up. Each pass over
//!   the pages first checks the two words (first and last u64) of a page against the
//!   previous pass's [`page_word`] and then writes this pass's. Paced to
//!   `kiln.counter.rate` MiB/s (0: as fast as it goes).
//! - Output: every `kiln.counter.period_ms` ms a line
//!   `counter seq=N t_ns=T errors=E pass=P dirtied_kib=K`, `T` from kvmclock; a gap between two lines
//!   longer than the period plus `kiln.counter.jump_ms` prints `counter jump=NS ns seq=N`.
//!   kvmclock going backwards is an error.
//! - Disk: with a writable virtio-blk, each line (seq from 1) also writes sector `seq % span` stamped
//!   [`blk_word`]`(seq)` and reads it back; once the ring has wrapped (seq > span), the old stamp
//!   (`seq - span`) is checked before it is overwritten.
//! - After `kiln.counter.secs` seconds (0: never) the result: PASS when there were no
//!   pattern, disk or clock errors.
//!
//! It runs on the vCPU that runs the scenarios (the BSP); with `kiln.counter.aps=1` every AP
//! also dirties and checks its own `kiln.counter.mib` MiB (right after the BSP's) at the same
//! rate, and the BSP's lines count their pages and errors too.

use super::blk::{self, Blk, SECTOR};
use super::layout::{self, DATA};
use super::ring::Buf;
use super::{Env, Platform};
use crate::freeram::{FreeRam, Range, MAX_RANGES, PAGE};
use crate::line::{Describe, LineBuf};

/// The word pass `pass` leaves in the first and last u64 of the page at `addr` (pass 0:
/// nothing written yet).
pub const fn page_word(addr: u64, pass: u64) -> u64 {
    0x434e_5452_0000_0000 ^ addr ^ pass.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Every u64 of the sector written with sequence number `seq`.
pub const fn blk_word(seq: u64) -> u64 {
    0x434e_5442_0000_0000 ^ seq
}

/// Settings from the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// MiB of memory to keep dirtying.
    pub mib: u64,
    /// MiB/s to dirty (0: as fast as possible).
    pub rate: u64,
    /// Milliseconds between output lines.
    pub period_ms: u64,
    /// A gap between lines over the period by more than this many ms is reported.
    pub jump_ms: u64,
    /// Seconds to run (0: forever).
    pub secs: u64,
    /// Sectors of the disk ring (0: don't use a disk).
    pub blk_sectors: u64,
    /// Whether the APs dirty memory too (each its own `mib` MiB after the BSP's).
    pub aps: bool,
}

impl Settings {
    /// Reads `kiln.counter.*`; None (reason in `out`) on a bad value.
    pub fn parse(env: &Env<'_>, out: &mut LineBuf) -> Option<Settings> {
        let s = Settings {
            mib: env.num("kiln.counter.mib", 16, out)?,
            rate: env.num("kiln.counter.rate", 10, out)?,
            period_ms: env.num("kiln.counter.period_ms", 10, out)?,
            jump_ms: env.num("kiln.counter.jump_ms", 50, out)?,
            secs: env.num("kiln.counter.secs", 10, out)?,
            blk_sectors: env.num("kiln.counter.blk_sectors", 2048, out)?,
            aps: env.num("kiln.counter.aps", 0, out)? == 1,
        };
        if s.period_ms == 0 || s.period_ms > 60_000 {
            out.push_str("kiln.counter.period_ms must be 1..=60000");
            return None;
        }
        if s.mib > 1 << 20 || s.rate > 1 << 20 || s.secs > 1 << 32 || s.jump_ms > 1 << 32 {
            out.push_str("kiln.counter value out of range");
            return None;
        }
        Some(s)
    }
}

/// The pages being dirtied: the first `pages` pages of some free ranges.
struct Pages {
    ranges: [Range; MAX_RANGES],
    len: usize,
    pages: u64,
    /// Cursor: range index and address.
    r: usize,
    addr: u64,
    /// Current pass (1 on the first walk).
    pass: u64,
}

impl Pages {
    fn new(fr: &FreeRam, want: u64) -> Pages {
        let mut p = Pages {
            ranges: [Range { start: 0, end: 0 }; MAX_RANGES],
            len: 0,
            pages: 0,
            r: 0,
            addr: 0,
            pass: 1,
        };
        for r in fr.as_slice() {
            if p.pages == want {
                break;
            }
            let take = r.pages().min(want - p.pages);
            p.ranges[p.len] = Range {
                start: r.start,
                end: r.start + take * PAGE,
            };
            p.len += 1;
            p.pages += take;
        }
        p.addr = p.ranges[0].start;
        p
    }

    /// Checks and rewrites the page under the cursor and moves on; the mismatch, if any.
    fn step<P: Platform>(&mut self, p: &P) -> Option<(u64, u64, u64)> {
        let a = self.addr;
        let mut bad = None;
        if self.pass > 1 {
            let want = page_word(a, self.pass - 1);
            for off in [0, PAGE - 8] {
                let got = p.page_read64(a + off);
                if got != want && bad.is_none() {
                    bad = Some((a + off, got, want));
                }
            }
        }
        let w = page_word(a, self.pass);
        p.page_write64(a, w);
        p.page_write64(a + PAGE - 8, w);
        self.addr += PAGE;
        if self.addr >= self.ranges[self.r].end {
            self.r += 1;
            if self.r == self.len {
                self.r = 0;
                self.pass += 1;
            }
            self.addr = self.ranges[self.r].start;
        }
        bad
    }
}

/// How many errors are described one by one on the console.
const MAX_REPORTED: u64 = 8;

/// Everything counted during a run.
#[derive(Default)]
struct Tally {
    mem_errors: u64,
    blk_errors: u64,
    backwards: u64,
    jumps: u64,
    max_jump_ns: u64,
    blk_blocks: u64,
    steps: u64,
}

impl Tally {
    fn errors(&self) -> u64 {
        self.mem_errors + self.blk_errors + self.backwards
    }
}

fn report_error<P: Platform>(p: &P, t: &Tally, what: &str, f: impl FnOnce(&mut LineBuf)) {
    if t.errors() > MAX_REPORTED {
        return;
    }
    let mut l = LineBuf::new();
    l.push_str("counter error ");
    l.push_str(what);
    l.push_str(" ");
    f(&mut l);
    p.info(l.as_bytes());
}

/// The disk ring: sector `seq % span` holds [`blk_word`]`(seq)`.
struct Disk {
    b: Blk,
    span: u64,
}

impl Disk {
    /// One tick: check the old stamp (after the first wrap), write the new, read it back.
    fn tick<P: Platform>(&mut self, p: &P, seq: u64, t: &mut Tally) {
        let s = seq % self.span;
        let mut why = LineBuf::new();
        let ok = (seq <= self.span
            || blk::read_check(
                p,
                &mut self.b,
                &mut why,
                "old stamp",
                (s, 1, DATA, SECTOR as u32),
                |_| blk_word(seq - self.span),
            ))
            && self.write(p, s, seq, &mut why)
            && blk::read_check(
                p,
                &mut self.b,
                &mut why,
                "read back",
                (s, 1, DATA, SECTOR as u32),
                |_| blk_word(seq),
            );
        if ok {
            t.blk_blocks += 1;
        } else {
            t.blk_errors += 1;
            report_error(p, t, "blk", |l| {
                l.push_str("seq=");
                l.push_dec(seq);
                l.push_str(" ");
                l.push_bytes(why.as_bytes());
            });
        }
    }

    fn write<P: Platform>(&mut self, p: &P, s: u64, seq: u64, why: &mut LineBuf) -> bool {
        for k in 0..SECTOR / 8 {
            p.write64(DATA + k * 8, blk_word(seq));
        }
        match self
            .b
            .request(p, blk::req::OUT, s, &[Buf::r(DATA, SECTOR as u32)])
        {
            Ok(d) if d.status == blk::S_OK => true,
            Ok(d) => {
                why.push_str("write: status ");
                why.push_dec(u64::from(d.status));
                false
            }
            Err(e) => {
                why.push_str("write: ");
                e.describe(why);
                false
            }
        }
    }
}

/// Runs `counter`.
pub fn run_counter<P: Platform>(p: &P, env: &Env<'_>, out: &mut LineBuf) -> bool {
    let Some(s) = Settings::parse(env, out) else {
        return false;
    };
    let fr = FreeRam::new(env.memmap, layout::END, &env.reserved);
    let want = s.mib * 256;
    if want > fr.pages() {
        out.push_str("kiln.counter.mib=");
        out.push_dec(s.mib);
        out.push_str(" but only ");
        out.push_dec(fr.pages() / 256);
        out.push_str(" MiB of free RAM above ");
        out.push_hex(layout::END);
        return false;
    }
    let mut pages = (want > 0).then(|| Pages::new(&fr, want));
    // The APs' areas: right after the BSP's, in the same free range.
    let aps = if s.aps && want > 0 {
        p.counter_ap_count()
    } else {
        0
    };
    if aps > 0 {
        let first = fr.as_slice()[0];
        if first.pages() < want * (1 + u64::from(aps)) {
            out.push_str("kiln.counter.aps=1: the first free RAM range has room for ");
            out.push_dec(first.pages() / 256);
            out.push_str(" MiB, not ");
            out.push_dec(s.mib * (1 + u64::from(aps)));
            return false;
        }
    }
    let mut disk = None;
    if s.blk_sectors > 0 {
        if let Some(dev) = blk::find_writable(p, env) {
            if !env.region_ok(layout::START, layout::FUNCTIONAL_END, out) {
                return false;
            }
            match Blk::open(p, dev, layout::BLK_QA) {
                Ok(b) => {
                    let span = s.blk_sectors.min(b.capacity);
                    disk = Some(Disk { b, span });
                }
                Err(e) => {
                    out.push_str("blk init: ");
                    e.describe(out);
                    return false;
                }
            }
        }
    }

    let mut start_line = LineBuf::new();
    start_line.push_str("counter start pages=");
    start_line.push_dec(want);
    start_line.push_str(" rate_mibs=");
    start_line.push_dec(s.rate);
    start_line.push_str(" period_ms=");
    start_line.push_dec(s.period_ms);
    start_line.push_str(" blk_span=");
    start_line.push_dec(disk.as_ref().map_or(0, |d| d.span));
    p.info(start_line.as_bytes());

    let started_aps = if aps > 0 {
        let base = fr.as_slice()[0].start + want * PAGE;
        let n = p.counter_aps_start(base, want, s.rate * 256);
        let mut l = LineBuf::new();
        l.push_str("counter aps=");
        l.push_dec(u64::from(n));
        l.push_str(" of ");
        l.push_dec(u64::from(aps));
        p.info(l.as_bytes());
        n
    } else {
        0
    };
    let period = s.period_ms * 1_000_000;
    let jump = s.jump_ms * 1_000_000;
    let end = s.secs.checked_mul(1_000_000_000);
    let rate_pages = s.rate * 256;
    let mut t = Tally::default();
    let start = p.now_ns();
    let mut last = start;
    let mut last_tick = start;
    let mut seq = 0u64;
    loop {
        // Memory: catch up with the rate (or do a batch), at most 64 pages between clock reads.
        if let Some(pg) = pages.as_mut() {
            let due = if s.rate == 0 {
                u64::MAX
            } else {
                let el = u128::from(last - start);
                (u128::from(rate_pages) * el / 1_000_000_000) as u64
            };
            let mut n = 0;
            while t.steps < due && n < 64 {
                if let Some((a, got, want)) = pg.step(p) {
                    t.mem_errors += 1;
                    report_error(p, &t, "mem", |l| {
                        l.push_str("addr=");
                        l.push_hex(a);
                        l.push_str(" read=");
                        l.push_hex(got);
                        l.push_str(" want=");
                        l.push_hex(want);
                    });
                }
                t.steps += 1;
                n += 1;
            }
        }
        let now = p.now_ns();
        if now < last {
            t.backwards += 1;
            let back = last - now;
            report_error(p, &t, "clock", |l| {
                l.push_str("kvmclock went back ");
                l.push_dec(back);
                l.push_str(" ns");
            });
            continue;
        }
        last = now;
        if now - last_tick >= period {
            let gap = now - last_tick;
            seq += 1;
            if gap > period + jump {
                t.jumps += 1;
                t.max_jump_ns = t.max_jump_ns.max(gap - period);
                let mut l = LineBuf::new();
                l.push_str("counter jump=");
                l.push_dec(gap - period);
                l.push_str("ns seq=");
                l.push_dec(seq);
                p.info(l.as_bytes());
            }
            if let Some(d) = disk.as_mut() {
                d.tick(p, seq, &mut t);
            }
            let mut l = LineBuf::new();
            l.push_str("counter seq=");
            l.push_dec(seq);
            l.push_str(" t_ns=");
            l.push_dec(now);
            let (ap_steps, ap_errors) = p.counter_aps_status();
            l.push_str(" errors=");
            l.push_dec(t.errors() + ap_errors);
            l.push_str(" pass=");
            l.push_dec(pages.as_ref().map_or(0, |pg| pg.pass));
            l.push_str(" dirtied_kib=");
            l.push_dec((t.steps + ap_steps) * 4);
            p.info(l.as_bytes());
            last_tick = now;
        }
        if end.is_some_and(|e| e > 0 && now - start >= e) {
            break;
        }
    }
    if let Some(d) = disk.as_mut() {
        let _ = d.b.t.reset(p);
    }
    p.counter_aps_stop();
    let (ap_steps, ap_errors) = p.counter_aps_status();
    out.push_str("seq=");
    out.push_dec(seq);
    out.push_str(" pages=");
    out.push_dec(want);
    out.push_str(" passes=");
    out.push_dec(pages.as_ref().map_or(0, |pg| pg.pass - 1));
    out.push_str(" dirtied_mib=");
    out.push_dec(t.steps / 256);
    out.push_str(" blk_blocks=");
    out.push_dec(t.blk_blocks);
    out.push_str(" jumps=");
    out.push_dec(t.jumps);
    out.push_str(" max_jump_ns=");
    out.push_dec(t.max_jump_ns);
    if started_aps > 0 {
        out.push_str(" aps=");
        out.push_dec(u64::from(started_aps));
        out.push_str(" ap_dirtied_mib=");
        out.push_dec(ap_steps / 256);
        out.push_str(" ap_errors=");
        out.push_dec(ap_errors);
    }
    out.push_str(" errors=");
    out.push_dec(t.errors() + ap_errors);
    out.push_str(" (mem=");
    out.push_dec(t.mem_errors);
    out.push_str(" blk=");
    out.push_dec(t.blk_errors);
    out.push_str(" clock=");
    out.push_dec(t.backwards);
    out.push_str(")");
    t.errors() == 0 && ap_errors == 0 && started_aps == aps
}

#[cfg(test)]
mod tests {
    use super::super::host::{image, Host};
    use super::super::MmioDev;
    use super::*;
    use std::cell::Cell;

    fn ticks(h: &Host) -> Vec<(u64, u64)> {
        h.lines
            .borrow()
            .iter()
            .filter_map(|l| {
                let r = l.strip_prefix("counter seq=")?;
                let mut it = r.split(' ');
                let seq = it.next()?.parse().ok()?;
                let t = it.next()?.strip_prefix("t_ns=")?.parse().ok()?;
                Some((seq, t))
            })
            .collect()
    }

    #[test]
    fn counts_dirties_and_stamps_blocks_without_errors() {
        let (path, f) = image(32768);
        let h = Host::new(Some(&f), false);
        let (ok, detail) = h.run(
            "kiln.counter.mib=2 kiln.counter.rate=0 kiln.counter.secs=1 \
             kiln.counter.blk_sectors=16",
            run_counter,
        );
        let _ = std::fs::remove_file(path);
        let lines = h.lines.borrow().join("\n");
        assert!(ok, "{detail}\n{lines}");
        assert!(detail.contains("errors=0"), "{detail}");
        let t = ticks(&h);
        assert!(t.len() > 10, "{lines}");
        for w in t.windows(2) {
            assert_eq!(w[1].0, w[0].0 + 1);
            assert!(w[1].1 >= w[0].1);
        }
        // More than one pass: the check of the previous pass ran.
        let passes: u64 = detail
            .split("passes=")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap();
        assert!(passes >= 2, "{detail}");
        // The ring wrapped (16 sectors) and the latest stamp is on disk.
        let last = t.last().unwrap().0;
        assert!(last > 16);
        assert_eq!(
            super::super::host::sector_word(&f, last % 16),
            blk_word(last)
        );
    }

    /// A [`Platform`] that corrupts one dirtied page after a while.
    struct Corrupting<'a> {
        h: &'a Host,
        calls: Cell<u64>,
    }

    impl Platform for Corrupting<'_> {
        fn read8(&self, a: u64) -> u8 {
            self.h.read8(a)
        }
        fn read16(&self, a: u64) -> u16 {
            self.h.read16(a)
        }
        fn read32(&self, a: u64) -> u32 {
            self.h.read32(a)
        }
        fn read64(&self, a: u64) -> u64 {
            self.h.read64(a)
        }
        fn write8(&self, a: u64, v: u8) {
            self.h.write8(a, v)
        }
        fn write16(&self, a: u64, v: u16) {
            self.h.write16(a, v)
        }
        fn write32(&self, a: u64, v: u32) {
            self.h.write32(a, v)
        }
        fn write64(&self, a: u64, v: u64) {
            self.h.write64(a, v)
        }
        fn reg_read(&self, a: u64) -> u32 {
            self.h.reg_read(a)
        }
        fn reg_write(&self, a: u64, v: u32) {
            self.h.reg_write(a, v)
        }
        fn now_ns(&self) -> u64 {
            let n = self.calls.get() + 1;
            self.calls.set(n);
            if n == 100 {
                // A page the first pass has written (pass 1 runs from END up).
                self.h.page_write64(layout::END + PAGE, 0xdead);
            }
            self.h.now_ns()
        }
        fn irq_enable(&self, d: &MmioDev) -> bool {
            self.h.irq_enable(d)
        }
        fn irq_disable(&self, d: &MmioDev) {
            self.h.irq_disable(d)
        }
        fn irq_count(&self, d: &MmioDev) -> u32 {
            self.h.irq_count(d)
        }
        fn info(&self, l: &[u8]) {
            self.h.info(l)
        }
        fn hold(&self) {}
        fn page_read64(&self, a: u64) -> u64 {
            self.h.page_read64(a)
        }
        fn page_write64(&self, a: u64, v: u64) {
            self.h.page_write64(a, v)
        }
    }

    #[test]
    fn a_changed_page_is_an_error() {
        let h = Host::new(None, false);
        let (ok, detail) = h.run(
            "kiln.counter.mib=1 kiln.counter.rate=0 kiln.counter.secs=1",
            |h, env, out| {
                let c = Corrupting {
                    h,
                    calls: Cell::new(0),
                };
                run_counter(&c, env, out)
            },
        );
        let lines = h.lines.borrow().join("\n");
        assert!(!ok, "{detail}\n{lines}");
        assert!(detail.contains("mem=1"), "{detail}");
        assert!(lines.contains("counter error mem addr=0x"), "{lines}");
    }

    #[test]
    fn bad_settings_and_too_much_memory() {
        let h = Host::new(None, false);
        let (ok, detail) = h.run("kiln.counter.period_ms=0", run_counter);
        assert!(!ok && detail.contains("period_ms"), "{detail}");
        let (ok, detail) = h.run("kiln.counter.mib=x", run_counter);
        assert!(!ok && detail.contains("bad value"), "{detail}");
        let (ok, detail) = h.run("kiln.counter.mib=4000", run_counter);
        assert!(!ok && detail.contains("free RAM"), "{detail}");
    }
}
