//! ELF program-header parsing, the flat image of the loaded segments, and the bzImage wrapper.

use crate::BuildError;

/// Where the guest is linked and loaded (docs/guest-contract.md: kernel load address).
pub const LOAD_ADDR: u64 = 0x10_0000;
/// Offset of the 64-bit entry from the load address (bzImage convention, contract).
pub const ENTRY64_OFFSET: u64 = 0x200;

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// What the builder checks and uses from the guest ELF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatImage {
    /// Physical address of the first byte of `bytes` (always [`LOAD_ADDR`]).
    pub load_addr: u64,
    /// File contents of all PT_LOAD segments, laid out by physical address, gaps zero-filled.
    pub bytes: Vec<u8>,
    /// One past the last byte any PT_LOAD segment occupies in memory (includes BSS).
    pub mem_end: u64,
    /// ELF `e_entry` (the Linux 64-bit entry).
    pub entry: u64,
    /// Entry from the PVH note (`XEN_ELFNOTE_PHYS32_ENTRY`), if present.
    pub pvh_entry: Option<u32>,
}

fn bad(reason: &'static str) -> BuildError {
    BuildError::BadElf { reason }
}

fn rd(b: &[u8], off: usize, n: usize) -> Result<u64, BuildError> {
    let s = off
        .checked_add(n)
        .and_then(|end| b.get(off..end))
        .ok_or_else(|| bad("truncated"))?;
    Ok(s.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
}

fn usize_of(v: u64) -> Result<usize, BuildError> {
    usize::try_from(v).map_err(|_| bad("offset does not fit usize"))
}

/// Parses `elf`, checks it is the x86_64 executable the contract expects (entry at
/// `LOAD_ADDR + 0x200`, first segment at `LOAD_ADDR`) and flattens its PT_LOAD segments.
pub fn flatten(elf: &[u8]) -> Result<FlatImage, BuildError> {
    if elf.get(..4) != Some(b"\x7fELF") {
        return Err(bad("no ELF magic"));
    }
    if rd(elf, 4, 1)? != 2 || rd(elf, 5, 1)? != 1 {
        return Err(bad("not ELF64 little-endian"));
    }
    if rd(elf, 16, 2)? != 2 || rd(elf, 18, 2)? != 62 {
        return Err(bad("not an x86_64 executable (ET_EXEC, EM_X86_64)"));
    }
    let entry = rd(elf, 24, 8)?;
    let phoff = usize_of(rd(elf, 32, 8)?)?;
    let phentsize = usize_of(rd(elf, 54, 2)?)?;
    let phnum = usize_of(rd(elf, 56, 2)?)?;
    if phentsize < 56 {
        return Err(bad("program header entries too small"));
    }

    // (paddr, file bytes, memsz)
    let mut loads: Vec<(u64, &[u8], u64)> = Vec::new();
    let mut pvh_entry = None;
    for i in 0..phnum {
        let ph = phoff
            .checked_add(
                i.checked_mul(phentsize)
                    .ok_or_else(|| bad("phdr overflow"))?,
            )
            .ok_or_else(|| bad("phdr overflow"))?;
        let p_type = rd(elf, ph, 4)? as u32;
        let offset = usize_of(rd(elf, ph + 8, 8)?)?;
        let paddr = rd(elf, ph + 24, 8)?;
        let filesz = usize_of(rd(elf, ph + 32, 8)?)?;
        let memsz = rd(elf, ph + 40, 8)?;
        let data = offset
            .checked_add(filesz)
            .and_then(|end| elf.get(offset..end))
            .ok_or_else(|| bad("segment outside the file"))?;
        match p_type {
            PT_LOAD if memsz > 0 => {
                if (filesz as u64) > memsz {
                    return Err(bad("segment filesz > memsz"));
                }
                loads.push((paddr, data, memsz));
            }
            PT_NOTE => {
                if let Some(e) = find_pvh_note(data)? {
                    pvh_entry = Some(e);
                }
            }
            _ => {}
        }
    }
    loads.sort_by_key(|l| l.0);
    let first = loads.first().ok_or_else(|| bad("no PT_LOAD segment"))?;
    if first.0 != LOAD_ADDR {
        return Err(bad("first PT_LOAD is not at the load address 0x100000"));
    }
    if entry != LOAD_ADDR + ENTRY64_OFFSET {
        return Err(bad("e_entry is not load address + 0x200"));
    }
    let mut bytes = Vec::new();
    let mut mem_end = LOAD_ADDR;
    for (paddr, data, memsz) in &loads {
        let off = usize_of(paddr - LOAD_ADDR)?;
        if off < bytes.len() {
            return Err(bad("PT_LOAD segments overlap"));
        }
        bytes.resize(off, 0);
        bytes.extend_from_slice(data);
        mem_end = mem_end.max(
            paddr
                .checked_add(*memsz)
                .ok_or_else(|| bad("memsz overflow"))?,
        );
    }
    Ok(FlatImage {
        load_addr: LOAD_ADDR,
        bytes,
        mem_end,
        entry,
        pvh_entry,
    })
}

/// Walks the notes of one PT_NOTE segment (4-byte aligned fields) for Xen's PHYS32_ENTRY.
fn find_pvh_note(mut notes: &[u8]) -> Result<Option<u32>, BuildError> {
    let align4 = |n: u64| -> Result<usize, BuildError> { usize_of((n + 3) & !3) };
    while notes.len() >= 12 {
        let namesz = rd(notes, 0, 4)?;
        let descsz = rd(notes, 4, 4)?;
        let ntype = rd(notes, 8, 4)? as u32;
        let name_end = 12 + align4(namesz)?;
        let desc_end = name_end + align4(descsz)?;
        let name = notes
            .get(12..12 + usize_of(namesz)?)
            .ok_or_else(|| bad("note name"))?;
        if ntype == XEN_ELFNOTE_PHYS32_ENTRY && name == b"Xen\0" && descsz >= 4 {
            return Ok(Some(rd(notes, name_end, 4)? as u32));
        }
        notes = notes
            .get(desc_end..)
            .ok_or_else(|| bad("note runs past its segment"))?;
    }
    Ok(None)
}

/// Setup sectors after the boot sector (the header needs more than the first 512 bytes).
const SETUP_SECTS: u8 = 1;
/// Bytes before the protected-mode payload: boot sector + setup sectors.
pub const SETUP_BYTES: usize = (SETUP_SECTS as usize + 1) * 512;
/// Boot protocol version written to the header (2.15).
pub const BOOT_PROTOCOL: u16 = 0x020F;
/// `initrd_addr_max` written to the header.
pub const INITRD_ADDR_MAX: u32 = 0x37FF_FFFF;
const LOADED_HIGH: u8 = 0x01;
const XLF_KERNEL_64: u16 = 0x01;
/// Real-mode stub (cli; hlt; jmp back) for loaders that run setup code: we have none.
const REAL_MODE_STUB_AT: usize = 0x280;
const VERSION_STRING_AT: usize = 0x2A0;

fn put(buf: &mut [u8], off: usize, val: u64, n: usize) {
    buf[off..off + n].copy_from_slice(&val.to_le_bytes()[..n]);
}

/// Wraps a flat image into a bzImage-format file (Documentation/arch/x86/boot.rst): a boot
/// sector and one setup sector holding the setup header, then the flat image, which the
/// loader places at `code32_start` (0x100000). The 64-bit entry is at +0x200.
pub fn bzimage(flat: &FlatImage) -> Result<Vec<u8>, BuildError> {
    let payload = flat.bytes.len();
    let syssize = u32::try_from(payload.div_ceil(16)).map_err(|_| bad("image too large"))?;
    let init_size = u32::try_from((flat.mem_end - flat.load_addr).next_multiple_of(4096))
        .map_err(|_| bad("image too large"))?;
    let code32_start = u32::try_from(flat.load_addr).map_err(|_| bad("load address"))?;

    let mut out = vec![0u8; SETUP_BYTES];
    put(&mut out, 0x1F1, u64::from(SETUP_SECTS), 1); // setup_sects
    put(&mut out, 0x1F4, u64::from(syssize), 4); // syssize, 16-byte units
    put(&mut out, 0x1FA, 0xFFFF, 2); // vid_mode: normal
    put(&mut out, 0x1FE, 0xAA55, 2); // boot_flag
                                     // jump: short jmp from 0x202 to the real-mode stub
    out[0x200] = 0xEB;
    out[0x201] = (REAL_MODE_STUB_AT - 0x202) as u8;
    put(&mut out, 0x202, 0x5372_6448, 4); // "HdrS"
    put(&mut out, 0x206, u64::from(BOOT_PROTOCOL), 2); // version
    put(&mut out, 0x20E, (VERSION_STRING_AT - 0x200) as u64, 2); // kernel_version
    put(&mut out, 0x211, u64::from(LOADED_HIGH), 1); // loadflags
    put(&mut out, 0x214, u64::from(code32_start), 4); // code32_start
    put(&mut out, 0x22C, u64::from(INITRD_ADDR_MAX), 4); // initrd_addr_max
    put(&mut out, 0x230, 0x1000, 4); // kernel_alignment
    put(&mut out, 0x234, 0, 1); // relocatable_kernel
    put(&mut out, 0x235, 12, 1); // min_alignment (log2)
    put(&mut out, 0x236, u64::from(XLF_KERNEL_64), 2); // xloadflags
    put(&mut out, 0x238, 4095, 4); // cmdline_size
    put(&mut out, 0x258, flat.load_addr, 8); // pref_address
    put(&mut out, 0x260, u64::from(init_size), 4); // init_size
    out[REAL_MODE_STUB_AT..REAL_MODE_STUB_AT + 4].copy_from_slice(&[0xFA, 0xF4, 0xEB, 0xFC]);
    let version = b"kiln-testguest\0";
    out[VERSION_STRING_AT..VERSION_STRING_AT + version.len()].copy_from_slice(version);
    out.extend_from_slice(&flat.bytes);
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF: one PT_LOAD of `code` at 0x100000 with `bss` extra bytes, plus a PT_NOTE
    /// with a Xen PHYS32_ENTRY note for `pvh`.
    pub(crate) fn synthetic_elf(code: &[u8], bss: u64, pvh: u32) -> Vec<u8> {
        let mut note = Vec::new();
        for v in [4u32, 4, 18] {
            note.extend_from_slice(&v.to_le_bytes());
        }
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&pvh.to_le_bytes());
        let phoff = 64usize;
        let code_off = phoff + 2 * 56;
        let note_off = code_off + code.len();
        let mut e = vec![0u8; 64];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        e[6] = 1;
        put(&mut e, 16, 2, 2);
        put(&mut e, 18, 62, 2);
        put(&mut e, 24, LOAD_ADDR + 0x200, 8);
        put(&mut e, 32, phoff as u64, 8);
        put(&mut e, 54, 56, 2);
        put(&mut e, 56, 2, 2);
        let mut ph = vec![0u8; 112];
        put(&mut ph, 0, 1, 4);
        put(&mut ph, 8, code_off as u64, 8);
        put(&mut ph, 16, LOAD_ADDR, 8);
        put(&mut ph, 24, LOAD_ADDR, 8);
        put(&mut ph, 32, code.len() as u64, 8);
        put(&mut ph, 40, code.len() as u64 + bss, 8);
        put(&mut ph, 56, 4, 4);
        put(&mut ph, 56 + 8, note_off as u64, 8);
        put(&mut ph, 56 + 32, note.len() as u64, 8);
        put(&mut ph, 56 + 40, note.len() as u64, 8);
        e.extend_from_slice(&ph);
        e.extend_from_slice(code);
        e.extend_from_slice(&note);
        e
    }

    #[test]
    fn flattens_and_finds_pvh_note() {
        let code: Vec<u8> = (0..0x300u32).map(|i| i as u8).collect();
        let f = flatten(&synthetic_elf(&code, 0x5000, 0x10_0007)).unwrap();
        assert_eq!(f.bytes, code);
        assert_eq!(f.mem_end, LOAD_ADDR + 0x300 + 0x5000);
        assert_eq!(f.pvh_entry, Some(0x10_0007));
        assert_eq!(f.entry, 0x10_0200);
    }

    #[test]
    fn rejects_bad_elves() {
        let code = [0u8; 0x300];
        let good = synthetic_elf(&code, 0, 0x10_0000);
        let mut e = good.clone();
        e[0] = 0;
        assert!(flatten(&e).is_err());
        let mut e = good.clone();
        put(&mut e, 24, 0x10_0000, 8);
        assert!(flatten(&e).is_err(), "entry must be +0x200");
        let mut e = good.clone();
        put(&mut e, 64 + 24, 0x20_0000, 8);
        assert!(flatten(&e).is_err(), "must load at 1 MiB");
        let mut e = good.clone();
        put(&mut e, 64 + 32, 1 << 40, 8);
        assert!(flatten(&e).is_err(), "segment past end of file");
        assert!(flatten(&good[..100]).is_err());
    }

    #[test]
    fn bzimage_header_fields() {
        let code = [0x90u8; 0x1234];
        let f = flatten(&synthetic_elf(&code, 0x10000, 0x10_0000)).unwrap();
        let b = bzimage(&f).unwrap();
        let r = |o: usize, n: usize| rd(&b, o, n).unwrap();
        assert_eq!(b.len(), SETUP_BYTES + code.len());
        assert_eq!(r(0x1F1, 1), 1);
        assert_eq!(r(0x1FE, 2), 0xAA55);
        assert_eq!(r(0x202, 4), 0x5372_6448);
        assert_eq!(r(0x206, 2), 0x020F);
        assert_eq!(r(0x1F4, 4), 0x124, "syssize rounds up to 16 bytes");
        assert_eq!(r(0x211, 1) & 1, 1, "LOADED_HIGH");
        assert_eq!(r(0x214, 4), 0x10_0000);
        assert_eq!(r(0x236, 2) & 1, 1, "XLF_KERNEL_64");
        assert_eq!(r(0x238, 4), 4095);
        assert_eq!(r(0x22C, 4), 0x37FF_FFFF);
        assert_eq!(r(0x258, 8), 0x10_0000);
        assert_eq!(r(0x260, 4), 0x12000, "init_size covers bss, page rounded");
        assert_eq!(&b[SETUP_BYTES..], &code[..]);
    }
}
