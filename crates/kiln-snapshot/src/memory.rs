//! The guest memory file: every RAM region at its own file offset (regions back to back, in
//! guest address order), with only some pages written and the rest left as holes.
//!
//! - A **full** memory file holds every page that is not all zeros; the holes read as the
//!   zeros they stand for, so the file can be mapped `MAP_PRIVATE` as guest RAM directly.
//! - A **diff** memory file holds the pages dirtied since the previous snapshot, zero pages
//!   included; it is applied over the memory the previous snapshot restores to.
//!
//! Which file ranges hold data is recorded in the (checksummed) state file as
//! [`MemoryDesc::extents`], so restoring never depends on the file system reporting holes
//! (`SEEK_DATA`) faithfully.
//!
//! After the last region, a 16-byte trailer (`KILNMEM1` and a u64 id, little endian) ties the
//! file to its state file ([`MemoryDesc::id`]; a diff's state also names its base's id): a
//! memory file from another snapshot, or a pair half-replaced by a failed overwrite, is
//! refused instead of restoring a mix.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{io_err, write_atomic, Error, Result};

/// The page size the memory file is written in.
pub const PAGE_SIZE: u64 = 4096;
/// The trailer's magic.
const TRAILER_MAGIC: [u8; 8] = *b"KILNMEM1";
/// Bytes of the trailer after the last region.
pub const TRAILER_LEN: u64 = 16;

/// A fresh id for a memory file (time and process id mixed; unique enough to tell files
/// apart, not a secret).
pub fn new_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut h = t ^ (u64::from(std::process::id()) << 40);
    // splitmix64's finaliser.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// One RAM region and where it lies in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// Guest physical start address.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of its first byte in the memory file.
    pub file_offset: u64,
}

/// The guest memory layout and what a memory file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryDesc {
    /// The RAM regions, in guest address order, back to back in the file.
    pub regions: Vec<MemoryRegion>,
    /// File ranges `(offset, len)` that hold data, sorted and merged; the rest is holes.
    pub extents: Vec<(u64, u64)>,
    /// Whether this is a diff (only dirtied pages; apply over the previous snapshot).
    pub diff: bool,
    /// The id in this memory file's trailer.
    pub id: u64,
    /// For a diff: the id of the full memory file it applies over.
    pub base: Option<u64>,
}

impl MemoryDesc {
    /// The layout of `regions` (`(guest_addr, len)`), with no data yet.
    pub fn full(regions: &[(u64, u64)]) -> Self {
        let mut off = 0;
        let regions = regions
            .iter()
            .map(|&(guest_addr, len)| {
                let r = MemoryRegion {
                    guest_addr,
                    len,
                    file_offset: off,
                };
                off += len;
                r
            })
            .collect();
        MemoryDesc {
            regions,
            extents: Vec::new(),
            diff: false,
            id: 0,
            base: None,
        }
    }

    /// Where the trailer starts: the end of the last region (the file is
    /// [`TRAILER_LEN`] bytes longer).
    pub fn file_len(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.file_offset.saturating_add(r.len))
            .max()
            .unwrap_or(0)
    }

    /// Bytes of data (not holes) in the file.
    pub fn data_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.1).sum()
    }

    /// Whether `regions` (`(guest_addr, len)`) is this layout.
    pub fn same_layout(&self, regions: &[(u64, u64)]) -> bool {
        self.regions.len() == regions.len()
            && self
                .regions
                .iter()
                .zip(regions)
                .all(|(a, b)| (a.guest_addr, a.len) == *b)
    }

    fn push_extent(&mut self, off: u64, len: u64) {
        if let Some(last) = self.extents.last_mut() {
            if last.0 + last.1 == off {
                last.1 += len;
                return;
            }
        }
        self.extents.push((off, len));
    }
}

/// Which pages to write.
#[derive(Debug, Clone, Copy)]
pub enum Pages<'a> {
    /// Every page that is not all zeros (a full snapshot).
    NonZero,
    /// The pages whose bit is set in each region's bitmap (KVM dirty-log layout: bit `i % 64`
    /// of word `i / 64` is page `i`), zero pages included (a diff snapshot).
    Dirty(&'a [Vec<u64>]),
}

fn is_zero(page: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u64; align_to only reinterprets the aligned middle.
    let (head, words, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && tail.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0)
}

/// Writes the memory file for guest RAM `ram` (`(guest_addr, bytes)` per region, in guest
/// address order) atomically to `path`, selecting pages per `pages`; returns what it holds.
/// A diff names the id of the full memory file it applies over (`base`).
///
/// The caller must keep `ram` from changing meanwhile (the VM is paused).
pub fn write_memory(
    path: &Path,
    ram: &[(u64, &[u8])],
    pages: Pages<'_>,
    base: Option<u64>,
) -> Result<MemoryDesc> {
    let layout: Vec<(u64, u64)> = ram.iter().map(|(a, d)| (*a, d.len() as u64)).collect();
    let mut desc = MemoryDesc::full(&layout);
    desc.diff = matches!(pages, Pages::Dirty(_));
    desc.id = new_id();
    desc.base = base;
    if desc.diff != base.is_some() {
        return Err(Error::MemoryFile {
            path: path.to_path_buf(),
            why: "a diff memory file needs its base's id, a full one has none".into(),
        });
    }
    if let Pages::Dirty(maps) = pages {
        if maps.len() != ram.len() {
            return Err(Error::MemoryFile {
                path: path.to_path_buf(),
                why: format!(
                    "{} dirty bitmaps for {} memory regions",
                    maps.len(),
                    ram.len()
                ),
            });
        }
    }
    let total = desc.file_len();
    let mut extents = MemoryDesc::full(&layout);
    let id = desc.id;
    write_atomic(path, |f| {
        f.set_len(total + TRAILER_LEN)?;
        let mut trailer = [0u8; TRAILER_LEN as usize];
        trailer[..8].copy_from_slice(&TRAILER_MAGIC);
        trailer[8..].copy_from_slice(&id.to_le_bytes());
        f.write_all_at(&trailer, total)?;
        for (ri, ((_, data), region)) in ram.iter().zip(&desc.regions).enumerate() {
            let npages = data.len().div_ceil(PAGE_SIZE as usize);
            let wanted = |p: usize| -> bool {
                let page =
                    &data[p * PAGE_SIZE as usize..data.len().min((p + 1) * PAGE_SIZE as usize)];
                match pages {
                    Pages::NonZero => !is_zero(page),
                    Pages::Dirty(maps) => maps[ri]
                        .get(p / 64)
                        .is_some_and(|w| w & (1 << (p % 64)) != 0),
                }
            };
            let mut p = 0;
            while p < npages {
                if !wanted(p) {
                    p += 1;
                    continue;
                }
                let start = p;
                while p < npages && wanted(p) {
                    p += 1;
                }
                let from = start * PAGE_SIZE as usize;
                let to = data.len().min(p * PAGE_SIZE as usize);
                let off = region.file_offset + from as u64;
                f.write_all_at(&data[from..to], off)?;
                extents.push_extent(off, (to - from) as u64);
            }
        }
        Ok(())
    })?;
    desc.extents = extents.extents;
    Ok(desc)
}

/// Opens the memory file at `path` and checks it against `desc` (its length) and its
/// trailer against `id` (`desc.id` for the file `desc` describes; a diff's `base` for the
/// full file under it).
pub fn open_memory(path: &Path, desc: &MemoryDesc, id: u64) -> Result<File> {
    let f = File::open(path).map_err(io_err(path, "opening the memory file"))?;
    let len = f
        .metadata()
        .map_err(io_err(path, "reading the memory file's size"))?
        .len();
    let Some(want) = desc.file_len().checked_add(TRAILER_LEN) else {
        return Err(Error::MemoryFile {
            path: path.to_path_buf(),
            why: "the state file's memory regions overflow a file offset".into(),
        });
    };
    if len != want {
        return Err(Error::MemoryFile {
            path: path.to_path_buf(),
            why: format!(
                "the memory file is {len} bytes, the state file says {want} (wrong file, or truncated)"
            ),
        });
    }
    let mut trailer = [0u8; TRAILER_LEN as usize];
    f.read_exact_at(&mut trailer, desc.file_len())
        .map_err(io_err(path, "reading the memory file's trailer"))?;
    let mut found = [0u8; 8];
    found.copy_from_slice(&trailer[8..]);
    let found = u64::from_le_bytes(found);
    if trailer[..8] != TRAILER_MAGIC || found != id {
        return Err(Error::MemoryFile {
            path: path.to_path_buf(),
            why: format!(
                "this memory file (id {found:#018x}) belongs to another snapshot than the state \
                 file (which expects {id:#018x})"
            ),
        });
    }
    if let Some(&(off, l)) = desc
        .extents
        .iter()
        .find(|(off, l)| off.checked_add(*l).is_none_or(|end| end > len))
    {
        return Err(Error::MemoryFile {
            path: path.to_path_buf(),
            why: format!("extent {off:#x}+{l:#x} lies past the end of the file"),
        });
    }
    Ok(f)
}

/// Copies the data extents of the memory file `path` (described by `desc`) into guest RAM
/// `ram` (`(guest_addr, bytes)` per region, the same layout); holes are left as they are, so
/// a diff lands on top of what `ram` already holds. Returns the bytes copied.
pub fn read_memory(path: &Path, desc: &MemoryDesc, ram: &mut [(u64, &mut [u8])]) -> Result<u64> {
    let layout: Vec<(u64, u64)> = ram.iter().map(|(a, d)| (*a, d.len() as u64)).collect();
    let mismatch = |why: String| Error::MemoryFile {
        path: path.to_path_buf(),
        why,
    };
    if !desc.same_layout(&layout) {
        return Err(mismatch(format!(
            "the snapshot's memory layout {:?} is not this VM's {layout:?}",
            desc.regions
                .iter()
                .map(|r| (r.guest_addr, r.len))
                .collect::<Vec<_>>()
        )));
    }
    let f = open_memory(path, desc, desc.id)?;
    let mut copied = 0;
    for &(off, len) in &desc.extents {
        // An extent may span regions (they are back to back in the file): split it.
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let Some((ri, r)) = desc
                .regions
                .iter()
                .enumerate()
                .find(|(_, r)| pos >= r.file_offset && pos - r.file_offset < r.len)
            else {
                return Err(mismatch(format!("extent at {pos:#x} is in no region")));
            };
            let in_region = pos - r.file_offset;
            let n = (end - pos).min(r.len - in_region);
            let dst = &mut ram[ri].1[in_region as usize..(in_region + n) as usize];
            f.read_exact_at(dst, pos)
                .map_err(io_err(path, "reading the memory file"))?;
            pos += n;
            copied += n;
        }
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const P: usize = PAGE_SIZE as usize;

    fn ram() -> (Vec<u8>, Vec<u8>) {
        let mut low = vec![0u8; 64 * P];
        let mut high = vec![0u8; 16 * P];
        low[3 * P + 7] = 1;
        low[4 * P] = 2;
        low[40 * P..41 * P].fill(0xaa);
        high[15 * P + P - 1] = 9;
        (low, high)
    }

    #[test]
    fn full_file_is_sparse_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let (low, high) = ram();
        let desc =
            write_memory(&path, &[(0, &low), (1 << 32, &high)], Pages::NonZero, None).unwrap();
        assert_eq!(desc.file_len(), 80 * PAGE_SIZE);
        assert_eq!(
            desc.extents,
            vec![
                (3 * PAGE_SIZE, 2 * PAGE_SIZE),
                (40 * PAGE_SIZE, PAGE_SIZE),
                (79 * PAGE_SIZE, PAGE_SIZE)
            ]
        );
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 80 * PAGE_SIZE + TRAILER_LEN);
        // Holes: far fewer blocks than the length (st_blocks is in 512-byte units).
        assert!(
            meta.blocks() * 512 <= 8 * PAGE_SIZE,
            "{} blocks",
            meta.blocks()
        );
        let (mut l2, mut h2) = (vec![0xffu8; 64 * P], vec![0u8; 16 * P]);
        l2.fill(0);
        let n = read_memory(&path, &desc, &mut [(0, &mut l2), (1 << 32, &mut h2)]).unwrap();
        assert_eq!(n, 4 * PAGE_SIZE);
        assert_eq!((l2, h2), (low, high));
    }

    #[test]
    fn diff_applies_over_the_base_including_zeroed_pages() {
        let dir = tempfile::tempdir().unwrap();
        let (base_p, diff_p) = (dir.path().join("base"), dir.path().join("diff"));
        let (mut low, high) = ram();
        let base = write_memory(
            &base_p,
            &[(0, &low), (1 << 32, &high)],
            Pages::NonZero,
            None,
        )
        .unwrap();
        // The guest zeroes page 40 and writes page 5.
        low[40 * P..41 * P].fill(0);
        low[5 * P] = 5;
        let mut maps = vec![vec![0u64; 1], vec![0u64; 1]];
        maps[0][0] = 1 << 40 | 1 << 5;
        let diff = write_memory(
            &diff_p,
            &[(0, &low), (1 << 32, &high)],
            Pages::Dirty(&maps),
            Some(base.id),
        )
        .unwrap();
        assert_eq!(diff.base, Some(base.id));
        // The diff's file is not the base: refused where the base is expected.
        let e = open_memory(&diff_p, &base, base.id).unwrap_err();
        assert!(e.to_string().contains("another snapshot"), "{e}");
        assert!(diff.diff);
        assert_eq!(diff.data_bytes(), 2 * PAGE_SIZE);
        let (mut l2, mut h2) = (vec![0u8; 64 * P], vec![0u8; 16 * P]);
        read_memory(&base_p, &base, &mut [(0, &mut l2), (1 << 32, &mut h2)]).unwrap();
        read_memory(&diff_p, &diff, &mut [(0, &mut l2), (1 << 32, &mut h2)]).unwrap();
        assert_eq!((l2, h2), (low, high));
    }

    #[test]
    fn wrong_length_or_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let (low, high) = ram();
        let desc =
            write_memory(&path, &[(0, &low), (1 << 32, &high)], Pages::NonZero, None).unwrap();
        // A newer snapshot's memory file in its place: another id.
        let other = dir.path().join("other");
        let o = write_memory(&other, &[(0, &low), (1 << 32, &high)], Pages::NonZero, None).unwrap();
        assert_ne!(o.id, desc.id);
        let (mut a, mut b) = (vec![0u8; 64 * P], vec![0u8; 16 * P]);
        let e = read_memory(&other, &desc, &mut [(0, &mut a), (1 << 32, &mut b)]).unwrap_err();
        assert!(e.to_string().contains("belongs to another snapshot"), "{e}");
        let (mut l2, mut h2) = (vec![0u8; 64 * P], vec![0u8; 8 * P]);
        let e = read_memory(&path, &desc, &mut [(0, &mut l2), (1 << 32, &mut h2)]).unwrap_err();
        assert!(e.to_string().contains("layout"), "{e}");
        let f = File::options().write(true).open(&path).unwrap();
        f.set_len(10 * PAGE_SIZE).unwrap();
        let mut h2 = vec![0u8; 16 * P];
        let e = read_memory(&path, &desc, &mut [(0, &mut l2), (1 << 32, &mut h2)]).unwrap_err();
        assert!(
            e.to_string().contains("truncated") && e.to_string().contains("memory"),
            "{e}"
        );
    }
}
