//! The device against real Unix sockets in a temporary directory, driven through its three
//! queues by a minimal driver.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use vm_memory::GuestAddress;

use super::*;
use crate::test_util::{mem, write_desc, CountingInterrupt, Mem, F_NEXT, F_WRITE};

const QS: u16 = 16;
const CID: u64 = 42;
/// Where RX buffers are (4 KiB + header each, one per descriptor index).
const RXDATA: u64 = 0x1_0000;
const RXBUF: u32 = 0x2000;
/// Where TX packets are built (one slot per descriptor index).
const TXDATA: u64 = 0x4_0000;
const TXSLOT: u64 = 0x1_2000;

/// The driver side of one queue with its rings at `base`.
struct QDrv {
    base: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl QDrv {
    fn new(i: u64) -> QDrv {
        QDrv {
            base: 0x3000 * i,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
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
        mem.write_obj(self.avail_idx, GuestAddress(self.base + 0x1000 + 2))
            .unwrap();
        head
    }
    fn pop_used(&mut self, mem: &Mem) -> Option<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.base + 0x2000 + 2)).unwrap();
        if idx == self.used_seen {
            return None;
        }
        let e = self.base + 0x2000 + 4 + 8 * u64::from(self.used_seen % QS);
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((
            mem.read_obj(GuestAddress(e)).unwrap(),
            mem.read_obj(GuestAddress(e + 4)).unwrap(),
        ))
    }
}

struct H {
    mem: Mem,
    dev: Vsock<Mem>,
    rx: QDrv,
    tx: QDrv,
    irq: Arc<CountingInterrupt>,
    dir: PathBuf,
    uds: PathBuf,
    /// RX buffers posted and not yet used.
    rx_out: usize,
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-vsock-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 1 << 20,
        fwd_cnt: 0,
    }
}

impl H {
    fn new(name: &str) -> H {
        let dir = tmpdir(name);
        let uds = dir.join("v.sock");
        let mem = mem();
        let mut dev = Vsock::new(VsockConfig {
            guest_cid: CID,
            uds_path: uds.clone(),
            queue_size: QS,
        })
        .unwrap();
        let (rx, tx, ev) = (QDrv::new(0), QDrv::new(1), QDrv::new(2));
        let irq = CountingInterrupt::new();
        dev.activate(
            mem.clone(),
            vec![rx.queue(), tx.queue(), ev.queue()],
            irq.clone(),
        )
        .unwrap();
        H {
            mem,
            dev,
            rx,
            tx,
            irq,
            dir,
            uds,
            rx_out: 0,
        }
    }

    fn listen(&self, port: u32) -> UnixListener {
        UnixListener::bind(port_path(&self.uds, port)).unwrap()
    }

    /// Posts RX buffers until the ring holds `n`.
    fn post_rx(&mut self, n: usize) {
        while self.rx_out < n {
            let i = u64::from(self.rx.next_desc);
            self.rx
                .add(&self.mem, &[(RXDATA + i * u64::from(RXBUF), RXBUF, true)]);
            self.rx_out += 1;
        }
        self.dev.process_queue(RXQ).unwrap();
    }

    /// Sends one packet split over two readable descriptors (header, payload).
    fn send_raw(&mut self, h: &Header, data: &[u8]) {
        let i = u64::from(self.tx.next_desc);
        let a = TXDATA + (i % 8) * TXSLOT;
        self.mem.write_slice(&h.encode(), GuestAddress(a)).unwrap();
        if data.is_empty() {
            self.tx.add(&self.mem, &[(a, HDR_LEN as u32, false)]);
        } else {
            self.mem.write_slice(data, GuestAddress(a + 0x100)).unwrap();
            self.tx.add(
                &self.mem,
                &[
                    (a, HDR_LEN as u32, false),
                    (a + 0x100, data.len() as u32, false),
                ],
            );
        }
        self.dev.process_queue(TXQ).unwrap();
        while self.tx.pop_used(&self.mem).is_some() {}
    }

    fn send(&mut self, mut h: Header, data: &[u8]) {
        h.len = data.len() as u32;
        self.send_raw(&h, data);
    }

    /// Takes the packets the device put in RX buffers.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some((id, len)) = self.rx.pop_used(&self.mem) {
            self.rx_out -= 1;
            let a = RXDATA + u64::from(id) * u64::from(RXBUF);
            let mut hb = [0u8; HDR_LEN];
            self.mem.read_slice(&mut hb, GuestAddress(a)).unwrap();
            let h = Header::parse(&hb);
            assert_eq!(len as usize, HDR_LEN + h.len as usize, "used len");
            let mut d = vec![0u8; h.len as usize];
            self.mem
                .read_slice(&mut d, GuestAddress(a + HDR_LEN as u64))
                .unwrap();
            out.push((h, d));
        }
        out
    }

    fn backend(&mut self) {
        self.dev.process_backend(BACKEND_TOKEN).unwrap();
    }

    /// Guest connects from `gport` to host `port`; returns the host's end.
    fn connect(&mut self, l: &UnixListener, gport: u32, port: u32) -> UnixStream {
        self.post_rx(8);
        self.send(hdr(OP_REQUEST, gport, port), &[]);
        let p = self.recv();
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0.op, OP_RESPONSE);
        assert_eq!((p[0].0.src_port, p[0].0.dst_port), (port, gport));
        assert_eq!((p[0].0.src_cid, p[0].0.dst_cid), (HOST_CID, CID));
        assert_eq!(p[0].0.buf_alloc, CONN_BUF);
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }
}

impl Drop for H {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn identity_config_and_listener() {
    let h = H::new("identity");
    assert_eq!(h.dev.device_type(), VIRTIO_ID_VSOCK);
    assert_eq!(h.dev.queue_max_sizes(), &[QS; 3]);
    let mut b = [0u8; 8];
    h.dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), CID);
    let mut b = [0xffu8; 4];
    h.dev.read_config(4, &mut b);
    assert_eq!(b, [0; 4]);
    assert!(h.uds.exists());
    let uds = h.uds.clone();
    // A second device can't take the same path.
    let e = Vsock::<Mem>::new(VsockConfig {
        guest_cid: CID,
        uds_path: uds.clone(),
        queue_size: QS,
    })
    .unwrap_err();
    assert!(matches!(e, Error::VsockBackend { .. }), "{e}");
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
        let e = Vsock::<Mem>::new(VsockConfig {
            guest_cid: cid,
            uds_path: h.dir.join("x"),
            queue_size: QS,
        })
        .unwrap_err();
        assert!(matches!(e, Error::VsockCid(c) if c == cid));
    }
    drop(h);
}

#[test]
fn guest_connect_exchanges_data_both_ways() {
    let mut h = H::new("connect");
    let l = h.listen(1234);
    let mut s = h.connect(&l, 5000, 1234);
    h.send(hdr(OP_RW, 5000, 1234), b"hello host");
    let mut b = [0u8; 10];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello host");
    s.write_all(b"hello guest").unwrap();
    h.backend();
    let p = h.recv();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].0.op, OP_RW);
    assert_eq!(p[0].1, b"hello guest");
    assert!(h.irq.queue_count() > 0);
    // A big write from the host arrives whole and in order, in buffer-sized pieces.
    let big: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    s.write_all(&big).unwrap();
    let mut got = Vec::new();
    for _ in 0..100 {
        h.post_rx(8);
        h.backend();
        for (ph, d) in h.recv() {
            assert_eq!(ph.op, OP_RW);
            assert!(d.len() <= (RXBUF as usize - HDR_LEN));
            got.extend(d);
        }
        if got.len() == big.len() {
            break;
        }
    }
    assert!(got == big, "host-to-guest stream differs");
}

#[test]
fn unknown_port_and_unknown_connection_get_rst() {
    let mut h = H::new("rst");
    h.post_rx(8);
    h.send(hdr(OP_REQUEST, 5000, 999), &[]);
    h.send(hdr(OP_RW, 5001, 999), b"data");
    h.send(hdr(OP_SHUTDOWN, 5002, 999), &[]);
    // An RST for nothing is not answered.
    h.send(hdr(OP_RST, 5003, 999), &[]);
    let p = h.recv();
    let ports: Vec<(u16, u32)> = p.iter().map(|(x, _)| (x.op, x.dst_port)).collect();
    assert_eq!(ports, [(OP_RST, 5000), (OP_RST, 5001), (OP_RST, 5002)]);
    assert_eq!(h.dev.connections(), 0);
}

#[test]
fn host_initiated_connection() {
    let mut h = H::new("hostinit");
    h.post_rx(8);
    let mut s = UnixStream::connect(&h.uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The line arrives in two pieces, with stream data right behind it.
    s.write_all(b"CONN").unwrap();
    h.backend();
    assert!(h.recv().is_empty());
    s.write_all(b"ECT 7000\nearly bytes").unwrap();
    h.backend();
    let p = h.recv();
    assert_eq!(p.len(), 1);
    let req = p[0].0;
    assert_eq!((req.op, req.dst_port, req.dst_cid), (OP_REQUEST, 7000, CID));
    assert!(req.src_port >= FIRST_LOCAL_PORT);
    h.send(hdr(OP_RESPONSE, 7000, req.src_port), &[]);
    let mut line = vec![0u8; format!("OK {}\n", req.src_port).len()];
    s.read_exact(&mut line).unwrap();
    assert_eq!(line, format!("OK {}\n", req.src_port).as_bytes());
    let p = h.recv();
    assert_eq!(p.len(), 1);
    assert_eq!((p[0].0.op, p[0].1.as_slice()), (OP_RW, &b"early bytes"[..]));
    h.send(hdr(OP_RW, 7000, req.src_port), b"from guest");
    let mut b = [0u8; 10];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"from guest");
    // A guest that refuses: the host's socket closes.
    let mut s2 = UnixStream::connect(&h.uds).unwrap();
    s2.write_all(b"CONNECT 7001\n").unwrap();
    h.backend();
    let p = h.recv();
    assert_eq!(p[0].0.op, OP_REQUEST);
    h.send(hdr(OP_RST, 7001, p[0].0.src_port), &[]);
    s2.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(s2.read(&mut b).unwrap(), 0);
    // Garbage instead of CONNECT: closed, nothing reaches the guest.
    let mut s3 = UnixStream::connect(&h.uds).unwrap();
    s3.write_all(b"HELLO 1\n").unwrap();
    h.backend();
    s3.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(!matches!(s3.read(&mut b), Ok(n) if n > 0));
    let mut s4 = UnixStream::connect(&h.uds).unwrap();
    s4.write_all(&[b'9'; 40]).unwrap();
    h.backend();
    s4.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Closed with our bytes unread: EOF or ECONNRESET.
    assert!(!matches!(s4.read(&mut b), Ok(n) if n > 0));
    assert!(h.recv().is_empty());
    assert_eq!(h.dev.connections(), 1);
}

#[test]
fn credit_limits_what_the_guest_gets() {
    let mut h = H::new("credit");
    let l = h.listen(1);
    h.post_rx(8);
    let mut req = hdr(OP_REQUEST, 10, 1);
    req.buf_alloc = 100;
    h.send(req, &[]);
    assert_eq!(h.recv()[0].0.op, OP_RESPONSE);
    let (mut s, _) = l.accept().unwrap();
    s.write_all(&[7u8; 300]).unwrap();
    h.backend();
    let p = h.recv();
    // 100 bytes of data, then a request for credit; the rest waits in the socket.
    assert_eq!(p.len(), 2, "{p:?}");
    assert_eq!((p[0].0.op, p[0].1.len()), (OP_RW, 100));
    assert_eq!(p[1].0.op, OP_CREDIT_REQUEST);
    h.backend();
    assert!(h.recv().is_empty());
    let mut upd = hdr(OP_CREDIT_UPDATE, 10, 1);
    upd.buf_alloc = 100;
    upd.fwd_cnt = 60;
    h.send(upd, &[]);
    let p = h.recv();
    assert_eq!((p[0].0.op, p[0].1.len()), (OP_RW, 60));
    // CREDIT_REQUEST is answered with our counters.
    h.send(hdr(OP_CREDIT_REQUEST, 10, 1), &[]);
    let p = h.recv();
    let last = p.last().unwrap().0;
    assert_eq!(
        last.op, OP_RW,
        "the rest flows now that buf_alloc is 1 MiB: {p:?}"
    );
    assert_eq!(p.iter().map(|x| x.1.len()).sum::<usize>(), 140);
}

#[test]
fn credit_abuse_resets_the_connection() {
    let mut h = H::new("abuse");
    let l = h.listen(1);
    let s = h.connect(&l, 10, 1);
    // The host doesn't read: CONN_BUF fits (socket buffer plus ours), one byte more doesn't.
    s.set_nonblocking(true).unwrap();
    let chunk = vec![1u8; MAX_PAYLOAD];
    let mut sent = 0usize;
    // Fill the host socket's buffer first, so the next bytes must wait in ours.
    while h.dev.b.slab.iter().flatten().all(|c| c.pending.is_empty()) {
        h.send(hdr(OP_RW, 10, 1), &chunk);
        sent += chunk.len();
        assert!(sent < 64 << 20);
    }
    let pending = h.dev.b.slab.iter().flatten().next().unwrap().pending.len();
    let room = CONN_BUF as usize - pending;
    let mut left = room;
    while left > 0 {
        let n = left.min(MAX_PAYLOAD);
        h.send(hdr(OP_RW, 10, 1), &chunk[..n]);
        left -= n;
    }
    assert_eq!(h.dev.stats().credit_abuse, 0);
    assert_eq!(h.dev.connections(), 1);
    h.post_rx(8);
    h.recv();
    h.send(hdr(OP_RW, 10, 1), b"x");
    assert_eq!(h.dev.stats().credit_abuse, 1);
    assert_eq!(h.dev.connections(), 0);
    let p = h.recv();
    assert_eq!(p.last().unwrap().0.op, OP_RST);
}

#[test]
fn half_close_both_ways() {
    let mut h = H::new("halfclose");
    let l = h.listen(1);
    let mut s = h.connect(&l, 10, 1);
    h.send(hdr(OP_RW, 10, 1), b"last words");
    let mut sd = hdr(OP_SHUTDOWN, 10, 1);
    sd.flags = SHUTDOWN_SEND;
    h.send(sd, &[]);
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last words", "guest SHUTDOWN(SEND) = EOF on the host");
    // The other direction still works.
    s.write_all(b"reply").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    h.backend();
    let p = h.recv();
    assert_eq!((p[0].0.op, p[0].1.as_slice()), (OP_RW, &b"reply"[..]));
    assert_eq!((p[1].0.op, p[1].0.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    sd.flags = SHUTDOWN_BOTH;
    h.send(sd, &[]);
    let p = h.recv();
    assert_eq!(p.last().unwrap().0.op, OP_RST);
    assert_eq!(h.dev.connections(), 0);
}

#[test]
fn no_rx_buffers_leaves_data_in_the_socket() {
    let mut h = H::new("backpressure");
    let l = h.listen(1);
    let mut s = h.connect(&l, 10, 1);
    // Take every RX buffer away.
    while h.rx_out > 0 {
        s.write_all(b"x").unwrap();
        h.backend();
        h.recv();
        if h.rx_out == 0 {
            break;
        }
        h.post_rx(0);
    }
    let data = vec![5u8; 50_000];
    s.write_all(&data).unwrap();
    h.backend();
    h.backend();
    assert!(h.recv().is_empty());
    // Posting buffers is enough: process_queue(RX) serves the waiting connection.
    let mut got = 0;
    for _ in 0..20 {
        h.post_rx(8);
        got += h.recv().iter().map(|p| p.1.len()).sum::<usize>();
        if got >= data.len() {
            break;
        }
    }
    assert_eq!(got, data.len());
}

#[test]
fn hostile_packets_are_dropped_or_reset_and_the_device_goes_on() {
    let mut h = H::new("hostile");
    let l = h.listen(1);
    let mut s = h.connect(&l, 10, 1);
    h.post_rx(8);
    // Shorter than a header.
    h.tx.add(&h.mem, &[(TXDATA, 20, false)]);
    h.dev.process_queue(TXQ).unwrap();
    assert_eq!(h.dev.stats().malformed, 1);
    // Wrong source CID, wrong destination CID: dropped.
    let mut bad = hdr(OP_REQUEST, 11, 1);
    bad.src_cid = 3;
    h.send(bad, &[]);
    bad.src_cid = CID;
    bad.dst_cid = 1;
    h.send(bad, &[]);
    assert_eq!(h.dev.stats().wrong_cid, 2);
    // Unknown type and unknown op: RST, and nothing connects.
    let mut t = hdr(OP_REQUEST, 12, 1);
    t.type_ = 2;
    h.send(t, &[]);
    h.send(hdr(99, 13, 1), &[]);
    // Header from a device-writable buffer only: too short.
    h.tx.add(&h.mem, &[(TXDATA, 64, true)]);
    h.dev.process_queue(TXQ).unwrap();
    // A descriptor outside guest memory.
    h.tx.add(&h.mem, &[(crate::test_util::MEM_SIZE - 8, 64, false)]);
    h.dev.process_queue(TXQ).unwrap();
    assert_eq!(h.dev.stats().malformed, 3);
    let p = h.recv();
    let rsts: Vec<u32> = p
        .iter()
        .filter(|x| x.0.op == OP_RST)
        .map(|x| x.0.dst_port)
        .collect();
    assert_eq!(rsts, [12, 13]);
    // The good connection is untouched.
    h.send(hdr(OP_RW, 10, 1), b"still here");
    let mut b = [0u8; 10];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"still here");
    // len beyond the descriptors on a live connection: the stream would have a hole, reset.
    let mut liar = hdr(OP_RW, 10, 1);
    liar.len = 1000;
    h.send_raw(&liar, b"short");
    assert_eq!(h.dev.stats().malformed, 4);
    assert_eq!(h.dev.connections(), 0);
    assert_eq!(h.recv().last().unwrap().0.op, OP_RST);
    assert_eq!(s.read(&mut b).unwrap(), 0);
    // len beyond MAX_PAYLOAD.
    liar.len = u32::MAX;
    h.send_raw(&liar, b"x");
    assert_eq!(h.dev.stats().malformed, 5);
    // RX buffers too small for a header are used empty; the next one is used.
    let l2 = h.listen(2);
    let _s2 = h.connect(&l2, 20, 2);
    assert_eq!(h.dev.connections(), 1);
}

#[test]
fn many_connections_and_the_cap() {
    let mut h = H::new("many");
    let l = h.listen(1);
    l.set_nonblocking(true).unwrap();
    let mut hosts = Vec::new();
    for i in 0..200u32 {
        h.post_rx(8);
        h.send(hdr(OP_REQUEST, 1000 + i, 1), &[]);
        let p = h.recv();
        assert_eq!(p[0].0.op, OP_RESPONSE, "connection {i}");
        hosts.push(l.accept().unwrap().0);
    }
    assert_eq!(h.dev.connections(), 200);
    for (i, s) in hosts.iter_mut().enumerate() {
        s.write_all(&(i as u32).to_le_bytes()).unwrap();
    }
    let mut seen = [false; 200];
    for _ in 0..100 {
        h.post_rx(16);
        h.backend();
        for (ph, d) in h.recv() {
            let i = (ph.dst_port - 1000) as usize;
            assert_eq!(d, (i as u32).to_le_bytes());
            seen[i] = true;
        }
        if seen.iter().all(|&x| x) {
            break;
        }
    }
    assert!(seen.iter().all(|&x| x));
    // Fill up to the cap with host-side hellos, which count too.
    let mut hello = Vec::new();
    for _ in 200..MAX_CONNS {
        hello.push(UnixStream::connect(&h.uds).unwrap());
    }
    h.backend();
    assert_eq!(h.dev.connections(), MAX_CONNS);
    h.post_rx(8);
    h.send(hdr(OP_REQUEST, 9999, 1), &[]);
    assert_eq!(h.recv()[0].0.op, OP_RST);
    // A reset frees every connection.
    VirtioDevice::<Mem>::reset(&mut h.dev);
    assert_eq!(h.dev.connections(), 0);
}

#[test]
fn tiny_rx_buffers_neither_spin_nor_lose_packets() {
    let mut h = H::new("tiny");
    let l = h.listen(1);
    // A buffer too small for a header is returned empty; the RESPONSE takes the next one.
    h.rx.add(&h.mem, &[(RXDATA, 20, true)]);
    h.rx_out += 1;
    h.post_rx(2);
    h.send(hdr(OP_REQUEST, 10, 1), &[]);
    let mut used = Vec::new();
    while let Some(u) = h.rx.pop_used(&h.mem) {
        used.push(u);
        h.rx_out -= 1;
    }
    assert_eq!(used.len(), 2, "{used:?}");
    assert_eq!(used[0].1, 0);
    assert_eq!(used[1].1, HDR_LEN as u32);
    assert_eq!(h.dev.stats().bad_rx_buffers, 1);
    let (mut s, _) = l.accept().unwrap();
    // A header-sized buffer can't carry data: the device leaves it (no spin) and the data
    // waits in the socket.
    h.rx.add(&h.mem, &[(RXDATA + 0x8000, HDR_LEN as u32, true)]);
    h.rx_out += 1;
    s.write_all(b"payload").unwrap();
    h.backend();
    assert!(h.rx.pop_used(&h.mem).is_none());
    // A buffer behind it isn't reached either (the ring is in order)...
    h.rx.add(&h.mem, &[(RXDATA + 0xa000, RXBUF, true)]);
    h.rx_out += 1;
    h.dev.process_queue(RXQ).unwrap();
    assert!(h.rx.pop_used(&h.mem).is_none());
    // ...until a control packet uses the small one: a credit request takes a header only.
    h.send(hdr(OP_CREDIT_REQUEST, 10, 1), &[]);
    let mut got = Vec::new();
    while let Some((id, len)) = h.rx.pop_used(&h.mem) {
        got.push((id, len));
    }
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].1, HDR_LEN as u32);
    assert_eq!(got[1].1, HDR_LEN as u32 + 7);
    let mut b = [0u8; 7];
    h.mem
        .read_slice(&mut b, GuestAddress(RXDATA + 0xa000 + HDR_LEN as u64))
        .unwrap();
    assert_eq!(&b, b"payload");
}

mod prop {
    use proptest::prelude::*;

    use super::*;

    /// One guest action: a TX packet with fields drawn near the interesting values, or RX
    /// buffers (possibly tiny or outside memory), or host activity.
    #[derive(Debug, Clone)]
    enum Act {
        Tx {
            op: u16,
            type_: u16,
            src_port: u32,
            dst_port: u32,
            len: u32,
            data: u32,
            flags: u32,
            buf_alloc: u32,
            fwd_cnt: u32,
        },
        Rx(u32),
        HostWrite,
        HostConnect(u32),
    }

    fn act() -> impl Strategy<Value = Act> {
        prop_oneof![
            4 => (
                0u16..9,
                prop_oneof![Just(TYPE_STREAM), any::<u16>()],
                10u32..13,
                prop_oneof![Just(1u32), Just(2u32), Just(FIRST_LOCAL_PORT), any::<u32>()],
                prop_oneof![0u32..64, Just(u32::MAX), Just(MAX_PAYLOAD as u32 + 1)],
                0u32..64,
                0u32..4,
                prop_oneof![Just(0u32), 1u32..100, Just(1 << 20)],
                any::<u32>(),
            )
                .prop_map(
                    |(op, type_, src_port, dst_port, len, data, flags, buf_alloc, fwd_cnt)| {
                        Act::Tx {
                            op,
                            type_,
                            src_port,
                            dst_port,
                            len,
                            data,
                            flags,
                            buf_alloc,
                            fwd_cnt,
                        }
                    }
                ),
            2 => prop_oneof![Just(0u32), 1u32..50, Just(RXBUF)].prop_map(Act::Rx),
            1 => Just(Act::HostWrite),
            1 => (0u32..3).prop_map(Act::HostConnect),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Whatever the guest sends and however the host behaves, the device neither panics
        /// nor hangs, and its used lengths stay within the buffers.
        #[test]
        fn any_packet_sequence_is_safe(acts in proptest::collection::vec(act(), 1..40)) {
            let mut h = H::new("prop");
            let _l1 = h.listen(1);
            let _l2 = h.listen(2);
            let mut hosts: Vec<UnixStream> = Vec::new();
            for a in acts {
                match a {
                    Act::Tx { op, type_, src_port, dst_port, len, data, flags, buf_alloc, fwd_cnt } => {
                        let hd = Header {
                            src_cid: CID,
                            dst_cid: HOST_CID,
                            src_port,
                            dst_port,
                            len,
                            type_,
                            op,
                            flags,
                            buf_alloc,
                            fwd_cnt,
                        };
                        let payload = vec![0x5a; data as usize];
                        h.send_raw(&hd, &payload);
                    }
                    Act::Rx(n) => {
                        let i = u64::from(h.rx.next_desc);
                        h.rx.add(&h.mem, &[(RXDATA + i * u64::from(RXBUF), n, true)]);
                        h.dev.process_queue(RXQ).unwrap();
                    }
                    Act::HostWrite => {
                        for s in &mut hosts {
                            let _ = s.set_nonblocking(true);
                            let _ = s.write(b"host bytes");
                        }
                        h.backend();
                    }
                    Act::HostConnect(p) => {
                        if let Ok(mut s) = UnixStream::connect(&h.uds) {
                            let _ = s.write_all(format!("CONNECT {}\n", 10 + p).as_bytes());
                            hosts.push(s);
                        }
                        h.backend();
                    }
                }
                while let Some((_, len)) = h.rx.pop_used(&h.mem) {
                    prop_assert!(len <= RXBUF);
                }
                prop_assert!(h.dev.connections() <= MAX_CONNS);
            }
        }
    }
}
