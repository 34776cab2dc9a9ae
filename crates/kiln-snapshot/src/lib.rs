//! Kiln's snapshot files: a versioned, checksummed **state file** (everything of a VM except its
//! memory, as any serde type the VMM chooses) and a sparse **memory file** (guest RAM, zero
//! pages left as holes). KVM-free: the VMM captures and restores the state; this crate only
//! writes, checks and reads files.
//!
//! # State file layout (format version 1)
//!
//! | offset | size | what |
//! | --- | --- | --- |
//! | 0 | 8 | magic `KILNSNAP` |
//! | 8 | 4 | format version, little endian ([`FORMAT_VERSION`]) |
//! | 12 | 8 | total file length in bytes, little endian |
//! | 20 | 4 | header length `H`, little endian |
//! | 24 | `H` | [`Header`], postcard |
//! | 24 + `H` | ... | payload, postcard |
//! | end - 4 | 4 | CRC-32 (IEEE) of every byte before it, little endian |
//!
//! Files are written to a temporary file in the target directory, fsync'd, renamed over the
//! target and the directory fsync'd, so a crash leaves either the old file or the new one.
//! [`read_state`] checks, in order: magic, format version, length, checksum, header, host CPU
//! compatibility, payload; each failure is an [`Error`] naming the file. Nothing is changed
//! by a failed load.
#![warn(missing_docs)]
#![doc = include_str!("../README.md")]

mod cpu;
pub mod memory;

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use cpu::CpuFeatures;
pub use memory::{MemoryDesc, MemoryRegion};

/// The first bytes of every state file.
pub const MAGIC: [u8; 8] = *b"KILNSNAP";
/// The state file format this build writes and the only one it reads (see docs/snapshot.md
/// for the rules: any change to the header or to the payload types bumps it).
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the header: magic, version, total length, header length.
const PREAMBLE: usize = 8 + 4 + 8 + 4;
/// Bytes of the trailing checksum.
const CRC_LEN: usize = 4;
/// State files larger than this are refused before being read (a VM's state is a few
/// hundred KiB per vCPU; this only stops a wrong path from filling memory).
pub const MAX_STATE_FILE: u64 = 256 << 20;

/// Errors writing or loading snapshot files; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error.
    #[error("{path}: {what}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Not a kiln state file.
    #[error("{path}: not a kiln snapshot state file (bad magic {found:02x?})")]
    Magic {
        /// The file.
        path: PathBuf,
        /// The first bytes found.
        found: Vec<u8>,
    },
    /// Written by a kiln with another format version.
    #[error(
        "{path}: snapshot format version {found}, this kiln reads only version {supported} \
         (see docs/snapshot.md: restore it with the kiln release that wrote it)"
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The file is shorter or longer than its header says.
    #[error(
        "{path}: the file is {actual} bytes but says it is {expected} (truncated or appended to)"
    )]
    Length {
        /// The file.
        path: PathBuf,
        /// The length recorded in the file.
        expected: u64,
        /// The length on disk.
        actual: u64,
    },
    /// The checksum does not match: the file is corrupt.
    #[error("{path}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is corrupt")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// The CRC in the file.
        stored: u32,
        /// The CRC of the contents.
        computed: u32,
    },
    /// The header or payload does not decode (a file from a buggy writer).
    #[error("{path}: {what} does not decode: {source}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// "header" or "VM state".
        what: &'static str,
        /// Why.
        #[source]
        source: postcard::Error,
    },
    /// The state could not be encoded.
    #[error("{path}: encoding the VM state: {source}")]
    Encode {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: postcard::Error,
    },
    /// This host can't run the snapshot (other CPU vendor, missing CPU features).
    #[error("{path}: this host can't run the snapshot: {why}")]
    Incompatible {
        /// The file.
        path: PathBuf,
        /// What differs.
        why: String,
    },
    /// The memory file does not match the state file's description of it.
    #[error("{path}: {why}")]
    MemoryFile {
        /// The memory file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// Everything about a snapshot that is checked before its payload is used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The kiln release that wrote the file (informational; the format version decides).
    pub kiln_version: String,
    /// The CPU of the host that wrote it.
    pub host: CpuFeatures,
    /// The CPU features the guest was given and may use: every one must be present on the
    /// host that restores it, and the vendor must be the same.
    pub required: CpuFeatures,
    /// The guest memory layout and what the memory file holds.
    pub memory: MemoryDesc,
}

impl Header {
    /// Fails unless a host with `host`'s CPU can run the snapshot.
    pub fn check_host(&self, host: &CpuFeatures) -> std::result::Result<(), String> {
        host.satisfies(&self.required)
    }
}

/// Writes `path` atomically: `data` goes to a temporary file beside it, which is fsync'd and
/// renamed over `path`; then the directory is fsync'd.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut File) -> io::Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| Error::Io {
        path: path.to_path_buf(),
        what: "the path names no file",
        source: io::ErrorKind::InvalidInput.into(),
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        // A leftover of a crashed earlier run goes; then the file must be new, so a link
        // planted under the predictable name is not followed.
        let _ = std::fs::remove_file(&tmp);
        let mut f = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err(&tmp, "creating"))?;
        write(&mut f).map_err(io_err(&tmp, "writing"))?;
        f.sync_all().map_err(io_err(&tmp, "fsync"))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io_err(path, "renaming the temporary file"))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&dir, "fsync of the directory"))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Encodes `header` and `payload` into the state file format.
pub fn encode_state<T: Serialize>(path: &Path, header: &Header, payload: &T) -> Result<Vec<u8>> {
    let enc = |source| Error::Encode {
        path: path.to_path_buf(),
        source,
    };
    let h = postcard::to_stdvec(header).map_err(enc)?;
    let p = postcard::to_stdvec(payload).map_err(enc)?;
    let total = PREAMBLE + h.len() + p.len() + CRC_LEN;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(total as u64).to_le_bytes());
    out.extend_from_slice(&u32::try_from(h.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&p);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Writes a state file atomically (see [`write_atomic`]).
pub fn write_state<T: Serialize>(path: &Path, header: &Header, payload: &T) -> Result<()> {
    let bytes = encode_state(path, header, payload)?;
    write_atomic(path, |f| f.write_all(&bytes))
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u32::from_le_bytes(w)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        w.copy_from_slice(s);
    }
    u64::from_le_bytes(w)
}

/// Checks state file bytes up to and including the header (magic, version, length,
/// checksum); returns the header and the payload bytes.
fn check_and_split<'a>(path: &Path, bytes: &'a [u8]) -> Result<(Header, &'a [u8])> {
    let p = || path.to_path_buf();
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        return Err(Error::Magic {
            path: p(),
            found: bytes.iter().take(MAGIC.len()).copied().collect(),
        });
    }
    let actual = bytes.len() as u64;
    if bytes.len() < PREAMBLE + CRC_LEN {
        return Err(Error::Length {
            path: p(),
            expected: (PREAMBLE + CRC_LEN) as u64,
            actual,
        });
    }
    let version = le_u32(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(Error::Version {
            path: p(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let expected = le_u64(bytes, 12);
    if expected != actual {
        return Err(Error::Length {
            path: p(),
            expected,
            actual,
        });
    }
    let body_end = bytes.len() - CRC_LEN;
    let stored = le_u32(bytes, body_end);
    let computed = crc32fast::hash(&bytes[..body_end]);
    if stored != computed {
        return Err(Error::Checksum {
            path: p(),
            stored,
            computed,
        });
    }
    let header_len = le_u32(bytes, 20) as usize;
    let header_bytes = bytes
        .get(PREAMBLE..body_end)
        .and_then(|b| b.get(..header_len))
        .ok_or_else(|| Error::Length {
            path: p(),
            expected: (PREAMBLE + header_len + CRC_LEN) as u64,
            actual,
        })?;
    let header: Header = postcard::from_bytes(header_bytes).map_err(|source| Error::Decode {
        path: p(),
        what: "header",
        source,
    })?;
    Ok((header, &bytes[PREAMBLE + header_len..body_end]))
}

/// Checks and decodes state file bytes read from `path` (see the [crate docs](crate) for the
/// order of checks); the host check uses `host`.
pub fn decode_state<T: DeserializeOwned>(
    path: &Path,
    bytes: &[u8],
    host: &CpuFeatures,
) -> Result<(Header, T)> {
    let (header, payload_bytes) = check_and_split(path, bytes)?;
    header.check_host(host).map_err(|why| Error::Incompatible {
        path: path.to_path_buf(),
        why,
    })?;
    let payload = postcard::from_bytes(payload_bytes).map_err(|source| Error::Decode {
        path: path.to_path_buf(),
        what: "VM state",
        source,
    })?;
    Ok((header, payload))
}

/// Reads and checks the state file at `path` (magic, version, length, checksum) and returns
/// its header, without decoding the payload or checking this host (for tools that inspect
/// snapshots, and for finding a diff's memory description).
pub fn read_header(path: &Path) -> Result<Header> {
    let bytes = read_file(path)?;
    check_and_split(path, &bytes).map(|(h, _)| h)
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    let mut f = File::open(path).map_err(io_err(path, "opening the state file"))?;
    let len = f
        .metadata()
        .map_err(io_err(path, "reading the state file's size"))?
        .len();
    if len > MAX_STATE_FILE {
        return Err(Error::Length {
            path: path.to_path_buf(),
            expected: MAX_STATE_FILE,
            actual: len,
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.read_to_end(&mut bytes)
        .map_err(io_err(path, "reading the state file"))?;
    Ok(bytes)
}

/// Reads and checks the state file at `path` against this host's CPU.
pub fn read_state<T: DeserializeOwned>(path: &Path) -> Result<(Header, T)> {
    read_state_for(path, &CpuFeatures::host())
}

/// [`read_state`], checking compatibility with a host that has `host`'s CPU.
pub fn read_state_for<T: DeserializeOwned>(path: &Path, host: &CpuFeatures) -> Result<(Header, T)> {
    let bytes = read_file(path)?;
    decode_state(path, &bytes, host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Payload {
        regs: Vec<u64>,
        name: String,
    }

    fn payload() -> Payload {
        Payload {
            regs: (0..64).map(|i| i * 0x1234_5678).collect(),
            name: "vm".into(),
        }
    }

    fn header() -> Header {
        let host = CpuFeatures::host();
        Header {
            kiln_version: "0.1.0".into(),
            required: host.clone(),
            host,
            memory: MemoryDesc::full(&[(0, 1 << 20)]),
        }
    }

    fn write(dir: &Path) -> PathBuf {
        let path = dir.join("state");
        write_state(&path, &header(), &payload()).unwrap();
        path
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path());
        let (h, p): (Header, Payload) = read_state(&path).unwrap();
        assert_eq!(h, header());
        assert_eq!(read_header(&path).unwrap(), h);
        assert_eq!(p, payload());
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn every_corrupt_byte_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path());
        let good = std::fs::read(&path).unwrap();
        let host = CpuFeatures::host();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            let e = decode_state::<Payload>(&path, &bad, &host).unwrap_err();
            // Where the flip lands decides which check sees it first; none lets it through.
            assert!(
                matches!(
                    e,
                    Error::Magic { .. }
                        | Error::Version { .. }
                        | Error::Length { .. }
                        | Error::Checksum { .. }
                ),
                "byte {i}: {e}"
            );
        }
        let mut bad = good.clone();
        bad[40] ^= 1;
        let e = decode_state::<Payload>(&path, &bad, &host).unwrap_err();
        assert!(matches!(e, Error::Checksum { .. }), "{e}");
        assert!(e.to_string().contains("state") && e.to_string().contains("corrupt"));
    }

    #[test]
    fn truncated_and_extended_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path());
        let good = std::fs::read(&path).unwrap();
        for len in [0, 3, 8, 20, 27, good.len() / 2, good.len() - 1] {
            std::fs::write(&path, &good[..len]).unwrap();
            let e = read_state::<Payload>(&path).unwrap_err();
            assert!(
                matches!(e, Error::Length { .. } | Error::Magic { .. }),
                "len {len}: {e}"
            );
        }
        let mut longer = good.clone();
        longer.push(0);
        std::fs::write(&path, &longer).unwrap();
        let e = read_state::<Payload>(&path).unwrap_err();
        assert!(e.to_string().contains("truncated or appended"), "{e}");
    }

    #[test]
    fn wrong_magic_and_version_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path());
        let good = std::fs::read(&path).unwrap();
        let mut bad = good.clone();
        bad[..8].copy_from_slice(b"NOTASNAP");
        std::fs::write(&path, &bad).unwrap();
        let e = read_state::<Payload>(&path).unwrap_err();
        assert!(e.to_string().contains("not a kiln snapshot"), "{e}");
        // A future version, with a valid checksum: still refused, by version.
        let mut future = good.clone();
        future[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let end = future.len() - 4;
        let crc = crc32fast::hash(&future[..end]);
        future[end..].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&path, &future).unwrap();
        let e = read_state::<Payload>(&path).unwrap_err();
        assert!(
            matches!(e, Error::Version { found, .. } if found == FORMAT_VERSION + 1),
            "{e}"
        );
        assert!(e.to_string().contains("format version 2"), "{e}");
    }

    #[test]
    fn foreign_vendor_and_missing_features_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path());
        let mut other = CpuFeatures::host();
        other.vendor = if other.vendor == "AuthenticAMD" {
            "GenuineIntel".into()
        } else {
            "AuthenticAMD".into()
        };
        let e = read_state_for::<Payload>(&path, &other).unwrap_err();
        assert!(matches!(e, Error::Incompatible { .. }), "{e}");
        assert!(e.to_string().contains("vendor"), "{e}");

        let mut poorer = CpuFeatures::host();
        poorer.leaf7_ebx = 0;
        poorer.leaf1_ecx = 0;
        let h = header();
        if h.required.leaf7_ebx != 0 || h.required.leaf1_ecx != 0 {
            let e = read_state_for::<Payload>(&path, &poorer).unwrap_err();
            assert!(e.to_string().contains("missing"), "{e}");
        }
        let mut small = CpuFeatures::host();
        small.xsave_size = 0;
        if h.required.xsave_size > 0 {
            let e = read_state_for::<Payload>(&path, &small).unwrap_err();
            assert!(e.to_string().contains("XSAVE"), "{e}");
        }
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path());
        let before = std::fs::read(&path).unwrap();
        let r = write_atomic(&path, |f| {
            f.write_all(b"partial")?;
            Err(io::Error::other("disk full"))
        });
        assert!(r.unwrap_err().to_string().contains("disk full"));
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
