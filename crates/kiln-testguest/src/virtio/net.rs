//! virtio-net (device ID 1): a minimal driver and the `virtio-net`, `net-evil` and
//! `net-bench` scenarios.
//!
//! The guest speaks just enough IPv4 to test a real host stack through the device: it
//! resolves the host's MAC with ARP, pings it (ICMP echo) and checks every checksum of the
//! replies; the bench sends UDP datagrams to a host sink. Addresses come from
//! `kiln.net=GUESTIP/HOSTIP` (docs/guest-contract.md).
//!
//! The driver negotiates `MAC`, `STATUS`, `MTU` and `MRG_RXBUF` (no offloads: every frame
//! carries full checksums), posts [`RX_BUFS`] 2 KiB receive buffers (enough for a 1500-byte
//! MTU frame, so each frame takes one) and polls the used rings.

use super::layout;
use super::ring::{write_desc, Buf, SplitQueue, DESC_F_INDIRECT, DESC_F_NEXT};
use super::transport::{status, InitError, Transport};
use super::{wait_until, Env, MmioDev, Platform, SECOND};
use crate::line::{Describe, LineBuf};

/// Device type: network card.
pub const ID_NET: u32 = 1;
/// `VIRTIO_NET_F_MTU`.
pub const F_MTU: u64 = 1 << 3;
/// `VIRTIO_NET_F_MAC`.
pub const F_MAC: u64 = 1 << 5;
/// `VIRTIO_NET_F_MRG_RXBUF`.
pub const F_MRG_RXBUF: u64 = 1 << 15;
/// `VIRTIO_NET_F_STATUS`.
pub const F_STATUS: u64 = 1 << 16;
/// Features the driver takes.
pub const WANTED: u64 = F_MAC | F_STATUS | F_MTU | F_MRG_RXBUF;
/// The virtio-net header (virtio 1.x).
pub const HDR: usize = 12;
/// Receive buffers posted.
pub const RX_BUFS: u16 = 32;
/// Receive queue entries: room for the transmit buffers too, which the receive bench posts
/// as well (it sends nothing).
pub const RX_SIZE: u16 = 256;
/// Bytes per buffer.
pub const BUF_LEN: u32 = 2048;
/// Transmit queue entries (and transmit buffers).
pub const TX_SIZE: u16 = 256;
/// Receive buffers: 2 KiB apart from the start of the data area.
pub const RX_BASE: u64 = layout::DATA;
/// Transmit buffers, after the receive buffers.
pub const TX_BASE: u64 = layout::DATA + 0x1_0000;
/// Where the driver's memory ends.
pub const NET_END: u64 = TX_BASE + TX_SIZE as u64 * BUF_LEN as u64;
/// Largest frame handled here (without the virtio header).
pub const MAX_FRAME: usize = BUF_LEN as usize - HDR;

const _: () = assert!(NET_END <= layout::FUNCTIONAL_END);
const _: () = assert!(RX_BASE + RX_BUFS as u64 * BUF_LEN as u64 <= TX_BASE);

const ETH_ARP: u16 = 0x0806;
const ETH_IP: u16 = 0x0800;
const BROADCAST: [u8; 6] = [0xff; 6];
/// ICMP identifier of the guest's echo requests.
const PING_ID: u16 = 0x4b4c;
/// Bytes of ICMP payload per echo request.
const PING_PAYLOAD: usize = 56;

/// The addresses from `kiln.net=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addrs {
    /// The guest's IPv4 address.
    pub guest: [u8; 4],
    /// The host's.
    pub host: [u8; 4],
}

/// Parses a dotted quad.
pub fn parse_ip(s: &[u8]) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut n = 0;
    for part in s.split(|&b| b == b'.') {
        if n == 4 || part.is_empty() || part.len() > 3 {
            return None;
        }
        let v = crate::cmdline::parse_dec(part)?;
        ip[n] = u8::try_from(v).ok()?;
        n += 1;
    }
    (n == 4).then_some(ip)
}

/// Parses `GUESTIP/HOSTIP`.
pub fn parse_addrs(s: &[u8]) -> Option<Addrs> {
    let i = s.iter().position(|&b| b == b'/')?;
    Some(Addrs {
        guest: parse_ip(&s[..i])?,
        host: parse_ip(&s[i + 1..])?,
    })
}

/// The Internet checksum (RFC 1071) of `data`, folded and complemented.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn get16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Writes an Ethernet header; returns its length.
fn eth(b: &mut [u8], dst: [u8; 6], src: [u8; 6], kind: u16) -> usize {
    b[..6].copy_from_slice(&dst);
    b[6..12].copy_from_slice(&src);
    put16(b, 12, kind);
    14
}

/// An ARP request for `a.host` from `mac`/`a.guest`; returns the frame length.
pub fn arp_request(b: &mut [u8], mac: [u8; 6], a: &Addrs) -> usize {
    let o = eth(b, BROADCAST, mac, ETH_ARP);
    put16(b, o, 1); // Ethernet
    put16(b, o + 2, ETH_IP);
    b[o + 4] = 6;
    b[o + 5] = 4;
    put16(b, o + 6, 1); // request
    b[o + 8..o + 14].copy_from_slice(&mac);
    b[o + 14..o + 18].copy_from_slice(&a.guest);
    b[o + 18..o + 24].fill(0);
    b[o + 24..o + 28].copy_from_slice(&a.host);
    o + 28
}

/// If `f` is an ARP reply from `a.host` to `a.guest`, the host's MAC.
pub fn arp_reply_mac(f: &[u8], a: &Addrs) -> Option<[u8; 6]> {
    if f.len() < 42 || get16(f, 12) != ETH_ARP || get16(f, 20) != 2 {
        return None;
    }
    if f[28..32] != a.host || f[38..42] != a.guest {
        return None;
    }
    let mut m = [0u8; 6];
    m.copy_from_slice(&f[22..28]);
    Some(m)
}

/// Writes an IPv4 header (no options, checksum filled in) for `payload` bytes of `proto`.
fn ipv4(b: &mut [u8], src: [u8; 4], dst: [u8; 4], proto: u8, payload: usize, id: u16) -> usize {
    b[0] = 0x45;
    b[1] = 0;
    put16(b, 2, (20 + payload) as u16);
    put16(b, 4, id);
    put16(b, 6, 0x4000); // don't fragment
    b[8] = 64;
    b[9] = proto;
    put16(b, 10, 0);
    b[12..16].copy_from_slice(&src);
    b[16..20].copy_from_slice(&dst);
    let c = checksum(&b[..20]);
    put16(b, 10, c);
    20
}

/// The payload byte `i` of echo request `seq`.
fn ping_byte(seq: u16, i: usize) -> u8 {
    (i as u8).wrapping_mul(3).wrapping_add(seq as u8)
}

/// An ICMP echo request; returns the frame length.
pub fn echo_request(b: &mut [u8], mac: [u8; 6], host_mac: [u8; 6], a: &Addrs, seq: u16) -> usize {
    let o = eth(b, host_mac, mac, ETH_IP);
    let icmp_len = 8 + PING_PAYLOAD;
    let o = o + ipv4(&mut b[o..], a.guest, a.host, 1, icmp_len, seq);
    let icmp = &mut b[o..o + icmp_len];
    icmp[0] = 8;
    icmp[1] = 0;
    put16(icmp, 2, 0);
    put16(icmp, 4, PING_ID);
    put16(icmp, 6, seq);
    for i in 0..PING_PAYLOAD {
        icmp[8 + i] = ping_byte(seq, i);
    }
    let c = checksum(icmp);
    put16(icmp, 2, c);
    o + icmp_len
}

/// What is wrong with a frame that should be the echo reply `seq` (None: it is right).
pub fn check_echo_reply(
    f: &[u8],
    mac: [u8; 6],
    host_mac: [u8; 6],
    a: &Addrs,
    seq: u16,
) -> Option<&'static str> {
    if f.len() < 14 + 20 + 8 + PING_PAYLOAD {
        return Some("short frame");
    }
    if f[..6] != mac || f[6..12] != host_mac {
        return Some("wrong MAC addresses");
    }
    let ip = &f[14..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ip.len() < ihl + 8 + PING_PAYLOAD {
        return Some("not IPv4");
    }
    if checksum(&ip[..ihl]) != 0 {
        return Some("bad IPv4 header checksum");
    }
    if ip[9] != 1 || ip[12..16] != a.host || ip[16..20] != a.guest {
        return Some("wrong IP protocol or addresses");
    }
    let total = usize::from(get16(ip, 2));
    if total < ihl + 8 || total > ip.len() {
        return Some("bad IPv4 total length");
    }
    let icmp = &ip[ihl..total];
    if checksum(icmp) != 0 {
        return Some("bad ICMP checksum");
    }
    if icmp[0] != 0 || icmp[1] != 0 {
        return Some("not an echo reply");
    }
    if get16(icmp, 4) != PING_ID || get16(icmp, 6) != seq {
        return Some("wrong echo id or sequence");
    }
    if icmp.len() != 8 + PING_PAYLOAD || (0..PING_PAYLOAD).any(|i| icmp[8 + i] != ping_byte(seq, i))
    {
        return Some("echo payload differs");
    }
    None
}

/// Whether `f` is an ICMP echo reply for us at all (others are ignored while waiting).
fn is_echo_reply(f: &[u8], a: &Addrs) -> bool {
    if f.len() < 14 + 20 + 8 || get16(f, 12) != ETH_IP {
        return false;
    }
    let ihl = usize::from(f[14] & 0xf) * 4;
    f[14 + 9] == 1 && f[14 + 12..14 + 16] == a.host && f.len() > 14 + ihl && f[14 + ihl] == 0
}

/// A UDP datagram of `payload` bytes (checksum 0: none, allowed over IPv4).
pub fn udp(
    b: &mut [u8],
    mac: [u8; 6],
    host_mac: [u8; 6],
    a: &Addrs,
    port: u16,
    payload: usize,
) -> usize {
    let o = eth(b, host_mac, mac, ETH_IP);
    let o = o + ipv4(&mut b[o..], a.guest, a.host, 17, 8 + payload, 0);
    put16(b, o, port);
    put16(b, o + 2, port);
    put16(b, o + 4, (8 + payload) as u16);
    put16(b, o + 6, 0);
    for (i, x) in b[o + 8..o + 8 + payload].iter_mut().enumerate() {
        *x = i as u8;
    }
    o + 8 + payload
}

/// A virtio-net device brought up with both queues and its receive buffers posted.
pub struct Net {
    /// Where it is.
    pub dev: MmioDev,
    /// Its registers.
    pub t: Transport,
    /// Receive queue.
    pub rx: SplitQueue,
    /// Transmit queue.
    pub tx: SplitQueue,
    /// Features accepted.
    pub features: u64,
    /// The MAC from the configuration space.
    pub mac: [u8; 6],
    /// `status` from the configuration space.
    pub status: u16,
    /// `mtu` from the configuration space (0 without `MTU`).
    pub mtu: u16,
    /// Receive buffer of each descriptor head (0: not one of ours).
    rx_buf: [u64; RX_SIZE as usize],
    /// Next transmit buffer to use.
    tx_next: u16,
}

/// Why a step of the driver failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetError {
    /// Bringing the device up.
    Init(InitError),
    /// Posting a receive buffer or a frame found no free descriptor.
    RingFull,
    /// Nothing completed in time.
    Timeout,
    /// The device asked for a reset (status).
    NeedsReset(u32),
}

impl Describe for NetError {
    fn describe(&self, out: &mut LineBuf) {
        match *self {
            NetError::Init(e) => {
                out.push_str("init: ");
                e.describe(out);
            }
            NetError::RingFull => out.push_str("no free descriptor"),
            NetError::Timeout => out.push_str("timed out"),
            NetError::NeedsReset(s) => {
                out.push_str("device needs reset, status ");
                out.push_hex(u64::from(s));
            }
        }
    }
}

impl Net {
    /// Resets and initialises the device at `dev` and posts the receive buffers.
    pub fn open<P: Platform>(p: &P, dev: MmioDev) -> Result<Net, NetError> {
        let t = Transport::new(dev.base);
        let features = t.negotiate(p, WANTED).map_err(NetError::Init)?;
        let rx = t
            .setup_queue(p, 0, layout::BLK_QA, RX_SIZE)
            .map_err(NetError::Init)?;
        let tx = t
            .setup_queue(p, 1, layout::BLK_QB, TX_SIZE)
            .map_err(NetError::Init)?;
        t.driver_ok(p).map_err(NetError::Init)?;
        let w0 = t.config32(p, 0);
        let w1 = t.config32(p, 4);
        let w2 = t.config32(p, 8);
        let mut mac = [0u8; 6];
        mac[..4].copy_from_slice(&w0.to_le_bytes());
        mac[4..].copy_from_slice(&w1.to_le_bytes()[..2]);
        let mut n = Net {
            dev,
            t,
            rx,
            tx,
            features,
            mac,
            status: (w1 >> 16) as u16,
            mtu: if features & F_MTU != 0 {
                (w2 >> 16) as u16
            } else {
                0
            },
            rx_buf: [0; RX_SIZE as usize],
            tx_next: 0,
        };
        for i in 0..u64::from(RX_BUFS) {
            n.post_rx(p, RX_BASE + i * u64::from(BUF_LEN))?;
        }
        n.t.notify(p, 0);
        Ok(n)
    }

    /// Makes the receive buffer at `addr` available (no notification).
    fn post_rx<P: Platform>(&mut self, p: &P, addr: u64) -> Result<(), NetError> {
        let head = self
            .rx
            .add(p, &[Buf::w(addr, BUF_LEN)])
            .ok_or(NetError::RingFull)?;
        if let Some(s) = self.rx_buf.get_mut(usize::from(head)) {
            *s = addr;
        }
        Ok(())
    }

    /// Returns completed transmit chains; how many.
    pub fn reap_tx<P: Platform>(&mut self, p: &P) -> u32 {
        let mut n = 0;
        while self.tx.pop_used(p).is_some() {
            n += 1;
        }
        n
    }

    /// The next transmit buffer (waits for a free descriptor).
    fn tx_buf<P: Platform>(&mut self, p: &P) -> Result<u64, NetError> {
        if self.tx.num_free() == 0 {
            let tx = &mut self.tx;
            if !wait_until(p, SECOND, || tx.pop_used(p).is_some()) {
                return Err(NetError::Timeout);
            }
        }
        let b = TX_BASE + u64::from(self.tx_next) * u64::from(BUF_LEN);
        self.tx_next = (self.tx_next + 1) % TX_SIZE;
        Ok(b)
    }

    /// Sends `frame` behind a zero virtio header, as one readable descriptor.
    pub fn send<P: Platform>(&mut self, p: &P, frame: &[u8]) -> Result<(), NetError> {
        self.send_raw(p, &[0; HDR], frame)
    }

    /// Sends `frame` behind the header `hdr`.
    pub fn send_raw<P: Platform>(
        &mut self,
        p: &P,
        hdr: &[u8; HDR],
        frame: &[u8],
    ) -> Result<(), NetError> {
        self.reap_tx(p);
        let b = self.tx_buf(p)?;
        copy_to(p, b, hdr);
        copy_to(p, b + HDR as u64, frame);
        self.tx
            .add(p, &[Buf::r(b, (HDR + frame.len()) as u32)])
            .ok_or(NetError::RingFull)?;
        self.t.notify(p, 1);
        Ok(())
    }

    /// Waits up to `timeout_ns` for a frame; copies it (without the virtio header) into
    /// `f` and returns its length, then gives the buffer back to the device. Chains that
    /// were not ordinary receive buffers (hostile cases) are counted in `odd`.
    pub fn recv<P: Platform>(
        &mut self,
        p: &P,
        f: &mut [u8; MAX_FRAME],
        timeout_ns: u64,
        odd: &mut u32,
    ) -> Result<usize, NetError> {
        let start = p.now_ns();
        loop {
            let mut got = None;
            let rx = &mut self.rx;
            let left = timeout_ns.saturating_sub(p.now_ns().wrapping_sub(start));
            if !wait_until(p, left, || {
                got = rx.pop_used(p);
                got.is_some()
            }) {
                let s = self.t.status(p);
                if s & status::DEVICE_NEEDS_RESET != 0 {
                    return Err(NetError::NeedsReset(s));
                }
                return Err(NetError::Timeout);
            }
            let Some((id, len)) = got else {
                continue;
            };
            let addr = usize::try_from(id)
                .ok()
                .and_then(|i| self.rx_buf.get(i))
                .copied()
                .unwrap_or(0);
            if addr == 0 {
                *odd += 1;
                continue;
            }
            let len = (len as usize).min(BUF_LEN as usize);
            let n = len.saturating_sub(HDR);
            // One buffer per frame (2 KiB > MTU frames), so num_buffers must be 1.
            let num_buffers = p.read16(addr + 10);
            copy_from(p, addr + HDR as u64, &mut f[..n.min(MAX_FRAME)]);
            self.post_rx(p, addr)?;
            self.t.notify(p, 0);
            if num_buffers != 1 && self.features & F_MRG_RXBUF != 0 {
                *odd += 1;
                continue;
            }
            return Ok(n);
        }
    }

    /// Resolves the host's MAC with ARP (a request a second, up to `tries`).
    pub fn arp<P: Platform>(&mut self, p: &P, a: &Addrs, tries: u32) -> Result<[u8; 6], NetError> {
        let mut f = [0u8; MAX_FRAME];
        let mut odd = 0;
        for _ in 0..tries {
            let n = arp_request(&mut f, self.mac, a);
            self.send(p, &f[..n])?;
            let start = p.now_ns();
            while p.now_ns().wrapping_sub(start) < SECOND {
                let left = SECOND - p.now_ns().wrapping_sub(start).min(SECOND);
                match self.recv(p, &mut f, left, &mut odd) {
                    Ok(n) => {
                        if let Some(m) = arp_reply_mac(&f[..n], a) {
                            return Ok(m);
                        }
                    }
                    Err(NetError::Timeout) => break,
                    Err(e) => return Err(e),
                }
            }
        }
        Err(NetError::Timeout)
    }

    /// One ping: sends echo request `seq` and waits up to 2 s for its reply; the reply's
    /// problem if it has one.
    pub fn ping<P: Platform>(
        &mut self,
        p: &P,
        a: &Addrs,
        host_mac: [u8; 6],
        seq: u16,
        odd: &mut u32,
    ) -> Result<Option<&'static str>, NetError> {
        let mut f = [0u8; MAX_FRAME];
        let n = echo_request(&mut f, self.mac, host_mac, a, seq);
        self.send(p, &f[..n])?;
        let start = p.now_ns();
        loop {
            let left = (2 * SECOND).saturating_sub(p.now_ns().wrapping_sub(start));
            let n = self.recv(p, &mut f, left, odd)?;
            if is_echo_reply(&f[..n], a) {
                return Ok(check_echo_reply(&f[..n], self.mac, host_mac, a, seq));
            }
        }
    }
}

fn copy_to<P: Platform>(p: &P, addr: u64, b: &[u8]) {
    let mut i = 0;
    while i + 8 <= b.len() {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i..i + 8]);
        p.write64(addr + i as u64, u64::from_le_bytes(w));
        i += 8;
    }
    for (k, &x) in b[i..].iter().enumerate() {
        p.write8(addr + (i + k) as u64, x);
    }
}

fn copy_from<P: Platform>(p: &P, addr: u64, b: &mut [u8]) {
    let mut i = 0;
    while i + 8 <= b.len() {
        b[i..i + 8].copy_from_slice(&p.read64(addr + i as u64).to_le_bytes());
        i += 8;
    }
    for (k, x) in b.iter_mut().enumerate().skip(i) {
        *x = p.read8(addr + k as u64);
    }
}

fn push_mac(out: &mut LineBuf, m: &[u8; 6]) {
    for (i, b) in m.iter().enumerate() {
        if i > 0 {
            out.push_str(":");
        }
        out.push_hex_digits(u64::from(*b), 2);
    }
}

/// The setup every scenario shares: addresses, region, device, and (with `arp`) the host's
/// MAC by ARP (else all zeros).
fn setup<P: Platform>(
    p: &P,
    env: &Env<'_>,
    out: &mut LineBuf,
    arp: bool,
) -> Option<(Net, Addrs, [u8; 6])> {
    let Some(a) = env.cmdline.get("kiln.net").and_then(parse_addrs) else {
        out.push_str("kiln.net=GUESTIP/HOSTIP missing or malformed");
        return None;
    };
    if !env.region_ok(layout::START, NET_END, out) {
        return None;
    }
    let Some(dev) = env.find(p, ID_NET, |_, _| true) else {
        env.none_found(p, "virtio-net", out);
        return None;
    };
    let mut n = match Net::open(p, dev) {
        Ok(n) => n,
        Err(e) => {
            e.describe(out);
            return None;
        }
    };
    if n.features & F_MAC == 0 || n.mac[0] & 1 != 0 || n.mac == [0; 6] {
        out.push_str("no usable MAC (features ");
        out.push_hex(n.features);
        out.push_str(")");
        return None;
    }
    if n.features & F_STATUS != 0 && n.status & 1 == 0 {
        out.push_str("link is down (status ");
        out.push_hex(u64::from(n.status));
        out.push_str(")");
        return None;
    }
    if !arp {
        return Some((n, a, [0; 6]));
    }
    let host_mac = match n.arp(p, &a, 10) {
        Ok(m) => m,
        Err(e) => {
            out.push_str("ARP for the host: ");
            e.describe(out);
            let _ = n.t.reset(p);
            return None;
        }
    };
    Some((n, a, host_mac))
}

/// Pings `count` times from `first_seq`; the mean round trip in µs, or None (reason in
/// `out`) on the first failure.
fn pings<P: Platform>(
    p: &P,
    n: &mut Net,
    (a, host_mac): (&Addrs, [u8; 6]),
    (first_seq, count): (u16, u16),
    odd: &mut u32,
    out: &mut LineBuf,
) -> Option<u64> {
    let start = p.now_ns();
    for seq in first_seq..first_seq + count {
        match n.ping(p, a, host_mac, seq, odd) {
            Ok(None) => {}
            Ok(Some(why)) => {
                out.push_str("echo reply ");
                out.push_dec(u64::from(seq));
                out.push_str(": ");
                out.push_str(why);
                return None;
            }
            Err(e) => {
                out.push_str("echo ");
                out.push_dec(u64::from(seq));
                out.push_str(": ");
                e.describe(out);
                return None;
            }
        }
    }
    Some(p.now_ns().wrapping_sub(start) / u64::from(count.max(1)) / 1000)
}

/// The `virtio-net` scenario: MAC and link status from the configuration space, ARP for
/// the host, three pings with every checksum of the replies checked.
pub fn run_net<P: Platform>(p: &P, env: &Env<'_>, out: &mut LineBuf) -> bool {
    let Some((mut n, a, host_mac)) = setup(p, env, out, true) else {
        return false;
    };
    let mut odd = 0;
    let Some(rtt) = pings(p, &mut n, (&a, host_mac), (1, 3), &mut odd, out) else {
        let _ = n.t.reset(p);
        return false;
    };
    let _ = n.t.reset(p);
    out.push_str("dev=");
    out.push_hex(n.dev.base);
    out.push_str(" mac=");
    push_mac(out, &n.mac);
    out.push_str(" mtu=");
    out.push_dec(u64::from(n.mtu));
    out.push_str(" host_mac=");
    push_mac(out, &host_mac);
    out.push_str(" pings=3 rtt_us=");
    out.push_dec(rtt);
    true
}

/// The `net-evil` scenario: malformed transmit chains (empty, header only, truncated, over
/// the MTU, offload flags that weren't negotiated, a device-writable buffer, buffers outside
/// RAM, a descriptor chained to itself, an indirect table outside RAM) and malformed receive
/// chains (device-readable, shorter than the header, outside RAM); each must come back, the
/// device must not need a reset, and pings must still work.
pub fn run_net_evil<P: Platform>(p: &P, env: &Env<'_>, out: &mut LineBuf) -> bool {
    let Some((mut n, a, host_mac)) = setup(p, env, out, true) else {
        return false;
    };
    let mut odd = 0;
    let mtu = usize::from(if n.mtu == 0 { 1500 } else { n.mtu });
    let mut f = [0u8; MAX_FRAME];
    let len = echo_request(&mut f, n.mac, host_mac, &a, 999);
    let before = n.tx.used_idx(p);
    let b = TX_BASE + u64::from(TX_SIZE - 1) * u64::from(BUF_LEN);
    copy_to(p, b, &[0; HDR]);
    copy_to(p, b + HDR as u64, &f[..len]);
    // Not just a header: NEEDS_CSUM without CSUM, and TCPv4 GSO without HOST_TSO4.
    let csum = TX_BASE + u64::from(TX_SIZE - 2) * u64::from(BUF_LEN);
    let mut h = [0u8; HDR];
    h[0] = 1;
    h[6] = 34;
    h[8] = 2;
    copy_to(p, csum, &h);
    copy_to(p, csum + HDR as u64, &f[..len]);
    let gso = TX_BASE + u64::from(TX_SIZE - 3) * u64::from(BUF_LEN);
    h[1] = 1;
    h[4] = 0xb0;
    h[5] = 0x05;
    copy_to(p, gso, &h);
    copy_to(p, gso + HDR as u64, &f[..len]);
    let far = 0x7f00_0000_0000u64;
    let cases: [&[Buf]; 9] = [
        &[Buf::r(b, 0)],
        &[Buf::r(b, HDR as u32)],
        &[Buf::r(b, (HDR + 13) as u32)],
        &[Buf::r(b, (HDR + mtu + 14 + 4 + 1) as u32)],
        &[Buf::r(csum, (HDR + len) as u32)],
        &[Buf::r(gso, (HDR + len) as u32)],
        &[Buf::r(b, HDR as u32), Buf::w(b + HDR as u64, len as u32)],
        &[Buf::r(far, (HDR + len) as u32)],
        &[Buf::r(b, HDR as u32), Buf::r(far, len as u32)],
    ];
    n.reap_tx(p);
    for c in cases {
        if n.tx.add(p, c).is_none() {
            out.push_str("transmit ring full");
            return false;
        }
    }
    // Descriptor abuse, rewritten in place before the notification: a descriptor chained to
    // itself (the device must stop at the queue size) and an indirect table outside RAM.
    for (addr, len, flags) in [(b, HDR as u32, DESC_F_NEXT), (far, 64, DESC_F_INDIRECT)] {
        let Some(head) = n.tx.add(p, &[Buf::r(addr, len)]) else {
            out.push_str("transmit ring full");
            return false;
        };
        write_desc(p, n.tx.mem.desc, head, addr, len, flags, head);
    }
    let total = cases.len() + 2;
    n.t.notify(p, 1);
    let tx = &mut n.tx;
    let want = before.wrapping_add(total as u16);
    if !wait_until(p, 2 * SECOND, || tx.used_idx(p) == want) {
        out.push_str("malformed transmit chains not all returned: used ");
        out.push_dec(u64::from(n.tx.used_idx(p).wrapping_sub(before)));
        out.push_str(" of ");
        out.push_dec(total as u64);
        return false;
    }
    n.reap_tx(p);
    // Hostile receive chains: a readable buffer, one shorter than the header, one outside
    // RAM. The device must return them empty and use the next good buffer.
    let evil_rx: [Buf; 3] = [Buf::r(b, BUF_LEN), Buf::w(b, 4), Buf::w(far, BUF_LEN)];
    // They sit behind the posted good buffers: the pings below run until the device has
    // cycled through all of those.
    for e in evil_rx {
        if n.rx.add(p, &[e]).is_none() {
            out.push_str("receive ring full");
            return false;
        }
    }
    n.t.notify(p, 0);
    let s = n.t.status(p);
    if s & status::DEVICE_NEEDS_RESET != 0 {
        out.push_str("device needs reset after malformed chains, status ");
        out.push_hex(u64::from(s));
        return false;
    }
    // Enough pings to consume every posted buffer once (so the hostile ones come up).
    let rounds = RX_BUFS + 4;
    if pings(p, &mut n, (&a, host_mac), (100, rounds), &mut odd, out).is_none() {
        let _ = n.t.reset(p);
        return false;
    }
    let _ = n.t.reset(p);
    if odd < evil_rx.len() as u32 {
        out.push_str("hostile receive chains not returned: ");
        out.push_dec(u64::from(odd));
        return false;
    }
    out.push_str("tx_cases=");
    out.push_dec(total as u64);
    out.push_str(" rx_cases=");
    out.push_dec(evil_rx.len() as u64);
    out.push_str(" pings_after=");
    out.push_dec(u64::from(rounds));
    true
}

/// Default frames sent by `net-bench` (`kiln.netbench.frames`).
pub const DEFAULT_BENCH_FRAMES: u64 = 200_000;
/// Default UDP payload (`kiln.netbench.size`): a full 1500-byte IP packet.
pub const DEFAULT_BENCH_SIZE: u64 = 1472;
/// Default UDP port of the host sink (`kiln.netbench.port`).
pub const DEFAULT_BENCH_PORT: u64 = 5555;
/// Default receive measurement window in ms (`kiln.netbench.ms`, `kiln.netbench.dir=rx`).
pub const DEFAULT_BENCH_MS: u64 = 2000;

/// The `net-bench` scenario: sends `kiln.netbench.frames` UDP datagrams of
/// `kiln.netbench.size` bytes to the host's `kiln.netbench.port` as fast as the transmit
/// queue takes them, and prints `KBENCH net tx_frames=.. fps=.. mibs=..`; with
/// `kiln.netbench.dir=rx` it counts what the host sends instead (see `bench_rx`).
pub fn run_net_bench<P: Platform>(p: &P, env: &Env<'_>, out: &mut LineBuf) -> bool {
    let (Some(frames), Some(size), Some(port)) = (
        env.num("kiln.netbench.frames", DEFAULT_BENCH_FRAMES, out),
        env.num("kiln.netbench.size", DEFAULT_BENCH_SIZE, out),
        env.num("kiln.netbench.port", DEFAULT_BENCH_PORT, out),
    ) else {
        return false;
    };
    if !(1..=1472).contains(&size) || port == 0 || port > 65535 || frames == 0 {
        out.push_str("kiln.netbench: size 1..=1472, port 1..=65535, frames > 0");
        return false;
    }
    let rx = match env.cmdline.get("kiln.netbench.dir") {
        None | Some(b"tx") => false,
        Some(b"rx") => true,
        Some(_) => {
            out.push_str("kiln.netbench.dir: tx or rx");
            return false;
        }
    };
    let Some(ms) = env.num("kiln.netbench.ms", DEFAULT_BENCH_MS, out) else {
        return false;
    };
    if !(1..=60_000).contains(&ms) {
        out.push_str("kiln.netbench.ms: 1..=60000");
        return false;
    }
    // The receive bench needs no ARP (the host has a static entry for the guest), and the
    // host's flood could crowd the reply out of the tap's queue.
    let Some((mut n, a, host_mac)) = setup(p, env, out, !rx) else {
        return false;
    };
    if rx {
        return bench_rx(p, &mut n, ms, out);
    }
    // One prebuilt frame per transmit descriptor: the loop only recycles descriptors.
    let mut f = [0u8; MAX_FRAME];
    let len = udp(&mut f, n.mac, host_mac, &a, port as u16, size as usize);
    n.reap_tx(p);
    let qs = n.tx.size();
    for i in 0..qs {
        let b = TX_BASE + u64::from(i) * u64::from(BUF_LEN);
        copy_to(p, b, &[0; HDR]);
        copy_to(p, b + HDR as u64, &f[..len]);
        write_desc(p, n.tx.mem.desc, i, b, (HDR + len) as u32, 0, 0);
    }
    n.tx.set_no_interrupt(p, true);
    let mut sent = 0u64;
    let mut done = 0u64;
    let mut free = qs;
    let mut next = 0u16;
    let mut last_used = n.tx.used_idx(p);
    let start = p.now_ns();
    let mut last_progress = start;
    while done < frames {
        let mut added = false;
        while free > 0 && sent < frames {
            n.tx.push_head(p, next);
            next = (next + 1) % qs;
            free -= 1;
            sent += 1;
            added = true;
        }
        if added {
            n.tx.publish(p);
            n.t.notify(p, 1);
        }
        let u = n.tx.used_idx(p);
        let k = u.wrapping_sub(last_used);
        if k > 0 {
            last_used = u;
            free += k;
            done += u64::from(k);
            last_progress = p.now_ns();
        } else if p.now_ns().wrapping_sub(last_progress) > 5 * SECOND {
            out.push_str("transmit stalled after ");
            out.push_dec(done);
            out.push_str(" frames");
            let _ = n.t.reset(p);
            return false;
        }
    }
    let ns = p.now_ns().wrapping_sub(start).max(1);
    let _ = n.t.reset(p);
    let fps = (u128::from(done) * u128::from(SECOND) / u128::from(ns)) as u64;
    let bytes = u128::from(done) * len as u128;
    let mibs_tenths = (bytes * 10 * u128::from(SECOND) / u128::from(ns) / (1 << 20)) as u64;
    let mut l = LineBuf::new();
    l.push_str("KBENCH net tx_frames=");
    l.push_dec(done);
    l.push_str(" frame_bytes=");
    l.push_dec(len as u64);
    l.push_str(" ns=");
    l.push_dec(ns);
    l.push_str(" fps=");
    l.push_dec(fps);
    l.push_str(" mibs=");
    l.push_dec(mibs_tenths / 10);
    l.push_str(".");
    l.push_dec(mibs_tenths % 10);
    p.info(l.as_bytes());
    out.push_str("frames=");
    out.push_dec(done);
    out.push_str(" fps=");
    out.push_dec(fps);
    true
}

/// `net-bench` with `kiln.netbench.dir=rx`: waits up to 10 s for the host's first frame,
/// then counts the frames that arrive in the next `ms` milliseconds, recycling buffers in
/// batches (one notification per batch), and prints `KBENCH net-rx ...`.
fn bench_rx<P: Platform>(p: &P, n: &mut Net, ms: u64, out: &mut LineBuf) -> bool {
    n.rx.set_no_interrupt(p, true);
    // The transmit buffers become receive buffers too: a deep ring, so the device has room
    // while the guest is between batches.
    let extra = (RX_SIZE - RX_BUFS).min(TX_SIZE);
    for i in 0..u64::from(extra) {
        if let Err(e) = n.post_rx(p, TX_BASE + i * u64::from(BUF_LEN)) {
            e.describe(out);
            let _ = n.t.reset(p);
            return false;
        }
    }
    n.t.notify(p, 0);
    let burst = |n: &mut Net| -> Result<(u64, u64), NetError> {
        let (mut frames, mut bytes) = (0u64, 0u64);
        while let Some((id, len)) = n.rx.pop_used(p) {
            let addr = usize::try_from(id)
                .ok()
                .and_then(|i| n.rx_buf.get(i))
                .copied()
                .unwrap_or(0);
            if addr == 0 {
                continue;
            }
            frames += 1;
            bytes += u64::from(len).saturating_sub(HDR as u64);
            n.post_rx(p, addr)?;
        }
        if frames > 0 {
            n.t.notify(p, 0);
        }
        Ok((frames, bytes))
    };
    // Whatever came before the host's stream (ARP, IPv6 noise) doesn't count.
    let _ = burst(n);
    let first = p.now_ns();
    let mut started = None;
    while started.is_none() {
        match burst(n) {
            Ok((f, _)) if f > 0 => started = Some(p.now_ns()),
            Ok(_) if p.now_ns().wrapping_sub(first) > 10 * SECOND => {
                out.push_str("no frame from the host within 10 s");
                let _ = n.t.reset(p);
                return false;
            }
            Ok(_) => core::hint::spin_loop(),
            Err(e) => {
                e.describe(out);
                let _ = n.t.reset(p);
                return false;
            }
        }
    }
    let start = started.unwrap_or(first);
    let (mut frames, mut bytes) = (0u64, 0u64);
    let end = start + ms * 1_000_000;
    while p.now_ns() < end {
        match burst(n) {
            Ok((f, b)) => {
                frames += f;
                bytes += b;
            }
            Err(e) => {
                e.describe(out);
                let _ = n.t.reset(p);
                return false;
            }
        }
    }
    let ns = p.now_ns().wrapping_sub(start).max(1);
    let _ = n.t.reset(p);
    let fps = (u128::from(frames) * u128::from(SECOND) / u128::from(ns)) as u64;
    let mibs_tenths =
        (u128::from(bytes) * 10 * u128::from(SECOND) / u128::from(ns) / (1 << 20)) as u64;
    let mut l = LineBuf::new();
    l.push_str("KBENCH net-rx rx_frames=");
    l.push_dec(frames);
    l.push_str(" bytes=");
    l.push_dec(bytes);
    l.push_str(" ns=");
    l.push_dec(ns);
    l.push_str(" fps=");
    l.push_dec(fps);
    l.push_str(" mibs=");
    l.push_dec(mibs_tenths / 10);
    l.push_str(".");
    l.push_dec(mibs_tenths % 10);
    p.info(l.as_bytes());
    if frames == 0 {
        out.push_str("no frames counted");
        return false;
    }
    out.push_str("dir=rx frames=");
    out.push_dec(frames);
    out.push_str(" fps=");
    out.push_dec(fps);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Addrs = Addrs {
        guest: [10, 0, 0, 2],
        host: [10, 0, 0, 1],
    };

    #[test]
    fn addresses() {
        assert_eq!(parse_addrs(b"10.0.0.2/10.0.0.1"), Some(A));
        for bad in [
            &b"10.0.0.2"[..],
            b"10.0.0/10.0.0.1",
            b"10.0.0.256/10.0.0.1",
            b"10.0.0.2/1.2.3.4.5",
            b"a.b.c.d/10.0.0.1",
            b"",
        ] {
            assert_eq!(parse_addrs(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn checksums_verify_to_zero() {
        // RFC 1071's example.
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&d), !0xddf2);
        let mut f = [0u8; MAX_FRAME];
        let n = echo_request(&mut f, [2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], &A, 7);
        assert_eq!(n, 14 + 20 + 8 + PING_PAYLOAD);
        assert_eq!(checksum(&f[14..34]), 0);
        assert_eq!(checksum(&f[34..n]), 0);
    }

    /// Turns an echo request into the reply a host would send.
    fn reply(f: &mut [u8], n: usize) {
        let (d, s) = (
            [f[6], f[7], f[8], f[9], f[10], f[11]],
            [f[0], f[1], f[2], f[3], f[4], f[5]],
        );
        f[..6].copy_from_slice(&d);
        f[6..12].copy_from_slice(&s);
        let (src, dst) = ([f[26], f[27], f[28], f[29]], [f[30], f[31], f[32], f[33]]);
        f[26..30].copy_from_slice(&dst);
        f[30..34].copy_from_slice(&src);
        f[24] = 0;
        f[25] = 0;
        let c = checksum(&f[14..34]);
        put16(f, 24, c);
        f[34] = 0;
        put16(f, 36, 0);
        let c = checksum(&f[34..n]);
        put16(f, 36, c);
    }

    #[test]
    fn echo_replies_are_checked() {
        let (me, host) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let mut f = [0u8; MAX_FRAME];
        let n = echo_request(&mut f, me, host, &A, 3);
        reply(&mut f, n);
        assert!(is_echo_reply(&f[..n], &A));
        assert_eq!(check_echo_reply(&f[..n], me, host, &A, 3), None);
        assert_eq!(
            check_echo_reply(&f[..n], me, host, &A, 4),
            Some("wrong echo id or sequence")
        );
        let mut bad = f;
        bad[40] ^= 1;
        assert_eq!(
            check_echo_reply(&bad[..n], me, host, &A, 3),
            Some("bad ICMP checksum")
        );
        let mut bad = f;
        bad[22] ^= 1;
        assert_eq!(
            check_echo_reply(&bad[..n], me, host, &A, 3),
            Some("bad IPv4 header checksum")
        );
        assert_eq!(
            check_echo_reply(&f[..n], host, me, &A, 3),
            Some("wrong MAC addresses")
        );
    }

    #[test]
    fn arp_round_trip() {
        let me = [2, 0, 0, 0, 0, 1];
        let mut f = [0u8; MAX_FRAME];
        let n = arp_request(&mut f, me, &A);
        assert_eq!(n, 42);
        assert_eq!(arp_reply_mac(&f[..n], &A), None, "a request is no reply");
        // The host's reply: op 2, sender = host, target = us.
        let host = [2, 0, 0, 0, 0, 9];
        put16(&mut f, 20, 2);
        f[22..28].copy_from_slice(&host);
        f[28..32].copy_from_slice(&A.host);
        f[32..38].copy_from_slice(&me);
        f[38..42].copy_from_slice(&A.guest);
        assert_eq!(arp_reply_mac(&f[..n], &A), Some(host));
    }

    #[test]
    fn udp_frames() {
        let mut f = [0u8; MAX_FRAME];
        let n = udp(&mut f, [2; 6], [4; 6], &A, 5555, 1472);
        assert_eq!(n, 1514);
        assert_eq!(checksum(&f[14..34]), 0);
        assert_eq!(get16(&f, 34), 5555);
        assert_eq!(get16(&f, 38), 1480);
    }
}
