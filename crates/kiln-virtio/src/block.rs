//! virtio-blk (device ID 2) backed by a raw image file or a host block device.
//!
//! Requests are parsed by [`parse_request`], a pure function over guest memory (no file I/O),
//! then executed against the file with positional I/O (`pread`/`pwrite`, `fdatasync`,
//! `fallocate`). Whatever the guest puts in a descriptor chain, the outcome is a status byte
//! (`OK`, `IOERR`, `UNSUPP`) written to the chain's last writable byte, or, if there is no
//! such byte, the chain returned with length 0; never a VMM error or panic.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use kiln_ratelimit::RateLimiter;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::queue::{drain, ChainDone};
use crate::{
    check_queue_size, read_config_bytes, Error, QueueOutcome, Result, VirtioDevice,
    VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};

const DEVICE: &str = "virtio-blk";

/// Bytes per virtio-blk sector (fixed by the spec, whatever `blk_size` says).
pub const SECTOR_SIZE: u64 = 512;
/// Length of the request header (`type`, `reserved`, `sector`).
pub const HEADER_LEN: u32 = 16;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = 20;
/// Length of one discard / write-zeroes segment.
pub const DISCARD_SEG_LEN: u64 = 16;
/// Data segments per request advertised in `seg_max`; longer chains are refused with IOERR.
pub const SEG_MAX: u32 = 126;
/// Most descriptors a chain may have (data segments plus header and status).
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// Segments per discard / write-zeroes request (`max_discard_seg`, `max_write_zeroes_seg`).
pub const MAX_DISCARD_SEG: u32 = 32;
/// Sectors per discard / write-zeroes segment (`max_*_sectors`): 1 GiB.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Default queue size.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Bytes of the bounce buffer between guest memory and the file, allocated once per device.
const BOUNCE_LEN: usize = 64 << 10;

/// Feature bits (`VIRTIO_BLK_F_*`).
pub mod features {
    /// Maximum number of segments in a request is in `seg_max`.
    pub const SEG_MAX: u64 = 1 << 2;
    /// The device is read-only.
    pub const RO: u64 = 1 << 5;
    /// Block size of the disk is in `blk_size`.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// The FLUSH command is supported.
    pub const FLUSH: u64 = 1 << 9;
    /// DISCARD is supported (limits in the configuration space).
    pub const DISCARD: u64 = 1 << 13;
    /// WRITE_ZEROES is supported (limits in the configuration space).
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// Request status values.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// Device or driver error.
    pub const IOERR: u8 = 1;
    /// Request not supported.
    pub const UNSUPP: u8 = 2;
}

/// Request types (`VIRTIO_BLK_T_*`).
pub mod request_type {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush the write cache.
    pub const FLUSH: u32 = 4;
    /// Get the device id string.
    pub const GET_ID: u32 = 8;
    /// Discard sectors.
    pub const DISCARD: u32 = 11;
    /// Write zeroes to sectors.
    pub const WRITE_ZEROES: u32 = 13;
}

/// `flags` bit of a write-zeroes segment: the device may unmap (punch a hole).
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `data_len` bytes from `sector`.
    In,
    /// Write `data_len` bytes at `sector`.
    Out,
    /// Flush to stable storage.
    Flush,
    /// Return the id string.
    GetId,
    /// Discard the ranges listed in the data.
    Discard,
    /// Zero the ranges listed in the data.
    WriteZeroes,
    /// A type this device doesn't implement (answered with UNSUPP).
    Unsupported(u32),
}

/// One guest buffer of a request's data (header and status byte excluded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: GuestAddress,
    /// Length in bytes (never 0 once parsed).
    pub len: u32,
    /// Whether the device writes it (IN, GET_ID) or reads it (OUT, DISCARD, WRITE_ZEROES).
    pub writable: bool,
}

/// A well-formed request: the data segments are in the `segs` vector given to
/// [`parse_request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// What it asks for.
    pub kind: RequestKind,
    /// First sector (IN/OUT).
    pub sector: u64,
    /// Total bytes of the data segments.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain is not a well-formed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseErrorKind {
    /// No descriptor could be read.
    EmptyChain,
    /// The last descriptor is not device-writable, or its status byte isn't in guest memory.
    NoStatus,
    /// A device-readable descriptor follows a device-writable one.
    WrongOrder,
    /// More than [`MAX_DESCRIPTORS`] descriptors.
    TooManyDescriptors,
    /// Fewer than 16 device-readable bytes for the header.
    ShortHeader,
    /// Data in the wrong direction for the request type (e.g. a writable buffer in a write).
    WrongDirection,
    /// A data length that isn't a multiple of the sector (or segment) size.
    BadLength,
    /// A buffer that isn't in guest memory.
    BadAddress,
}

/// A malformed chain, and where to put the IOERR status if there is a writable status byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseError {
    /// What is wrong.
    pub kind: ParseErrorKind,
    /// The status byte, if the chain has a usable one.
    pub status: Option<GuestAddress>,
}

/// Reads `buf.len()` bytes at byte `offset` of the stream formed by `segs`.
fn read_stream<M: GuestMemory>(mem: &M, segs: &[Segment], offset: u64, buf: &mut [u8]) -> bool {
    let mut skip = offset;
    let mut done = 0usize;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        // Both fit: skip < len <= u32::MAX.
        let n = ((len - skip) as usize).min(buf.len() - done);
        let Some(addr) = s.addr.checked_add(skip) else {
            return false;
        };
        if mem.read_slice(&mut buf[done..done + n], addr).is_err() {
            return false;
        }
        done += n;
        skip = 0;
    }
    done == buf.len()
}

/// Parses one descriptor chain into a [`Request`], leaving its data segments in `segs`.
///
/// Pure over guest memory: it reads the header and checks that every buffer lies in guest
/// memory, and touches nothing else, so it can be tested and benchmarked on mock memory.
/// `segs` is cleared and reused; it grows to at most [`MAX_DESCRIPTORS`] entries, so a
/// caller that reserves that much never allocates here.
///
/// Layout rules (virtio 1.x, any layout): device-readable descriptors first, the 16-byte
/// header at the start of the readable bytes, the status byte as the last byte of the last
/// (device-writable) descriptor.
pub fn parse_request<M, I>(
    mem: &M,
    chain: I,
    segs: &mut Vec<Segment>,
) -> std::result::Result<Request, ParseError>
where
    M: GuestMemory,
    I: IntoIterator<Item = Descriptor>,
{
    segs.clear();
    let (mut readable, mut writable) = (0u64, 0u64);
    let (mut n_readable, mut wrong_order, mut too_many) = (0usize, false, false);
    let mut seen_writable = false;
    let mut last: Option<Descriptor> = None;
    for d in chain {
        let w = d.is_write_only();
        if w {
            writable += u64::from(d.len());
            seen_writable = true;
        } else {
            wrong_order |= seen_writable;
            readable += u64::from(d.len());
            n_readable += 1;
        }
        if segs.len() < MAX_DESCRIPTORS {
            segs.push(Segment {
                addr: d.addr(),
                len: d.len(),
                writable: w,
            });
        } else {
            too_many = true;
        }
        last = Some(d);
    }
    let Some(last) = last else {
        return Err(ParseError {
            kind: ParseErrorKind::EmptyChain,
            status: None,
        });
    };
    let status = (last.is_write_only() && last.len() > 0)
        .then(|| last.addr().checked_add(u64::from(last.len()) - 1))
        .flatten()
        .filter(|&a| mem.check_range(a, 1, Permissions::Write));
    let fail = |kind| Err(ParseError { kind, status });
    let Some(status_addr) = status else {
        return fail(ParseErrorKind::NoStatus);
    };
    if too_many {
        return fail(ParseErrorKind::TooManyDescriptors);
    }
    if wrong_order {
        return fail(ParseErrorKind::WrongOrder);
    }
    let mut hdr = [0u8; HEADER_LEN as usize];
    if readable < u64::from(HEADER_LEN) || !read_stream(mem, &segs[..n_readable], 0, &mut hdr) {
        return fail(ParseErrorKind::ShortHeader);
    }
    let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = hdr;
    let req_type = u32::from_le_bytes([t0, t1, t2, t3]);
    let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
    let kind = match req_type {
        request_type::IN => RequestKind::In,
        request_type::OUT => RequestKind::Out,
        request_type::FLUSH => RequestKind::Flush,
        request_type::GET_ID => RequestKind::GetId,
        request_type::DISCARD => RequestKind::Discard,
        request_type::WRITE_ZEROES => RequestKind::WriteZeroes,
        other => RequestKind::Unsupported(other),
    };
    let extra_readable = readable - u64::from(HEADER_LEN);
    let extra_writable = writable - 1;
    // Direction and size of the data for each type.
    let (device_writes, data_len) = match kind {
        RequestKind::In | RequestKind::GetId => (true, extra_writable),
        RequestKind::Out | RequestKind::Discard | RequestKind::WriteZeroes => {
            (false, extra_readable)
        }
        RequestKind::Flush | RequestKind::Unsupported(_) => (false, 0),
    };
    let wrong = match kind {
        RequestKind::Unsupported(_) => false,
        _ if device_writes => extra_readable != 0,
        _ => extra_writable != 0 || (kind == RequestKind::Flush && extra_readable != 0),
    };
    if wrong {
        return fail(ParseErrorKind::WrongDirection);
    }
    let bad_len = match kind {
        RequestKind::In | RequestKind::Out => data_len % SECTOR_SIZE != 0,
        RequestKind::Discard | RequestKind::WriteZeroes => {
            data_len == 0 || data_len % DISCARD_SEG_LEN != 0
        }
        _ => false,
    };
    if bad_len {
        return fail(ParseErrorKind::BadLength);
    }
    // Keep only the data: drop the header bytes from the readable part, or the status byte
    // from the writable part.
    if device_writes {
        segs.drain(..n_readable);
        if let Some(l) = segs.last_mut() {
            l.len -= 1;
        }
    } else {
        segs.truncate(n_readable);
        let mut skip = HEADER_LEN;
        while let Some(first) = segs.first_mut() {
            if skip == 0 {
                break;
            }
            if first.len <= skip {
                skip -= first.len;
                segs.remove(0);
            } else {
                first.len -= skip;
                first.addr = first.addr.unchecked_add(u64::from(skip));
                skip = 0;
            }
        }
    }
    segs.retain(|s| s.len > 0);
    if matches!(kind, RequestKind::Flush | RequestKind::Unsupported(_)) {
        segs.clear();
    }
    let perm = if device_writes {
        Permissions::Write
    } else {
        Permissions::Read
    };
    for s in segs.iter() {
        if !mem.check_range(s.addr, s.len as usize, perm) {
            return fail(ParseErrorKind::BadAddress);
        }
    }
    Ok(Request {
        kind,
        sector,
        data_len,
        status: status_addr,
    })
}

/// Configuration of a [`Block`] device.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    /// Refuse writes, discards and write-zeroes (offers `VIRTIO_BLK_F_RO`).
    pub read_only: bool,
    /// The GET_ID string, at most 20 bytes (NUL-padded).
    pub id: Vec<u8>,
    /// Size of the single request queue (a power of two).
    pub queue_size: u16,
    /// Offer DISCARD (holes punched in the image).
    pub discard: bool,
    /// Offer WRITE_ZEROES.
    pub write_zeroes: bool,
    /// Optional throttling (bytes/s and requests/s).
    pub rate_limiter: Option<RateLimiter>,
}

impl Default for BlockConfig {
    fn default() -> Self {
        BlockConfig {
            read_only: false,
            id: Vec::new(),
            queue_size: DEFAULT_QUEUE_SIZE,
            discard: true,
            write_zeroes: true,
            rate_limiter: None,
        }
    }
}

/// The disk and the buffers requests use; separate from the queue so both can be borrowed.
struct Backend {
    file: File,
    capacity: u64,
    read_only: bool,
    id: [u8; ID_LEN],
    features: u64,
    limiter: Option<RateLimiter>,
    segs: Vec<Segment>,
    bounce: Vec<u8>,
}

/// A virtio-blk device with one request queue.
pub struct Block<M> {
    backend: Backend,
    config_space: [u8; CONFIG_LEN],
    queue_sizes: [u16; 1],
    acked: u64,
    active: Option<Active<M>>,
}

struct Active<M> {
    mem: M,
    queue: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// Bytes of the configuration space exposed (through `write_zeroes_may_unmap` and padding).
const CONFIG_LEN: usize = 60;

impl<M> std::fmt::Debug for Block<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("capacity", &self.backend.capacity)
            .field("read_only", &self.backend.read_only)
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl<M> Block<M> {
    /// A block device over `file` (opened read-write unless `cfg.read_only`). Its capacity is
    /// the file's size (a block device's size for a device node) rounded down to 512 bytes.
    pub fn new(mut file: File, cfg: BlockConfig) -> Result<Self> {
        if cfg.id.len() > ID_LEN {
            return Err(Error::IdTooLong(cfg.id.len()));
        }
        check_queue_size(DEVICE, cfg.queue_size)?;
        // seek(End) works for block devices, whose metadata length is 0.
        let size = file.seek(SeekFrom::End(0)).map_err(Error::Disk)?;
        let capacity = size / SECTOR_SIZE;
        let mut id = [0u8; ID_LEN];
        id[..cfg.id.len()].copy_from_slice(&cfg.id);
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | features::FLUSH
            | features::BLK_SIZE
            | features::SEG_MAX;
        if cfg.read_only {
            features |= features::RO;
        }
        if cfg.discard && !cfg.read_only {
            features |= features::DISCARD;
        }
        if cfg.write_zeroes && !cfg.read_only {
            features |= features::WRITE_ZEROES;
        }
        let mut cs = [0u8; CONFIG_LEN];
        let mut put = |off: usize, bytes: &[u8]| cs[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &capacity.to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        put(20, &(SECTOR_SIZE as u32).to_le_bytes());
        put(34, &1u16.to_le_bytes()); // num_queues
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEG.to_le_bytes());
        put(44, &1u32.to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(52, &MAX_DISCARD_SEG.to_le_bytes());
        put(56, &[1]); // write_zeroes_may_unmap
        Ok(Block {
            backend: Backend {
                file,
                capacity,
                read_only: cfg.read_only,
                id,
                features,
                limiter: cfg.rate_limiter,
                segs: Vec::with_capacity(MAX_DESCRIPTORS),
                bounce: vec![0; BOUNCE_LEN],
            },
            config_space: cs,
            queue_sizes: [cfg.queue_size],
            acked: 0,
            active: None,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.backend.capacity
    }

    /// Features the driver accepted (0 before `FEATURES_OK`).
    pub fn acked_features(&self) -> u64 {
        self.acked
    }
}

impl Backend {
    /// Executes one chain; returns what to put in the used ring.
    fn handle<M: GuestMemory>(&mut self, mem: &M, chain: DescriptorChain<&M>) -> ChainDone {
        let req = match parse_request(mem, chain, &mut self.segs) {
            Ok(r) => r,
            Err(e) => {
                BAD_REQUEST.warn(format_args!("virtio-blk: malformed request: {:?}", e.kind));
                return ChainDone::Used(match e.status {
                    Some(s) if mem.write_obj(status::IOERR, s).is_ok() => 1,
                    _ => 0,
                });
            }
        };
        if let Some(l) = self.limiter.as_mut() {
            let bytes = match req.kind {
                RequestKind::In | RequestKind::Out => req.data_len,
                _ => 0,
            };
            let now = Instant::now();
            if !l.consume_at(1, bytes, now) {
                return ChainDone::Throttled(l.time_until_at(1, bytes, now));
            }
        }
        let (st, written) = self.execute(mem, &req);
        let len = match mem.write_obj(st, req.status) {
            // written <= data_len < 2^32 (a chain's total length is capped by virtio-queue).
            Ok(()) => u32::try_from(written).unwrap_or(u32::MAX).saturating_add(1),
            Err(_) => 0,
        };
        ChainDone::Used(len)
    }

    /// Checks `[sector, sector + len)` (`len` in bytes) against the disk; returns the byte
    /// offset.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        let off = sector.checked_mul(SECTOR_SIZE)?;
        let end = off.checked_add(len)?;
        (end <= self.capacity.checked_mul(SECTOR_SIZE)?).then_some(off)
    }

    /// Runs a parsed request; returns the status and the bytes written to guest buffers.
    fn execute<M: GuestMemory>(&mut self, mem: &M, req: &Request) -> (u8, u64) {
        let res = match req.kind {
            RequestKind::Unsupported(_) => return (status::UNSUPP, 0),
            RequestKind::In => match self.range(req.sector, req.data_len) {
                Some(off) => self.read(mem, off).map(|()| req.data_len),
                None => Err(status::IOERR),
            },
            RequestKind::Out if self.read_only => Err(status::IOERR),
            RequestKind::Out => match self.range(req.sector, req.data_len) {
                Some(off) => self.write(mem, off).map(|()| 0),
                None => Err(status::IOERR),
            },
            RequestKind::Flush => self.file.sync_data().map(|()| 0).map_err(|_| status::IOERR),
            RequestKind::GetId => self.get_id(mem),
            RequestKind::Discard | RequestKind::WriteZeroes => {
                let feature = if req.kind == RequestKind::Discard {
                    features::DISCARD
                } else {
                    features::WRITE_ZEROES
                };
                if self.read_only {
                    Err(status::IOERR)
                } else if self.features & feature == 0 {
                    Err(status::UNSUPP)
                } else {
                    self.discard_or_zero(mem, req).map(|()| 0)
                }
            }
        };
        match res {
            Ok(n) => (status::OK, n),
            Err(s) => (s, 0),
        }
    }

    /// Disk → guest: `pread` straight into guest memory, no bounce copy (parse_request
    /// checked every segment is device-writable guest RAM).
    fn read<M: GuestMemory>(&mut self, mem: &M, off: u64) -> std::result::Result<(), u8> {
        self.transfer(mem, off, Direction::ToGuest)
    }

    /// Guest → disk: `pwrite` straight from guest memory.
    fn write<M: GuestMemory>(&mut self, mem: &M, off: u64) -> std::result::Result<(), u8> {
        self.transfer(mem, off, Direction::FromGuest)
    }

    /// Moves the request's data segments between the image at `off` and guest memory, one
    /// `pread`/`pwrite` per host-contiguous piece.
    fn transfer<M: GuestMemory>(
        &mut self,
        mem: &M,
        mut off: u64,
        dir: Direction,
    ) -> std::result::Result<(), u8> {
        let perm = match dir {
            Direction::ToGuest => Permissions::Write,
            Direction::FromGuest => Permissions::Read,
        };
        let fd = self.file.as_raw_fd();
        for s in &self.segs {
            let slices = mem
                .get_slices(s.addr, s.len as usize, perm)
                .map_err(|_| status::IOERR)?;
            for vs in slices {
                let vs = vs.map_err(|_| status::IOERR)?;
                let mut done = 0usize;
                while done < vs.len() {
                    let guard = vs.ptr_guard_mut();
                    let (ptr, len) = (guard.as_ptr(), vs.len() - done);
                    let pos = off as libc::off_t;
                    // SAFETY: `ptr` points at `vs.len()` bytes of mapped guest memory that stay
                    // mapped while `mem` lives; the kernel reads or writes at most the
                    // remaining `len` bytes from `done`. The guest may touch the buffer
                    // meanwhile, which is the same as any DMA and can't affect the VMM's own
                    // memory.
                    let n = unsafe {
                        match dir {
                            Direction::ToGuest => libc::pread(fd, ptr.add(done).cast(), len, pos),
                            Direction::FromGuest => {
                                libc::pwrite(fd, ptr.add(done).cast(), len, pos)
                            }
                        }
                    };
                    match n {
                        n if n > 0 => {
                            if dir == Direction::ToGuest {
                                vs.bitmap().mark_dirty(done, n as usize);
                            }
                            done += n as usize;
                            off += n as u64;
                        }
                        // A short read means the end of the image (range-checked before).
                        0 => return Err(status::IOERR),
                        _ if std::io::Error::last_os_error().kind()
                            == std::io::ErrorKind::Interrupted => {}
                        _ => return Err(status::IOERR),
                    }
                }
            }
        }
        Ok(())
    }

    fn get_id<M: GuestMemory>(&mut self, mem: &M) -> std::result::Result<u64, u8> {
        let mut written = 0usize;
        for s in &self.segs {
            if written == ID_LEN {
                break;
            }
            let n = (s.len as usize).min(ID_LEN - written);
            mem.write_slice(&self.id[written..written + n], s.addr)
                .map_err(|_| status::IOERR)?;
            written += n;
        }
        Ok(written as u64)
    }

    fn discard_or_zero<M: GuestMemory>(
        &mut self,
        mem: &M,
        req: &Request,
    ) -> std::result::Result<(), u8> {
        let n = req.data_len / DISCARD_SEG_LEN;
        if n > u64::from(MAX_DISCARD_SEG) {
            return Err(status::IOERR);
        }
        // Validate every segment before touching the disk, so a bad one changes nothing.
        for pass in 0..2 {
            for i in 0..n {
                let mut raw = [0u8; DISCARD_SEG_LEN as usize];
                if !read_stream(mem, &self.segs, i * DISCARD_SEG_LEN, &mut raw) {
                    return Err(status::IOERR);
                }
                let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = raw;
                let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
                let sectors = u32::from_le_bytes([n0, n1, n2, n3]);
                let flags = u32::from_le_bytes([f0, f1, f2, f3]);
                let allowed = if req.kind == RequestKind::WriteZeroes {
                    WRITE_ZEROES_FLAG_UNMAP
                } else {
                    0
                };
                if flags & !allowed != 0 {
                    return Err(status::UNSUPP);
                }
                if sectors > MAX_DISCARD_SECTORS {
                    return Err(status::IOERR);
                }
                let len = u64::from(sectors) * SECTOR_SIZE;
                let off = self.range(sector, len).ok_or(status::IOERR)?;
                if pass == 1 && len > 0 {
                    let unmap =
                        req.kind == RequestKind::Discard || flags & WRITE_ZEROES_FLAG_UNMAP != 0;
                    self.zero_range(off, len, unmap, req.kind == RequestKind::Discard)?;
                }
            }
        }
        Ok(())
    }

    /// Deallocates (`unmap`) or zeroes `[off, off + len)`. A discard is a hint: if the file
    /// can't punch holes it still succeeds; a write-zeroes falls back to writing zeros.
    fn zero_range(
        &mut self,
        off: u64,
        len: u64,
        unmap: bool,
        discard: bool,
    ) -> std::result::Result<(), u8> {
        if unmap && fallocate(&self.file, PUNCH_HOLE, off, len).is_ok() {
            return Ok(());
        }
        if discard {
            HOLE_UNSUPPORTED.warn(format_args!(
                "virtio-blk: punching a hole failed; discard ignored"
            ));
            return Ok(());
        }
        if fallocate(
            &self.file,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
        .is_ok()
        {
            return Ok(());
        }
        self.bounce.fill(0);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(BOUNCE_LEN as u64) as usize;
            self.file
                .write_all_at(&self.bounce[..n], off + done)
                .map_err(|_| status::IOERR)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Which way [`Backend::transfer`] moves data.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Image → guest (read request).
    ToGuest,
    /// Guest → image (write request).
    FromGuest,
}

const PUNCH_HOLE: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

static BAD_REQUEST: kiln_bus::RateLimitedWarn = kiln_bus::RateLimitedWarn::new();
static HOLE_UNSUPPORTED: kiln_bus::RateLimitedWarn = kiln_bus::RateLimitedWarn::new();

fn fallocate(file: &File, mode: libc::c_int, off: u64, len: u64) -> std::io::Result<()> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate takes no pointers; the fd is valid for the lifetime of `file`.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl<M: GuestMemory + Send> VirtioDevice<M> for Block<M> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.backend.features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.backend.features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Without VIRTIO_BLK_F_CONFIG_WCE every field is read-only.
        CONFIG_WRITE.warn(format_args!(
            "virtio-blk: write to read-only config space ignored"
        ));
    }

    fn activate(
        &mut self,
        mem: M,
        mut queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<()> {
        if queues.len() != 1 {
            return Err(Error::QueueCount {
                device: DEVICE,
                expected: 1,
                got: queues.len(),
            });
        }
        let Some(queue) = queues.pop() else {
            return Err(Error::QueueCount {
                device: DEVICE,
                expected: 1,
                got: 0,
            });
        };
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
    }

    fn save_state(&self) -> Result<crate::DeviceState> {
        // Requests complete (data written, fdatasync done for flushes) before their used
        // entry is written, on the event loop, so a paused device has none in flight. The
        // acked features come back through ack_features; the rate limiter starts afresh.
        Ok(crate::DeviceState {
            queues: crate::positions(self.active.as_ref().map(|a| &a.queue)),
            data: Vec::new(),
        })
    }

    fn restore_state(&mut self, _data: &[u8]) -> Result<()> {
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<QueueOutcome> {
        if index != 0 {
            return Err(Error::QueueIndex {
                device: DEVICE,
                index,
                count: 1,
            });
        }
        let Some(a) = self.active.as_mut() else {
            return Err(Error::NotActivated { device: DEVICE });
        };
        let backend = &mut self.backend;
        let mem = &a.mem;
        drain(DEVICE, index, &mut a.queue, mem, &a.interrupt, |chain| {
            Ok(backend.handle(mem, chain))
        })
    }
}

static CONFIG_WRITE: kiln_bus::RateLimitedWarn = kiln_bus::RateLimitedWarn::new();

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::time::{Duration, Instant};

    use kiln_ratelimit::BucketConfig;
    use vmm_sys_util::tempfile::TempFile;

    use super::*;
    use crate::test_util::*;

    const HDR: u64 = DATA;
    const BUF: u64 = DATA + 0x1000;
    const STATUS: u64 = DATA + 0x8_0000;

    struct H {
        mem: Mem,
        drv: Driver,
        blk: Block<Mem>,
        irq: Arc<CountingInterrupt>,
        tf: TempFile,
        used: u16,
    }

    fn harness(cfg: BlockConfig, size: u64) -> H {
        let tf = TempFile::new().unwrap();
        tf.as_file().set_len(size).unwrap();
        let mut blk = Block::new(tf.as_file().try_clone().unwrap(), cfg).unwrap();
        let mem = mem();
        let drv = Driver::default();
        let irq = CountingInterrupt::new();
        blk.activate(mem.clone(), vec![drv.queue()], irq.clone())
            .unwrap();
        H {
            mem,
            drv,
            blk,
            irq,
            tf,
            used: 0,
        }
    }

    fn default_harness() -> H {
        harness(
            BlockConfig {
                id: b"kiln-disk-0".to_vec(),
                ..Default::default()
            },
            1 << 20,
        )
    }

    impl H {
        fn header(&self, t: u32, sector: u64) {
            self.mem.write_obj(t, GuestAddress(HDR)).unwrap();
            self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
            self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        }

        /// Submits one chain, processes the queue, returns (used len, status byte).
        fn run(&mut self, bufs: &[(u64, u32, bool)]) -> (u32, u8) {
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let head = self.drv.add(&self.mem, bufs);
            assert_eq!(self.blk.process_queue(0).unwrap(), QueueOutcome::Done);
            let (id, len) = Driver::used(&self.mem, self.used);
            self.used += 1;
            assert_eq!(Driver::used_idx(&self.mem), self.used);
            assert_eq!(id, u32::from(head));
            (len, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
        }

        /// A standard request: header, data, 1-byte status.
        fn request(&mut self, t: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u32, u8) {
            self.header(t, sector);
            let mut bufs = vec![(HDR, 16, false)];
            bufs.extend_from_slice(data);
            bufs.push((STATUS, 1, true));
            self.run(&bufs)
        }

        fn file_bytes(&self, off: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0; len];
            self.tf.as_file().read_exact_at(&mut v, off).unwrap();
            v
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn config_space_and_features() {
        let h = default_harness();
        let mut b = [0u8; 8];
        h.blk.read_config(0, &mut b);
        assert_eq!(u64::from_le_bytes(b), (1 << 20) / 512);
        let mut w = [0u8; 4];
        h.blk.read_config(20, &mut w);
        assert_eq!(u32::from_le_bytes(w), 512);
        h.blk.read_config(12, &mut w);
        assert_eq!(u32::from_le_bytes(w), SEG_MAX);
        h.blk.read_config(40, &mut w);
        assert_eq!(u32::from_le_bytes(w), MAX_DISCARD_SEG);
        // Past the end reads as zero, even at absurd offsets.
        h.blk.read_config(u64::MAX - 1, &mut w);
        assert_eq!(w, [0; 4]);
        let f = h.blk.device_features();
        for bit in [
            VIRTIO_F_VERSION_1,
            features::FLUSH,
            features::BLK_SIZE,
            features::SEG_MAX,
            features::DISCARD,
            features::WRITE_ZEROES,
        ] {
            assert_ne!(f & bit, 0, "{bit:#x}");
        }
        assert_eq!(f & features::RO, 0);
        let ro = harness(
            BlockConfig {
                read_only: true,
                ..Default::default()
            },
            4096,
        );
        let f = ro.blk.device_features();
        assert_ne!(f & features::RO, 0);
        assert_eq!(f & (features::DISCARD | features::WRITE_ZEROES), 0);
    }

    #[test]
    fn rejects_bad_construction() {
        let tf = TempFile::new().unwrap();
        let f = || tf.as_file().try_clone().unwrap();
        let long = BlockConfig {
            id: vec![b'x'; 21],
            ..Default::default()
        };
        assert!(matches!(
            Block::<Mem>::new(f(), long),
            Err(Error::IdTooLong(21))
        ));
        let bad_q = BlockConfig {
            queue_size: 100,
            ..Default::default()
        };
        assert!(matches!(
            Block::<Mem>::new(f(), bad_q),
            Err(Error::QueueSize { size: 100, .. })
        ));
    }

    #[test]
    fn write_then_read_round_trip() {
        let mut h = default_harness();
        let data = pattern(1024, 3);
        h.mem.write_slice(&data, GuestAddress(BUF)).unwrap();
        assert_eq!(
            h.request(request_type::OUT, 3, &[(BUF, 1024, false)]),
            (1, status::OK)
        );
        assert_eq!(h.file_bytes(3 * 512, 1024), data);
        assert_eq!(h.file_bytes(0, 512), vec![0; 512]);
        // Read back into two buffers.
        let (a, b) = (BUF + 0x4000, BUF + 0x9000);
        assert_eq!(
            h.request(request_type::IN, 3, &[(a, 512, true), (b, 512, true)]),
            (1025, status::OK)
        );
        let mut got = vec![0u8; 1024];
        h.mem.read_slice(&mut got[..512], GuestAddress(a)).unwrap();
        h.mem.read_slice(&mut got[512..], GuestAddress(b)).unwrap();
        assert_eq!(got, data);
        assert!(h.irq.queue_count() >= 2);
    }

    #[test]
    fn large_transfer_crosses_bounce_buffer() {
        let mut h = default_harness();
        let data = pattern(BOUNCE_LEN * 2 + 512, 9);
        h.mem.write_slice(&data, GuestAddress(BUF)).unwrap();
        let len = data.len() as u32;
        assert_eq!(
            h.request(request_type::OUT, 1, &[(BUF, len, false)]).1,
            status::OK
        );
        assert_eq!(h.file_bytes(512, data.len()), data);
        h.mem
            .write_slice(&vec![0; data.len()], GuestAddress(BUF))
            .unwrap();
        assert_eq!(
            h.request(request_type::IN, 1, &[(BUF, len, true)]),
            (len + 1, status::OK)
        );
        let mut got = vec![0u8; data.len()];
        h.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(got, data);
    }

    #[test]
    fn flush_and_get_id() {
        let mut h = default_harness();
        assert_eq!(h.request(request_type::FLUSH, 0, &[]), (1, status::OK));
        h.mem.write_slice(&[0xaa; 20], GuestAddress(BUF)).unwrap();
        assert_eq!(
            h.request(request_type::GET_ID, 0, &[(BUF, 20, true)]),
            (21, status::OK)
        );
        let mut id = [0u8; 20];
        h.mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
        assert_eq!(&id[..11], b"kiln-disk-0");
        assert_eq!(id[11..], [0; 9]);
        // A shorter buffer gets a prefix.
        assert_eq!(
            h.request(request_type::GET_ID, 0, &[(BUF + 100, 4, true)]),
            (5, status::OK)
        );
        let mut p = [0u8; 4];
        h.mem.read_slice(&mut p, GuestAddress(BUF + 100)).unwrap();
        assert_eq!(&p, b"kiln");
    }

    fn discard_seg(mem: &Mem, at: u64, sector: u64, sectors: u32, flags: u32) {
        mem.write_obj(sector, GuestAddress(at)).unwrap();
        mem.write_obj(sectors, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
    }

    fn punch_hole_supported(f: &File) -> bool {
        fallocate(f, PUNCH_HOLE, 0, 4096).is_ok()
    }

    #[test]
    fn discard_punches_holes_in_sparse_images() {
        let mut h = harness(BlockConfig::default(), 4 << 20);
        if !punch_hole_supported(h.tf.as_file()) {
            eprintln!("SKIPPED discard test: the temp directory's filesystem can't punch holes");
            return;
        }
        let data = pattern(1 << 20, 1);
        h.tf.as_file().write_all_at(&data, 1 << 20).unwrap();
        h.tf.as_file().sync_all().unwrap();
        let before = h.tf.as_file().metadata().unwrap().blocks();
        assert!(before >= 2048, "data should be allocated: {before} blocks");
        // Discard 512 KiB in two segments.
        discard_seg(&h.mem, BUF, 2048, 512, 0);
        discard_seg(&h.mem, BUF + 16, 2560, 512, 0);
        assert_eq!(
            h.request(request_type::DISCARD, 0, &[(BUF, 32, false)]),
            (1, status::OK)
        );
        let after = h.tf.as_file().metadata().unwrap().blocks();
        assert!(after + 1000 <= before, "st_blocks {before} -> {after}");
        assert_eq!(h.tf.as_file().metadata().unwrap().len(), 4 << 20);
        assert_eq!(h.file_bytes(1 << 20, 512 << 10), vec![0; 512 << 10]);
        assert_eq!(h.file_bytes(3 << 19, 512 << 10), data[512 << 10..]);
    }

    #[test]
    fn write_zeroes_with_and_without_unmap() {
        let mut h = harness(BlockConfig::default(), 1 << 20);
        h.tf.as_file()
            .write_all_at(&pattern(1 << 20, 5), 0)
            .unwrap();
        discard_seg(&h.mem, BUF, 8, 8, WRITE_ZEROES_FLAG_UNMAP);
        discard_seg(&h.mem, BUF + 16, 100, 3, 0);
        assert_eq!(
            h.request(request_type::WRITE_ZEROES, 0, &[(BUF, 32, false)]),
            (1, status::OK)
        );
        assert_eq!(h.file_bytes(8 * 512, 8 * 512), vec![0; 8 * 512]);
        assert_eq!(h.file_bytes(100 * 512, 3 * 512), vec![0; 3 * 512]);
        // Neighbours untouched.
        assert_eq!(
            h.file_bytes(7 * 512, 512),
            pattern(1 << 20, 5)[7 * 512..8 * 512]
        );
        assert_eq!(
            h.file_bytes(103 * 512, 1),
            pattern(1 << 20, 5)[103 * 512..103 * 512 + 1]
        );
        assert_eq!(h.tf.as_file().metadata().unwrap().len(), 1 << 20);
    }

    #[test]
    fn discard_and_write_zeroes_validate_every_segment_first() {
        let mut h = harness(BlockConfig::default(), 1 << 20);
        let data = pattern(1 << 20, 2);
        h.tf.as_file().write_all_at(&data, 0).unwrap();
        let cap = h.blk.capacity();
        // Second segment past the end: nothing is discarded.
        discard_seg(&h.mem, BUF, 0, 8, 0);
        discard_seg(&h.mem, BUF + 16, cap - 1, 2, 0);
        assert_eq!(
            h.request(request_type::WRITE_ZEROES, 0, &[(BUF, 32, false)])
                .1,
            status::IOERR
        );
        assert_eq!(h.file_bytes(0, 4096), data[..4096]);
        // UNMAP is not a discard flag; unknown flags are unsupported.
        discard_seg(&h.mem, BUF, 0, 8, WRITE_ZEROES_FLAG_UNMAP);
        assert_eq!(
            h.request(request_type::DISCARD, 0, &[(BUF, 16, false)]).1,
            status::UNSUPP
        );
        discard_seg(&h.mem, BUF, 0, 8, 0x80);
        assert_eq!(
            h.request(request_type::WRITE_ZEROES, 0, &[(BUF, 16, false)])
                .1,
            status::UNSUPP
        );
        // Sector overflow, oversized segment, too many segments, ragged length.
        discard_seg(&h.mem, BUF, u64::MAX, 1, 0);
        assert_eq!(
            h.request(request_type::DISCARD, 0, &[(BUF, 16, false)]).1,
            status::IOERR
        );
        discard_seg(&h.mem, BUF, 0, MAX_DISCARD_SECTORS + 1, 0);
        assert_eq!(
            h.request(request_type::DISCARD, 0, &[(BUF, 16, false)]).1,
            status::IOERR
        );
        let n = (MAX_DISCARD_SEG + 1) * 16;
        h.mem
            .write_slice(&vec![0; n as usize], GuestAddress(BUF))
            .unwrap();
        assert_eq!(
            h.request(request_type::DISCARD, 0, &[(BUF, n, false)]).1,
            status::IOERR
        );
        assert_eq!(
            h.request(request_type::DISCARD, 0, &[(BUF, 15, false)]).1,
            status::IOERR
        );
        assert_eq!(h.file_bytes(0, 4096), data[..4096]);
    }

    #[test]
    fn read_only_refuses_writes() {
        let mut h = harness(
            BlockConfig {
                read_only: true,
                ..Default::default()
            },
            1 << 16,
        );
        h.tf.as_file().write_all_at(&[7; 512], 0).unwrap();
        h.mem.write_slice(&[1; 512], GuestAddress(BUF)).unwrap();
        assert_eq!(
            h.request(request_type::OUT, 0, &[(BUF, 512, false)]),
            (1, status::IOERR)
        );
        discard_seg(&h.mem, BUF, 0, 1, 0);
        assert_eq!(
            h.request(request_type::DISCARD, 0, &[(BUF, 16, false)]).1,
            status::IOERR
        );
        assert_eq!(
            h.request(request_type::WRITE_ZEROES, 0, &[(BUF, 16, false)])
                .1,
            status::IOERR
        );
        assert_eq!(h.file_bytes(0, 512), vec![7; 512]);
        assert_eq!(
            h.request(request_type::IN, 0, &[(BUF, 512, true)]),
            (513, status::OK)
        );
        assert_eq!(h.request(request_type::FLUSH, 0, &[]).1, status::OK);
    }

    #[test]
    fn requests_past_the_end_fail() {
        let mut h = harness(BlockConfig::default(), 8 * 512);
        assert_eq!(h.blk.capacity(), 8);
        let cases = [
            (request_type::IN, 8, 512),
            (request_type::IN, 7, 1024),
            (request_type::OUT, 7, 1024),
            (request_type::IN, u64::MAX, 512),
            (request_type::OUT, u64::MAX / 512 + 1, 512),
        ];
        for (t, sector, len) in cases {
            let w = t == request_type::IN;
            assert_eq!(
                h.request(t, sector, &[(BUF, len, w)]),
                (1, status::IOERR),
                "type {t} sector {sector} len {len}"
            );
        }
        assert_eq!(h.tf.as_file().metadata().unwrap().len(), 8 * 512);
        // The last sector itself is fine.
        assert_eq!(
            h.request(request_type::IN, 7, &[(BUF, 512, true)]).1,
            status::OK
        );
    }

    #[test]
    fn malformed_chains_get_ioerr_or_len_zero() {
        let mut h = default_harness();
        let before = h.file_bytes(0, 4096);
        h.header(request_type::OUT, 0);
        // Header too short.
        assert_eq!(
            h.run(&[(HDR, 8, false), (STATUS, 1, true)]),
            (1, status::IOERR)
        );
        // No status: only readable descriptors; nothing is written to guest memory.
        assert_eq!(h.run(&[(HDR, 16, false), (BUF, 512, false)]), (0, 0xff));
        // Last descriptor writable but empty.
        assert_eq!(h.run(&[(HDR, 16, false), (STATUS, 0, true)]), (0, 0xff));
        // Status byte outside guest memory.
        assert_eq!(h.run(&[(HDR, 16, false), (MEM_SIZE, 1, true)]).0, 0);
        // OUT with a device-writable data buffer.
        assert_eq!(
            h.run(&[(HDR, 16, false), (BUF, 512, true), (STATUS, 1, true)]),
            (1, status::IOERR)
        );
        // Readable after writable.
        assert_eq!(
            h.run(&[
                (HDR, 16, false),
                (BUF, 512, true),
                (BUF, 512, false),
                (STATUS, 1, true)
            ]),
            (1, status::IOERR)
        );
        // Data not a multiple of 512.
        assert_eq!(
            h.run(&[(HDR, 16, false), (BUF, 511, false), (STATUS, 1, true)]),
            (1, status::IOERR)
        );
        // Data outside guest memory, and wrapping the address space.
        assert_eq!(
            h.run(&[
                (HDR, 16, false),
                (MEM_SIZE - 256, 512, false),
                (STATUS, 1, true)
            ]),
            (1, status::IOERR)
        );
        assert_eq!(
            h.run(&[
                (HDR, 16, false),
                (u64::MAX - 100, 512, false),
                (STATUS, 1, true)
            ]),
            (1, status::IOERR)
        );
        // Header outside guest memory.
        assert_eq!(
            h.run(&[(MEM_SIZE + 0x1000, 16, false), (STATUS, 1, true)]),
            (1, status::IOERR)
        );
        assert_eq!(h.file_bytes(0, 4096), before);
        // IN with readable data.
        h.header(request_type::IN, 0);
        assert_eq!(
            h.run(&[(HDR, 16, false), (BUF, 512, false), (STATUS, 1, true)]),
            (1, status::IOERR)
        );
        // FLUSH with data.
        h.header(request_type::FLUSH, 0);
        assert_eq!(
            h.run(&[(HDR, 16, false), (BUF, 512, true), (STATUS, 1, true)]),
            (1, status::IOERR)
        );
        // Unknown type.
        h.header(99, 0);
        assert_eq!(
            h.run(&[(HDR, 16, false), (STATUS, 1, true)]),
            (1, status::UNSUPP)
        );
        assert_eq!(h.blk.process_queue(0).unwrap(), QueueOutcome::Done);
    }

    #[test]
    fn any_layout_header_and_status_sharing_descriptors() {
        let mut h = default_harness();
        let data = pattern(512, 4);
        h.mem.write_slice(&data, GuestAddress(BUF)).unwrap();
        // OUT: header split 8 + 8 and followed by data in one descriptor.
        h.header(request_type::OUT, 2);
        h.mem.write_slice(&data, GuestAddress(HDR + 16)).unwrap();
        assert_eq!(
            h.run(&[
                (HDR, 8, false),
                (HDR + 8, 8 + 512, false),
                (STATUS, 1, true)
            ]),
            (1, status::OK)
        );
        assert_eq!(h.file_bytes(1024, 512), data);
        // IN: data and status in one writable descriptor; status is its last byte.
        h.header(request_type::IN, 2);
        let (len, _) = h.run(&[(HDR, 16, false), (BUF + 0x1000, 513, true)]);
        assert_eq!(len, 513);
        let mut got = vec![0u8; 513];
        h.mem
            .read_slice(&mut got, GuestAddress(BUF + 0x1000))
            .unwrap();
        assert_eq!(got[..512], data[..]);
        assert_eq!(got[512], status::OK);
    }

    #[test]
    fn indirect_chains_work() {
        let mut h = default_harness();
        let table = DATA + 0x2_0000;
        let data = pattern(512, 8);
        h.mem.write_slice(&data, GuestAddress(BUF)).unwrap();
        h.header(request_type::OUT, 5);
        write_desc(&h.mem, table, 0, HDR, 16, F_NEXT, 1);
        write_desc(&h.mem, table, 1, BUF, 512, F_NEXT, 2);
        write_desc(&h.mem, table, 2, STATUS, 1, F_WRITE, 0);
        h.drv.add_raw(&h.mem, table, 48, F_INDIRECT);
        assert_eq!(h.blk.process_queue(0).unwrap(), QueueOutcome::Done);
        assert_eq!(Driver::used(&h.mem, 0).1, 1);
        assert_eq!(
            h.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            status::OK
        );
        assert_eq!(h.file_bytes(5 * 512, 512), data);
    }

    #[test]
    fn too_many_descriptors_is_ioerr() {
        let m = mem();
        let mut segs = Vec::with_capacity(MAX_DESCRIPTORS);
        m.write_obj(request_type::OUT, GuestAddress(HDR)).unwrap();
        let mut chain = vec![Descriptor::new(HDR, 16, 0, 0)];
        chain
            .extend((0..MAX_DESCRIPTORS).map(|i| Descriptor::new(BUF + 512 * i as u64, 512, 0, 0)));
        chain.push(Descriptor::new(STATUS, 1, F_WRITE, 0));
        let e = parse_request(&m, chain.clone(), &mut segs).unwrap_err();
        assert_eq!(e.kind, ParseErrorKind::TooManyDescriptors);
        assert_eq!(e.status, Some(GuestAddress(STATUS)));
        assert!(
            segs.capacity() <= MAX_DESCRIPTORS,
            "parse must not grow the vector"
        );
        // One fewer data segment than the limit parses.
        chain.drain(MAX_DESCRIPTORS - 1..MAX_DESCRIPTORS + 1);
        let r = parse_request(&m, chain, &mut segs).unwrap();
        assert_eq!(r.kind, RequestKind::Out);
        assert_eq!(segs.len(), MAX_DESCRIPTORS - 2);
        assert_eq!(r.data_len, 512 * (MAX_DESCRIPTORS as u64 - 2));
    }

    #[test]
    fn parse_request_reports_structure() {
        let m = mem();
        let mut segs = Vec::new();
        m.write_obj(request_type::IN, GuestAddress(HDR)).unwrap();
        m.write_obj(77u64, GuestAddress(HDR + 8)).unwrap();
        let chain = [
            Descriptor::new(HDR, 16, 0, 0),
            Descriptor::new(BUF, 1024, F_WRITE, 0),
            Descriptor::new(STATUS, 1, F_WRITE, 0),
        ];
        let r = parse_request(&m, chain, &mut segs).unwrap();
        assert_eq!(
            r,
            Request {
                kind: RequestKind::In,
                sector: 77,
                data_len: 1024,
                status: GuestAddress(STATUS)
            }
        );
        assert_eq!(
            segs,
            [Segment {
                addr: GuestAddress(BUF),
                len: 1024,
                writable: true
            }]
        );
        let e = parse_request(&m, [], &mut segs).unwrap_err();
        assert_eq!((e.kind, e.status), (ParseErrorKind::EmptyChain, None));
    }

    #[test]
    fn several_requests_per_notification_one_interrupt() {
        let mut h = default_harness();
        h.header(request_type::FLUSH, 0);
        for i in 0..3u64 {
            h.drv
                .add(&h.mem, &[(HDR, 16, false), (STATUS + i, 1, true)]);
        }
        assert_eq!(h.blk.process_queue(0).unwrap(), QueueOutcome::Done);
        assert_eq!(Driver::used_idx(&h.mem), 3);
        assert_eq!(h.irq.queue_count(), 1);
        for i in 0..3 {
            assert_eq!(Driver::used(&h.mem, i).1, 1);
        }
        // A spurious notification changes nothing.
        assert_eq!(h.blk.process_queue(0).unwrap(), QueueOutcome::Done);
        assert_eq!(h.irq.queue_count(), 1);
    }

    #[test]
    fn rate_limited_disk_stops_and_resumes() {
        let ops = BucketConfig {
            size: 1,
            one_time_burst: 0,
            refill_time: Duration::from_millis(30),
        };
        let mut h = harness(
            BlockConfig {
                rate_limiter: Some(RateLimiter::new(None, Some(ops)).unwrap()),
                ..Default::default()
            },
            1 << 16,
        );
        h.header(request_type::FLUSH, 0);
        h.drv.add(&h.mem, &[(HDR, 16, false), (STATUS, 1, true)]);
        h.drv
            .add(&h.mem, &[(HDR, 16, false), (STATUS + 1, 1, true)]);
        let start = Instant::now();
        let QueueOutcome::Throttled(wait) = h.blk.process_queue(0).unwrap() else {
            panic!("second request should be throttled");
        };
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(30));
        assert_eq!(Driver::used_idx(&h.mem), 1);
        std::thread::sleep(wait);
        assert_eq!(h.blk.process_queue(0).unwrap(), QueueOutcome::Done);
        assert_eq!(Driver::used_idx(&h.mem), 2);
        assert!(start.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn process_queue_errors() {
        let tf = TempFile::new().unwrap();
        let mut b =
            Block::<Mem>::new(tf.as_file().try_clone().unwrap(), BlockConfig::default()).unwrap();
        assert!(matches!(
            b.process_queue(0),
            Err(Error::NotActivated { .. })
        ));
        assert!(matches!(
            b.process_queue(1),
            Err(Error::QueueIndex { index: 1, .. })
        ));
        let irq = CountingInterrupt::new();
        assert!(matches!(
            b.activate(mem(), vec![], irq.clone()),
            Err(Error::QueueCount { got: 0, .. })
        ));
        let d = Driver::default();
        assert!(b.activate(mem(), vec![d.queue()], irq).is_ok());
        b.reset();
        assert!(matches!(
            b.process_queue(0),
            Err(Error::NotActivated { .. })
        ));
    }
}
