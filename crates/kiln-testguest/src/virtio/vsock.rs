//! virtio-vsock (device ID 19): a minimal stream-socket driver (polled, no interrupts) and
//! the `vsock`, `vsock-evil` and `vsock-bench` scenarios. The host side of each scenario is
//! described in docs/guest-contract.md ("virtio-vsock").
//!
//! Ring-0 guest code may be emulated instruction by instruction (README, "Why no SSE"), so
//! the driver touches data a u64 at a time and never copies it: received data is checked
//! (or counted) straight from the RX buffer, which goes back to the device at once.

use super::layout;
use super::ring::{Buf, SplitQueue};
use super::transport::{InitError, Transport, F_INDIRECT_DESC};
use super::{info_line, Env, MmioDev, Platform, SECOND};
use crate::line::{Describe, LineBuf};

/// Virtio device ID of a socket device.
pub const ID_VSOCK: u32 = 19;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Header bytes.
pub const HDR: u32 = 44;
/// `VIRTIO_VSOCK_TYPE_STREAM`.
pub const TYPE_STREAM: u16 = 1;
/// Operations.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection refused or torn down.
pub const OP_RST: u16 = 3;
/// Half- or full close.
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// Credit news.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Please send credit news.
pub const OP_CREDIT_REQUEST: u16 = 7;
/// SHUTDOWN: no more receiving.
pub const SHUT_RCV: u32 = 1;
/// SHUTDOWN: no more sending.
pub const SHUT_SEND: u32 = 2;

/// Queue sizes asked for.
pub const RX_QS: u16 = 16;
/// TX queue size (and TX slots: one per in-flight packet).
pub const TX_QS: u16 = 16;
const EV_QS: u16 = 4;
const Q_RX: u64 = layout::QUEUES;
const Q_TX: u64 = layout::QUEUES + layout::QUEUE_AREA;
const Q_EV: u64 = layout::QUEUES + 2 * layout::QUEUE_AREA;
/// TX headers, 64 bytes apart, one per TX slot.
const TX_HDRS: u64 = layout::SMALL;
const EV_BUFS: u64 = layout::SMALL + 0x1000;
/// RX buffers (header and payload in one buffer, like Linux), [`RX_STRIDE`] apart; each
/// starts 4 bytes into its slot so that the payload after the 44-byte header is 8-aligned.
const RX_BUFS: u64 = layout::DATA;
/// Bytes of each RX buffer: a header and 32 KiB (the per-packet cost is mostly the guest's:
/// fewer, larger packets go faster).
pub const RX_BUF_LEN: u32 = HDR + 0x8000;
const RX_STRIDE: u64 = 0x8100;
/// TX payloads, one [`MAX_PAYLOAD`] slot each.
const TX_DATA: u64 = layout::DATA + 0x9_0000;
/// Largest payload the driver sends.
pub const MAX_PAYLOAD: u32 = 0x1_0000;
/// Each connection's receive buffer as advertised (`buf_alloc`): data is consumed as it
/// arrives, so this only paces the host.
pub const GUEST_BUF: u32 = 0x4_0000;
/// Connections at once.
pub const MAX_CONNS: usize = 8;
/// The end of what the driver uses.
pub const END: u64 = TX_DATA + TX_QS as u64 * MAX_PAYLOAD as u64;
const _: () = assert!(
    RX_BUFS + RX_QS as u64 * RX_STRIDE <= TX_DATA
        && RX_STRIDE >= 4 + RX_BUF_LEN as u64 + 8
        && END <= layout::FUNCTIONAL_END
        && TX_HDRS + 64 * TX_QS as u64 <= EV_BUFS
        && EV_BUFS + 64 < layout::SCRATCH
);

/// Word `k` (bytes `8k..8k+8`, little-endian) of the test stream with `seed`
/// (docs/guest-contract.md).
pub fn word(seed: u8, k: u64) -> u64 {
    (k ^ (u64::from(seed) * 0x0101_0101_0101_0101)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// The stream checksum's start value.
pub const SUM_INIT: u64 = 0xcbf2_9ce4_8422_2325;

/// Adds word `w` to the stream checksum `h`.
pub fn sum_word(h: u64, w: u64) -> u64 {
    (h ^ w).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29)
}

/// Seed of the guest-to-host stream.
pub const SEED_G2H: u8 = 0x47;
/// Seed of the host-to-guest stream.
pub const SEED_H2G: u8 = 0x48;

/// A packet header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hdr {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Flags.
    pub flags: u32,
    /// Sender's buffer.
    pub buf_alloc: u32,
    /// Sender's forwarded count.
    pub fwd_cnt: u32,
}

impl Hdr {
    fn read<P: Platform>(p: &P, a: u64) -> Hdr {
        Hdr {
            src_cid: p.read64(a),
            dst_cid: p.read64(a + 8),
            src_port: p.read32(a + 16),
            dst_port: p.read32(a + 20),
            len: p.read32(a + 24),
            type_: p.read16(a + 28),
            op: p.read16(a + 30),
            flags: p.read32(a + 32),
            buf_alloc: p.read32(a + 36),
            fwd_cnt: p.read32(a + 40),
        }
    }

    fn write<P: Platform>(&self, p: &P, a: u64) {
        p.write64(a, self.src_cid);
        p.write64(a + 8, self.dst_cid);
        p.write32(a + 16, self.src_port);
        p.write32(a + 20, self.dst_port);
        p.write32(a + 24, self.len);
        p.write16(a + 28, self.type_);
        p.write16(a + 30, self.op);
        p.write32(a + 32, self.flags);
        p.write32(a + 36, self.buf_alloc);
        p.write32(a + 40, self.fwd_cnt);
    }
}

/// Where a connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Slot unused.
    Free,
    /// REQUEST sent.
    Connecting,
    /// Data flows.
    Connected,
    /// RST received.
    Reset,
}

/// One connection.
#[derive(Clone, Copy, Debug)]
pub struct Conn {
    /// Where it stands.
    pub state: State,
    /// Our port.
    pub local: u32,
    /// The host's port.
    pub peer: u32,
    /// Host-initiated and not yet returned by [`Vsock::accept`].
    pub unaccepted: bool,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    /// Bytes received (all consumed at once: our fwd_cnt, wrapping).
    rx_cnt: u32,
    fwd_told: u32,
    owe_response: bool,
    owe_credit: bool,
    /// SHUTDOWN flags the host sent.
    pub peer_shut: u32,
    /// Count received data without looking at it (benchmarks).
    pub discard: bool,
    /// The device sent more than our credit allowed.
    pub overrun: bool,
    /// What the received stream is checked against.
    pub seed: u8,
    /// Bytes received in all.
    pub received: u64,
    /// Checksum of the whole words received.
    pub sum: u64,
    /// Whole words received.
    pub words: u64,
    /// The first word that differed from the stream, if any.
    pub bad_word: Option<u64>,
    carry: u64,
    carry_len: u32,
}

impl Conn {
    fn take_word(&mut self, w: u64) {
        if self.bad_word.is_none() && w != word(self.seed, self.words) {
            self.bad_word = Some(self.words);
        }
        self.sum = sum_word(self.sum, w);
        self.words += 1;
    }

    fn take_byte(&mut self, b: u8) {
        self.carry |= u64::from(b) << (8 * self.carry_len);
        self.carry_len += 1;
        if self.carry_len == 8 {
            let w = self.carry;
            self.carry = 0;
            self.carry_len = 0;
            self.take_word(w);
        }
    }

    /// Checks `n` received bytes at `d` (8-aligned) against the stream, a word at a time.
    fn take<P: Platform>(&mut self, p: &P, d: u64, n: u32) {
        let n = u64::from(n);
        let mut i = 0u64;
        while self.carry_len != 0 && i < n {
            self.take_byte(p.read8(d + i));
            i += 1;
        }
        let words = (n - i) / 8;
        if i == 0 {
            for j in 0..words {
                self.take_word(p.read64(d + 8 * j));
            }
        } else if words > 0 {
            // The words straddle aligned ones: shift pairs together.
            let sh = 8 * i as u32;
            let mut lo = p.read64(d);
            for j in 0..words {
                let hi = p.read64(d + 8 * (j + 1));
                self.take_word((lo >> sh) | (hi << (64 - sh)));
                lo = hi;
            }
        }
        i += 8 * words;
        while i < n {
            self.take_byte(p.read8(d + i));
            i += 1;
        }
    }
}

const FREE_CONN: Conn = Conn {
    state: State::Free,
    local: 0,
    peer: 0,
    unaccepted: false,
    peer_buf_alloc: 0,
    peer_fwd_cnt: 0,
    tx_cnt: 0,
    rx_cnt: 0,
    fwd_told: 0,
    owe_response: false,
    owe_credit: false,
    peer_shut: 0,
    discard: false,
    overrun: false,
    seed: 0,
    received: 0,
    sum: SUM_INIT,
    words: 0,
    bad_word: None,
    carry: 0,
    carry_len: 0,
};

/// Counters of odd things the device sent.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Packets for no connection, or with wrong CIDs, or shorter than their header says.
    pub stray: u32,
    /// RSTs received (for any connection or none).
    pub rsts: u32,
}

/// The driver.
pub struct Vsock {
    /// Where the device is.
    pub dev: MmioDev,
    /// Its registers.
    pub t: Transport,
    rx: SplitQueue,
    tx: SplitQueue,
    /// The event queue (one buffer posted; kiln never uses it).
    ev: SplitQueue,
    /// Our CID (from the configuration space).
    pub cid: u64,
    rx_slot_of: [u8; 256],
    tx_slot_of: [u8; 256],
    tx_free: u32,
    /// The connections.
    pub conns: [Conn; MAX_CONNS],
    listen: Option<(u32, u8)>,
    next_port: u32,
    /// Oddities.
    pub stats: Stats,
}

/// Why an operation failed.
pub type VErr = &'static str;

impl Vsock {
    /// Resets and initialises the device: three queues, RX buffers posted, DRIVER_OK.
    pub fn open<P: Platform>(p: &P, dev: MmioDev) -> Result<Vsock, InitError> {
        let t = Transport::new(dev.base);
        t.negotiate(p, F_INDIRECT_DESC)?;
        let rx = t.setup_queue(p, 0, Q_RX, RX_QS)?;
        let tx = t.setup_queue(p, 1, Q_TX, TX_QS)?;
        let ev = t.setup_queue(p, 2, Q_EV, EV_QS)?;
        let mut v = Vsock {
            dev,
            t,
            rx,
            tx,
            ev,
            cid: 0,
            rx_slot_of: [0; 256],
            tx_slot_of: [0; 256],
            tx_free: 0,
            conns: [FREE_CONN; MAX_CONNS],
            listen: None,
            next_port: 1024,
            stats: Stats::default(),
        };
        v.tx_free = (1u32 << v.tx.size().min(32)) - 1;
        let mut slot = 0u16;
        while v.rx.num_free() > 0 && slot < RX_QS {
            let a = rx_buf(slot);
            let Some(h) = v.rx.add(p, &[Buf::w(a, RX_BUF_LEN)]) else {
                break;
            };
            v.rx_slot_of[usize::from(h)] = slot as u8;
            slot += 1;
        }
        let _ = v.ev.add(p, &[Buf::w(EV_BUFS, 8)]);
        // The driver polls: used-buffer interrupts would only cost the device a write.
        v.rx.set_no_interrupt(p, true);
        v.tx.set_no_interrupt(p, true);
        v.t.driver_ok(p)?;
        v.cid = v.t.config64(p, 0);
        v.t.notify(p, 0);
        Ok(v)
    }

    fn hdr(&self, c: &Conn, op: u16) -> Hdr {
        // fwd_cnt: everything received was consumed on arrival.
        Hdr {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: c.local,
            dst_port: c.peer,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: GUEST_BUF,
            fwd_cnt: c.rx_cnt,
        }
    }

    fn reclaim_tx<P: Platform>(&mut self, p: &P) {
        while let Some((id, _)) = self.tx.pop_used(p) {
            if let Some(&s) = self.tx_slot_of.get(id as usize) {
                self.tx_free |= 1 << s;
            }
        }
    }

    /// A free TX slot, waiting (and taking RX meanwhile) up to 5 s.
    fn slot<P: Platform>(&mut self, p: &P) -> Option<u32> {
        let start = p.now_ns();
        loop {
            self.reclaim_tx(p);
            // A slot and the two descriptors a packet may take.
            if self.tx_free != 0 && self.tx.num_free() >= 2 {
                let s = self.tx_free.trailing_zeros();
                self.tx_free &= !(1 << s);
                return Some(s);
            }
            if p.now_ns().wrapping_sub(start) > 5 * SECOND {
                return None;
            }
            self.take_rx(p);
            core::hint::spin_loop();
        }
    }

    /// The payload buffer of TX slot `s`.
    pub fn slot_data(s: u32) -> u64 {
        TX_DATA + u64::from(s) * u64::from(MAX_PAYLOAD)
    }

    /// Sends `h` from slot `s` with `h.len` payload bytes already at [`Vsock::slot_data`];
    /// `hdr_len` lets hostile tests send a short header.
    pub fn send_raw<P: Platform>(&mut self, p: &P, s: u32, h: &Hdr, hdr_len: u32, data_len: u32) {
        let ha = TX_HDRS + 64 * u64::from(s);
        h.write(p, ha);
        let head = if data_len == 0 {
            self.tx.add(p, &[Buf::r(ha, hdr_len)])
        } else {
            self.tx.add(
                p,
                &[Buf::r(ha, hdr_len), Buf::r(Self::slot_data(s), data_len)],
            )
        };
        match head {
            Some(head) => self.tx_slot_of[usize::from(head)] = s as u8,
            None => self.tx_free |= 1 << s,
        }
        self.t.notify(p, 1);
    }

    /// Sends a payload-less packet `op` on connection `ci`.
    fn send_ctl<P: Platform>(&mut self, p: &P, ci: usize, op: u16, flags: u32) -> Result<(), VErr> {
        let s = self.slot(p).ok_or("no TX slot within 5 s")?;
        let c = self.conns[ci];
        let mut h = self.hdr(&c, op);
        h.flags = flags;
        self.conns[ci].fwd_told = c.rx_cnt;
        self.send_raw(p, s, &h, HDR, 0);
        Ok(())
    }

    /// Takes every used RX buffer, handles its packet, posts it again; then sends the
    /// control packets owed.
    pub fn take_rx<P: Platform>(&mut self, p: &P) {
        let mut any = false;
        while let Some((id, len)) = self.rx.pop_used(p) {
            let slot = self.rx_slot_of.get(id as usize).copied().unwrap_or(0);
            let a = rx_buf(u16::from(slot));
            if (HDR..=RX_BUF_LEN).contains(&len) {
                self.handle(p, a, len);
            } else {
                self.stats.stray += 1;
            }
            if let Some(h) = self.rx.add(p, &[Buf::w(a, RX_BUF_LEN)]) {
                self.rx_slot_of[usize::from(h)] = slot;
            }
            any = true;
        }
        if any {
            self.t.notify(p, 0);
        }
        for ci in 0..MAX_CONNS {
            let c = self.conns[ci];
            if c.owe_response {
                self.conns[ci].owe_response = false;
                let _ = self.send_ctl(p, ci, OP_RESPONSE, 0);
            } else if c.owe_credit && c.state == State::Connected {
                self.conns[ci].owe_credit = false;
                let _ = self.send_ctl(p, ci, OP_CREDIT_UPDATE, 0);
            }
        }
    }

    fn find(&self, local: u32, peer: u32) -> Option<usize> {
        self.conns
            .iter()
            .position(|c| c.state != State::Free && c.local == local && c.peer == peer)
    }

    fn handle<P: Platform>(&mut self, p: &P, a: u64, len: u32) {
        let h = Hdr::read(p, a);
        if h.src_cid != HOST_CID || h.dst_cid != self.cid || h.len > len - HDR {
            self.stats.stray += 1;
            return;
        }
        if h.op == OP_RST {
            self.stats.rsts += 1;
        }
        let Some(ci) = self.find(h.dst_port, h.src_port) else {
            let listening = self.listen.filter(|l| l.0 == h.dst_port);
            if let (OP_REQUEST, Some((_, seed))) = (h.op, listening) {
                if let Some(ci) = self.conns.iter().position(|c| c.state == State::Free) {
                    self.conns[ci] = Conn {
                        state: State::Connected,
                        local: h.dst_port,
                        peer: h.src_port,
                        unaccepted: true,
                        peer_buf_alloc: h.buf_alloc,
                        peer_fwd_cnt: h.fwd_cnt,
                        owe_response: true,
                        // Data may come before `accept` returns the connection.
                        seed,
                        ..FREE_CONN
                    };
                    return;
                }
            }
            if h.op != OP_RST {
                self.stats.stray += 1;
            }
            return;
        };
        let c = &mut self.conns[ci];
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RESPONSE if c.state == State::Connecting => c.state = State::Connected,
            OP_RST => c.state = State::Reset,
            OP_SHUTDOWN => c.peer_shut |= h.flags & (SHUT_RCV | SHUT_SEND),
            OP_RW if c.state == State::Connected => {
                // The host may only send what we told it we have room for.
                if h.len > GUEST_BUF - c.rx_cnt.wrapping_sub(c.fwd_told).min(GUEST_BUF) {
                    c.overrun = true;
                }
                if !c.discard {
                    c.take(p, a + u64::from(HDR), h.len);
                }
                c.received += u64::from(h.len);
                c.rx_cnt = c.rx_cnt.wrapping_add(h.len);
                if c.rx_cnt.wrapping_sub(c.fwd_told) >= GUEST_BUF / 4 {
                    c.owe_credit = true;
                }
            }
            OP_CREDIT_REQUEST => c.owe_credit = true,
            _ => {}
        }
    }

    /// Connects to host `port`; waits up to 10 s for the answer.
    pub fn connect<P: Platform>(&mut self, p: &P, port: u32) -> Result<usize, VErr> {
        let ci = self
            .conns
            .iter()
            .position(|c| c.state == State::Free)
            .ok_or("no free connection slot")?;
        self.next_port = self.next_port.wrapping_add(1).max(1024);
        self.conns[ci] = Conn {
            state: State::Connecting,
            local: self.next_port,
            peer: port,
            ..FREE_CONN
        };
        self.send_ctl(p, ci, OP_REQUEST, 0)?;
        let start = p.now_ns();
        while self.conns[ci].state == State::Connecting {
            if p.now_ns().wrapping_sub(start) > 10 * SECOND {
                self.conns[ci] = FREE_CONN;
                return Err("no RESPONSE or RST within 10 s");
            }
            self.take_rx(p);
        }
        if self.conns[ci].state == State::Reset {
            self.conns[ci] = FREE_CONN;
            return Err("refused (RST)");
        }
        Ok(ci)
    }

    /// Accepts host connections to `port` from now on, checking what they send against the
    /// stream with `seed`.
    pub fn listen(&mut self, port: u32, seed: u8) {
        self.listen = Some((port, seed));
    }

    /// Waits up to `timeout_ns` for a host-initiated connection.
    pub fn accept<P: Platform>(&mut self, p: &P, timeout_ns: u64) -> Option<usize> {
        let start = p.now_ns();
        loop {
            self.take_rx(p);
            if let Some(ci) = self.conns.iter().position(|c| c.unaccepted) {
                self.conns[ci].unaccepted = false;
                return Some(ci);
            }
            if p.now_ns().wrapping_sub(start) > timeout_ns {
                return None;
            }
        }
    }

    /// Sends `len` bytes in packets of up to [`MAX_PAYLOAD`], each filled by
    /// `fill(slot address, offset, n)`, within the host's credit (waiting for it up to
    /// 10 s at a time).
    pub fn write<P: Platform>(
        &mut self,
        p: &P,
        ci: usize,
        len: u64,
        mut fill: impl FnMut(u64, u64, u32),
    ) -> Result<(), VErr> {
        let mut off = 0u64;
        while off < len {
            let start = p.now_ns();
            let credit = loop {
                let c = &self.conns[ci];
                if c.state != State::Connected {
                    return Err("connection reset while sending");
                }
                if c.peer_shut & SHUT_RCV != 0 {
                    return Err("the host stopped receiving");
                }
                let cr = c
                    .peer_buf_alloc
                    .saturating_sub(c.tx_cnt.wrapping_sub(c.peer_fwd_cnt));
                if cr > 0 {
                    break cr;
                }
                if p.now_ns().wrapping_sub(start) > 10 * SECOND {
                    return Err("no credit from the host within 10 s");
                }
                self.take_rx(p);
            };
            // Whole words only, so the stream stays aligned in our buffers.
            let n = ((len - off).min(u64::from(credit.min(MAX_PAYLOAD))) as u32) & !7;
            if n == 0 {
                self.take_rx(p);
                continue;
            }
            let s = self.slot(p).ok_or("no TX slot within 5 s")?;
            fill(Self::slot_data(s), off, n);
            let c = self.conns[ci];
            let mut h = self.hdr(&c, OP_RW);
            h.len = n;
            self.conns[ci].tx_cnt = c.tx_cnt.wrapping_add(n);
            self.conns[ci].fwd_told = c.rx_cnt;
            self.send_raw(p, s, &h, HDR, n);
            off += u64::from(n);
        }
        Ok(())
    }

    /// Sends SHUTDOWN with `flags`.
    pub fn shutdown<P: Platform>(&mut self, p: &P, ci: usize, flags: u32) -> Result<(), VErr> {
        self.send_ctl(p, ci, OP_SHUTDOWN, flags)
    }

    /// Shuts both directions and waits up to 5 s for the device's RST; frees the slot.
    pub fn close<P: Platform>(&mut self, p: &P, ci: usize) -> Result<(), VErr> {
        if self.conns[ci].state == State::Connected {
            self.shutdown(p, ci, SHUT_RCV | SHUT_SEND)?;
            let start = p.now_ns();
            while self.conns[ci].state == State::Connected {
                if p.now_ns().wrapping_sub(start) > 5 * SECOND {
                    self.conns[ci] = FREE_CONN;
                    return Err("no RST within 5 s of SHUTDOWN(both)");
                }
                self.take_rx(p);
            }
        }
        self.conns[ci] = FREE_CONN;
        Ok(())
    }

    /// Takes data until the host shuts its sending side (or resets), waiting up to
    /// `timeout_ns` for each piece. Returns the bytes received on the connection in all.
    pub fn read_to_end<P: Platform>(
        &mut self,
        p: &P,
        ci: usize,
        timeout_ns: u64,
    ) -> Result<u64, VErr> {
        let mut last = p.now_ns();
        loop {
            let before = self.conns[ci].received;
            self.take_rx(p);
            let c = &self.conns[ci];
            if c.overrun {
                return Err("the device sent beyond our credit");
            }
            if c.received != before {
                last = p.now_ns();
                continue;
            }
            if c.peer_shut & SHUT_SEND != 0 || c.state != State::Connected {
                return Ok(c.received);
            }
            if p.now_ns().wrapping_sub(last) > timeout_ns {
                return Err("no data or SHUTDOWN from the host in time");
            }
        }
    }
}

/// RX buffer `slot`.
fn rx_buf(slot: u16) -> u64 {
    RX_BUFS + u64::from(slot) * RX_STRIDE + 4
}

/// Writes `n` bytes (a multiple of 8) of the stream from offset `off` (a multiple of 8) at
/// `a`, adding them to the checksum `h`.
fn fill_stream<P: Platform>(p: &P, seed: u8, a: u64, off: u64, n: u32, h: &mut u64) {
    for j in 0..u64::from(n / 8) {
        let w = word(seed, off / 8 + j);
        *h = sum_word(*h, w);
        p.write64(a + 8 * j, w);
    }
}

fn open<P: Platform>(p: &P, env: &Env<'_>, out: &mut LineBuf) -> Option<Vsock> {
    if !env.region_ok(layout::START, END, out) {
        return None;
    }
    let Some(dev) = env.find(p, ID_VSOCK, |_, _| true) else {
        env.none_found(p, "virtio-vsock", out);
        return None;
    };
    match Vsock::open(p, dev) {
        Ok(v) => Some(v),
        Err(e) => {
            out.push_str("init: ");
            e.describe(out);
            None
        }
    }
}

fn fail(out: &mut LineBuf, what: &str, e: VErr) -> bool {
    out.push_str(what);
    out.push_str(": ");
    out.push_str(e);
    false
}

/// Part one of `vsock`: `size` bytes each way on a guest-initiated connection.
fn guest_initiated<P: Platform>(
    p: &P,
    v: &mut Vsock,
    port: u32,
    size: u64,
    out: &mut LineBuf,
) -> bool {
    let ci = match v.connect(p, port) {
        Ok(ci) => ci,
        Err(e) => return fail(out, "connect", e),
    };
    v.conns[ci].seed = SEED_H2G;
    let mut sent = SUM_INIT;
    if let Err(e) = v.write(p, ci, size, |a, off, n| {
        fill_stream(p, SEED_G2H, a, off, n, &mut sent)
    }) {
        return fail(out, "send", e);
    }
    if let Err(e) = v.shutdown(p, ci, SHUT_SEND) {
        return fail(out, "shutdown", e);
    }
    let n = match v.read_to_end(p, ci, 20 * SECOND) {
        Ok(n) => n,
        Err(e) => return fail(out, "receive", e),
    };
    let c = v.conns[ci];
    if let Err(e) = v.close(p, ci) {
        return fail(out, "close", e);
    }
    out.push_str("g2h=");
    out.push_dec(size);
    out.push_str(" g2h_sum=");
    out.push_hex(sent);
    out.push_str(" h2g=");
    out.push_dec(n);
    out.push_str(" h2g_sum=");
    out.push_hex(c.sum);
    if let Some(k) = c.bad_word {
        out.push_str(" host data differs from the stream at word ");
        out.push_dec(k);
        return false;
    }
    if n != size {
        out.push_str(" expected h2g=");
        out.push_dec(size);
        return false;
    }
    true
}

/// Part two: accept `count` host connections on `port`; each sends the host-to-guest
/// stream and half-closes; the guest answers each with 16 bytes (bytes received, stream
/// checksum), half-closes and closes.
fn host_initiated<P: Platform>(
    p: &P,
    v: &mut Vsock,
    port: u32,
    count: usize,
    out: &mut LineBuf,
) -> bool {
    v.listen(port, SEED_H2G);
    let mut l = info_line("vsock");
    l.push_str("listening ");
    l.push_dec(u64::from(port));
    l.push_str(" conns=");
    l.push_dec(count as u64);
    p.info(l.as_bytes());
    let mut cis = [usize::MAX; MAX_CONNS];
    for (k, slot) in cis.iter_mut().take(count).enumerate() {
        match v.accept(p, 30 * SECOND) {
            Some(ci) => *slot = ci,
            None => {
                out.push_str(" accept ");
                out.push_dec(k as u64);
                out.push_str(": no host connection within 30 s");
                return false;
            }
        }
    }
    let mut total = 0u64;
    let mut done = [false; MAX_CONNS];
    let start = p.now_ns();
    while done.iter().take(count).any(|d| !d) {
        if p.now_ns().wrapping_sub(start) > 60 * SECOND {
            out.push_str(" host connections not finished within 60 s");
            return false;
        }
        v.take_rx(p);
        for k in 0..count {
            let ci = cis[k];
            let c = v.conns[ci];
            if done[k] || c.peer_shut & SHUT_SEND == 0 {
                if !done[k] && c.state != State::Connected {
                    return fail(out, " host connection", "reset by the host");
                }
                continue;
            }
            if let Some(w) = c.bad_word {
                out.push_str(" host connection: data differs from the stream at word ");
                out.push_dec(w);
                return false;
            }
            let reply = [c.received, c.sum];
            let r = v.write(p, ci, 16, |a, off, n| {
                for j in 0..u64::from(n / 8) {
                    p.write64(a + 8 * j, reply[(off / 8 + j) as usize]);
                }
            });
            if let Err(e) = r.and_then(|_| v.shutdown(p, ci, SHUT_SEND)) {
                return fail(out, " reply", e);
            }
            if let Err(e) = v.close(p, ci) {
                return fail(out, " close", e);
            }
            total += c.received;
            done[k] = true;
        }
    }
    v.listen = None;
    out.push_str(" accepted=");
    out.push_dec(count as u64);
    out.push_str(" received=");
    out.push_dec(total);
    total > 0
}

/// The `vsock` scenario (docs/guest-contract.md).
pub fn run_vsock<P: Platform>(p: &P, env: &Env<'_>, out: &mut LineBuf) -> bool {
    let Some(port) = env.num("kiln.vsock.port", 1234, out) else {
        return false;
    };
    let Some(listen) = env.num("kiln.vsock.listen", 5000, out) else {
        return false;
    };
    let Some(size) = env.num("kiln.vsock.size", 1 << 20, out) else {
        return false;
    };
    let Some(conns) = env.num("kiln.vsock.conns", 1, out) else {
        return false;
    };
    let Some(refused) = env.num("kiln.vsock.refused", 1235, out) else {
        return false;
    };
    let Some(mut v) = open(p, env, out) else {
        return false;
    };
    out.push_str("cid=");
    out.push_dec(v.cid);
    out.push_str(" ");
    let ok = guest_initiated(p, &mut v, port as u32, size & !7, out)
        && match v.connect(p, refused as u32) {
            Err("refused (RST)") => {
                out.push_str(" refused=rst");
                true
            }
            Ok(_) => fail(out, " refused port", "connected"),
            Err(e) => fail(out, " refused port", e),
        }
        && host_initiated(
            p,
            &mut v,
            listen as u32,
            (conns as usize).clamp(1, MAX_CONNS),
            out,
        );
    let _ = v.t.reset(p);
    ok
}

/// Takes RX for `ns`; returns how many RSTs came meanwhile.
fn rsts_within<P: Platform>(p: &P, v: &mut Vsock, before: u32, ns: u64) -> u32 {
    let start = p.now_ns();
    while p.now_ns().wrapping_sub(start) < ns {
        v.take_rx(p);
    }
    v.stats.rsts - before
}

/// The `vsock-evil` scenario: malformed packets, then credit abuse on a connection to
/// `kiln.vsock.port` (whose host end doesn't read), then a normal connection to the same
/// port: 4 KiB of the guest stream out, 4 KiB of the host stream back.
pub fn run_vsock_evil<P: Platform>(p: &P, env: &Env<'_>, out: &mut LineBuf) -> bool {
    let Some(port) = env.num("kiln.vsock.port", 1234, out) else {
        return false;
    };
    let Some(mut v) = open(p, env, out) else {
        return false;
    };
    let ok = evil(p, &mut v, port as u32, out);
    let _ = v.t.reset(p);
    ok
}

fn evil<P: Platform>(p: &P, v: &mut Vsock, port: u32, out: &mut LineBuf) -> bool {
    let base = Hdr {
        src_cid: v.cid,
        dst_cid: HOST_CID,
        src_port: 7000,
        dst_port: port,
        len: 0,
        type_: TYPE_STREAM,
        op: OP_REQUEST,
        flags: 0,
        buf_alloc: GUEST_BUF,
        fwd_cnt: 0,
    };
    let cid = v.cid;
    let sendh = |v: &mut Vsock, h: Hdr, hdr_len: u32| {
        if let Some(s) = v.slot(p) {
            v.send_raw(p, s, &h, hdr_len, 0);
        }
    };
    // 1. A truncated header; 2. len beyond the buffers; 3. a wrong source CID: all dropped
    // without an answer.
    let before = v.stats.rsts;
    sendh(v, base, 20);
    sendh(
        v,
        Hdr {
            len: 5000,
            op: OP_RW,
            ..base
        },
        HDR,
    );
    sendh(
        v,
        Hdr {
            src_cid: cid + 1,
            ..base
        },
        HDR,
    );
    let n = rsts_within(p, v, before, SECOND / 5);
    if n != 0 || v.conns.iter().any(|c| c.state != State::Free) {
        out.push_str("dropped packets were answered (");
        out.push_dec(u64::from(n));
        out.push_str(" RSTs)");
        return false;
    }
    // 4. An unknown op, 5. an unknown socket type: an RST each.
    let before = v.stats.rsts;
    sendh(
        v,
        Hdr {
            op: 99,
            src_port: 7001,
            ..base
        },
        HDR,
    );
    sendh(
        v,
        Hdr {
            type_: 2,
            src_port: 7002,
            ..base
        },
        HDR,
    );
    let n = rsts_within(p, v, before, SECOND / 2);
    if n != 2 {
        out.push_str("bad op/type: expected 2 RSTs, got ");
        out.push_dec(u64::from(n));
        return false;
    }
    out.push_str("bad-packets=ok");
    // 6. Credit abuse: ignore the host's credit and send until reset.
    let ci = match v.connect(p, port) {
        Ok(ci) => ci,
        Err(e) => return fail(out, " abuse connect", e),
    };
    let mut sent = 0u64;
    while v.conns[ci].state == State::Connected && sent < (16 << 20) {
        let Some(s) = v.slot(p) else {
            return fail(out, " abuse", "no TX slot");
        };
        let h = Hdr {
            src_port: v.conns[ci].local,
            op: OP_RW,
            len: MAX_PAYLOAD,
            ..base
        };
        // Whatever the slot holds: the host never reads it.
        v.send_raw(p, s, &h, HDR, MAX_PAYLOAD);
        sent += u64::from(MAX_PAYLOAD);
        v.take_rx(p);
    }
    let start = p.now_ns();
    while v.conns[ci].state == State::Connected && p.now_ns().wrapping_sub(start) < 5 * SECOND {
        v.take_rx(p);
    }
    if v.conns[ci].state != State::Reset {
        out.push_str(" credit abuse: no RST after ");
        out.push_dec(sent);
        out.push_str(" bytes");
        return false;
    }
    v.conns[ci] = FREE_CONN;
    out.push_str(" abuse-rst-after=");
    out.push_dec(sent);
    // 7. A normal connection still works.
    let ci = match v.connect(p, port) {
        Ok(ci) => ci,
        Err(e) => return fail(out, " after", e),
    };
    v.conns[ci].seed = SEED_H2G;
    let size = 4096u64;
    let mut h = SUM_INIT;
    if let Err(e) = v.write(p, ci, size, |a, off, n| {
        fill_stream(p, SEED_G2H, a, off, n, &mut h)
    }) {
        return fail(out, " after: send", e);
    }
    let _ = v.shutdown(p, ci, SHUT_SEND);
    let r = v.read_to_end(p, ci, 20 * SECOND);
    let c = v.conns[ci];
    let _ = v.close(p, ci);
    match r {
        Ok(n) if n == size && c.bad_word.is_none() => {
            out.push_str(" after=ok");
            true
        }
        Ok(n) => {
            out.push_str(" after: got ");
            out.push_dec(n);
            out.push_str(" bytes back, short or not the host stream");
            false
        }
        Err(e) => fail(out, " after: receive", e),
    }
}

/// The `vsock-bench` scenario: `kiln.vsock.mib` MiB guest to host, then the same host to
/// guest, on one connection to `kiln.vsock.port`; prints `KBENCH vsock ...`.
pub fn run_vsock_bench<P: Platform>(p: &P, env: &Env<'_>, out: &mut LineBuf) -> bool {
    let Some(port) = env.num("kiln.vsock.port", 1234, out) else {
        return false;
    };
    let Some(mib) = env.num("kiln.vsock.mib", 64, out) else {
        return false;
    };
    let Some(mut v) = open(p, env, out) else {
        return false;
    };
    let ok = bench(p, &mut v, port as u32, mib << 20, out);
    let _ = v.t.reset(p);
    ok
}

fn bench<P: Platform>(p: &P, v: &mut Vsock, port: u32, size: u64, out: &mut LineBuf) -> bool {
    let ci = match v.connect(p, port) {
        Ok(ci) => ci,
        Err(e) => return fail(out, "connect", e),
    };
    v.conns[ci].discard = true;
    let t0 = p.now_ns();
    // Payload bytes are whatever the slots hold: the host only counts.
    if let Err(e) = v.write(p, ci, size, |_, _, _| {}) {
        return fail(out, "send", e);
    }
    if let Err(e) = v.shutdown(p, ci, SHUT_SEND) {
        return fail(out, "shutdown", e);
    }
    let t1 = p.now_ns();
    // The host answers once it has read everything: time host-to-guest from its first byte.
    while v.conns[ci].received == 0 && v.conns[ci].state == State::Connected {
        if p.now_ns().wrapping_sub(t1) > 20 * SECOND {
            return fail(out, "receive", "no data from the host within 20 s");
        }
        v.take_rx(p);
    }
    let t2 = p.now_ns();
    let first = v.conns[ci].received;
    let r = v.read_to_end(p, ci, 20 * SECOND);
    let t3 = p.now_ns();
    let _ = v.close(p, ci);
    let got = match r {
        Ok(n) => n,
        Err(e) => return fail(out, "receive", e),
    };
    let mut l = LineBuf::new();
    l.push_str("KBENCH vsock g2h_mib_s=");
    push_rate(&mut l, size, t1.wrapping_sub(t0));
    l.push_str(" h2g_mib_s=");
    push_rate(&mut l, got - first, t3.wrapping_sub(t2));
    l.push_str(" bytes=");
    l.push_dec(size);
    p.info(l.as_bytes());
    out.push_str("g2h=");
    out.push_dec(size);
    out.push_str(" h2g=");
    out.push_dec(got);
    if got != size {
        out.push_str(" (expected the same back)");
        return false;
    }
    true
}

/// Appends `bytes` per `ns` in MiB/s with one decimal.
fn push_rate(l: &mut LineBuf, bytes: u64, ns: u64) {
    let tenths = (u128::from(bytes) * 10_000_000_000 / u128::from(ns.max(1))) >> 20;
    let t = u64::try_from(tenths).unwrap_or(u64::MAX);
    l.push_dec(t / 10);
    l.push_str(".");
    l.push_dec(t % 10);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::ring::tests::Ram;
    use std::vec::Vec;

    fn stream(seed: u8, len: usize) -> Vec<u8> {
        (0..len as u64 / 8)
            .flat_map(|k| word(seed, k).to_le_bytes())
            .collect()
    }

    /// The stream in chunks of any length, each at an 8-aligned address (as in RX buffers),
    /// checks out word by word; a changed byte is found at its word.
    #[test]
    fn chunked_stream_checks_out() {
        let ram = Ram::new(0x1000);
        let data = stream(SEED_H2G, 800);
        let sum = (0..100).fold(SUM_INIT, |h, k| sum_word(h, word(SEED_H2G, k)));
        for chunks in [
            &[800usize][..],
            &[1, 7, 8, 9, 3, 772],
            &[5, 5, 5, 785],
            &[13; 62],
        ] {
            let mut c = Conn {
                seed: SEED_H2G,
                ..FREE_CONN
            };
            let mut off = 0usize;
            for &n in chunks {
                let n = n.min(data.len() - off);
                // Garbage after the chunk: the reader may look at it but must not use it.
                ram.0.borrow_mut()[0x100..0x100 + n + 16].fill(0xee);
                ram.0.borrow_mut()[0x100..0x100 + n].copy_from_slice(&data[off..off + n]);
                c.take(&ram, 0x100, n as u32);
                off += n;
            }
            assert_eq!(off, 800, "{chunks:?}");
            assert_eq!((c.words, c.sum, c.bad_word), (100, sum, None), "{chunks:?}");
        }
        let mut bad = data.clone();
        bad[8 * 37 + 3] ^= 1;
        let mut c = Conn {
            seed: SEED_H2G,
            ..FREE_CONN
        };
        for chunk in bad.chunks(11) {
            ram.0.borrow_mut()[0x100..0x100 + chunk.len()].copy_from_slice(chunk);
            c.take(&ram, 0x100, chunk.len() as u32);
        }
        assert_eq!(c.bad_word, Some(37));
    }

    #[test]
    fn header_round_trip() {
        let ram = Ram::new(0x100);
        let h = Hdr {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1025,
            dst_port: 1234,
            len: 8,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: GUEST_BUF,
            fwd_cnt: 77,
        };
        h.write(&ram, 0x10);
        assert_eq!(Hdr::read(&ram, 0x10), h);
        assert_eq!(ram.read16(0x10 + 30), OP_RW);
        assert_eq!(ram.read32(0x10 + 40), 77);
    }
}
