//! Frames on the wire.
//!
//! Every frame is an 8-byte header — kind (u8), three zero bytes, payload length (u32 LE) —
//! followed by the payload. All integers are little-endian. The first frame of a stream is
//! [`Frame::Hello`], whose payload starts with [`MAGIC`] and [`PROTOCOL_VERSION`], so a
//! stream from something else, or from an incompatible kiln, is refused at once.

use std::io::{self, Read, Write};

use crate::{Error, HostInfo, Region, PAGE};

/// First bytes of a `Hello` payload.
pub const MAGIC: [u8; 8] = *b"KILNMIG\0";
/// Version of this protocol; a destination refuses any other.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest payload accepted (a state blob may be this large).
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// Most pages one `Pages` frame carries.
pub const MAX_PAGES_PER_FRAME: usize = 256;

/// Frame kinds.
mod kind {
    pub const HELLO: u8 = 1;
    pub const HELLO_OK: u8 = 2;
    pub const REFUSE: u8 = 3;
    pub const PAGES: u8 = 4;
    pub const ZERO: u8 = 5;
    pub const ROUND_END: u8 = 6;
    pub const STATE: u8 = 7;
    pub const COMMIT: u8 = 8;
    pub const RUNNING: u8 = 9;
    pub const ABORT: u8 = 10;
}

/// What the source says first: who it is and what the VM looks like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u32,
    /// The sending host and kiln.
    pub host: HostInfo,
    /// The guest memory regions.
    pub regions: Vec<Region>,
    /// vCPUs of the VM.
    pub vcpus: u32,
}

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Source → destination, first.
    Hello(Hello),
    /// Destination → source: the VM can be taken.
    HelloOk,
    /// Destination → source: refused or failed, with why.
    Refuse(String),
    /// Source → destination: `data.len() / 4096` pages from `gpa`.
    Pages {
        /// Guest-physical address of the first page.
        gpa: u64,
        /// The page contents.
        data: Vec<u8>,
    },
    /// Source → destination: `count` pages from `gpa` are all zeros.
    Zero {
        /// Guest-physical address of the first page.
        gpa: u64,
        /// Pages.
        count: u64,
    },
    /// Source → destination: a pre-copy round ended (for the destination's log).
    RoundEnd {
        /// Round number (0 = the full pass).
        round: u32,
        /// Pages sent in it.
        pages: u64,
    },
    /// Source → destination: the paused VM's device state.
    State(Vec<u8>),
    /// Source → destination: everything is sent; restore and run.
    Commit,
    /// Destination → source: the VM runs here now.
    Running {
        /// Nanoseconds from `Commit` to the VM running, by the destination's clock.
        restore_ns: u64,
    },
    /// Source → destination: the source gives up (and keeps its VM).
    Abort(String),
}

impl Frame {
    /// A short name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "hello",
            Frame::HelloOk => "hello-ok",
            Frame::Refuse(_) => "refuse",
            Frame::Pages { .. } => "pages",
            Frame::Zero { .. } => "zero",
            Frame::RoundEnd { .. } => "round-end",
            Frame::State(_) => "state",
            Frame::Commit => "commit",
            Frame::Running { .. } => "running",
            Frame::Abort(_) => "abort",
        }
    }
}

/// Appends little-endian fields to a payload.
#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
        self
    }
}

/// Reads little-endian fields from a payload; every read is bounds-checked.
struct Dec<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.b.len() < n {
            return Err(Error::Malformed(self.what, "payload too short".into()));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u32(&mut self) -> Result<u32, Error> {
        let mut a = [0; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, Error> {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<&'a [u8], Error> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, Error> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec())
            .map_err(|_| Error::Malformed(self.what, "string is not UTF-8".into()))
    }
    fn end(&self) -> Result<(), Error> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(Error::Malformed(self.what, "trailing bytes".into()))
        }
    }
}

fn header(kind: u8, len: usize) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[0] = kind;
    h[4..].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

/// Writes a frame whose payload is `parts` concatenated (no copy of large page data).
fn write_parts(w: &mut impl Write, kind: u8, parts: &[&[u8]]) -> io::Result<usize> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    // The receiver refuses bigger frames; don't send one (or a length that doesn't fit).
    if len > MAX_PAYLOAD as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a {len}-byte frame exceeds the protocol's {MAX_PAYLOAD}-byte limit"),
        ));
    }
    w.write_all(&header(kind, len))?;
    for p in parts {
        w.write_all(p)?;
    }
    Ok(8 + len)
}

/// Writes `pages` pages from `data` at `gpa` as one `Pages` frame; returns bytes written.
pub fn write_pages(w: &mut impl Write, gpa: u64, data: &[u8]) -> io::Result<usize> {
    write_parts(w, kind::PAGES, &[&gpa.to_le_bytes(), data])
}

/// Writes `f`; returns the bytes written.
pub fn write_frame(w: &mut impl Write, f: &Frame) -> io::Result<usize> {
    let mut e = Enc::default();
    let k = match f {
        Frame::Hello(h) => {
            e.0.extend_from_slice(&MAGIC);
            e.u32(h.version);
            e.bytes(h.host.kiln_version.as_bytes());
            e.bytes(&h.host.cpu_vendor);
            e.u32(h.host.cpu_features.len() as u32);
            for f in &h.host.cpu_features {
                e.u32(*f);
            }
            e.u32(h.regions.len() as u32);
            for r in &h.regions {
                e.u64(r.gpa).u64(r.len);
            }
            e.u32(h.vcpus);
            kind::HELLO
        }
        Frame::HelloOk => kind::HELLO_OK,
        Frame::Refuse(m) => {
            e.bytes(m.as_bytes());
            kind::REFUSE
        }
        Frame::Pages { gpa, data } => return write_pages(w, *gpa, data),
        Frame::Zero { gpa, count } => {
            e.u64(*gpa).u64(*count);
            kind::ZERO
        }
        Frame::RoundEnd { round, pages } => {
            e.u32(*round).u64(*pages);
            kind::ROUND_END
        }
        Frame::State(b) => return write_parts(w, kind::STATE, &[b]),
        Frame::Commit => kind::COMMIT,
        Frame::Running { restore_ns } => {
            e.u64(*restore_ns);
            kind::RUNNING
        }
        Frame::Abort(m) => {
            e.bytes(m.as_bytes());
            kind::ABORT
        }
    };
    let n = write_parts(w, k, &[&e.0])?;
    w.flush()?;
    Ok(n)
}

/// Reads exactly `buf.len()` bytes; a clean end of stream is [`Error::Truncated`].
fn read_full(r: &mut impl Read, buf: &mut [u8], what: &'static str) -> Result<(), Error> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::Truncated(what)
        } else {
            Error::Io(what, e)
        }
    })
}

/// Reads one frame.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, Error> {
    let mut h = [0u8; 8];
    read_full(r, &mut h, "frame header")?;
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if h[1..4] != [0, 0, 0] {
        return Err(Error::Malformed(
            "frame header",
            "reserved bytes set".into(),
        ));
    }
    if len > MAX_PAYLOAD {
        return Err(Error::Malformed(
            "frame header",
            format!("payload of {len} bytes exceeds {MAX_PAYLOAD}"),
        ));
    }
    let mut p = vec![0u8; len as usize];
    read_full(r, &mut p, "frame payload")?;
    decode(h[0], p)
}

fn decode(k: u8, p: Vec<u8>) -> Result<Frame, Error> {
    let what = match k {
        kind::HELLO => "hello",
        kind::REFUSE => "refuse",
        kind::PAGES => "pages",
        kind::ZERO => "zero",
        kind::ROUND_END => "round-end",
        kind::RUNNING => "running",
        kind::ABORT => "abort",
        _ => "frame",
    };
    let mut d = Dec { b: &p, what };
    let f = match k {
        kind::HELLO => {
            if d.take(8)? != MAGIC {
                return Err(Error::Malformed(
                    "hello",
                    "not a kiln migration stream".into(),
                ));
            }
            let version = d.u32()?;
            if version != PROTOCOL_VERSION {
                return Err(Error::Version {
                    ours: PROTOCOL_VERSION,
                    theirs: version,
                });
            }
            let kiln_version = d.string()?;
            let vendor = d.bytes()?;
            let mut cpu_vendor = [0u8; 12];
            if vendor.len() != 12 {
                return Err(Error::Malformed(
                    "hello",
                    "CPU vendor is not 12 bytes".into(),
                ));
            }
            cpu_vendor.copy_from_slice(vendor);
            let n = d.u32()? as usize;
            if n > 64 {
                return Err(Error::Malformed(
                    "hello",
                    "too many CPU feature words".into(),
                ));
            }
            let cpu_features = (0..n).map(|_| d.u32()).collect::<Result<_, _>>()?;
            let n = d.u32()? as usize;
            if n > 16 {
                return Err(Error::Malformed("hello", "too many memory regions".into()));
            }
            let regions = (0..n)
                .map(|_| {
                    Ok(Region {
                        gpa: d.u64()?,
                        len: d.u64()?,
                    })
                })
                .collect::<Result<_, Error>>()?;
            let vcpus = d.u32()?;
            Frame::Hello(Hello {
                version,
                host: HostInfo {
                    kiln_version,
                    cpu_vendor,
                    cpu_features,
                },
                regions,
                vcpus,
            })
        }
        kind::HELLO_OK => Frame::HelloOk,
        kind::REFUSE => Frame::Refuse(d.string()?),
        kind::PAGES => {
            let gpa = d.u64()?;
            let n = d.b.len();
            if n == 0 || n % PAGE as usize != 0 || n > MAX_PAGES_PER_FRAME * PAGE as usize {
                return Err(Error::Malformed("pages", format!("{n} bytes of page data")));
            }
            if gpa % PAGE != 0 {
                return Err(Error::Malformed(
                    "pages",
                    format!("unaligned address {gpa:#x}"),
                ));
            }
            // The page data is the rest of the payload: move it out without a copy.
            let mut p = p;
            p.drain(..8);
            return Ok(Frame::Pages { gpa, data: p });
        }
        kind::ZERO => Frame::Zero {
            gpa: d.u64()?,
            count: d.u64()?,
        },
        kind::ROUND_END => Frame::RoundEnd {
            round: d.u32()?,
            pages: d.u64()?,
        },
        kind::STATE => return Ok(Frame::State(p)),
        kind::COMMIT => Frame::Commit,
        kind::RUNNING => Frame::Running {
            restore_ns: d.u64()?,
        },
        kind::ABORT => Frame::Abort(d.string()?),
        other => return Err(Error::Malformed("frame", format!("unknown kind {other}"))),
    };
    d.end()?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostInfo {
        HostInfo {
            kiln_version: "0.1.0".into(),
            cpu_vendor: *b"GenuineIntel",
            cpu_features: vec![1, 2, 3],
        }
    }

    fn round_trip(f: Frame) {
        let mut b = Vec::new();
        write_frame(&mut b, &f).unwrap();
        assert_eq!(read_frame(&mut &b[..]).unwrap(), f);
    }

    #[test]
    fn every_frame_round_trips() {
        round_trip(Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            host: host(),
            regions: vec![Region {
                gpa: 0,
                len: 1 << 20,
            }],
            vcpus: 2,
        }));
        round_trip(Frame::HelloOk);
        round_trip(Frame::Refuse("no".into()));
        round_trip(Frame::Pages {
            gpa: 0x1000,
            data: vec![7; 8192],
        });
        round_trip(Frame::Zero { gpa: 0, count: 9 });
        round_trip(Frame::RoundEnd { round: 3, pages: 4 });
        round_trip(Frame::State(vec![1, 2, 3]));
        round_trip(Frame::Commit);
        round_trip(Frame::Running { restore_ns: 5 });
        round_trip(Frame::Abort("x".into()));
    }

    #[test]
    fn a_bad_version_and_a_foreign_stream_are_refused() {
        let mut b = Vec::new();
        write_frame(
            &mut b,
            &Frame::Hello(Hello {
                version: PROTOCOL_VERSION + 1,
                host: host(),
                regions: vec![],
                vcpus: 1,
            }),
        )
        .unwrap();
        assert!(matches!(
            read_frame(&mut &b[..]),
            Err(Error::Version { theirs, .. }) if theirs == PROTOCOL_VERSION + 1
        ));
        b[8] = b'X';
        assert!(matches!(
            read_frame(&mut &b[..]),
            Err(Error::Malformed("hello", _))
        ));
    }

    #[test]
    fn truncated_and_malformed_frames_are_errors() {
        let mut b = Vec::new();
        write_frame(&mut b, &Frame::Zero { gpa: 0, count: 1 }).unwrap();
        for cut in [0, 3, 8, 15] {
            assert!(
                matches!(read_frame(&mut &b[..cut]), Err(Error::Truncated(_))),
                "{cut}"
            );
        }
        // A frame over the limit is not even sent.
        let huge = vec![0u8; MAX_PAYLOAD as usize + 1];
        let e = write_frame(&mut Vec::new(), &Frame::State(huge)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
        // Payload length over the limit.
        let mut big = b.clone();
        big[4..8].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(
            read_frame(&mut &big[..]),
            Err(Error::Malformed(..))
        ));
        // Unknown kind; reserved bytes.
        let mut k = b.clone();
        k[0] = 99;
        assert!(matches!(read_frame(&mut &k[..]), Err(Error::Malformed(..))));
        let mut r = b.clone();
        r[2] = 1;
        assert!(matches!(read_frame(&mut &r[..]), Err(Error::Malformed(..))));
        // Page data that is not whole pages, or unaligned.
        let mut p = Vec::new();
        write_pages(&mut p, 0, &[0; 100]).unwrap();
        assert!(matches!(
            read_frame(&mut &p[..]),
            Err(Error::Malformed("pages", _))
        ));
        let mut p = Vec::new();
        write_pages(&mut p, 0x800, &[0; 4096]).unwrap();
        assert!(matches!(
            read_frame(&mut &p[..]),
            Err(Error::Malformed("pages", _))
        ));
        // A string length that runs past the payload.
        let mut s = Vec::new();
        write_frame(&mut s, &Frame::Refuse("abc".into())).unwrap();
        s[8] = 200;
        assert!(matches!(read_frame(&mut &s[..]), Err(Error::Malformed(..))));
    }
}
