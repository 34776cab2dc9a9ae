//! virtio-balloon (device ID 5) and the `balloon` scenario.
//!
//! Queues: inflate 0 and deflate 1, then statistics if `STATS_VQ` was accepted, then free
//! page reporting if `REPORTING` was (virtio 1.x, 5.5.2). The pages given to the device are
//! the top of free RAM above the driver's region ([`FreeRam::new`] with the floor at
//! [`layout::END`], without the initrd and the command line), in buffers of 256 frame
//! numbers (u32 LE, address / 4096) as Linux sends them.
//!
//! The scenario: post a statistics buffer; read the target (`num_pages`); write a marker in
//! each page to be given, inflate, write `actual`; print `KTEST-INFO balloon inflated
//! pages=N` (and with `kiln.balloon.hold=1` wait for a console line: the host reads the
//! VMM's RSS); write a pattern in the rest of free RAM; deflate, reset `actual`; read the
//! first word of each deflated page (0 if the host really dropped it, the marker if it kept
//! it; anything else fails), write and check a pattern there and check the rest kept its
//! own; wait up to 3 s for the statistics buffer to come back and send fresh numbers; report
//! one free run of 4 MiB (one device-writable buffer, as Linux sends its reports) if
//! `REPORTING` was accepted, wait for it and count the pages that read zero afterwards.

use super::layout;
use super::ring::{Buf, QueueMem, SplitQueue};
use super::transport::{regs, InitError, Transport};
use super::{info_line, wait_until, Env, MmioDev, Platform, SECOND};
use crate::freeram::{next_batch, Cursor, FreeRam, Range, PAGE};
use crate::line::{Describe, LineBuf};

/// Device type: memory balloon.
pub const ID_BALLOON: u32 = 5;
/// VIRTIO_BALLOON_F_STATS_VQ: a statistics queue.
pub const F_STATS_VQ: u64 = 1 << 1;
/// VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest may deflate when short of memory.
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// VIRTIO_BALLOON_F_REPORTING: a free page reporting queue.
pub const F_REPORTING: u64 = 1 << 5;
/// Features the scenario accepts when offered (VERSION_1 is always required).
pub const WANTED: u64 = F_STATS_VQ | F_DEFLATE_ON_OOM | F_REPORTING;

/// Frame numbers per inflate/deflate buffer (Linux's `VIRTIO_BALLOON_ARRAY_PFNS_MAX`).
pub const PFNS_PER_BUF: usize = 256;
/// Buffers in flight at once (the queue's size, if smaller, limits it further).
pub const BUFS: usize = 64;
/// Entries asked for on each queue.
pub const QUEUE_SIZE: u16 = 64;
/// Queue memory: four queues of [`QUEUE_STRIDE`] bytes each, above the small-buffer area.
pub const QUEUES: u64 = layout::SMALL_END;
/// Bytes per queue.
pub const QUEUE_STRIDE: u64 = 0x4000;
/// The statistics buffer.
pub const STATS_BUF: u64 = QUEUES + 4 * QUEUE_STRIDE;
/// Frame number buffers, 1 KiB each.
pub const PFN_BUFS: u64 = STATS_BUF + 0x1000;
/// End of the memory the balloon driver uses.
pub const END: u64 = PFN_BUFS + (BUFS * PFNS_PER_BUF * 4) as u64;
/// How long a round of inflate/deflate buffers or a free page report may take.
pub const TIMEOUT_NS: u64 = 5 * SECOND;
/// How long the scenario waits for the statistics buffer to come back.
pub const STATS_WAIT_NS: u64 = 3 * SECOND;
/// Pages in the free page report (4 MiB).
pub const REPORT_PAGES: u64 = 1024;

const _: () = assert!(QueueMem::bytes(QUEUE_SIZE) <= QUEUE_STRIDE && END <= layout::DATA);

/// Queue index of inflate.
pub const Q_INFLATE: u32 = 0;
/// Queue index of deflate.
pub const Q_DEFLATE: u32 = 1;

/// Written in each page before it is given to the device ("BALL").
pub const fn marker_word(addr: u64) -> u64 {
    addr ^ 0x4241_4c4c_0000_0000
}

/// Written in the free pages outside the balloon while it is inflated ("REST").
pub const fn rest_word(addr: u64) -> u64 {
    addr ^ 0x5245_5354_0000_0000
}

/// Written in each page after it came back from the device ("BACK").
pub const fn back_word(addr: u64) -> u64 {
    addr ^ 0x4241_434b_0000_0000
}

/// The statistics the guest reports, `(tag, value)`: swap in/out, major and minor faults
/// (this guest never pages: 0), free memory, total memory, available memory (= free), disk
/// caches (none: 0).
pub fn stats(free: u64, total: u64) -> [(u16, u64); 8] {
    [
        (0, 0),
        (1, 0),
        (2, 0),
        (3, 0),
        (4, free),
        (5, total),
        (6, free),
        (7, 0),
    ]
}

/// Writes [`stats`] at `buf` as packed `{le16 tag; le64 val}` entries (16-bit stores: the
/// values are only 2-byte aligned); returns the length.
pub fn write_stats<P: Platform>(p: &P, buf: u64, free: u64, total: u64) -> u32 {
    let s = stats(free, total);
    for (i, (tag, val)) in s.iter().enumerate() {
        let a = buf + 10 * i as u64;
        p.write16(a, *tag);
        for k in 0..4 {
            p.write16(a + 2 + 2 * k, (val >> (16 * k)) as u16);
        }
    }
    10 * s.len() as u32
}

/// A balloon brought up with its queues.
pub struct Balloon {
    /// Where it is.
    pub dev: MmioDev,
    /// Its registers.
    pub t: Transport,
    /// The features accepted.
    pub features: u64,
    /// Queue 0.
    pub inflate: SplitQueue,
    /// Queue 1.
    pub deflate: SplitQueue,
    /// The statistics queue and its index, with `STATS_VQ`.
    pub stats: Option<(u32, SplitQueue)>,
    /// The reporting queue and its index, with `REPORTING`.
    pub report: Option<(u32, SplitQueue)>,
}

impl Balloon {
    /// Resets and initialises the balloon at `dev`: features, every queue the accepted
    /// features define, DRIVER_OK.
    pub fn open<P: Platform>(p: &P, dev: MmioDev) -> Result<Balloon, InitError> {
        let t = Transport::new(dev.base);
        let features = t.negotiate(p, WANTED)?;
        let area = |i: u64| QUEUES + i * QUEUE_STRIDE;
        let inflate = t.setup_queue(p, Q_INFLATE, area(0), QUEUE_SIZE)?;
        let deflate = t.setup_queue(p, Q_DEFLATE, area(1), QUEUE_SIZE)?;
        let mut next = 2;
        let mut optional = |f: u64, a: u64| -> Result<Option<(u32, SplitQueue)>, InitError> {
            if features & f == 0 {
                return Ok(None);
            }
            let q = t.setup_queue(p, next, area(a), 8)?;
            next += 1;
            Ok(Some((next - 1, q)))
        };
        let stats = optional(F_STATS_VQ, 2)?;
        let report = optional(F_REPORTING, 3)?;
        t.driver_ok(p)?;
        Ok(Balloon {
            dev,
            t,
            features,
            inflate,
            deflate,
            stats,
            report,
        })
    }

    /// `num_pages`: the size the device wants.
    pub fn target<P: Platform>(&self, p: &P) -> u32 {
        self.t.config32(p, 0)
    }

    /// `actual`: the size the driver says it has.
    pub fn actual<P: Platform>(&self, p: &P) -> u32 {
        self.t.config32(p, 4)
    }

    /// Writes `actual`.
    pub fn set_actual<P: Platform>(&self, p: &P, pages: u32) {
        self.t.write(p, regs::CONFIG + 4, pages)
    }

    /// Sends the free pages at or above `cut` through queue `which` (inflate or deflate),
    /// [`PFNS_PER_BUF`] a buffer, up to [`BUFS`] buffers a round, each round waited for.
    /// Returns the pages sent; None with the reason in `out` on a full queue, a timeout or
    /// an unknown used id.
    pub fn transfer<P: Platform>(
        &mut self,
        p: &P,
        which: u32,
        fr: &FreeRam,
        cut: u64,
        out: &mut LineBuf,
    ) -> Option<u64> {
        let t = self.t;
        let q = if which == Q_INFLATE {
            &mut self.inflate
        } else {
            &mut self.deflate
        };
        let name = if which == Q_INFLATE {
            "inflate"
        } else {
            "deflate"
        };
        let per_round = BUFS.min(usize::from(q.size()));
        let mut cursor = Cursor::top();
        let mut pfns = [0u32; PFNS_PER_BUF];
        let mut sent = 0u64;
        loop {
            let mut posted = 0usize;
            while posted < per_round {
                let n = next_batch(fr, cut, &mut cursor, &mut pfns);
                if n == 0 {
                    break;
                }
                let buf = PFN_BUFS + (posted * PFNS_PER_BUF * 4) as u64;
                for (i, pfn) in pfns[..n].iter().enumerate() {
                    p.write32(buf + 4 * i as u64, *pfn);
                }
                if q.add(p, &[Buf::r(buf, 4 * n as u32)]).is_none() {
                    out.push_str(name);
                    out.push_str(": no free descriptor (the device returned an unknown id?)");
                    return None;
                }
                posted += 1;
                sent += n as u64;
            }
            if posted == 0 {
                return Some(sent);
            }
            t.notify(p, which);
            let mut done = 0usize;
            wait_until(p, TIMEOUT_NS, || {
                while q.pop_used(p).is_some() {
                    done += 1;
                }
                done >= posted
            });
            if done < posted || q.num_free() != q.size() {
                out.push_str(name);
                out.push_str(": ");
                out.push_dec(done as u64);
                out.push_str(" of ");
                out.push_dec(posted as u64);
                out.push_str(" buffers came back within 5 s");
                if q.num_free() != q.size() && done >= posted {
                    out.push_str(", with unknown ids");
                }
                out.push_str(" (status ");
                out.push_hex(u64::from(t.status(p)));
                out.push_str(")");
                return None;
            }
        }
    }
}

/// Calls `f` with the address of each page of `r`.
fn each_page(r: Range, mut f: impl FnMut(u64)) {
    let mut a = r.start;
    while a < r.end {
        f(a);
        a += PAGE;
    }
}

/// The `balloon` scenario (module documentation).
pub fn run_balloon<P: Platform>(p: &P, env: &Env<'_>, out: &mut LineBuf) -> bool {
    if !env.region_ok(QUEUES, END, out) {
        return false;
    }
    let Some(hold) = env.num("kiln.balloon.hold", 0, out) else {
        return false;
    };
    let Some(dev) = env.find(p, ID_BALLOON, |_, _| true) else {
        env.none_found(p, "virtio-balloon", out);
        return false;
    };
    let mut b = match Balloon::open(p, dev) {
        Ok(b) => b,
        Err(e) => {
            out.push_str("init: ");
            e.describe(out);
            return false;
        }
    };
    let ok = exercise(p, env, &mut b, hold == 1, out);
    let _ = b.t.reset(p);
    ok
}

fn exercise<P: Platform>(
    p: &P,
    env: &Env<'_>,
    b: &mut Balloon,
    hold: bool,
    out: &mut LineBuf,
) -> bool {
    let fr = FreeRam::new(env.memmap, layout::END, &env.reserved);
    let total = env.memmap.ram_total();
    let free_bytes = fr.pages() * PAGE;
    let target = u64::from(b.target(p));
    let Some(cut) = fr.top(target) else {
        out.push_str("target ");
        out.push_dec(target);
        out.push_str(" pages, but only ");
        out.push_dec(fr.pages());
        out.push_str(" free pages above ");
        out.push_hex(layout::END);
        return false;
    };

    // A statistics buffer for the device to hold.
    let mut stats_head = None;
    if let Some((i, q)) = b.stats.as_mut() {
        let len = write_stats(p, STATS_BUF, free_bytes, total);
        stats_head = q.add(p, &[Buf::r(STATS_BUF, len)]);
        b.t.notify(p, *i);
    }

    // Inflate.
    fr.above(cut, |r| each_page(r, |a| p.page_write64(a, marker_word(a))));
    let Some(inflated) = b.transfer(p, Q_INFLATE, &fr, cut, out) else {
        return false;
    };
    b.set_actual(p, inflated as u32);
    let actual = b.actual(p);
    let mut l = info_line("balloon");
    l.push_str("inflated pages=");
    l.push_dec(inflated);
    p.info(l.as_bytes());
    if hold {
        p.wait_line();
    }
    if u64::from(actual) != inflated {
        out.push_str("actual reads ");
        out.push_dec(u64::from(actual));
        out.push_str(" after writing ");
        out.push_dec(inflated);
        return false;
    }

    // The rest of free RAM is the guest's to use meanwhile.
    let mut rest = 0u64;
    fr.below(cut, |r| {
        each_page(r, |a| p.page_write64(a, rest_word(a)));
        rest += r.pages();
    });

    // Deflate, then take the pages back.
    let Some(deflated) = b.transfer(p, Q_DEFLATE, &fr, cut, out) else {
        return false;
    };
    b.set_actual(p, 0);
    if b.actual(p) != 0 {
        out.push_str("actual reads ");
        out.push_dec(u64::from(b.actual(p)));
        out.push_str(" after writing 0");
        return false;
    }
    let (mut zero, mut kept, mut other) = (0u64, 0u64, None);
    fr.above(cut, |r| {
        each_page(r, |a| {
            match p.page_read64(a) {
                0 => zero += 1,
                v if v == marker_word(a) => kept += 1,
                _ => {
                    other.get_or_insert(a);
                }
            }
            p.page_write64(a, back_word(a));
        })
    });
    let mut lost = None;
    fr.above(cut, |r| {
        each_page(r, |a| {
            if p.page_read64(a) != back_word(a) {
                lost.get_or_insert(a);
            }
        })
    });
    fr.below(cut, |r| {
        each_page(r, |a| {
            if p.page_read64(a) != rest_word(a) {
                lost.get_or_insert(a);
            }
        })
    });
    if let Some(a) = other {
        out.push_str("deflated page ");
        out.push_hex(a);
        out.push_str(" holds neither zeros nor what the guest wrote before inflating");
        return false;
    }
    if let Some(a) = lost {
        out.push_str("page ");
        out.push_hex(a);
        out.push_str(" lost what the guest wrote (ballooned or not)");
        return false;
    }

    // The statistics round trip: the device hands the buffer back, the guest refills it.
    let mut trips = 0u64;
    if let (Some((i, q)), Some(head)) = (b.stats.as_mut(), stats_head) {
        let mut got = None;
        wait_until(p, STATS_WAIT_NS, || {
            got = q.pop_used(p);
            got.is_some()
        });
        match got {
            Some((id, _)) if id == u32::from(head) => {
                let len = write_stats(p, STATS_BUF, free_bytes, total);
                if q.add(p, &[Buf::r(STATS_BUF, len)]).is_some() {
                    b.t.notify(p, *i);
                    trips += 1;
                }
            }
            Some((id, _)) => {
                out.push_str("statistics queue: used id ");
                out.push_dec(u64::from(id));
                out.push_str(", posted ");
                out.push_dec(u64::from(head));
                return false;
            }
            None => {}
        }
    }

    // One free page report.
    let mut reported = None;
    if let Some((i, q)) = b.report.as_mut() {
        if let Some(run) = fr.low_run(cut, REPORT_PAGES) {
            // Device-writable, as Linux adds it (`virtqueue_add_inbuf`) and QEMU expects.
            let Some(head) = q.add(p, &[Buf::w(run.start, (run.end - run.start) as u32)]) else {
                out.push_str("reporting queue: no free descriptor");
                return false;
            };
            b.t.notify(p, *i);
            let mut got = None;
            wait_until(p, TIMEOUT_NS, || {
                got = q.pop_used(p);
                got.is_some()
            });
            match got {
                Some((id, _)) if id == u32::from(head) => {}
                Some((id, _)) => {
                    out.push_str("reporting queue: used id ");
                    out.push_dec(u64::from(id));
                    return false;
                }
                None => {
                    out.push_str("free page report not answered within 5 s");
                    return false;
                }
            }
            let mut zeroed = 0u64;
            each_page(run, |a| zeroed += u64::from(p.page_read64(a) == 0));
            reported = Some((run.pages(), zeroed));
        }
    }

    out.push_str("dev=");
    out.push_hex(b.dev.base);
    out.push_str(" features=version_1");
    for (f, name) in [
        (F_STATS_VQ, ",stats_vq"),
        (F_DEFLATE_ON_OOM, ",deflate_on_oom"),
        (F_REPORTING, ",reporting"),
    ] {
        if b.features & f != 0 {
            out.push_str(name);
        }
    }
    out.push_str(" free_pages=");
    out.push_dec(fr.pages());
    out.push_str(" target=");
    out.push_dec(target);
    out.push_str(" inflated=");
    out.push_dec(inflated);
    out.push_str(" rest_touched=");
    out.push_dec(rest);
    out.push_str(" deflated=");
    out.push_dec(deflated);
    out.push_str(" zero_after_deflate=");
    out.push_dec(zero);
    out.push_str("/");
    out.push_dec(deflated);
    if kept > 0 {
        out.push_str(" kept_by_host=");
        out.push_dec(kept);
    }
    out.push_str(" stats_round_trips=");
    if b.stats.is_some() {
        out.push_dec(trips);
    } else {
        out.push_str("n/a");
    }
    out.push_str(" reporting=");
    match (b.report.is_some(), reported) {
        (false, _) => out.push_str("n/a"),
        (true, None) => out.push_str("skipped(no free page below the balloon)"),
        (true, Some((pages, zeroed))) => {
            out.push_str("done(pages=");
            out.push_dec(pages);
            out.push_str(",zeroed=");
            out.push_dec(zeroed);
            out.push_str(")");
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kiln_virtio::balloon::BalloonConfig;

    use super::super::host::Host;
    use super::super::ring::tests::Ram;
    use super::*;

    fn cfg(target_pages: u32, stats: bool, reporting: bool) -> BalloonConfig {
        BalloonConfig {
            target_pages,
            deflate_on_oom: true,
            stats_interval: stats.then_some(Duration::from_millis(50)),
            free_page_reporting: reporting,
            ..BalloonConfig::default()
        }
    }

    #[test]
    fn the_balloon_scenario_against_kiln_virtio() {
        let h = Host::with_balloon(cfg(1024, true, true));
        let (ok, detail) = h.run("kiln.balloon.hold=1", run_balloon);
        let lines = h.lines.borrow().clone();
        assert!(ok, "{detail}\n{lines:?}");
        let free = (48 - 17) << 8; // pages in [17 MiB, 48 MiB)
        for want in [
            "features=version_1,stats_vq,deflate_on_oom,reporting".to_string(),
            format!("free_pages={free} target=1024 inflated=1024"),
            format!("rest_touched={} deflated=1024", free - 1024),
            "zero_after_deflate=1024/1024 stats_round_trips=1".into(),
            "reporting=done(pages=1024,zeroed=1024)".into(),
        ] {
            assert!(detail.contains(&want), "{want} missing: {detail}");
        }
        assert!(!detail.contains("kept_by_host"), "{detail}");
        let at = lines
            .iter()
            .position(|l| l == "KTEST-INFO balloon inflated pages=1024")
            .expect("inflated line");
        assert_eq!(lines.get(at + 1).map(String::as_str), Some("(wait_line)"));
        let b = h.balloon.as_ref().unwrap();
        let (returned, target, stats) =
            b.with_device(|d| (d.returned_pages(), d.target_pages(), d.stats()));
        assert_eq!(returned, (1024, 1024));
        assert_eq!(target, 1024);
        // The first buffer and the refill after the round trip.
        assert_eq!(stats.updates, 2);
        assert_eq!(stats.get("free_memory"), Some(free * 4096));
        assert_eq!(stats.get("total_memory"), Some(h.memmap.ram_total()));
        assert_eq!(stats.get("available_memory"), Some(free * 4096));
        assert_eq!(stats.get("swap_in"), Some(0));
        // What the guest left: the top page taken back, a page in the middle untouched by
        // the report, the reported run (the lowest 4 MiB above the region) dropped.
        let top = (48 << 20) - PAGE;
        assert_eq!(h.mem_u64(top), back_word(top));
        assert_eq!(h.mem_u64(30 << 20), rest_word(30 << 20));
        assert_eq!(h.mem_u64(layout::END), 0);
        assert_eq!(
            h.mem_u64(layout::END + (4 << 20)),
            rest_word(layout::END + (4 << 20))
        );
    }

    #[test]
    fn queue_numbering_follows_the_accepted_features() {
        for (stats, reporting) in [(false, false), (false, true), (true, false)] {
            let h = Host::with_balloon(cfg(300, stats, reporting));
            let (ok, detail) = h.run("", run_balloon);
            assert!(ok, "{stats} {reporting}: {detail}");
            assert!(detail.contains("inflated=300"), "{detail}");
            assert!(detail.contains("zero_after_deflate=300/300"), "{detail}");
            let trips = if stats {
                "stats_round_trips=1"
            } else {
                "stats_round_trips=n/a"
            };
            assert!(detail.contains(trips), "{detail}");
            let rep = if reporting {
                "reporting=done(pages=1024"
            } else {
                "reporting=n/a"
            };
            assert!(detail.contains(rep), "{detail}");
            // No hold without the token.
            assert!(!h.lines.borrow().iter().any(|l| l == "(wait_line)"));
            let b = h.balloon.as_ref().unwrap();
            let (returned, updates) = b.with_device(|d| (d.returned_pages(), d.stats().updates));
            assert_eq!(returned, (300, if reporting { 1024 } else { 0 }));
            assert_eq!(updates, if stats { 2 } else { 0 });
        }
    }

    #[test]
    fn an_empty_balloon_and_one_too_big() {
        let h = Host::with_balloon(cfg(0, true, false));
        let (ok, detail) = h.run("", run_balloon);
        assert!(ok, "{detail}");
        assert!(detail.contains("target=0 inflated=0"), "{detail}");
        assert!(detail.contains("zero_after_deflate=0/0"), "{detail}");
        let h = Host::with_balloon(cfg(31 << 8 | 1, false, false));
        let (ok, detail) = h.run("", run_balloon);
        assert!(
            !ok && detail.contains("target 7937 pages, but only 7936 free pages"),
            "{detail}"
        );
        let b = h.balloon.as_ref().unwrap();
        assert_eq!(b.with_device(|d| d.returned_pages()), (0, 0));
    }

    #[test]
    fn needs_a_balloon_and_a_good_token() {
        let h = Host::new(None, true);
        let (ok, detail) = h.run("", run_balloon);
        assert!(!ok && detail.contains("no virtio-balloon"), "{detail}");
        let h = Host::with_balloon(cfg(8, false, false));
        let (ok, detail) = h.run("kiln.balloon.hold=x", run_balloon);
        assert!(
            !ok && detail.contains("bad value for kiln.balloon.hold"),
            "{detail}"
        );
    }

    #[test]
    fn stats_entries_are_packed_tag_value_pairs() {
        let p = Ram::new(0x100);
        let len = write_stats(&p, 0x10, 0x1122_3344_5566_7788, 5 << 30);
        assert_eq!(len, 80);
        let m = p.0.borrow();
        let entry = |i: usize| {
            let b = &m[0x10 + 10 * i..0x10 + 10 * i + 10];
            (
                u16::from_le_bytes([b[0], b[1]]),
                u64::from_le_bytes(b[2..10].try_into().unwrap()),
            )
        };
        assert_eq!(entry(0), (0, 0));
        assert_eq!(entry(4), (4, 0x1122_3344_5566_7788));
        assert_eq!(entry(5), (5, 5 << 30));
        assert_eq!(entry(6), (6, 0x1122_3344_5566_7788));
        assert_eq!(entry(7), (7, 0));
        assert_eq!(m[0x10 + 80], 0, "nothing past the last entry");
    }
}
