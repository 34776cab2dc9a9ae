//! virtio-net (device ID 1): one receive and one transmit queue over a frame backend
//! ([`NetBackend`]: a [`Tap`], or a socket pair in tests).
//!
//! Frames move between the backend and guest memory with `readv`/`writev` straight into and
//! out of the guest's buffers: the kernel's copy is the only one. Receive with
//! `VIRTIO_NET_F_MRG_RXBUF` gathers enough available chains for the largest frame the driver
//! may get, reads once into all of them, then gives back the chains the frame didn't need
//! (no bounce buffer).
//!
//! Transmit validates what the guest sends before the host sees it ([`parse_tx_header`]):
//! a bad header, a frame shorter than an Ethernet header or longer than the MTU allows, or a
//! chain with device-writable or unmapped buffers is dropped and counted ([`NetStats`]),
//! never a VMM error. The header goes to the backend from a copy the device checked, so the
//! guest can't change it between the check and the write.
//!
//! Back-pressure (see [`VirtioDevice::backend_fds`]): the backend fd is polled
//! edge-triggered; receive reads until the backend says `EAGAIN` or the guest has no buffer
//! left, and a receive-queue notification (new buffers) reads the backend again. A guest that
//! posts no buffers, or floods the transmit queue, only slows itself: transmit yields after a
//! budget of chains, and each direction has its own rate limiter.

pub mod tap;

use std::io;
use std::sync::Arc;
use std::time::Instant;

use kiln_bus::RateLimitedWarn;
use kiln_ratelimit::RateLimiter;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, GuestAddress, GuestMemory, Permissions};

pub use tap::Tap;

use crate::queue::{drain, ChainDone, BUDGET};
use crate::{
    check_queue_size, read_config_bytes, Error, InterruptKind, QueueOutcome, Result, VirtioDevice,
    VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_ID_NET, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};

const DEVICE: &str = "virtio-net";

/// Length of the virtio-net header in front of every frame (virtio 1.x: with `num_buffers`).
pub const HDR_LEN: usize = 12;
/// Ethernet header.
pub const ETH_HLEN: usize = 14;
/// An 802.1Q tag a frame may carry on top of the MTU.
pub const VLAN_HLEN: usize = 4;
/// Longest frame (without the virtio header) with segmentation offload: a 64 KiB IP packet
/// plus its link-layer header.
pub const MAX_GSO_FRAME: usize = 65535 + ETH_HLEN + VLAN_HLEN;
/// Default MTU.
pub const DEFAULT_MTU: u16 = 1500;
/// Smallest MTU accepted (IPv4's minimum).
pub const MIN_MTU: u16 = 68;
/// Largest MTU accepted (a jumbo frame that still fits without offloads in 64 KiB).
pub const MAX_MTU: u16 = 65535 - (ETH_HLEN + VLAN_HLEN) as u16;
/// Default queue size.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Backend token of the frame fd (see [`VirtioDevice::backend_fds`]).
pub const BACKEND_TOKEN: u32 = 0;
/// Most receive chains one frame may span (`MRG_RXBUF`): enough for a 64 KiB frame in 1.5 KiB
/// buffers. A driver that posts smaller buffers gets no frames (its own problem).
pub const MAX_RX_CHAINS: usize = 64;
/// Most iovecs passed to one `readv`/`writev` (the kernel's `UIO_MAXIOV`).
pub const MAX_IOV: usize = 1024;

/// Feature bits (`VIRTIO_NET_F_*`).
pub mod features {
    /// The device handles packets with a partial checksum (the driver may offload it).
    pub const CSUM: u64 = 1 << 0;
    /// The driver handles packets with a partial checksum.
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// `mtu` in the configuration space is valid.
    pub const MTU: u64 = 1 << 3;
    /// `mac` in the configuration space is valid.
    pub const MAC: u64 = 1 << 5;
    /// The driver takes TSO over IPv4.
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// The driver takes TSO over IPv6.
    pub const GUEST_TSO6: u64 = 1 << 8;
    /// The driver takes TSO with ECN.
    pub const GUEST_ECN: u64 = 1 << 9;
    /// The device takes TSO over IPv4.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// The device takes TSO over IPv6.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// The device takes TSO with ECN.
    pub const HOST_ECN: u64 = 1 << 13;
    /// The driver can merge receive buffers (`num_buffers`).
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// `status` in the configuration space is valid.
    pub const STATUS: u64 = 1 << 16;
}

/// `flags` of the virtio-net header.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// `gso_type` values.
pub mod gso {
    /// Not a GSO frame.
    pub const NONE: u8 = 0;
    /// TCP over IPv4.
    pub const TCPV4: u8 = 1;
    /// UDP (UFO; not offered).
    pub const UDP: u8 = 3;
    /// TCP over IPv6.
    pub const TCPV6: u8 = 4;
    /// ECN bit, ORed into the above.
    pub const ECN: u8 = 0x80;
}
/// `status` bit: the link is up.
pub const STATUS_LINK_UP: u16 = 1;

/// A frame source and sink: a tap, or anything that reads and writes one frame (virtio-net
/// header first) per call.
pub trait NetBackend: Send {
    /// Reads one frame into `iov`; `Err(WouldBlock)` when there is none.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for writes for the whole call.
    unsafe fn readv(&mut self, iov: &[libc::iovec]) -> io::Result<usize>;
    /// Writes one frame gathered from `iov`.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for reads for the whole call.
    unsafe fn writev(&mut self, iov: &[libc::iovec]) -> io::Result<usize>;
    /// The fd polled for input (edge-triggered).
    fn raw_fd(&self) -> std::os::fd::RawFd;
    /// Whether the backend understands checksum and segmentation offload headers (else the
    /// device offers none of those features).
    fn supports_offloads(&self) -> bool;
    /// Sets the offloads (`TUN_F_*`, see [`tap::offload`]) the backend may use in frames it
    /// hands to the device; called on activation with what the driver accepted.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
}

/// Counters of a virtio-net device.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    /// Frames given to the guest.
    pub rx_frames: u64,
    /// Bytes given to the guest (virtio headers included).
    pub rx_bytes: u64,
    /// Receive chains returned empty because the guest made them malformed.
    pub rx_bad_chains: u64,
    /// Backend read errors (other than `EAGAIN`).
    pub rx_errors: u64,
    /// Frames sent to the backend.
    pub tx_frames: u64,
    /// Bytes sent to the backend (virtio headers included).
    pub tx_bytes: u64,
    /// Transmit chains dropped as malformed (see [`TxDrop`]).
    pub tx_dropped: u64,
    /// Backend write errors.
    pub tx_errors: u64,
}

/// What [`Net::new`] needs.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// The MAC address announced to the driver.
    pub mac: [u8; 6],
    /// The MTU announced to the driver and enforced on transmit.
    pub mtu: u16,
    /// Size of each queue.
    pub queue_size: u16,
    /// Throttles what the guest receives (bytes and frames).
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Throttles what the guest sends (bytes and frames).
    pub tx_rate_limiter: Option<RateLimiter>,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            mtu: DEFAULT_MTU,
            queue_size: DEFAULT_QUEUE_SIZE,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        }
    }
}

/// The fields of a virtio-net header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NetHdr {
    /// `flags`.
    pub flags: u8,
    /// `gso_type`.
    pub gso_type: u8,
    /// `hdr_len`.
    pub hdr_len: u16,
    /// `gso_size`.
    pub gso_size: u16,
    /// `csum_start`.
    pub csum_start: u16,
    /// `csum_offset`.
    pub csum_offset: u16,
    /// `num_buffers`.
    pub num_buffers: u16,
}

impl NetHdr {
    /// Decodes the 12 little-endian header bytes.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        NetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
            num_buffers: u(10),
        }
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (i, v) in [
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        ]
        .into_iter()
        .enumerate()
        {
            b[2 + 2 * i..4 + 2 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
}

/// Why a transmit chain was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxDrop {
    /// Fewer bytes than a virtio header plus an Ethernet header (zero-length included).
    Truncated,
    /// A frame longer than the MTU (or, for GSO, 64 KiB) allows.
    TooLong,
    /// Header flags the device doesn't know, or `NEEDS_CSUM` without `CSUM` negotiated.
    BadFlags,
    /// A checksum position outside the frame.
    BadChecksumOffset,
    /// A GSO type that wasn't negotiated, or a GSO frame without `NEEDS_CSUM` / `gso_size`.
    BadGso,
    /// A device-writable descriptor in the chain.
    WritableDescriptor,
    /// A buffer outside guest memory.
    BadAddress,
    /// More descriptors than one `writev` takes.
    TooManyDescriptors,
}

/// Checks a transmit header against the negotiated features and the frame length (bytes
/// after the header). Pure: the property tests throw arbitrary headers at it.
pub fn parse_tx_header(
    hdr: &[u8; HDR_LEN],
    frame_len: usize,
    acked: u64,
    mtu: u16,
) -> std::result::Result<NetHdr, TxDrop> {
    let h = NetHdr::from_bytes(hdr);
    if frame_len < ETH_HLEN {
        return Err(TxDrop::Truncated);
    }
    if h.flags & !HDR_F_NEEDS_CSUM != 0 {
        return Err(TxDrop::BadFlags);
    }
    if h.flags & HDR_F_NEEDS_CSUM != 0 {
        if acked & features::CSUM == 0 {
            return Err(TxDrop::BadFlags);
        }
        let end = usize::from(h.csum_start) + usize::from(h.csum_offset) + 2;
        if end > frame_len {
            return Err(TxDrop::BadChecksumOffset);
        }
    }
    let base = h.gso_type & !gso::ECN;
    let max = if h.gso_type == gso::NONE {
        usize::from(mtu) + ETH_HLEN + VLAN_HLEN
    } else {
        let needed = match base {
            gso::TCPV4 => features::HOST_TSO4,
            gso::TCPV6 => features::HOST_TSO6,
            _ => return Err(TxDrop::BadGso),
        };
        let ecn_ok = h.gso_type & gso::ECN == 0 || acked & features::HOST_ECN != 0;
        if acked & needed == 0
            || !ecn_ok
            || h.flags & HDR_F_NEEDS_CSUM == 0
            || h.gso_size == 0
            || usize::from(h.hdr_len) > frame_len
        {
            return Err(TxDrop::BadGso);
        }
        MAX_GSO_FRAME
    };
    if frame_len > max {
        return Err(TxDrop::TooLong);
    }
    Ok(h)
}

/// A buffer of iovecs reused across calls. The raw pointers in it are only meaningful during
/// the call that filled it; it is cleared before that call returns.
struct IovBuf(Vec<libc::iovec>);

// SAFETY: the iovecs point into guest memory only between being pushed and the syscall that
// uses them, all inside one `process_*` call on one thread; across calls the vector is empty.
unsafe impl Send for IovBuf {}

struct Active<M> {
    mem: M,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// A virtio network device over backend `B`.
pub struct Net<M, B> {
    backend: B,
    mtu: u16,
    features: u64,
    acked: u64,
    config_space: [u8; 12],
    queue_sizes: [u16; 2],
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
    iov: IovBuf,
    /// Receive chains gathered for one frame: (head, capacity).
    rx_chains: Vec<(u16, u32)>,
    /// Their buffers in order (guest address, length).
    rx_segs: Vec<(GuestAddress, u32)>,
    stats: NetStats,
    active: Option<Active<M>>,
}

impl<M, B> std::fmt::Debug for Net<M, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("mtu", &self.mtu)
            .field("acked", &self.acked)
            .field("stats", &self.stats)
            .field("active", &self.active.is_some())
            .finish()
    }
}

static RX_WARN: RateLimitedWarn = RateLimitedWarn::new();
static TX_WARN: RateLimitedWarn = RateLimitedWarn::new();

impl<M, B: NetBackend> Net<M, B> {
    /// A network device over `backend` announcing `cfg`'s MAC and MTU, link up.
    pub fn new(backend: B, cfg: NetConfig) -> Result<Self> {
        check_queue_size(DEVICE, cfg.queue_size)?;
        if !(MIN_MTU..=MAX_MTU).contains(&cfg.mtu) {
            return Err(Error::Mtu(cfg.mtu));
        }
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | features::MAC
            | features::MTU
            | features::STATUS
            | features::MRG_RXBUF;
        if backend.supports_offloads() {
            features |= features::CSUM
                | features::GUEST_CSUM
                | features::HOST_TSO4
                | features::HOST_TSO6
                | features::HOST_ECN
                | features::GUEST_TSO4
                | features::GUEST_TSO6
                | features::GUEST_ECN;
        }
        let mut config_space = [0u8; 12];
        config_space[..6].copy_from_slice(&cfg.mac);
        config_space[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        config_space[8..10].copy_from_slice(&1u16.to_le_bytes());
        config_space[10..12].copy_from_slice(&cfg.mtu.to_le_bytes());
        Ok(Net {
            backend,
            mtu: cfg.mtu,
            features,
            acked: 0,
            config_space,
            queue_sizes: [cfg.queue_size; 2],
            rx_limiter: cfg.rx_rate_limiter,
            tx_limiter: cfg.tx_rate_limiter,
            iov: IovBuf(Vec::with_capacity(MAX_IOV + 1)),
            rx_chains: Vec::with_capacity(MAX_RX_CHAINS),
            rx_segs: Vec::with_capacity(MAX_IOV),
            stats: NetStats::default(),
            active: None,
        })
    }

    /// The counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Bytes a receive needs room for (header included) with the negotiated features.
    fn rx_frame_room(&self) -> usize {
        let gso = features::GUEST_TSO4 | features::GUEST_TSO6;
        HDR_LEN
            + if self.acked & gso != 0 {
                MAX_GSO_FRAME
            } else {
                usize::from(self.mtu) + ETH_HLEN + VLAN_HLEN
            }
    }
}

/// Appends the host pieces of `[addr, addr + len)` to `iov`; false if some byte isn't guest
/// RAM with `perm` or `iov` would exceed [`MAX_IOV`].
fn push_iov<M: GuestMemory>(
    mem: &M,
    iov: &mut Vec<libc::iovec>,
    addr: GuestAddress,
    len: usize,
    perm: Permissions,
) -> bool {
    if len == 0 {
        return true;
    }
    let Ok(slices) = mem.get_slices(addr, len, perm) else {
        return false;
    };
    for s in slices {
        let Ok(s) = s else {
            return false;
        };
        if iov.len() >= MAX_IOV {
            return false;
        }
        iov.push(libc::iovec {
            iov_base: s.ptr_guard_mut().as_ptr().cast(),
            iov_len: s.len(),
        });
    }
    true
}

/// Marks the first `len` bytes of the buffers `segs` dirty (the backend wrote them behind
/// vm-memory's back).
fn stream_mark_dirty<M: GuestMemory>(mem: &M, segs: &[(GuestAddress, u32)], mut len: usize) {
    for &(addr, l) in segs {
        if len == 0 {
            break;
        }
        let n = (l as usize).min(len);
        if let Ok(slices) = mem.get_slices(addr, n, Permissions::Write) {
            for s in slices.flatten() {
                s.bitmap().mark_dirty(0, s.len());
            }
        }
        len -= n;
    }
}

/// Writes `bytes` at byte `offset` of the stream formed by the buffers `segs`.
fn stream_write<M: GuestMemory>(
    mem: &M,
    segs: &[(GuestAddress, u32)],
    offset: usize,
    bytes: &[u8],
) {
    for (i, b) in bytes.iter().enumerate() {
        let mut at = offset + i;
        for &(addr, l) in segs {
            let l = l as usize;
            if at < l {
                if let Some(a) = addr.checked_add(at as u64) {
                    // Checked writable guest RAM when gathered.
                    let _ = vm_memory::Bytes::write_slice(mem, std::slice::from_ref(b), a);
                }
                break;
            }
            at -= l;
        }
    }
}

/// Asks the driver to notify when it makes another receive buffer available, even though
/// some sit unused in the ring (too few for a frame). With `EVENT_IDX`, `avail_event` must be
/// the current available index rather than our position, or the driver's next addition
/// would not cross it. Returns whether buffers arrived since the caller last looked.
fn want_kick<M: GuestMemory>(
    mem: &M,
    q: &mut Queue,
) -> std::result::Result<bool, virtio_queue::Error> {
    let seen = q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)?;
    q.enable_notification(mem)?;
    if q.event_idx_enabled() {
        let at = GuestAddress(q.used_ring())
            .checked_add(4 + 8 * u64::from(q.size()))
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        vm_memory::Bytes::write_obj(mem, seen.0.to_le(), at)
            .map_err(virtio_queue::Error::GuestMemory)?;
    }
    // The driver reads avail_event after publishing; order our write before the re-read.
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    Ok(q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)? != seen)
}

impl<M: GuestMemory, B: NetBackend> Net<M, B> {
    /// Moves frames from the backend to the receive queue until the backend is empty, the
    /// guest has no buffer, the budget is spent or the rate limiter says wait.
    fn process_rx(&mut self) -> Result<QueueOutcome> {
        let room = self.rx_frame_room();
        let mrg = self.acked & features::MRG_RXBUF != 0;
        let Some(a) = self.active.as_mut() else {
            return Err(Error::NotActivated { device: DEVICE });
        };
        if !a.rx.ready() {
            return Ok(QueueOutcome::Done);
        }
        let mem = &a.mem;
        let q = &mut a.rx;
        let qerr = |source| Error::Queue {
            device: DEVICE,
            queue: RX_QUEUE,
            source,
        };
        // Rounds of the loop (frames, retries), and chains put in the used ring.
        let mut rounds = 0usize;
        let mut used = 0usize;
        let outcome = loop {
            rounds += 1;
            if rounds > BUDGET {
                break QueueOutcome::Pending;
            }
            if let Some(l) = self.rx_limiter.as_ref() {
                let wait = l.time_until(1, 0);
                if !wait.is_zero() {
                    break QueueOutcome::Throttled(wait);
                }
            }
            // Gather chains until the largest possible frame fits (one chain without
            // MRG_RXBUF: the driver promised big enough buffers).
            self.iov.0.clear();
            self.rx_chains.clear();
            self.rx_segs.clear();
            let mut cap = 0usize;
            // A malformed chain met after good ones ends the gather (see below).
            let mut cut_short = false;
            q.disable_notification(mem).map_err(qerr)?;
            while cap < room && self.rx_chains.len() < MAX_RX_CHAINS {
                let next = q.iter(mem).map_err(qerr)?.next();
                let Some(chain) = next else {
                    break;
                };
                let head = chain.head_index();
                let mark = self.iov.0.len();
                let seg_mark = self.rx_segs.len();
                let mut chain_cap = 0usize;
                let mut ok = true;
                for d in chain {
                    // Zero-length buffers hold nothing; skipping them keeps the per-segment
                    // bookkeeping bounded by the iovec limit.
                    if d.is_write_only() && d.len() == 0 {
                        continue;
                    }
                    if !d.is_write_only()
                        || !push_iov(
                            mem,
                            &mut self.iov.0,
                            d.addr(),
                            d.len() as usize,
                            Permissions::Write,
                        )
                    {
                        ok = false;
                        break;
                    }
                    self.rx_segs.push((d.addr(), d.len()));
                    chain_cap += d.len() as usize;
                }
                // The header must fit in the first buffer chain.
                if !ok || chain_cap < HDR_LEN || chain_cap > u32::MAX as usize {
                    self.iov.0.truncate(mark);
                    self.rx_segs.truncate(seg_mark);
                    if !self.rx_chains.is_empty() {
                        // Giving chains back rewinds the ring over the last ones taken, so
                        // every chain taken since the first good one must still be in hand:
                        // put this one back for the front of the next gather and receive
                        // into the chains gathered so far (a frame larger than they are is
                        // cut short: the driver's own malformed buffer is the cause).
                        q.go_to_previous_position();
                        cut_short = true;
                        break;
                    }
                    self.stats.rx_bad_chains += 1;
                    RX_WARN.warn(format_args!(
                        "virtio-net: malformed receive chain {head} returned empty"
                    ));
                    q.add_used(mem, head, 0).map_err(qerr)?;
                    used += 1;
                    continue;
                }
                cap += chain_cap;
                self.rx_chains.push((head, chain_cap as u32));
                if !mrg {
                    break;
                }
            }
            let enough = !self.rx_chains.is_empty() && (cap >= room || !mrg || cut_short);
            if !enough {
                // Not enough buffers: give the partial gather back and ask for a kick when
                // the driver adds one.
                for _ in 0..self.rx_chains.len() {
                    q.go_to_previous_position();
                }
                self.iov.0.clear();
                if want_kick(mem, q).map_err(qerr)? {
                    // The driver added buffers meanwhile: look again (bounded by BUDGET).
                    continue;
                }
                break QueueOutcome::Done;
            }
            // SAFETY: every iovec was built by push_iov from guest RAM the device may write,
            // which stays mapped while `mem` lives.
            let r = unsafe { self.backend.readv(&self.iov.0) };
            self.iov.0.clear();
            let n = match r {
                Ok(n) => n,
                Err(e) => {
                    for _ in 0..self.rx_chains.len() {
                        q.go_to_previous_position();
                    }
                    if e.kind() == io::ErrorKind::WouldBlock {
                        break QueueOutcome::Done;
                    }
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    self.stats.rx_errors += 1;
                    RX_WARN.warn(format_args!("virtio-net: backend read: {e}"));
                    break QueueOutcome::Done;
                }
            };
            let n = n.min(cap);
            if let Some(l) = self.rx_limiter.as_mut() {
                l.charge_at(1, n as u64, Instant::now());
            }
            // The chains the frame filled (at least the first: it holds the header).
            let mut left = n.max(HDR_LEN);
            let mut used_chains = 0u16;
            for &(_, chain_cap) in &self.rx_chains {
                if left == 0 {
                    break;
                }
                left -= left.min(chain_cap as usize);
                used_chains += 1;
            }
            // num_buffers (the tap skips those two header bytes: they are ours), before the
            // used ring shows the driver anything.
            let num = if mrg { used_chains } else { 1 };
            stream_write(mem, &self.rx_segs, 10, &num.to_le_bytes());
            stream_mark_dirty(mem, &self.rx_segs, n);
            // Give back the chains the frame didn't need (the last ones popped), then hand
            // out the others.
            for _ in usize::from(used_chains)..self.rx_chains.len() {
                q.go_to_previous_position();
            }
            let mut left = n.max(HDR_LEN);
            for &(head, chain_cap) in &self.rx_chains[..usize::from(used_chains)] {
                let len = left.min(chain_cap as usize);
                left -= len;
                q.add_used(mem, head, len as u32).map_err(qerr)?;
                used += 1;
            }
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += n as u64;
        };
        if used > 0 && q.needs_notification(mem).map_err(qerr)? {
            a.interrupt
                .trigger(InterruptKind::Queue(RX_QUEUE as u16))
                .map_err(|source| Error::Interrupt {
                    device: DEVICE,
                    what: "used buffer",
                    source,
                })?;
        }
        Ok(outcome)
    }

    fn process_tx(&mut self) -> Result<QueueOutcome> {
        let Some(a) = self.active.as_mut() else {
            return Err(Error::NotActivated { device: DEVICE });
        };
        let mem = &a.mem;
        let (backend, iov, stats) = (&mut self.backend, &mut self.iov, &mut self.stats);
        let (limiter, acked, mtu) = (&mut self.tx_limiter, self.acked, self.mtu);
        drain(DEVICE, TX_QUEUE, &mut a.tx, mem, &a.interrupt, |chain| {
            let r = transmit(
                mem,
                chain,
                backend,
                &mut iov.0,
                limiter.as_mut(),
                acked,
                mtu,
            );
            iov.0.clear();
            Ok(match r {
                Tx::Sent(n) => {
                    stats.tx_frames += 1;
                    stats.tx_bytes += n as u64;
                    ChainDone::Used(0)
                }
                Tx::Dropped(why) => {
                    stats.tx_dropped += 1;
                    TX_WARN.warn(format_args!("virtio-net: transmit frame dropped: {why:?}"));
                    ChainDone::Used(0)
                }
                Tx::Error(e) => {
                    stats.tx_errors += 1;
                    TX_WARN.warn(format_args!("virtio-net: backend write: {e}"));
                    ChainDone::Used(0)
                }
                Tx::Throttled(d) => ChainDone::Throttled(d),
            })
        })
    }
}

enum Tx {
    Sent(usize),
    Dropped(TxDrop),
    Error(io::Error),
    Throttled(std::time::Duration),
}

/// Checks one transmit chain and writes its frame to the backend: the checked header from a
/// local copy, the frame straight from guest memory.
fn transmit<M: GuestMemory, B: NetBackend>(
    mem: &M,
    chain: DescriptorChain<&M>,
    backend: &mut B,
    iov: &mut Vec<libc::iovec>,
    limiter: Option<&mut RateLimiter>,
    acked: u64,
    mtu: u16,
) -> Tx {
    let mut hdr = [0u8; HDR_LEN];
    let mut hdr_got = 0usize;
    let mut total = 0usize;
    // iov[0] is the checked header copy, filled in below.
    iov.push(libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    });
    for d in chain {
        if d.is_write_only() {
            return Tx::Dropped(TxDrop::WritableDescriptor);
        }
        let len = d.len() as usize;
        total = total.saturating_add(len);
        if total > HDR_LEN + MAX_GSO_FRAME {
            return Tx::Dropped(TxDrop::TooLong);
        }
        // The header bytes of this descriptor go to the local copy.
        let h = (HDR_LEN - hdr_got).min(len);
        if h > 0 {
            if vm_memory::Bytes::read_slice(mem, &mut hdr[hdr_got..hdr_got + h], d.addr()).is_err()
            {
                return Tx::Dropped(TxDrop::BadAddress);
            }
            hdr_got += h;
        }
        let Some(rest) = d.addr().checked_add(h as u64) else {
            return Tx::Dropped(TxDrop::BadAddress);
        };
        if iov.len() >= MAX_IOV {
            return Tx::Dropped(TxDrop::TooManyDescriptors);
        }
        if !push_iov(mem, iov, rest, len - h, Permissions::Read) {
            return Tx::Dropped(if iov.len() >= MAX_IOV {
                TxDrop::TooManyDescriptors
            } else {
                TxDrop::BadAddress
            });
        }
    }
    if hdr_got < HDR_LEN {
        return Tx::Dropped(TxDrop::Truncated);
    }
    let frame_len = total - HDR_LEN;
    if let Err(why) = parse_tx_header(&hdr, frame_len, acked, mtu) {
        return Tx::Dropped(why);
    }
    if let Some(l) = limiter {
        let now = Instant::now();
        if !l.consume_at(1, total as u64, now) {
            return Tx::Throttled(l.time_until_at(1, total as u64, now));
        }
    }
    iov[0] = libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: HDR_LEN,
    };
    loop {
        // SAFETY: iov[0] is `hdr`, alive for the call; the others come from push_iov over
        // readable guest RAM that stays mapped while `mem` lives.
        match unsafe { backend.writev(iov) } {
            Ok(_) => return Tx::Sent(total),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Tx::Error(e),
        }
    }
}

impl<M: GuestMemory + Send, B: NetBackend> VirtioDevice<M> for Net<M, B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Without VIRTIO_NET_F_CTRL_MAC_ADDR the MAC (and everything else) is read-only.
    }

    fn activate(
        &mut self,
        mem: M,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<()> {
        let got = queues.len();
        let mut it = queues.into_iter();
        let (Some(rx), Some(tx), None) = (it.next(), it.next(), it.next()) else {
            return Err(Error::QueueCount {
                device: DEVICE,
                expected: 2,
                got,
            });
        };
        let mut tun = 0;
        for (f, t) in [
            (features::GUEST_CSUM, tap::offload::CSUM),
            (features::GUEST_TSO4, tap::offload::TSO4),
            (features::GUEST_TSO6, tap::offload::TSO6),
            (features::GUEST_ECN, tap::offload::TSO_ECN),
        ] {
            if self.acked & f != 0 {
                tun |= t;
            }
        }
        // TSO needs checksum offload on the tap.
        if tun & (tap::offload::TSO4 | tap::offload::TSO6) != 0 {
            tun |= tap::offload::CSUM;
        }
        if tun & (tap::offload::TSO4 | tap::offload::TSO6) == 0 {
            tun &= !tap::offload::TSO_ECN;
        }
        if self.backend.supports_offloads() {
            self.backend.set_offload(tun).map_err(Error::NetOffload)?;
        }
        self.active = Some(Active {
            mem,
            rx,
            tx,
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
    }

    fn process_queue(&mut self, index: usize) -> Result<QueueOutcome> {
        match index {
            // New receive buffers: take what the backend held back.
            RX_QUEUE => self.process_rx(),
            TX_QUEUE => self.process_tx(),
            _ => Err(Error::QueueIndex {
                device: DEVICE,
                index,
                count: 2,
            }),
        }
    }

    fn backend_fds(&self) -> Vec<(u32, std::os::fd::RawFd)> {
        vec![(BACKEND_TOKEN, self.backend.raw_fd())]
    }

    fn process_backend(&mut self, token: u32) -> Result<QueueOutcome> {
        if token != BACKEND_TOKEN {
            return Ok(QueueOutcome::Done);
        }
        if self.active.is_none() {
            // Not started: frames wait in the backend (the tap drops what overflows).
            return Ok(QueueOutcome::Done);
        }
        self.process_rx()
    }
}

#[cfg(test)]
mod tests;
