//! The `virtio-evil` scenario: malformed chains, rings and register sequences against the
//! block and entropy devices. For each case the guest reports what the device did
//! (`KTEST-INFO virtio-evil <dev> <case> <outcome>`), then resets and re-initialises it and
//! checks one good request. The scenario fails if a device did something unsafe (status OK
//! for a request it could not have carried out, a write outside the given buffers or into
//! a device-readable one), if recovery fails, or if an outcome is not one the case allows.
//!
//! `kiln.evil.skip=a,b` leaves cases out (for VMMs that exit or stall on them);
//! `kiln.evil.allow=a,b` accepts any safe outcome for them (for VMMs that legitimately
//! differ, e.g. QEMU accepts a queue size of 3). A name alone means both devices;
//! `blk:name` or `rng:name` one of them.

use super::blk::{self, req, Blk, S_IOERR, S_OK, S_UNSUPP, S_UNTOUCHED};
use super::layout::{self, DATA, SCRATCH};
use super::ring::{write_desc, QueueMem, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use super::rng::{self, Rng};
use super::transport::{status, InitError, Transport, F_INDIRECT_DESC, F_VERSION_1, ID_RNG};
use super::{info_line, wait_until, Env, MmioDev, Platform, SECOND};
use crate::line::{Describe, LineBuf};

/// One hostile case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    /// A chain whose last `next` points back to its head.
    Loop,
    /// An indirect table whose chain points back into itself.
    IndirectLoop,
    /// A data buffer just past the end of RAM.
    OobRamEnd,
    /// A data buffer at 0xFFFF_FFFF_F000.
    OobTop,
    /// A data buffer in the 32-bit MMIO hole.
    OobMmio,
    /// A zero-length data descriptor.
    ZeroLen,
    /// A 0xFFFF_FFFF-byte data descriptor.
    HugeLen,
    /// The request header in a device-writable descriptor.
    HeaderWritable,
    /// A read whose data buffer is device-readable only.
    ReadIntoReadOnly,
    /// A chain without a status descriptor.
    NoStatus,
    /// `avail.idx` moved more than the queue size ahead.
    AvailOverrun,
    /// A head index beyond the queue size.
    HeadOutOfRange,
    /// `QueueNum` = 3 (not a power of two).
    QueueNum3,
    /// `QueueNotify` before `DRIVER_OK`.
    NotifyEarly,
    /// Features without VIRTIO_F_VERSION_1.
    NoVersion1,
}

/// Every case, in the order they run.
pub const CASES: [Case; 15] = [
    Case::Loop,
    Case::IndirectLoop,
    Case::OobRamEnd,
    Case::OobTop,
    Case::OobMmio,
    Case::ZeroLen,
    Case::HugeLen,
    Case::HeaderWritable,
    Case::ReadIntoReadOnly,
    Case::NoStatus,
    Case::AvailOverrun,
    Case::HeadOutOfRange,
    Case::QueueNum3,
    Case::NotifyEarly,
    Case::NoVersion1,
];

impl Case {
    /// The name in `KTEST-INFO` lines and `kiln.evil.skip` / `kiln.evil.allow`.
    pub const fn name(self) -> &'static str {
        match self {
            Case::Loop => "loop",
            Case::IndirectLoop => "indirect-loop",
            Case::OobRamEnd => "oob-ram-end",
            Case::OobTop => "oob-top",
            Case::OobMmio => "oob-mmio",
            Case::ZeroLen => "zero-len",
            Case::HugeLen => "huge-len",
            Case::HeaderWritable => "hdr-writable",
            Case::ReadIntoReadOnly => "read-into-ro",
            Case::NoStatus => "no-status",
            Case::AvailOverrun => "avail-overrun",
            Case::HeadOutOfRange => "head-oob",
            Case::QueueNum3 => "qnum3",
            Case::NotifyEarly => "notify-early",
            Case::NoVersion1 => "no-version1",
        }
    }

    /// Whether the case means anything for the entropy device (it has no header or status).
    pub const fn applies_to_rng(self) -> bool {
        !matches!(self, Case::HeaderWritable | Case::NoStatus)
    }
}

/// Which device a case runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// virtio-blk.
    Blk,
    /// virtio-rng.
    Rng,
}

/// What the device did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Completed with status OK (blk), used length given.
    Ok(u32),
    /// Completed with IOERR.
    IoErr,
    /// Completed with UNSUPP.
    Unsupp,
    /// Completed with used length 0 (nothing written).
    Len0,
    /// Completed with a nonzero length and the status byte untouched: whatever the device
    /// wrote went to the last writable byte it was given (blk).
    StatusElsewhere,
    /// Completed with a status byte that is no status (blk).
    BadStatus(u8),
    /// Completed with this many bytes of entropy (rng).
    Filled(u32),
    /// Completed, but with an id that was never posted.
    WrongId(u32),
    /// Set DEVICE_NEEDS_RESET.
    NeedsReset,
    /// Nothing within the time allowed.
    Ignored,
    /// Refused a register write (QueueReady or FEATURES_OK read back 0).
    Refused,
    /// Accepted a register write it should have refused.
    Accepted,
    /// Processed a request notified before DRIVER_OK.
    Processed,
}

impl Describe for Outcome {
    fn describe(&self, out: &mut LineBuf) {
        match *self {
            Outcome::Ok(len) => {
                out.push_str("ok(len=");
                out.push_dec(u64::from(len));
                out.push_str(")");
            }
            Outcome::IoErr => out.push_str("ioerr"),
            Outcome::Unsupp => out.push_str("unsupp"),
            Outcome::Len0 => out.push_str("len0"),
            Outcome::StatusElsewhere => out.push_str("status-in-last-buffer"),
            Outcome::BadStatus(s) => {
                out.push_str("bad-status(");
                out.push_hex(u64::from(s));
                out.push_str(")");
            }
            Outcome::Filled(n) => {
                out.push_str("filled(");
                out.push_dec(u64::from(n));
                out.push_str(")");
            }
            Outcome::WrongId(id) => {
                out.push_str("wrong-id(");
                out.push_dec(u64::from(id));
                out.push_str(")");
            }
            Outcome::NeedsReset => out.push_str("needs_reset"),
            Outcome::Ignored => out.push_str("ignored"),
            Outcome::Refused => out.push_str("refused"),
            Outcome::Accepted => out.push_str("accepted"),
            Outcome::Processed => out.push_str("processed"),
        }
    }
}

/// Whether `o` is what a correct device may do for `case` on a `kind` device.
pub fn acceptable(kind: Kind, case: Case, o: Outcome) -> bool {
    use Outcome::*;
    // A request the device could not carry out: it may fail it, drop it, or give up.
    let refused_request = matches!(o, IoErr | Len0 | NeedsReset | Ignored | StatusElsewhere);
    match (kind, case) {
        (_, Case::AvailOverrun) => o == NeedsReset,
        (_, Case::QueueNum3 | Case::NoVersion1) => o == Refused,
        (_, Case::NotifyEarly) => o == Ignored,
        // A read of nothing is a read: OK is fine too.
        (Kind::Blk, Case::ZeroLen) => refused_request || matches!(o, Ok(_)),
        // Reading into nothing writable: OK only if nothing but the status was written.
        (Kind::Blk, Case::ReadIntoReadOnly) => refused_request || matches!(o, Ok(l) if l <= 1),
        (Kind::Blk, _) => refused_request,
        // The entropy device may fill what a looping chain or a huge buffer offers (it
        // stays inside the buffers given); never a buffer outside RAM or device-readable.
        (Kind::Rng, Case::Loop | Case::IndirectLoop | Case::HugeLen) => {
            matches!(o, Filled(_) | Len0 | NeedsReset | Ignored)
        }
        (Kind::Rng, _) => matches!(o, Len0 | NeedsReset | Ignored),
    }
}

impl Kind {
    /// `blk` or `rng`.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Blk => "blk",
            Kind::Rng => "rng",
        }
    }
}

/// Whether the comma-separated list in `key` names `case` for `kind` (`case` or
/// `kind:case`).
pub fn listed(env: &Env<'_>, key: &str, kind: Kind, case: Case) -> bool {
    let case = case.name().as_bytes();
    let kind = kind.name().as_bytes();
    env.cmdline.get(key).is_some_and(|v| {
        v.split(|&b| b == b',')
            .any(|n| match n.iter().position(|&b| b == b':') {
                Some(i) => &n[..i] == kind && &n[i + 1..] == case,
                None => n == case,
            })
    })
}

/// Where a case's data buffer is; canaries sit right before and after it.
const BUF: u64 = DATA + 0x1000;
/// Length of the case buffer.
const BUF_LEN: u32 = 4096;
/// The huge-length buffer: 1 MiB of nothing else from here, so a device that fills what
/// it can of it harms nobody.
const HUGE_BUF: u64 = DATA + 0x10_0000;
/// An indirect table.
const TABLE: u64 = SCRATCH + 0x8000;
/// Where recovery reads go.
const RECOVERY_BUF: u64 = DATA + 0x4_0000;
/// What canaries hold.
const CANARY: u64 = 0xca4a_12ee_5afe_c0de;
/// The case buffer's contents when the device must not write it.
const RO_WORD: u64 = 0x5245_4144_4f4e_4c59;
/// Queue entries for the cases (small: a looping chain is walked at most this far).
const QUEUE_SIZE: u16 = 16;
/// How long a case may take to be answered.
const CASE_TIMEOUT_NS: u64 = SECOND;
/// How long a notification before DRIVER_OK is given to (wrongly) take effect.
const EARLY_WAIT_NS: u64 = SECOND / 5;
/// A page in the MMIO hole that neither kiln nor QEMU microvm maps.
const MMIO_HOLE_PAGE: u64 = 0xc000_1000;

/// Canary addresses: around the case buffer, after the header and status byte of slot 0.
fn canaries() -> [u64; 4] {
    [
        BUF - 8,
        BUF + u64::from(BUF_LEN),
        layout::header(1),
        layout::status(1),
    ]
}

/// One past the highest RAM byte of the memory map.
pub fn ram_end(env: &Env<'_>) -> u64 {
    env.memmap
        .as_slice()
        .iter()
        .filter(|e| e.kind == crate::memmap::E820_RAM)
        .map(|e| e.end())
        .max()
        .unwrap_or(0)
}

/// Something the device must never do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unsafe {
    /// A canary outside the given buffers changed (address, value).
    Canary(u64, u64),
    /// A device-readable buffer changed (address, value).
    ReadOnly(u64, u64),
}

impl Describe for Unsafe {
    fn describe(&self, out: &mut LineBuf) {
        let (what, a, v) = match *self {
            Unsafe::Canary(a, v) => ("wrote outside the given buffers: ", a, v),
            Unsafe::ReadOnly(a, v) => ("wrote a device-readable buffer: ", a, v),
        };
        out.push_str(what);
        out.push_hex(a);
        out.push_str(" = ");
        out.push_hex(v);
    }
}

/// Sets the canaries, the read-only contents of the case buffer and slot 0's header.
fn arm<P: Platform>(p: &P) {
    for a in canaries() {
        p.write64(a, CANARY);
    }
    for off in [0, u64::from(BUF_LEN) / 2, u64::from(BUF_LEN) - 8] {
        p.write64(BUF + off, RO_WORD);
    }
}

/// Checks the canaries, and the case buffer and header when the device may not write them.
fn inspect<P: Platform>(p: &P, kind: Kind, case: Case) -> Result<(), Unsafe> {
    for a in canaries() {
        let v = p.read64(a);
        if v != CANARY {
            return Err(Unsafe::Canary(a, v));
        }
    }
    if case == Case::ReadIntoReadOnly {
        for off in [0, u64::from(BUF_LEN) / 2, u64::from(BUF_LEN) - 8] {
            let v = p.read64(BUF + off);
            if v != RO_WORD {
                return Err(Unsafe::ReadOnly(BUF + off, v));
            }
        }
    }
    if kind == Kind::Blk && case != Case::HeaderWritable {
        let h = layout::header(0);
        for (a, want) in [(h, u64::from(req::IN)), (h + 8, 0)] {
            let v = p.read64(a);
            if v != want {
                return Err(Unsafe::ReadOnly(a, v));
            }
        }
    }
    Ok(())
}

/// The data buffer of the out-of-RAM cases.
fn oob_addr(case: Case, ram_end: u64) -> Option<u64> {
    match case {
        Case::OobRamEnd => Some((ram_end + 0xfff) & !0xfff),
        Case::OobTop => Some(0xffff_ffff_f000),
        Case::OobMmio => Some(MMIO_HOLE_PAGE),
        _ => None,
    }
}

/// Writes the chain for a request case, headed by descriptor 0, into the table of `q`.
fn build<P: Platform>(p: &P, kind: Kind, case: Case, q: &QueueMem, ram_end: u64) {
    let d = q.desc;
    let (hdr, st) = (layout::header(0), layout::status(0));
    let data_w = |p: &P, i: u16, addr: u64, len: u32, next: Option<u16>| {
        let f = DESC_F_WRITE | if next.is_some() { DESC_F_NEXT } else { 0 };
        write_desc(p, d, i, addr, len, f, next.unwrap_or(0));
    };
    if kind == Kind::Blk {
        Blk::header(p, 0, req::IN, 0);
    }
    let oob = oob_addr(case, ram_end);
    match (kind, case) {
        (Kind::Blk, Case::Loop) => {
            write_desc(p, d, 0, hdr, 16, DESC_F_NEXT, 1);
            data_w(p, 1, BUF, BUF_LEN, Some(2));
            data_w(p, 2, st, 1, Some(0));
        }
        (Kind::Blk, Case::IndirectLoop) => {
            // Four entries; the chain goes 0 -> 1 -> 2 -> 0, so walking it as far as the
            // table is long meets the header again after the status.
            write_desc(p, TABLE, 0, hdr, 16, DESC_F_NEXT, 1);
            write_desc(p, TABLE, 1, BUF, BUF_LEN, DESC_F_WRITE | DESC_F_NEXT, 2);
            write_desc(p, TABLE, 2, st, 1, DESC_F_WRITE | DESC_F_NEXT, 0);
            write_desc(p, TABLE, 3, st, 1, DESC_F_WRITE, 0);
            write_desc(p, d, 0, TABLE, 64, DESC_F_INDIRECT, 0);
        }
        (Kind::Blk, Case::HeaderWritable) => {
            data_w(p, 0, hdr, 16, Some(1));
            data_w(p, 1, BUF, BUF_LEN, Some(2));
            data_w(p, 2, st, 1, None);
        }
        (Kind::Blk, Case::ReadIntoReadOnly) => {
            write_desc(p, d, 0, hdr, 16, DESC_F_NEXT, 1);
            write_desc(p, d, 1, BUF, BUF_LEN, DESC_F_NEXT, 2);
            data_w(p, 2, st, 1, None);
        }
        (Kind::Blk, Case::NoStatus) => write_desc(p, d, 0, hdr, 16, 0, 0),
        (Kind::Blk, _) => {
            let (addr, len) = match case {
                Case::ZeroLen => (BUF, 0),
                Case::HugeLen => (HUGE_BUF, u32::MAX),
                _ => match oob {
                    Some(a) => (a, BUF_LEN),
                    // A good read (the ring and register cases need one).
                    None => (BUF, BUF_LEN),
                },
            };
            write_desc(p, d, 0, hdr, 16, DESC_F_NEXT, 1);
            data_w(p, 1, addr, len, Some(2));
            data_w(p, 2, st, 1, None);
        }
        (Kind::Rng, Case::Loop) => {
            data_w(p, 0, BUF, 256, Some(1));
            data_w(p, 1, BUF + 256, 256, Some(0));
        }
        (Kind::Rng, Case::IndirectLoop) => {
            write_desc(p, TABLE, 0, BUF, 256, DESC_F_WRITE | DESC_F_NEXT, 1);
            write_desc(p, TABLE, 1, BUF + 256, 256, DESC_F_WRITE | DESC_F_NEXT, 0);
            write_desc(p, TABLE, 2, BUF, 256, DESC_F_WRITE, 0);
            write_desc(p, TABLE, 3, BUF, 256, DESC_F_WRITE, 0);
            write_desc(p, d, 0, TABLE, 64, DESC_F_INDIRECT, 0);
        }
        (Kind::Rng, Case::ReadIntoReadOnly) => write_desc(p, d, 0, BUF, 256, 0, 0),
        (Kind::Rng, _) => {
            let (addr, len) = match case {
                Case::ZeroLen => (BUF, 0),
                Case::HugeLen => (HUGE_BUF, u32::MAX),
                _ => oob.map_or((BUF, 256), |a| (a, BUF_LEN)),
            };
            data_w(p, 0, addr, len, None);
        }
    }
}

/// Waits for the device to answer the chain headed by 0 (or to give up) and says how.
fn classify<P: Platform>(
    p: &P,
    t: &Transport,
    kind: Kind,
    q: &QueueMem,
    last_used: u16,
) -> Outcome {
    let used_moved = || p.read16(q.used_idx_addr()) != last_used;
    let needs_reset = || t.status(p) & status::DEVICE_NEEDS_RESET != 0;
    wait_until(p, CASE_TIMEOUT_NS, || used_moved() || needs_reset());
    if used_moved() {
        let e = q.used + 4 + 8 * u64::from(last_used & (q.size - 1));
        let (id, len) = (p.read32(e), p.read32(e + 4));
        if id != 0 {
            return Outcome::WrongId(id);
        }
        if len == 0 {
            return Outcome::Len0;
        }
        return match (kind, p.read8(layout::status(0))) {
            (Kind::Rng, _) => Outcome::Filled(len),
            (Kind::Blk, S_OK) => Outcome::Ok(len),
            (Kind::Blk, S_IOERR) => Outcome::IoErr,
            (Kind::Blk, S_UNSUPP) => Outcome::Unsupp,
            (Kind::Blk, S_UNTOUCHED) => Outcome::StatusElsewhere,
            (Kind::Blk, s) => Outcome::BadStatus(s),
        };
    }
    if needs_reset() {
        Outcome::NeedsReset
    } else {
        Outcome::Ignored
    }
}

/// Why a case could not even be set up.
enum Setup {
    Init(InitError),
    /// The device does not offer indirect descriptors.
    NoIndirect,
}

/// Runs one case against the device at `dev`; the device is left in whatever state the
/// case put it in.
fn run_case<P: Platform>(
    p: &P,
    kind: Kind,
    case: Case,
    dev: &MmioDev,
    ram_end: u64,
) -> Result<Outcome, Setup> {
    let t = Transport::new(dev.base);
    let wanted = match kind {
        Kind::Blk => blk::WANTED,
        Kind::Rng => rng::WANTED,
    };
    let area = match kind {
        Kind::Blk => layout::BLK_QA,
        Kind::Rng => layout::RNG_QA,
    };
    match case {
        Case::NoVersion1 => {
            let offered = t.device_features(p);
            let stuck = t
                .offer_features(p, offered & wanted & !F_VERSION_1)
                .map_err(Setup::Init)?;
            return Ok(if stuck {
                Outcome::Accepted
            } else {
                Outcome::Refused
            });
        }
        Case::QueueNum3 => {
            t.negotiate(p, wanted).map_err(Setup::Init)?;
            let qm = QueueMem::at(area, 4);
            return Ok(if t.try_setup_queue(p, 0, &qm, 3) {
                Outcome::Accepted
            } else {
                Outcome::Refused
            });
        }
        _ => {}
    }
    let features = t.negotiate(p, wanted).map_err(Setup::Init)?;
    if case == Case::IndirectLoop && features & F_INDIRECT_DESC == 0 {
        return Err(Setup::NoIndirect);
    }
    let mut q = t.setup_queue(p, 0, area, QUEUE_SIZE).map_err(Setup::Init)?;
    let qm = q.mem;
    if case == Case::NotifyEarly {
        build(p, kind, case, &qm, ram_end);
        q.push_head(p, 0);
        q.publish(p);
        t.notify(p, 0);
        wait_until(p, EARLY_WAIT_NS, || false);
        return Ok(if q.used_idx(p) == 0 {
            Outcome::Ignored
        } else {
            Outcome::Processed
        });
    }
    t.driver_ok(p).map_err(Setup::Init)?;
    build(p, kind, case, &qm, ram_end);
    match case {
        Case::AvailOverrun => {
            q.push_head(p, 0);
            q.set_avail_idx_raw(p, qm.size + 2);
        }
        Case::HeadOutOfRange => {
            q.push_head(p, qm.size + 3);
            q.publish(p);
        }
        _ => {
            q.push_head(p, 0);
            q.publish(p);
        }
    }
    t.notify(p, 0);
    Ok(classify(p, &t, kind, &qm, 0))
}

/// Resets and re-initialises the device on the other queue area and checks one good
/// request (blk: sectors 0..8 against the image pattern, by interrupt when `by_irq`).
fn recover<P: Platform>(p: &P, kind: Kind, dev: &MmioDev, by_irq: bool, out: &mut LineBuf) -> bool {
    match kind {
        Kind::Blk => {
            let mut b = match Blk::open(p, *dev, layout::BLK_QB) {
                Ok(b) => b,
                Err(e) => {
                    out.push_str("re-init: ");
                    e.describe(out);
                    return false;
                }
            };
            if by_irq {
                if !p.irq_enable(dev) {
                    out.push_str("cannot route GSI ");
                    out.push_dec(u64::from(dev.gsi));
                    return false;
                }
                let ok = blk::read_by_interrupt(
                    p,
                    &mut b,
                    out,
                    "recovery read (irq)",
                    (0, 8, RECOVERY_BUF),
                );
                p.irq_disable(dev);
                ok
            } else {
                blk::read_check(
                    p,
                    &mut b,
                    out,
                    "recovery read",
                    (0, 8, RECOVERY_BUF, 4096),
                    blk::fresh_word,
                )
            }
        }
        Kind::Rng => {
            let mut r = match Rng::open(p, *dev, layout::RNG_QB) {
                Ok(r) => r,
                Err(e) => {
                    out.push_str("re-init: ");
                    e.describe(out);
                    return false;
                }
            };
            let buf = RECOVERY_BUF;
            rng::clear(p, buf, 8);
            match r.fill(p, buf, 64) {
                Some(n) if n > 0 && n <= 64 && rng::varied(p, buf, n) => true,
                got => {
                    out.push_str("recovery request: ");
                    match got {
                        Some(n) => {
                            out.push_str("used len ");
                            out.push_dec(u64::from(n));
                            out.push_str(" or constant bytes");
                        }
                        None => out.push_str("no answer"),
                    }
                    false
                }
            }
        }
    }
}

/// Outcome counts for the PASS line.
#[derive(Default)]
struct Tally {
    cases: u32,
    skipped: u32,
    allowed: u32,
}

/// Runs every applicable case on one device; false (reason in `out`) on the first failure.
fn run_device<P: Platform>(
    p: &P,
    env: &Env<'_>,
    kind: Kind,
    dev: &MmioDev,
    tally: &mut Tally,
    out: &mut LineBuf,
) -> bool {
    let dev_name = kind.name();
    let ram_end = ram_end(env);
    let mut first = true;
    for case in CASES {
        if kind == Kind::Rng && !case.applies_to_rng() {
            continue;
        }
        let mut l = info_line("virtio-evil");
        l.push_str(dev_name);
        l.push_str(" ");
        l.push_str(case.name());
        l.push_str(" ");
        if listed(env, "kiln.evil.skip", kind, case) {
            l.push_str("skipped");
            p.info(l.as_bytes());
            tally.skipped += 1;
            continue;
        }
        arm(p);
        let outcome = match run_case(p, kind, case, dev, ram_end) {
            Ok(o) => o,
            Err(Setup::NoIndirect) => {
                l.push_str("skipped(no VIRTIO_F_INDIRECT_DESC)");
                p.info(l.as_bytes());
                tally.skipped += 1;
                continue;
            }
            Err(Setup::Init(e)) => {
                out.push_str(dev_name);
                out.push_str(" ");
                out.push_str(case.name());
                out.push_str(": setting up: ");
                e.describe(out);
                return false;
            }
        };
        outcome.describe(&mut l);
        if let Some(a) = oob_addr(case, ram_end) {
            l.push_str(" addr=");
            l.push_hex(a);
        }
        let fine = acceptable(kind, case, outcome);
        let allowed = !fine && listed(env, "kiln.evil.allow", kind, case);
        let unsafe_act = inspect(p, kind, case);
        match (&unsafe_act, fine, allowed) {
            (Err(_), _, _) => l.push_str(" UNSAFE"),
            (Ok(()), false, true) => l.push_str(" (allowed by kiln.evil.allow)"),
            (Ok(()), false, false) => l.push_str(" UNEXPECTED"),
            _ => {}
        }
        p.info(l.as_bytes());
        let fail_head = |out: &mut LineBuf| {
            out.push_str(dev_name);
            out.push_str(" ");
            out.push_str(case.name());
            out.push_str(": ");
        };
        if let Err(u) = unsafe_act {
            fail_head(out);
            u.describe(out);
            return false;
        }
        if !fine && !allowed {
            fail_head(out);
            out.push_str("device answered ");
            outcome.describe(out);
            return false;
        }
        tally.cases += 1;
        tally.allowed += u32::from(allowed);
        let mut why = LineBuf::new();
        if !recover(p, kind, dev, kind == Kind::Blk && first, &mut why) {
            fail_head(out);
            out.push_str("no recovery after ");
            outcome.describe(out);
            out.push_str(": ");
            out.push_bytes(why.as_bytes());
            return false;
        }
        first = false;
    }
    true
}

/// The `virtio-evil` scenario.
pub fn run_evil<P: Platform>(p: &P, env: &Env<'_>, out: &mut LineBuf) -> bool {
    if !env.region_ok(layout::START, layout::FUNCTIONAL_END, out) {
        return false;
    }
    let Some(blk_dev) = blk::find_writable(p, env) else {
        env.none_found(p, "writable virtio-blk of 32768 sectors or more", out);
        return false;
    };
    let mut tally = Tally::default();
    let ok = run_device(p, env, Kind::Blk, &blk_dev, &mut tally, out);
    let _ = Transport::new(blk_dev.base).reset(p);
    if !ok {
        return false;
    }
    let blk_cases = tally.cases;
    let rng_dev = env.find(p, ID_RNG, |_, _| true);
    if let Some(d) = rng_dev {
        let ok = run_device(p, env, Kind::Rng, &d, &mut tally, out);
        let _ = Transport::new(d.base).reset(p);
        if !ok {
            return false;
        }
    }
    out.push_str("blk_cases=");
    out.push_dec(u64::from(blk_cases));
    out.push_str(" rng_cases=");
    match rng_dev {
        Some(_) => out.push_dec(u64::from(tally.cases - blk_cases)),
        None => out.push_str("0(no rng)"),
    }
    out.push_str(" skipped=");
    out.push_dec(u64::from(tally.skipped));
    out.push_str(" allowed=");
    out.push_dec(u64::from(tally.allowed));
    out.push_str(" recovered after each");
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        for (i, a) in CASES.iter().enumerate() {
            for b in &CASES[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }

    #[test]
    fn acceptance() {
        use Outcome::*;
        assert!(acceptable(Kind::Blk, Case::Loop, IoErr));
        assert!(acceptable(Kind::Blk, Case::OobTop, NeedsReset));
        assert!(
            !acceptable(Kind::Blk, Case::OobTop, Ok(4097)),
            "OK for a buffer outside RAM"
        );
        assert!(!acceptable(Kind::Blk, Case::HeaderWritable, Ok(1)));
        assert!(acceptable(Kind::Blk, Case::ZeroLen, Ok(1)));
        assert!(acceptable(Kind::Blk, Case::ReadIntoReadOnly, Ok(1)));
        assert!(!acceptable(Kind::Blk, Case::ReadIntoReadOnly, Ok(4097)));
        assert!(!acceptable(Kind::Blk, Case::AvailOverrun, Ignored));
        assert!(acceptable(Kind::Rng, Case::AvailOverrun, NeedsReset));
        assert!(!acceptable(Kind::Blk, Case::QueueNum3, Accepted));
        assert!(!acceptable(Kind::Blk, Case::NotifyEarly, Processed));
        assert!(acceptable(Kind::Rng, Case::Loop, Filled(16384)));
        assert!(!acceptable(Kind::Rng, Case::OobMmio, Filled(4096)));
        assert!(!acceptable(Kind::Rng, Case::ReadIntoReadOnly, Filled(256)));
        assert!(!acceptable(Kind::Blk, Case::Loop, WrongId(3)));
        assert!(!acceptable(Kind::Blk, Case::Loop, BadStatus(7)));
    }
}
