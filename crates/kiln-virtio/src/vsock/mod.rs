//! virtio-vsock (device ID 19) without `/dev/vhost-vsock`: a user-space device that maps
//! guest stream connections onto host Unix sockets, Firecracker's convention.
//!
//! - The guest connects to host port `P` (host CID 2): the device connects to the Unix
//!   socket `<uds_path>_P`; if nobody listens there the guest gets RST.
//! - A host process connects to the listener at `<uds_path>` and writes `CONNECT <port>\n`:
//!   the device sends the guest a REQUEST for `port` from a fresh local port `L` (at or above
//!   2^30); on the guest's RESPONSE it writes `OK <L>\n` and the socket carries the stream.
//!
//! Every host socket and the listener sit in one inner epoll set, which the device exposes as
//! its single backend fd ([`VirtioDevice::backend_fds`]). Flow control is the spec's credit
//! scheme: the device sends a connection's data only while the guest has credit for it (and
//! RX buffers); otherwise the bytes wait in the host socket, which pushes back on the host
//! writer. Guest data the host socket can't take at once is kept, up to the
//! [`CONN_BUF`] bytes the device advertises per connection; a guest that sends beyond the
//! credit it was given gets that connection reset.

pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemory};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::queue::{drain, ChainDone};
use crate::{
    check_queue_size, read_config_bytes, Error, InterruptKind, QueueOutcome, Result, VirtioDevice,
    VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC,
};
use packet::*;

const DEVICE: &str = "virtio-vsock";

/// Virtio device ID of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// The host's context ID.
pub const HOST_CID: u64 = 2;
/// Default size of each of the three queues.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Most connections at once; further requests get RST, further host connections are closed.
pub const MAX_CONNS: usize = 1024;
/// The receive buffer the device advertises per connection (`buf_alloc`): guest data the
/// host socket has not taken yet, at most this much.
pub const CONN_BUF: u32 = 256 << 10;
/// Largest payload of one packet, either way (Linux uses the same limit).
pub const MAX_PAYLOAD: usize = 64 << 10;
/// The device tells the guest about freed buffer space once this much has accumulated (or
/// when asked); below `CONN_BUF`, so a guest waiting for credit always hears of it.
const CREDIT_THRESHOLD: u32 = CONN_BUF / 4;
/// First local port handed to host-initiated connections.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// RSTs for packets without a connection waiting for RX buffers; more are dropped (a guest
/// that floods bad packets and posts no RX buffers hears about fewer of them).
const MAX_QUEUED_RSTS: usize = 256;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// epoll data of the listener (connections use their slab index).
const LISTENER_KEY: u64 = u64::MAX;
/// The backend token of the inner epoll fd.
pub const BACKEND_TOKEN: u32 = 0;
/// Queue indices.
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;

/// What the device is created with.
#[derive(Debug, Clone)]
pub struct VsockConfig {
    /// The guest's context ID (3 ..= 2^32 - 2).
    pub guest_cid: u64,
    /// The host listener path; guest connections to port `P` go to `<uds_path>_P`.
    pub uds_path: PathBuf,
    /// Size of each queue.
    pub queue_size: u16,
}

/// Counters of what the device refused or dropped, for tests and diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VsockStats {
    /// TX packets dropped: shorter than a header, payload beyond the buffers or
    /// [`MAX_PAYLOAD`], unreadable memory.
    pub malformed: u64,
    /// TX packets dropped for a source CID other than the guest's or a destination other
    /// than the host.
    pub wrong_cid: u64,
    /// RSTs sent (refused connections, unknown connections, bad type or op, credit abuse).
    pub rsts: u64,
    /// Connections reset because the guest sent beyond the credit it had.
    pub credit_abuse: u64,
    /// RX buffers too small for a header, or outside guest memory.
    pub bad_rx_buffers: u64,
    /// RSTs not sent because too many were waiting for RX buffers.
    pub dropped_rsts: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A host process connected to the listener; its `CONNECT` line hasn't come yet.
    HostHello,
    /// Host-initiated: REQUEST owed or sent to the guest, no RESPONSE yet.
    HostRequested,
    /// Data flows.
    Established,
    /// The guest shut both directions: reset once the pending guest data is written.
    Closing,
}

struct Conn {
    stream: UnixStream,
    state: State,
    guest_port: u32,
    host_port: u32,
    /// Control packets owed to the guest.
    owe_request: bool,
    owe_response: bool,
    owe_credit_update: bool,
    owe_credit_request: bool,
    owe_shutdown: u32,
    /// The host socket may have data (or EOF) for the guest.
    readable: bool,
    /// In the service queue.
    queued: bool,
    /// We asked the guest for credit and haven't heard since.
    credit_requested: bool,
    /// Bytes sent to the guest (wrapping).
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Guest bytes written to the host socket (wrapping).
    fwd_cnt: u32,
    /// `fwd_cnt` as the guest last heard it.
    fwd_cnt_told: u32,
    /// Guest bytes the host socket hasn't taken yet (at most `CONN_BUF`).
    pending: VecDeque<u8>,
    /// SHUTDOWN flags the guest sent.
    guest_shut: u32,
    /// SHUTDOWN flags sent to the guest.
    host_shut: u32,
}

impl Conn {
    fn new(stream: UnixStream, state: State, guest_port: u32, host_port: u32) -> Conn {
        Conn {
            stream,
            state,
            guest_port,
            host_port,
            owe_request: false,
            owe_response: false,
            owe_credit_update: false,
            owe_credit_request: false,
            owe_shutdown: 0,
            readable: true,
            queued: false,
            credit_requested: false,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            pending: VecDeque::new(),
            guest_shut: 0,
            host_shut: 0,
        }
    }

    /// Bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Whether data from the host socket may go to the guest at all.
    fn may_send_data(&self) -> bool {
        self.state == State::Established
            && self.host_shut & SHUTDOWN_SEND == 0
            && self.guest_shut & SHUTDOWN_RCV == 0
    }

    /// Whether servicing the connection would produce a packet (or learn something).
    fn has_work(&self) -> bool {
        self.owe_request
            || self.owe_response
            || self.owe_shutdown != 0
            || self.owe_credit_update
            || self.owe_credit_request
            || (self.readable && self.may_send_data() && self.peer_credit() > 0)
            || (self.readable
                && self.may_send_data()
                && self.peer_credit() == 0
                && !self.credit_requested)
    }

    fn header(&self, guest_cid: u64, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.host_port,
            dst_port: self.guest_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF,
            fwd_cnt: self.fwd_cnt,
        }
    }
}

/// The device minus its queues: sockets, connections, buffers.
struct Backend {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    slab: Vec<Option<Conn>>,
    free: Vec<usize>,
    by_key: HashMap<(u32, u32), usize>,
    /// Connections with something for the guest, served round-robin.
    service: VecDeque<usize>,
    /// RSTs for packets that had no connection.
    rsts: VecDeque<Header>,
    next_local_port: u32,
    txbuf: Vec<u8>,
    rxbuf: Vec<u8>,
    events: Vec<EpollEvent>,
    stats: VsockStats,
}

struct Active<M> {
    mem: M,
    rx: Queue,
    tx: Queue,
    // Kept for TRANSPORT_RESET events, which this device never sends.
    _ev: Queue,
    irq: Arc<dyn VirtioInterrupt>,
}

/// A virtio socket device backed by host Unix sockets (see the module documentation).
pub struct Vsock<M> {
    queue_sizes: [u16; 3],
    b: Backend,
    active: Option<Active<M>>,
}

impl<M> std::fmt::Debug for Vsock<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.b.guest_cid)
            .field("uds_path", &self.b.uds_path)
            .field("connections", &self.b.by_key.len())
            .field("active", &self.active.is_some())
            .finish()
    }
}

fn backend_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::VsockBackend {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Whether `cid` may be a guest's: 0-2 are the hypervisor, local and host, `u32::MAX` is
/// `VMADDR_CID_ANY`, and Linux keeps CIDs to 32 bits.
pub fn valid_guest_cid(cid: u64) -> bool {
    (3..u64::from(u32::MAX)).contains(&cid)
}

/// `<uds_path>_<port>`.
pub fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = uds_path.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Connects to the Unix socket at `path` without blocking (a listener with a full backlog
/// fails with `EAGAIN` rather than stalling the device thread).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: an all-zero sockaddr_un is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain syscall without pointers.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call; `len` is within it.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

impl<M> Vsock<M> {
    /// Creates the device and binds its listener at `cfg.uds_path` (which must not exist).
    /// The socket file stays when the device is dropped (the device thread may not unlink
    /// files under seccomp): its owner removes it at shutdown.
    pub fn new(cfg: VsockConfig) -> Result<Self> {
        check_queue_size(DEVICE, cfg.queue_size)?;
        if !valid_guest_cid(cfg.guest_cid) {
            return Err(Error::VsockCid(cfg.guest_cid));
        }
        let path = cfg.uds_path.as_path();
        let listener = UnixListener::bind(path).map_err(backend_err("binding", path))?;
        let b = Backend::new(cfg.guest_cid, cfg.uds_path.clone(), listener);
        let b = match b {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_file(&cfg.uds_path);
                return Err(e);
            }
        };
        Ok(Vsock {
            queue_sizes: [cfg.queue_size; 3],
            b,
            active: None,
        })
    }

    /// The guest's context ID.
    pub fn guest_cid(&self) -> u64 {
        self.b.guest_cid
    }

    /// The listener's path.
    pub fn uds_path(&self) -> &Path {
        &self.b.uds_path
    }

    /// Connections open now (including host connections still saying hello).
    pub fn connections(&self) -> usize {
        self.b.open_count()
    }

    /// What was refused or dropped so far.
    pub fn stats(&self) -> VsockStats {
        self.b.stats
    }
}

/// Where one packet for the guest came from.
enum Produced {
    /// Written into the chain: this many bytes.
    Wrote(u32),
    /// Nothing to send after all (the socket had no data): give the chain back.
    Nothing,
}

impl Backend {
    fn new(guest_cid: u64, uds_path: PathBuf, listener: UnixListener) -> Result<Backend> {
        let path = uds_path.clone();
        listener
            .set_nonblocking(true)
            .map_err(backend_err("configuring", &path))?;
        let epoll = Epoll::new().map_err(backend_err("creating the epoll set for", &path))?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, LISTENER_KEY),
            )
            .map_err(backend_err("polling", &path))?;
        Ok(Backend {
            guest_cid,
            uds_path,
            listener,
            epoll,
            slab: Vec::with_capacity(MAX_CONNS),
            free: Vec::with_capacity(MAX_CONNS),
            by_key: HashMap::with_capacity(MAX_CONNS),
            service: VecDeque::with_capacity(MAX_CONNS),
            rsts: VecDeque::with_capacity(MAX_QUEUED_RSTS),
            next_local_port: FIRST_LOCAL_PORT,
            txbuf: vec![0; HDR_LEN + MAX_PAYLOAD],
            rxbuf: vec![0; MAX_PAYLOAD],
            events: vec![EpollEvent::default(); 64],
            stats: VsockStats::default(),
        })
    }

    fn open_count(&self) -> usize {
        self.slab.len() - self.free.len()
    }

    /// Puts `conn` in the slab and the epoll set; None (the socket closed) when full.
    fn insert(&mut self, conn: Conn) -> Option<usize> {
        if self.open_count() >= MAX_CONNS {
            return None;
        }
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slab.push(None);
                self.slab.len() - 1
            }
        };
        let ev = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        if self
            .epoll
            .ctl(
                ControlOperation::Add,
                conn.stream.as_raw_fd(),
                EpollEvent::new(ev, idx as u64),
            )
            .is_err()
        {
            self.free.push(idx);
            return None;
        }
        if conn.state != State::HostHello {
            self.by_key.insert((conn.guest_port, conn.host_port), idx);
        }
        self.slab[idx] = Some(conn);
        Some(idx)
    }

    /// Closes connection `idx` (the host sees EOF), without telling the guest.
    fn remove(&mut self, idx: usize) {
        let Some(conn) = self.slab.get_mut(idx).and_then(Option::take) else {
            return;
        };
        if conn.state != State::HostHello {
            self.by_key.remove(&(conn.guest_port, conn.host_port));
        }
        if conn.queued {
            self.service.retain(|&i| i != idx);
        }
        self.free.push(idx);
        // Dropping the stream closes it, which also takes it out of the epoll set.
    }

    /// Queues an RST to the guest for (`guest_port`, `host_port`).
    fn queue_rst(&mut self, guest_port: u32, host_port: u32) {
        if self.rsts.len() >= MAX_QUEUED_RSTS {
            self.stats.dropped_rsts += 1;
            return;
        }
        self.stats.rsts += 1;
        self.rsts.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: host_port,
            dst_port: guest_port,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// Closes connection `idx` and tells the guest.
    fn reset(&mut self, idx: usize) {
        if let Some(c) = self.slab.get(idx).and_then(Option::as_ref) {
            if c.state != State::HostHello {
                let (g, h) = (c.guest_port, c.host_port);
                self.queue_rst(g, h);
            }
        }
        self.remove(idx);
    }

    fn enqueue(&mut self, idx: usize) {
        if let Some(c) = self.slab.get_mut(idx).and_then(Option::as_mut) {
            if !c.queued && c.has_work() {
                c.queued = true;
                self.service.push_back(idx);
            }
        }
    }

    /// Writes what the host socket takes of the connection's pending guest data; resets the
    /// connection on a socket error. Returns false if it was reset.
    fn flush(&mut self, idx: usize) -> bool {
        let Some(c) = self.slab.get_mut(idx).and_then(Option::as_mut) else {
            return false;
        };
        let mut broken = false;
        while !c.pending.is_empty() {
            let (a, _) = c.pending.as_slices();
            match (&c.stream).write(a) {
                Ok(0) => {
                    broken = true;
                    break;
                }
                Ok(n) => {
                    c.pending.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        if broken {
            self.reset(idx);
            return false;
        }
        if c.pending.is_empty() {
            if c.guest_shut & SHUTDOWN_SEND != 0 {
                let _ = c.stream.shutdown(Shutdown::Write);
            }
            if c.state == State::Closing {
                self.reset(idx);
                return false;
            }
        }
        if c.fwd_cnt.wrapping_sub(c.fwd_cnt_told) >= CREDIT_THRESHOLD {
            c.owe_credit_update = true;
        }
        self.enqueue(idx);
        true
    }

    /// Handles one TX packet (already copied to `txbuf[..n]`).
    fn handle_tx(&mut self, n: usize) {
        let hb = self.txbuf.get(..n.min(HDR_LEN));
        let Some(hb) = hb.and_then(|s| <&[u8; HDR_LEN]>::try_from(s).ok()) else {
            self.stats.malformed += 1;
            return;
        };
        let h = Header::parse(hb);
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            self.stats.wrong_cid += 1;
            return;
        }
        let key = (h.src_port, h.dst_port);
        let idx = self.by_key.get(&key).copied();
        let len = h.len as usize;
        if len > MAX_PAYLOAD || HDR_LEN + len > n {
            // The stream would have a hole: the connection can't go on.
            self.stats.malformed += 1;
            if let Some(i) = idx {
                self.reset(i);
            }
            return;
        }
        if h.type_ != TYPE_STREAM {
            if h.op != OP_RST {
                self.queue_rst(h.src_port, h.dst_port);
            }
            if let Some(i) = idx {
                self.remove(i);
            }
            return;
        }
        let Some(idx) = idx else {
            match h.op {
                OP_REQUEST => self.guest_connect(&h),
                OP_RST => {}
                _ => self.queue_rst(h.src_port, h.dst_port),
            }
            return;
        };
        let Some(c) = self.slab.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        c.credit_requested = false;
        match (h.op, c.state) {
            (OP_RST, _) => self.remove(idx),
            (OP_RESPONSE, State::HostRequested) => {
                c.state = State::Established;
                let mut line = [0u8; 16];
                let mut w = &mut line[..];
                let _ = writeln!(w, "OK {}", c.host_port);
                let used = 16 - w.len();
                // A fresh socket's buffer takes a line; anything else is a broken host.
                match (&c.stream).write(&line[..used]) {
                    Ok(k) if k == used => self.enqueue(idx),
                    _ => self.reset(idx),
                }
            }
            (OP_RW, State::Established) if c.guest_shut & SHUTDOWN_SEND == 0 => {
                if c.pending.len() + len > CONN_BUF as usize {
                    self.stats.credit_abuse += 1;
                    self.reset(idx);
                    return;
                }
                let data = &self.txbuf[HDR_LEN..HDR_LEN + len];
                let mut off = 0;
                let mut broken = false;
                if c.pending.is_empty() {
                    while off < len {
                        match (&c.stream).write(&data[off..]) {
                            Ok(0) => {
                                broken = true;
                                break;
                            }
                            Ok(k) => off += k,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(_) => {
                                broken = true;
                                break;
                            }
                        }
                    }
                }
                if broken {
                    self.reset(idx);
                    return;
                }
                c.fwd_cnt = c.fwd_cnt.wrapping_add(off as u32);
                c.pending.extend(&data[off..]);
                if c.fwd_cnt.wrapping_sub(c.fwd_cnt_told) >= CREDIT_THRESHOLD {
                    c.owe_credit_update = true;
                }
                self.enqueue(idx);
            }
            (OP_SHUTDOWN, State::Established | State::Closing) => {
                let f = h.flags & SHUTDOWN_BOTH;
                c.guest_shut |= f;
                if f & SHUTDOWN_RCV != 0 {
                    // The host's further writes fail (EPIPE): it learns the guest stopped
                    // reading.
                    let _ = c.stream.shutdown(Shutdown::Read);
                }
                if c.guest_shut == SHUTDOWN_BOTH {
                    c.state = State::Closing;
                }
                // Shuts the host socket's write side (and resets a closing connection)
                // once the pending guest data is out.
                self.flush(idx);
            }
            (OP_CREDIT_UPDATE, _) => self.enqueue(idx),
            (OP_CREDIT_REQUEST, _) => {
                c.owe_credit_update = true;
                self.enqueue(idx);
            }
            // A second REQUEST, a RESPONSE out of place, data after SHUTDOWN or before
            // RESPONSE, an unknown op: the guest is confused about this connection.
            _ => self.reset(idx),
        }
    }

    /// A guest REQUEST for an unknown (guest port, host port): connects to
    /// `<uds_path>_<port>` or answers RST.
    fn guest_connect(&mut self, h: &Header) {
        if self.open_count() >= MAX_CONNS {
            self.queue_rst(h.src_port, h.dst_port);
            return;
        }
        let stream = match connect_nonblocking(&port_path(&self.uds_path, h.dst_port)) {
            Ok(s) => s,
            Err(_) => {
                self.queue_rst(h.src_port, h.dst_port);
                return;
            }
        };
        let mut c = Conn::new(stream, State::Established, h.src_port, h.dst_port);
        c.owe_response = true;
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match self.insert(c) {
            Some(idx) => self.enqueue(idx),
            None => self.queue_rst(h.src_port, h.dst_port),
        }
    }

    /// Accepts host connections on the listener until it has none.
    fn accept_all(&mut self) {
        loop {
            // SAFETY: null address pointers are allowed (the peer's address isn't wanted);
            // the listener fd is valid while `self` lives.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // EAGAIN: done. Anything else (EMFILE...): try again on the next event.
                break;
            }
            // SAFETY: `fd` is a fresh socket nobody else owns.
            let s = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
            // Port 0s until the CONNECT line names the guest port.
            let c = Conn::new(s, State::HostHello, 0, 0);
            if let Some(idx) = self.insert(c) {
                self.host_hello(idx);
            }
        }
    }

    /// Reads a host connection's `CONNECT <port>\n` if it is complete; closes the
    /// connection on anything else.
    fn host_hello(&mut self, idx: usize) {
        let Some(c) = self.slab.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        let mut line = [0u8; MAX_CONNECT_LINE];
        // Peek first: bytes after the newline are stream data and must stay in the socket.
        // SAFETY: `line` is writable for its length during the call.
        let n = unsafe {
            libc::recv(
                c.stream.as_raw_fd(),
                line.as_mut_ptr().cast(),
                line.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
                self.remove(idx);
            }
            return;
        }
        let n = n as usize;
        let Some(nl) = line[..n].iter().position(|&b| b == b'\n') else {
            if n == 0 || n == line.len() {
                // EOF before a whole line, or a line too long.
                self.remove(idx);
            }
            return;
        };
        let mut sink = [0u8; MAX_CONNECT_LINE];
        if (&c.stream).read(&mut sink[..=nl]).ok() != Some(nl + 1) {
            self.remove(idx);
            return;
        }
        let port = std::str::from_utf8(&line[..nl])
            .ok()
            .map(|s| s.trim_end_matches('\r'))
            .and_then(|s| s.strip_prefix("CONNECT "))
            .and_then(|p| p.parse::<u32>().ok());
        let Some(port) = port else {
            self.remove(idx);
            return;
        };
        let Some(local) = self.alloc_local_port(port) else {
            self.remove(idx);
            return;
        };
        let Some(c) = self.slab.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        c.state = State::HostRequested;
        c.guest_port = port;
        c.host_port = local;
        c.owe_request = true;
        self.by_key.insert((port, local), idx);
        self.enqueue(idx);
    }

    /// A local port for a host-initiated connection to guest `port`, not in use with it.
    fn alloc_local_port(&mut self, port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNS {
            let p = self.next_local_port;
            self.next_local_port = p.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.by_key.contains_key(&(port, p)) {
                return Some(p);
            }
        }
        None
    }

    /// Takes the inner epoll set's events.
    fn poll(&mut self) {
        loop {
            let n = match self.epoll.wait(0, &mut self.events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            for i in 0..n {
                let ev = self.events[i];
                let key = ev.data();
                if key == LISTENER_KEY {
                    self.accept_all();
                    continue;
                }
                let idx = key as usize;
                let set = ev.event_set();
                let Some(c) = self.slab.get_mut(idx).and_then(Option::as_mut) else {
                    continue;
                };
                if c.state == State::HostHello {
                    self.host_hello(idx);
                    continue;
                }
                if set.intersects(
                    EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
                ) {
                    c.readable = true;
                }
                if set.contains(EventSet::OUT) && !c.pending.is_empty() && !self.flush(idx) {
                    continue;
                }
                self.enqueue(idx);
            }
            if n < self.events.len() {
                return;
            }
        }
    }

    /// Produces connection `idx`'s next packet into `chain` (writable capacity `cap`).
    fn produce<M: GuestMemory>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain<&M>,
        cap: usize,
        idx: usize,
    ) -> Produced {
        let guest_cid = self.guest_cid;
        let Some(c) = self.slab.get_mut(idx).and_then(Option::as_mut) else {
            return Produced::Nothing;
        };
        let mut data_len = 0usize;
        let mut h = if c.owe_request {
            c.owe_request = false;
            c.header(guest_cid, OP_REQUEST)
        } else if c.owe_response {
            c.owe_response = false;
            c.header(guest_cid, OP_RESPONSE)
        } else if c.readable && c.may_send_data() && c.peer_credit() > 0 && cap > HDR_LEN {
            // (A header-sized buffer can still take the control packets below.)
            let want = (c.peer_credit() as usize)
                .min(cap - HDR_LEN)
                .min(self.rxbuf.len());
            match (&c.stream).read(&mut self.rxbuf[..want]) {
                Ok(0) => {
                    c.readable = false;
                    c.host_shut |= SHUTDOWN_SEND;
                    let mut h = c.header(guest_cid, OP_SHUTDOWN);
                    h.flags = SHUTDOWN_SEND;
                    h
                }
                Ok(n) => {
                    data_len = n;
                    c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
                    let mut h = c.header(guest_cid, OP_RW);
                    h.len = n as u32;
                    h
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.readable = false;
                    return Produced::Nothing;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Produced::Nothing,
                Err(_) => {
                    self.reset(idx);
                    return Produced::Nothing;
                }
            }
        } else if c.owe_shutdown != 0 {
            let mut h = c.header(guest_cid, OP_SHUTDOWN);
            h.flags = c.owe_shutdown;
            c.host_shut |= c.owe_shutdown;
            c.owe_shutdown = 0;
            h
        } else if c.readable && c.may_send_data() && c.peer_credit() == 0 && !c.credit_requested {
            // Data waits and the guest gave no credit: ask once.
            c.credit_requested = true;
            c.header(guest_cid, OP_CREDIT_REQUEST)
        } else if c.owe_credit_update {
            c.header(guest_cid, OP_CREDIT_UPDATE)
        } else {
            return Produced::Nothing;
        };
        // Every header carries fwd_cnt: whatever we send is a credit update.
        c.owe_credit_update = false;
        c.fwd_cnt_told = c.fwd_cnt;
        h.fwd_cnt = c.fwd_cnt;
        match write_chain(mem, chain, &h.encode(), &self.rxbuf[..data_len]) {
            Some(n) => Produced::Wrote(n),
            None => {
                // The guest's buffer is outside its memory: the packet is lost, and with it
                // the stream's integrity.
                self.stats.bad_rx_buffers += 1;
                self.reset(idx);
                Produced::Wrote(0)
            }
        }
    }

    /// Fills RX buffers with queued RSTs and connections' packets until either runs out.
    fn fill_rx<M: GuestMemory>(&mut self, act: &mut Active<M>) -> Result<QueueOutcome> {
        let Active { mem, rx, irq, .. } = act;
        let mem = &*mem;
        if !rx.ready() {
            return Ok(QueueOutcome::Done);
        }
        let qerr = |source| Error::Queue {
            device: DEVICE,
            queue: RXQ,
            source,
        };
        let mut used = 0usize;
        // Rounds in a row that produced nothing: a connection whose data doesn't fit the
        // buffer at the head of the ring (a guest posting header-sized buffers) must not
        // spin here.
        let mut idle = 0usize;
        loop {
            if idle > self.service.len() + 1 {
                break;
            }
            let rst = self.rsts.front().copied();
            let idx = if rst.is_some() {
                None
            } else {
                match self.service.pop_front() {
                    Some(i) => Some(i),
                    None => break,
                }
            };
            if let Some(i) = idx {
                match self.slab.get_mut(i).and_then(Option::as_mut) {
                    Some(c) if c.has_work() => {}
                    Some(c) => {
                        c.queued = false;
                        continue;
                    }
                    None => continue,
                }
            }
            let Some(chain) = rx.pop_descriptor_chain(mem) else {
                if let Some(i) = idx {
                    self.service.push_front(i);
                }
                break;
            };
            let head = chain.head_index();
            let cap = chain
                .clone()
                .filter(|d| d.is_write_only())
                .fold(0usize, |a, d| a.saturating_add(d.len() as usize));
            if cap < HDR_LEN {
                self.stats.bad_rx_buffers += 1;
                rx.add_used(mem, head, 0).map_err(qerr)?;
                used += 1;
                if let Some(i) = idx {
                    self.service.push_front(i);
                }
                continue;
            }
            let written = match (rst, idx) {
                (Some(h), _) => {
                    self.rsts.pop_front();
                    write_chain(mem, &chain, &h.encode(), &[]).unwrap_or_else(|| {
                        self.stats.bad_rx_buffers += 1;
                        0
                    })
                }
                (None, Some(i)) => match self.produce(mem, &chain, cap, i) {
                    Produced::Wrote(n) => {
                        if let Some(c) = self.slab.get_mut(i).and_then(Option::as_mut) {
                            if c.has_work() {
                                self.service.push_back(i);
                            } else {
                                c.queued = false;
                            }
                        }
                        n
                    }
                    Produced::Nothing => {
                        idle += 1;
                        rx.go_to_previous_position();
                        if let Some(c) = self.slab.get_mut(i).and_then(Option::as_mut) {
                            if c.has_work() {
                                self.service.push_back(i);
                            } else {
                                c.queued = false;
                            }
                        }
                        continue;
                    }
                },
                (None, None) => break,
            };
            rx.add_used(mem, head, written).map_err(qerr)?;
            used += 1;
            idle = 0;
        }
        if used > 0 && rx.needs_notification(mem).map_err(qerr)? {
            irq.trigger(InterruptKind::Queue(RXQ as u16))
                .map_err(|source| Error::Interrupt {
                    device: DEVICE,
                    what: "used buffer",
                    source,
                })?;
        }
        Ok(QueueOutcome::Done)
    }
}

/// Writes `hdr` then `data` into the chain's device-writable buffers (which hold at least
/// both); None if one is outside guest memory.
fn write_chain<M: GuestMemory>(
    mem: &M,
    chain: &DescriptorChain<&M>,
    hdr: &[u8; HDR_LEN],
    data: &[u8],
) -> Option<u32> {
    let mut parts = [&hdr[..], data];
    let mut total = 0usize;
    for d in chain.clone().filter(|d| d.is_write_only()) {
        let mut room = d.len() as usize;
        let mut addr = d.addr();
        for p in parts.iter_mut() {
            if room == 0 {
                break;
            }
            let n = p.len().min(room);
            if n == 0 {
                continue;
            }
            mem.write_slice(&p[..n], addr).ok()?;
            addr = addr.checked_add(n as u64)?;
            room -= n;
            total += n;
            *p = &p[n..];
        }
        if parts.iter().all(|p| p.is_empty()) {
            break;
        }
    }
    // total <= HDR_LEN + MAX_PAYLOAD.
    Some(total as u32)
}

/// Copies the chain's device-readable buffers into `buf`; returns the bytes copied, None if
/// one is outside guest memory. Stops when `buf` is full.
fn read_chain<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    buf: &mut [u8],
) -> Option<usize> {
    let mut n = 0usize;
    for d in chain.filter(|d| !d.is_write_only()) {
        if n == buf.len() {
            break;
        }
        // An empty buffer (allowed by the spec) holds nothing; the next one may.
        let take = (d.len() as usize).min(buf.len() - n);
        if take == 0 {
            continue;
        }
        mem.read_slice(&mut buf[n..n + take], d.addr()).ok()?;
        n += take;
    }
    Some(n)
}

impl<M: GuestMemory + Send> VirtioDevice<M> for Vsock<M> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.b.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: M,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<()> {
        let got = queues.len();
        let Ok([rx, tx, ev]) = <[Queue; 3]>::try_from(queues) else {
            return Err(Error::QueueCount {
                device: DEVICE,
                expected: 3,
                got,
            });
        };
        self.active = Some(Active {
            mem,
            rx,
            tx,
            _ev: ev,
            irq: interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        // The guest forgot its sockets: the host's ends close.
        for i in 0..self.b.slab.len() {
            self.b.remove(i);
        }
        self.b.rsts.clear();
    }

    fn process_queue(&mut self, index: usize) -> Result<QueueOutcome> {
        let Some(act) = self.active.as_mut() else {
            return Err(Error::NotActivated { device: DEVICE });
        };
        match index {
            RXQ => self.b.fill_rx(act),
            TXQ => {
                let b = &mut self.b;
                let Active { mem, tx, irq, .. } = act;
                let mem = &*mem;
                let out = drain(DEVICE, TXQ, tx, mem, irq, |chain| {
                    match read_chain(mem, chain, &mut b.txbuf) {
                        Some(n) => b.handle_tx(n),
                        None => b.stats.malformed += 1,
                    }
                    Ok(ChainDone::Used(0))
                })?;
                // Replies (RESPONSE, RST, credit) go out now.
                self.b.fill_rx(act)?;
                Ok(out)
            }
            // The event queue only holds buffers for TRANSPORT_RESET, never sent.
            EVQ => Ok(QueueOutcome::Done),
            _ => Err(Error::QueueIndex {
                device: DEVICE,
                index,
                count: 3,
            }),
        }
    }

    fn backend_fds(&self) -> Vec<(u32, RawFd)> {
        vec![(BACKEND_TOKEN, self.b.epoll.as_raw_fd())]
    }

    fn process_backend(&mut self, _token: u32) -> Result<QueueOutcome> {
        self.b.poll();
        match self.active.as_mut() {
            Some(act) => self.b.fill_rx(act),
            // Connections wait (in their sockets) for the driver.
            None => Ok(QueueOutcome::Done),
        }
    }
}

#[cfg(test)]
mod tests;
