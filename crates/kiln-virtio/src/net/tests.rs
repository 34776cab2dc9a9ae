//! Unit tests of virtio-net with a socket-pair backend and a two-queue fake driver.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use kiln_ratelimit::BucketConfig;
use proptest::prelude::*;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::test_util::{mem, write_desc, CountingInterrupt, Mem, F_NEXT, F_WRITE, MEM_SIZE, QS};

/// One end of a `SOCK_SEQPACKET` pair: frame boundaries kept, like a tap.
struct PairBackend {
    fd: OwnedFd,
    offloads: bool,
    offload_flags: Option<u32>,
}

impl NetBackend for PairBackend {
    unsafe fn readv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller guarantees the iovecs.
        let n = unsafe { libc::readv(self.fd.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
    unsafe fn writev(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller guarantees the iovecs.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
    fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    fn supports_offloads(&self) -> bool {
        self.offloads
    }
    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.offload_flags = Some(flags);
        Ok(())
    }
}

fn pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: both fds are fresh and ours.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// The driver side of one split queue at `base` (descriptors), `base+0x1000` (avail),
/// `base+0x2000` (used).
struct Q {
    base: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl Q {
    fn new(base: u64) -> Self {
        Q {
            base,
            next_desc: 0,
            avail_idx: 0,
        }
    }
    fn queue(&self) -> Queue {
        let mut q = Queue::new(QS).unwrap();
        q.try_set_desc_table_address(GuestAddress(self.base))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.base + 0x1000))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.base + 0x2000))
            .unwrap();
        q.set_ready(true);
        q
    }
    fn add(&mut self, mem: &Mem, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let idx = self.next_desc;
            self.next_desc = (self.next_desc + 1) % QS;
            let last = i + 1 == bufs.len();
            let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            write_desc(mem, self.base, idx, addr, len, flags, self.next_desc);
        }
        let slot = u64::from(self.avail_idx % QS);
        mem.write_obj(head, GuestAddress(self.base + 0x1000 + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.base + 0x1002))
            .unwrap();
        head
    }
    fn used_idx(&self, mem: &Mem) -> u16 {
        mem.read_obj(GuestAddress(self.base + 0x2002)).unwrap()
    }
    fn used(&self, mem: &Mem, i: u16) -> (u32, u32) {
        let at = self.base + 0x2004 + 8 * u64::from(i % QS);
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}

const RXQ: u64 = 0;
const TXQ: u64 = 0x3000;
const BUF: u64 = 0x1_0000;

struct H {
    mem: Mem,
    rx: Q,
    tx: Q,
    net: Net<Mem, PairBackend>,
    peer: OwnedFd,
    irq: Arc<CountingInterrupt>,
}

fn harness_with(cfg: NetConfig, offloads: bool, acked: u64) -> H {
    let (a, b) = pair();
    let mut net = Net::new(
        PairBackend {
            fd: a,
            offloads,
            offload_flags: None,
        },
        cfg,
    )
    .unwrap();
    let m = mem();
    let (rx, tx) = (Q::new(RXQ), Q::new(TXQ));
    VirtioDevice::<Mem>::ack_features(&mut net, acked);
    let irq = CountingInterrupt::new();
    net.activate(m.clone(), vec![rx.queue(), tx.queue()], irq.clone())
        .unwrap();
    H {
        mem: m,
        rx,
        tx,
        net,
        peer: b,
        irq,
    }
}

fn harness(acked: u64) -> H {
    harness_with(NetConfig::default(), true, acked)
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

impl H {
    /// What the peer has received, one frame per entry.
    fn peer_frames(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let mut buf = vec![0u8; 70000];
            // SAFETY: buf is writable for its length.
            let n =
                unsafe { libc::read(self.peer.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                return out;
            }
            buf.truncate(n as usize);
            out.push(buf);
        }
    }
    fn peer_send(&self, data: &[u8]) {
        // SAFETY: data is readable for its length.
        let n = unsafe { libc::write(self.peer.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        assert_eq!(n, data.len() as isize);
    }
    /// Puts header+frame at BUF and queues it on TX as one readable descriptor.
    fn send(&mut self, hdr: NetHdr, payload: &[u8]) -> Vec<u8> {
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
        self.tx.add(&self.mem, &[(BUF, bytes.len() as u32, false)]);
        bytes
    }
    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

const BASE: u64 = VIRTIO_F_VERSION_1 | features::MRG_RXBUF;

#[test]
fn config_space_and_features() {
    let cfg = NetConfig {
        mac: [2, 1, 2, 3, 4, 5],
        mtu: 9000,
        ..NetConfig::default()
    };
    let h = harness_with(cfg.clone(), false, 0);
    let mut c = [0u8; 12];
    h.net.read_config(0, &mut c);
    assert_eq!(&c[..6], &[2, 1, 2, 3, 4, 5]);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), STATUS_LINK_UP);
    assert_eq!(u16::from_le_bytes([c[10], c[11]]), 9000);
    let f = VirtioDevice::<Mem>::device_features(&h.net);
    assert_ne!(f & features::MAC, 0);
    assert_ne!(f & features::MRG_RXBUF, 0);
    assert_eq!(
        f & (features::CSUM | features::GUEST_TSO4),
        0,
        "no offloads"
    );
    assert_eq!(VirtioDevice::<Mem>::device_type(&h.net), VIRTIO_ID_NET);
    let h = harness_with(cfg, true, 0);
    let f = VirtioDevice::<Mem>::device_features(&h.net);
    assert_ne!(f & features::CSUM, 0);
    assert_ne!(f & features::HOST_TSO6, 0);
    // Bad construction.
    let (a, _b) = pair();
    let be = PairBackend {
        fd: a,
        offloads: false,
        offload_flags: None,
    };
    let bad = NetConfig {
        mtu: 67,
        ..NetConfig::default()
    };
    assert!(matches!(Net::<Mem, _>::new(be, bad), Err(Error::Mtu(67))));
}

#[test]
fn activation_sets_the_offloads_the_driver_took() {
    let h = harness(BASE | features::GUEST_CSUM | features::GUEST_TSO4);
    assert_eq!(
        h.net.backend().offload_flags,
        Some(tap::offload::CSUM | tap::offload::TSO4)
    );
    let h = harness(BASE);
    assert_eq!(h.net.backend().offload_flags, Some(0));
    // TSO without GUEST_CSUM still gets checksum offload (TSO implies it on a tap).
    let h = harness(BASE | features::GUEST_TSO6);
    assert_eq!(
        h.net.backend().offload_flags,
        Some(tap::offload::CSUM | tap::offload::TSO6)
    );
}

#[test]
fn transmit_goes_to_the_backend_unchanged() {
    let mut h = harness(BASE);
    let sent = h.send(NetHdr::default(), &frame(100, 1));
    // A second frame split over three descriptors, the header cut in two.
    let f2 = frame(300, 9);
    let mut b2 = NetHdr::default().to_bytes().to_vec();
    b2.extend_from_slice(&f2);
    h.mem.write_slice(&b2, GuestAddress(BUF + 0x1000)).unwrap();
    h.tx.add(
        &h.mem,
        &[
            (BUF + 0x1000, 5, false),
            (BUF + 0x1005, 100, false),
            (BUF + 0x1069, (b2.len() - 105) as u32, false),
        ],
    );
    assert_eq!(h.net.process_queue(TX_QUEUE).unwrap(), QueueOutcome::Done);
    assert_eq!(h.peer_frames(), vec![sent, b2]);
    assert_eq!(h.tx.used_idx(&h.mem), 2);
    assert_eq!(h.tx.used(&h.mem, 0).1, 0);
    assert_eq!(h.irq.queue_count(), 1);
    let s = h.net.stats();
    assert_eq!((s.tx_frames, s.tx_dropped), (2, 0));
}

#[test]
fn bad_transmit_chains_are_dropped_and_counted() {
    let mut h = harness(BASE | features::CSUM);
    let ok = NetHdr::default().to_bytes();
    let w = |h: &H, at: u64, b: &[u8]| h.mem.write_slice(b, GuestAddress(at)).unwrap();
    w(&h, BUF, &ok);
    // Zero length; header only; header + 13 bytes (no Ethernet header).
    h.tx.add(&h.mem, &[(BUF, 0, false)]);
    h.tx.add(&h.mem, &[(BUF, 12, false)]);
    h.tx.add(&h.mem, &[(BUF, 12 + 13, false)]);
    // Over the MTU: 1500 + 14 + 4 + 1 bytes of frame.
    h.tx.add(&h.mem, &[(BUF, 12 + 1519, false)]);
    // A device-writable descriptor; a buffer past the end of memory.
    h.tx.add(&h.mem, &[(BUF, 100, true)]);
    h.tx.add(&h.mem, &[(MEM_SIZE - 50, 100, false)]);
    // Unknown flags; checksum offset past the frame; TSO not negotiated; UDP GSO.
    let bad = [
        NetHdr {
            flags: 0x80,
            ..NetHdr::default()
        },
        NetHdr {
            flags: HDR_F_NEEDS_CSUM,
            csum_start: 90,
            csum_offset: 10,
            ..NetHdr::default()
        },
        NetHdr {
            flags: HDR_F_NEEDS_CSUM,
            gso_type: gso::TCPV4,
            gso_size: 1000,
            ..NetHdr::default()
        },
        NetHdr {
            flags: HDR_F_NEEDS_CSUM,
            gso_type: gso::UDP,
            gso_size: 1000,
            ..NetHdr::default()
        },
    ];
    for (i, b) in bad.iter().enumerate() {
        let at = BUF + 0x1000 * (i as u64 + 1);
        w(&h, at, &b.to_bytes());
        h.tx.add(&h.mem, &[(at, 100, false)]);
    }
    assert_eq!(h.net.process_queue(TX_QUEUE).unwrap(), QueueOutcome::Done);
    assert_eq!(h.tx.used_idx(&h.mem), 10, "every chain is returned");
    assert!(h.peer_frames().is_empty());
    assert_eq!(h.net.stats().tx_dropped, 10);
    // Still working: a frame of exactly MTU + Ethernet + VLAN passes.
    let good = h.send(NetHdr::default(), &frame(1518, 3));
    h.net.process_queue(TX_QUEUE).unwrap();
    assert_eq!(h.peer_frames(), vec![good]);
}

#[test]
fn receive_without_mergeable_buffers() {
    let mut h = harness(VIRTIO_F_VERSION_1);
    let mut f = NetHdr::default().to_bytes().to_vec();
    f.extend_from_slice(&frame(600, 5));
    h.peer_send(&f);
    // No buffers: nothing happens, the frame waits in the backend.
    assert_eq!(
        h.net.process_backend(BACKEND_TOKEN).unwrap(),
        QueueOutcome::Done
    );
    assert_eq!(h.rx.used_idx(&h.mem), 0);
    // The driver posts a buffer and kicks: the frame arrives.
    h.rx.add(&h.mem, &[(BUF, 2048, true)]);
    assert_eq!(h.net.process_queue(RX_QUEUE).unwrap(), QueueOutcome::Done);
    assert_eq!(h.rx.used_idx(&h.mem), 1);
    assert_eq!(h.rx.used(&h.mem, 0), (0, f.len() as u32));
    let got = h.read(BUF, f.len());
    assert_eq!(
        NetHdr::from_bytes(got[..12].try_into().unwrap()).num_buffers,
        1
    );
    assert_eq!(got[12..], f[12..]);
    assert_eq!(h.irq.queue_count(), 1);
    assert_eq!(h.net.stats().rx_frames, 1);
}

#[test]
fn mergeable_receive_spans_chains_and_gives_back_the_rest() {
    let mut h = harness(BASE);
    // Room for the largest frame (12 + 1518) in 4 × 512 bytes.
    for i in 0..4 {
        h.rx.add(&h.mem, &[(BUF + 0x1000 * i, 512, true)]);
    }
    let mut f = NetHdr::default().to_bytes().to_vec();
    f.extend_from_slice(&frame(800, 2));
    h.peer_send(&f);
    assert_eq!(
        h.net.process_backend(BACKEND_TOKEN).unwrap(),
        QueueOutcome::Done
    );
    // 812 bytes: two chains.
    assert_eq!(h.rx.used_idx(&h.mem), 2);
    assert_eq!(h.rx.used(&h.mem, 0), (0, 512));
    assert_eq!(h.rx.used(&h.mem, 1), (1, 300));
    let got = [h.read(BUF, 512), h.read(BUF + 0x1000, 300)].concat();
    assert_eq!(
        NetHdr::from_bytes(got[..12].try_into().unwrap()).num_buffers,
        2
    );
    assert_eq!(got[12..], f[12..]);
    // Not enough room left for a full-size frame (2 × 512 < 1530): the next frame waits.
    let mut f2 = NetHdr::default().to_bytes().to_vec();
    f2.extend_from_slice(&frame(60, 4));
    h.peer_send(&f2);
    h.net.process_backend(BACKEND_TOKEN).unwrap();
    assert_eq!(h.rx.used_idx(&h.mem), 2);
    // More buffers: it lands in the chains given back before (head 2).
    for i in 4..6 {
        h.rx.add(&h.mem, &[(BUF + 0x1000 * i, 512, true)]);
    }
    h.net.process_queue(RX_QUEUE).unwrap();
    assert_eq!(h.rx.used_idx(&h.mem), 3);
    assert_eq!(h.rx.used(&h.mem, 2), (2, 72));
    assert_eq!(h.read(BUF + 0x2000 + 12, 60), f2[12..]);
}

#[test]
fn event_idx_asks_for_a_kick_past_the_buffers_it_left() {
    // Two 512-byte buffers are too little for a full frame: the device leaves them and, with
    // EVENT_IDX, must set avail_event to the available index (not its own position), or the
    // driver's next buffer would not notify.
    let (a, b) = pair();
    let mut net = Net::new(
        PairBackend {
            fd: a,
            offloads: false,
            offload_flags: None,
        },
        NetConfig::default(),
    )
    .unwrap();
    let m = mem();
    let (mut rx, tx) = (Q::new(RXQ), Q::new(TXQ));
    VirtioDevice::<Mem>::ack_features(&mut net, BASE | VIRTIO_RING_F_EVENT_IDX);
    let mut rq = rx.queue();
    rq.set_event_idx(true);
    let mut tq = tx.queue();
    tq.set_event_idx(true);
    net.activate(m.clone(), vec![rq, tq], CountingInterrupt::new())
        .unwrap();
    rx.add(&m, &[(BUF, 512, true)]);
    rx.add(&m, &[(BUF + 0x1000, 512, true)]);
    let mut f = NetHdr::default().to_bytes().to_vec();
    f.extend_from_slice(&frame(100, 1));
    // SAFETY: f is readable for its length.
    let n = unsafe { libc::write(b.as_raw_fd(), f.as_ptr().cast(), f.len()) };
    assert_eq!(n, f.len() as isize);
    assert_eq!(
        net.process_backend(BACKEND_TOKEN).unwrap(),
        QueueOutcome::Done
    );
    assert_eq!(rx.used_idx(&m), 0);
    let avail_event: u16 = m
        .read_obj(GuestAddress(RXQ + 0x2000 + 4 + 8 * u64::from(QS)))
        .unwrap();
    assert_eq!(avail_event, 2);
    // A third buffer: now there is room, the frame arrives in the first chain.
    rx.add(&m, &[(BUF + 0x2000, 1024, true)]);
    net.process_queue(RX_QUEUE).unwrap();
    assert_eq!(rx.used_idx(&m), 1);
    assert_eq!(rx.used(&m, 0), (0, 112));
}

#[test]
fn returned_bad_receive_chains_raise_an_interrupt_without_any_frame() {
    let mut h = harness(BASE);
    h.rx.add(&h.mem, &[(BUF, 2048, false)]);
    assert_eq!(h.net.process_queue(RX_QUEUE).unwrap(), QueueOutcome::Done);
    assert_eq!(h.rx.used(&h.mem, 0), (0, 0));
    assert_eq!(h.irq.queue_count(), 1);
}

#[test]
fn malformed_receive_chains_come_back_empty() {
    let mut h = harness(VIRTIO_F_VERSION_1);
    h.rx.add(&h.mem, &[(BUF, 2048, false)]);
    h.rx.add(&h.mem, &[(MEM_SIZE - 16, 2048, true)]);
    h.rx.add(&h.mem, &[(BUF, 8, true)]);
    h.rx.add(&h.mem, &[(BUF + 0x1000, 2048, true)]);
    let mut f = NetHdr::default().to_bytes().to_vec();
    f.extend_from_slice(&frame(100, 1));
    h.peer_send(&f);
    h.net.process_backend(BACKEND_TOKEN).unwrap();
    assert_eq!(h.rx.used_idx(&h.mem), 4);
    for i in 0..3 {
        assert_eq!(h.rx.used(&h.mem, i).1, 0);
    }
    assert_eq!(h.rx.used(&h.mem, 3), (3, f.len() as u32));
    assert_eq!(h.net.stats().rx_bad_chains, 3);
}

/// A malformed chain between good ones, with mergeable buffers: every chain comes back
/// exactly once, in ring order, and the good ones still carry frames.
#[test]
fn a_malformed_chain_between_good_ones_is_returned_once() {
    let mut h = harness(BASE);
    // Each good buffer is smaller than the largest frame, so a frame spans two of them.
    h.rx.add(&h.mem, &[(BUF, 1024, true)]);
    h.rx.add(&h.mem, &[(BUF + 0x1000, 1024, false)]);
    h.rx.add(&h.mem, &[(BUF + 0x2000, 1024, true)]);
    h.rx.add(&h.mem, &[(BUF + 0x3000, 1024, true)]);
    // Nothing to receive yet: nothing is used.
    h.net.process_backend(BACKEND_TOKEN).unwrap();
    h.net.process_queue(RX_QUEUE).unwrap();
    let mut f = NetHdr::default().to_bytes().to_vec();
    f.extend_from_slice(&frame(100, 1));
    h.peer_send(&f);
    h.net.process_backend(BACKEND_TOKEN).unwrap();
    let used = h.rx.used_idx(&h.mem);
    let heads: Vec<u32> = (0..used).map(|i| h.rx.used(&h.mem, i).0).collect();
    let mut sorted = heads.clone();
    sorted.dedup();
    assert_eq!(sorted, heads, "a chain came back twice: {heads:?}");
    assert_eq!(h.rx.used(&h.mem, 0), (0, f.len() as u32), "{heads:?}");
    assert_eq!(h.rx.used(&h.mem, 1), (1, 0), "{heads:?}");
    assert_eq!(h.net.stats().rx_bad_chains, 1);
}

/// Zero-length receive buffers add nothing (and no bookkeeping per descriptor).
#[test]
fn zero_length_receive_buffers_are_skipped() {
    let mut h = harness(VIRTIO_F_VERSION_1);
    h.rx.add(
        &h.mem,
        &[(BUF, 0, true), (BUF + 0x1000, 2048, true), (BUF, 0, true)],
    );
    let mut f = NetHdr::default().to_bytes().to_vec();
    f.extend_from_slice(&frame(100, 1));
    h.peer_send(&f);
    h.net.process_backend(BACKEND_TOKEN).unwrap();
    assert_eq!(h.rx.used(&h.mem, 0), (0, f.len() as u32));
    assert_eq!(h.net.stats().rx_bad_chains, 0);
}

#[test]
fn receive_drains_the_backend_until_eagain() {
    let mut h = harness(BASE);
    for i in 0..8 {
        h.rx.add(&h.mem, &[(BUF + 0x1000 * i, 2048, true)]);
    }
    for i in 0..5u8 {
        let mut f = NetHdr::default().to_bytes().to_vec();
        f.extend_from_slice(&frame(64, i));
        h.peer_send(&f);
    }
    assert_eq!(
        h.net.process_backend(BACKEND_TOKEN).unwrap(),
        QueueOutcome::Done
    );
    assert_eq!(h.rx.used_idx(&h.mem), 5);
    assert_eq!(h.irq.queue_count(), 1, "one interrupt for the batch");
}

fn bucket(size: u64, ms: u64) -> Option<BucketConfig> {
    Some(BucketConfig {
        size,
        one_time_burst: 0,
        refill_time: Duration::from_millis(ms),
    })
}

#[test]
fn rate_limiters_throttle_each_direction() {
    let cfg = NetConfig {
        tx_rate_limiter: Some(RateLimiter::new(None, bucket(1, 30)).unwrap()),
        rx_rate_limiter: Some(RateLimiter::new(None, bucket(1, 30)).unwrap()),
        ..NetConfig::default()
    };
    let mut h = harness_with(cfg, false, BASE);
    h.send(NetHdr::default(), &frame(60, 1));
    h.send(NetHdr::default(), &frame(60, 2));
    let QueueOutcome::Throttled(wait) = h.net.process_queue(TX_QUEUE).unwrap() else {
        panic!("TX not throttled");
    };
    assert!(wait <= Duration::from_millis(30));
    assert_eq!(h.peer_frames().len(), 1);
    std::thread::sleep(wait);
    assert_eq!(h.net.process_queue(TX_QUEUE).unwrap(), QueueOutcome::Done);
    assert_eq!(h.peer_frames().len(), 1);

    for i in 0..4 {
        h.rx.add(&h.mem, &[(BUF + 0x1000 * i, 2048, true)]);
    }
    let mut f = NetHdr::default().to_bytes().to_vec();
    f.extend_from_slice(&frame(60, 1));
    h.peer_send(&f);
    h.peer_send(&f);
    let QueueOutcome::Throttled(wait) = h.net.process_backend(BACKEND_TOKEN).unwrap() else {
        panic!("RX not throttled");
    };
    assert_eq!(h.rx.used_idx(&h.mem), 1);
    std::thread::sleep(wait);
    // The second frame comes in, and the device, out of tokens again, waits before looking
    // at the backend once more.
    assert!(matches!(
        h.net.process_backend(BACKEND_TOKEN).unwrap(),
        QueueOutcome::Throttled(_)
    ));
    assert_eq!(h.rx.used_idx(&h.mem), 2);
}

#[test]
fn errors_and_lifecycle() {
    let mut h = harness(BASE);
    assert!(matches!(
        h.net.process_queue(2),
        Err(Error::QueueIndex { index: 2, .. })
    ));
    VirtioDevice::<Mem>::reset(&mut h.net);
    assert!(matches!(
        h.net.process_queue(TX_QUEUE),
        Err(Error::NotActivated { .. })
    ));
    // Backend readiness before activation is not an error: frames wait.
    assert_eq!(
        h.net.process_backend(BACKEND_TOKEN).unwrap(),
        QueueOutcome::Done
    );
    let irq = CountingInterrupt::new();
    assert!(matches!(
        h.net.activate(h.mem.clone(), vec![h.rx.queue()], irq),
        Err(Error::QueueCount { got: 1, .. })
    ));
    assert_eq!(
        VirtioDevice::<Mem>::backend_fds(&h.net),
        vec![(BACKEND_TOKEN, h.net.backend().raw_fd())]
    );
}

#[test]
fn header_checks() {
    let acked = features::CSUM | features::HOST_TSO4;
    let tso = NetHdr {
        flags: HDR_F_NEEDS_CSUM,
        gso_type: gso::TCPV4,
        gso_size: 1448,
        hdr_len: 54,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    assert_eq!(
        parse_tx_header(&tso.to_bytes(), 60000, acked, 1500),
        Ok(tso)
    );
    assert_eq!(
        parse_tx_header(&tso.to_bytes(), MAX_GSO_FRAME + 1, acked, 1500),
        Err(TxDrop::TooLong)
    );
    let ecn = NetHdr {
        gso_type: gso::TCPV4 | gso::ECN,
        ..tso
    };
    assert_eq!(
        parse_tx_header(&ecn.to_bytes(), 6000, acked, 1500),
        Err(TxDrop::BadGso)
    );
    let no_csum = NetHdr { flags: 0, ..tso };
    assert_eq!(
        parse_tx_header(&no_csum.to_bytes(), 6000, acked, 1500),
        Err(TxDrop::BadGso)
    );
}

proptest! {
    /// Whatever the header and length, the check answers; what passes fits the limits.
    #[test]
    fn any_header_is_checked_without_panic(
        hdr in proptest::array::uniform12(any::<u8>()),
        len in 0usize..70000,
        acked in any::<u64>(),
        mtu in MIN_MTU..=MAX_MTU,
    ) {
        if let Ok(h) = parse_tx_header(&hdr, len, acked, mtu) {
            prop_assert!(len >= ETH_HLEN);
            prop_assert!(len <= MAX_GSO_FRAME);
            if h.gso_type == gso::NONE {
                prop_assert!(len <= usize::from(mtu) + ETH_HLEN + VLAN_HLEN);
            } else {
                prop_assert!(acked & (features::HOST_TSO4 | features::HOST_TSO6) != 0);
                prop_assert!(h.gso_size > 0);
            }
            if h.flags & HDR_F_NEEDS_CSUM != 0 {
                prop_assert!(acked & features::CSUM != 0);
                prop_assert!(usize::from(h.csum_start) + usize::from(h.csum_offset) + 2 <= len);
            }
            prop_assert_eq!(NetHdr::from_bytes(&hdr).to_bytes(), hdr);
        }
    }

    /// Arbitrary TX chains (any lengths, addresses, directions) never panic the device or
    /// leave a chain unreturned.
    #[test]
    fn any_tx_chain_is_returned(
        descs in proptest::collection::vec((0u64..MEM_SIZE + 0x1000, 0u32..4000, any::<bool>()), 1..5),
        hdr in proptest::array::uniform12(any::<u8>()),
    ) {
        let mut h = harness(BASE | features::CSUM | features::HOST_TSO4);
        h.mem.write_slice(&hdr, GuestAddress(BUF)).unwrap();
        let mut bufs: Vec<(u64, u32, bool)> = descs;
        bufs[0].0 = BUF;
        h.tx.add(&h.mem, &bufs);
        h.net.process_queue(TX_QUEUE).unwrap();
        prop_assert_eq!(h.tx.used_idx(&h.mem), 1);
        let s = h.net.stats();
        prop_assert_eq!(s.tx_frames + s.tx_dropped + s.tx_errors, 1);
    }
}
