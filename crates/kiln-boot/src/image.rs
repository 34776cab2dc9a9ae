//! Kernel image inspection done before handing the image to linux-loader: format
//! detection, bounds of what will be loaded, and the PVH note.
//!
//! linux-loader loads the bytes; this module makes sure it is asked to load only images
//! that fit the guest contract, and turns malformed images into specific errors.

use std::io::{Read, Seek, SeekFrom};

use linux_loader::bootparam::{setup_header, LOADED_HIGH, XLF_KERNEL_64};
use vm_memory::ByteValued;

use crate::{Error, Result};

/// Offset of the setup header in a bzImage.
const SETUP_HEADER_OFFSET: u64 = 0x1F1;
/// Offset of the "HdrS" magic.
const HDRS_OFFSET: u64 = 0x202;
const HDRS_MAGIC: [u8; 4] = *b"HdrS";
const ELF_MAGIC: [u8; 4] = [0x7F, b'E', b'L', b'F'];
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: 32-bit physical PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Notes larger than this are not read (real kernels carry a few hundred bytes).
const MAX_NOTE_SEGMENT: u64 = 1 << 20;
/// Oldest bzImage boot protocol we accept (2.06: cmdline_size is present).
pub const MIN_BZIMAGE_VERSION: u16 = 0x0206;

/// What the image is.
#[derive(Debug)]
pub enum ImageInfo {
    /// A 64-bit little-endian x86_64 ELF.
    Elf(ElfInfo),
    /// A bzImage with a usable setup header.
    BzImage(BzInfo),
}

/// Facts about an ELF kernel, from its headers.
#[derive(Debug)]
pub struct ElfInfo {
    /// `e_entry`.
    pub entry: u64,
    /// Lowest `p_paddr` of a loadable segment.
    pub start: u64,
    /// Highest `p_paddr + p_memsz` of a loadable segment.
    pub end: u64,
    /// The PVH entry from a `XEN_ELFNOTE_PHYS32_ENTRY` note, if any.
    pub pvh_entry: Option<u32>,
}

/// Facts about a bzImage, from its setup header.
#[derive(Debug)]
pub struct BzInfo {
    /// The setup header as found in the file.
    pub header: setup_header,
    /// Bytes of protected-mode kernel that will be copied to the load address.
    pub payload_len: u64,
}

/// Identifies the image and validates its headers.
pub fn inspect<R: Read + Seek>(img: &mut R) -> Result<ImageInfo> {
    let len = img.seek(SeekFrom::End(0)).map_err(Error::KernelIo)?;
    let mut magic = [0u8; 4];
    if len >= 4 {
        read_at(img, 0, &mut magic)?;
        if magic == ELF_MAGIC {
            return inspect_elf(img, len).map(ImageInfo::Elf);
        }
    }
    if len >= HDRS_OFFSET + 4 {
        read_at(img, HDRS_OFFSET, &mut magic)?;
        if magic == HDRS_MAGIC {
            return inspect_bzimage(img, len).map(ImageInfo::BzImage);
        }
    }
    Err(Error::UnknownKernelFormat)
}

fn read_at<R: Read + Seek>(img: &mut R, off: u64, buf: &mut [u8]) -> Result<()> {
    img.seek(SeekFrom::Start(off)).map_err(Error::KernelIo)?;
    img.read_exact(buf).map_err(Error::KernelIo)
}

fn need(what: &'static str, off: u64, size: u64, len: u64) -> Result<()> {
    match off.checked_add(size) {
        Some(end) if end <= len => Ok(()),
        _ => Err(Error::KernelTruncated {
            what,
            needed: off.saturating_add(size),
            len,
        }),
    }
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

fn inspect_elf<R: Read + Seek>(img: &mut R, len: u64) -> Result<ElfInfo> {
    need("ELF header", 0, EHDR_SIZE as u64, len)?;
    let mut eh = [0u8; EHDR_SIZE];
    read_at(img, 0, &mut eh)?;
    if eh[4] != ELFCLASS64 {
        return Err(Error::UnsupportedElf("not a 64-bit ELF (ELFCLASS64)"));
    }
    if eh[5] != ELFDATA2LSB {
        return Err(Error::UnsupportedElf("not little-endian"));
    }
    if u16_at(&eh, 18) != EM_X86_64 {
        return Err(Error::UnsupportedElf("e_machine is not x86_64"));
    }
    let entry = u64_at(&eh, 24);
    let phoff = u64_at(&eh, 32);
    let phentsize = u16_at(&eh, 54);
    let phnum = u16_at(&eh, 56);
    if usize::from(phentsize) != PHDR_SIZE {
        return Err(Error::UnsupportedElf("e_phentsize is not 56"));
    }
    if phoff < EHDR_SIZE as u64 {
        return Err(Error::UnsupportedElf(
            "program headers overlap the ELF header",
        ));
    }
    let table_len = u64::from(phnum) * PHDR_SIZE as u64;
    need("ELF program headers", phoff, table_len, len)?;
    let mut table = vec![0u8; table_len as usize];
    read_at(img, phoff, &mut table)?;

    let mut start = u64::MAX;
    let mut end = 0u64;
    let mut pvh_entry = None;
    for (index, ph) in table.chunks_exact(PHDR_SIZE).enumerate() {
        let p_type = u32_at(ph, 0);
        let offset = u64_at(ph, 8);
        let paddr = u64_at(ph, 24);
        let filesz = u64_at(ph, 32);
        let memsz = u64_at(ph, 40);
        let bad = |reason| Error::BadProgramHeader { index, reason };
        match p_type {
            PT_LOAD => {
                if filesz > memsz {
                    return Err(bad("p_filesz exceeds p_memsz"));
                }
                need("ELF segment", offset, filesz, len)?;
                let seg_end = paddr
                    .checked_add(memsz)
                    .ok_or(bad("p_paddr + p_memsz overflows"))?;
                if memsz > 0 {
                    start = start.min(paddr);
                    end = end.max(seg_end);
                }
            }
            PT_NOTE => {
                if filesz > MAX_NOTE_SEGMENT {
                    return Err(bad("note segment larger than 1 MiB"));
                }
                need("ELF note segment", offset, filesz, len)?;
                let mut notes = vec![0u8; filesz as usize];
                read_at(img, offset, &mut notes)?;
                // linux-loader keeps only the last PT_NOTE's verdict; scan them all here.
                if let Some(e) = find_pvh_note(&notes).map_err(bad)? {
                    pvh_entry.get_or_insert(e);
                }
            }
            _ => {}
        }
    }
    if end == 0 {
        return Err(Error::UnsupportedElf("no loadable segment"));
    }
    Ok(ElfInfo {
        entry,
        start,
        end,
        pvh_entry,
    })
}

/// Walks the notes of one PT_NOTE segment (4-byte aligned name and descriptor) and
/// returns the PVH entry point if a `Xen` note of type 18 is present.
fn find_pvh_note(notes: &[u8]) -> std::result::Result<Option<u32>, &'static str> {
    let align4 = |n: usize| n.checked_add(3).map(|n| n & !3);
    let mut pos = 0usize;
    while notes.len().saturating_sub(pos) >= 12 {
        let namesz = u32_at(notes, pos) as usize;
        let descsz = u32_at(notes, pos + 4) as usize;
        let n_type = u32_at(notes, pos + 8);
        let name_off = pos + 12;
        let desc_off = align4(namesz)
            .and_then(|n| name_off.checked_add(n))
            .ok_or("note name size overflows")?;
        let next = align4(descsz)
            .and_then(|d| desc_off.checked_add(d))
            .ok_or("note descriptor size overflows")?;
        if desc_off.checked_add(descsz).is_none_or(|e| e > notes.len()) {
            return Err("note runs past the end of its segment");
        }
        let name = &notes[name_off..name_off + namesz];
        if n_type == XEN_ELFNOTE_PHYS32_ENTRY && name == b"Xen\0" {
            if descsz < 4 {
                return Err("PVH note descriptor shorter than 4 bytes");
            }
            return Ok(Some(u32_at(notes, desc_off)));
        }
        pos = next;
    }
    Ok(None)
}

fn inspect_bzimage<R: Read + Seek>(img: &mut R, len: u64) -> Result<BzInfo> {
    let mut header = setup_header::default();
    let hdr_len = header.as_slice().len() as u64;
    need("bzImage setup header", SETUP_HEADER_OFFSET, hdr_len, len)?;
    read_at(img, SETUP_HEADER_OFFSET, header.as_mut_slice())?;
    let version = header.version;
    if version < MIN_BZIMAGE_VERSION {
        return Err(Error::BzImageTooOld { version });
    }
    let xloadflags = header.xloadflags;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::BzImageNot64Bit { xloadflags });
    }
    let loadflags = header.loadflags;
    if loadflags & LOADED_HIGH == 0 {
        return Err(Error::BzImageNotLoadedHigh { loadflags });
    }
    // setup_sects == 0 means 4 for historical reasons; +1 for the boot sector.
    let sects = match header.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let setup_len = (sects + 1) * 512;
    if len <= setup_len {
        return Err(Error::KernelTruncated {
            what: "bzImage protected-mode kernel",
            needed: setup_len + 1,
            len,
        });
    }
    Ok(BzInfo {
        header,
        payload_len: len - setup_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &[u8], ty: u32, desc: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_le_bytes());
        v.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        v.extend_from_slice(&ty.to_le_bytes());
        v.extend_from_slice(name);
        v.resize(v.len().next_multiple_of(4), 0);
        v.extend_from_slice(desc);
        v.resize(v.len().next_multiple_of(4), 0);
        v
    }

    #[test]
    fn pvh_note_scan() {
        let mut notes = note(b"GNU\0", 3, &[1, 2, 3, 4, 5, 6, 7]);
        notes.extend(note(b"Xen\0", 17, &[0; 4]));
        assert_eq!(find_pvh_note(&notes), Ok(None));
        notes.extend(note(b"Xen\0", 18, &0x0123_4567u32.to_le_bytes()));
        assert_eq!(find_pvh_note(&notes), Ok(Some(0x0123_4567)));
        // 8-byte descriptor: the low 4 bytes are the entry.
        let n = note(b"Xen\0", 18, &0x1_0020_0000u64.to_le_bytes());
        assert_eq!(find_pvh_note(&n), Ok(Some(0x0020_0000)));
        assert!(find_pvh_note(&note(b"Xen\0", 18, &[1, 2])).is_err());
        // A size field pointing past the segment.
        let mut bad = note(b"Xen\0", 18, &[0; 4]);
        bad[4] = 0xFF;
        assert!(find_pvh_note(&bad).is_err());
        let mut huge = note(b"Xen\0", 18, &[0; 4]);
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(find_pvh_note(&huge).is_err());
    }
}
