//! Loads synthetic ELF and bzImage kernels and checks every byte the contract defines.

use std::io::Cursor;

use kiln_memory::{E820Type, MemoryLayout};
use linux_loader::bootparam::{boot_params, setup_header};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::*;
use crate::gdt::{CODE32_DESCRIPTOR, CODE64_DESCRIPTOR, DATA_DESCRIPTOR, TSS_DESCRIPTOR};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const MARKER: &str = "Kiln-cmdline_0123456789~!@#%^&*()";

/// Guest memory with the kiln layout, without the host RAM check (MAP_NORESERVE, so a
/// 5 GiB guest costs nothing until touched).
fn mem(size: u64) -> GuestMemoryMmap {
    let ranges: Vec<_> = MemoryLayout::new(size)
        .unwrap()
        .regions()
        .into_iter()
        .map(|(a, l)| (a, l as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

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

fn pvh_notes(entry: u32) -> Vec<u8> {
    // A build-id note first, so the PVH note has to be found by walking.
    let mut n = note(b"GNU\0", 3, &[0xAB; 20]);
    n.extend(note(b"Xen\0", 18, &entry.to_le_bytes()));
    n
}

struct Seg {
    paddr: u64,
    data: Vec<u8>,
    memsz: u64,
}

/// A 64-bit x86_64 ELF executable: header, program headers, then segment contents.
fn make_elf(entry: u64, segs: &[Seg], notes: Option<&[u8]>) -> Vec<u8> {
    let phnum = segs.len() + usize::from(notes.is_some());
    let mut data_off = 64 + 56 * phnum as u64;
    let mut out = Vec::new();
    out.extend_from_slice(&[0x7F, b'E', b'L', b'F', 2, 1, 1, 0]);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&entry.to_le_bytes());
    out.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&64u16.to_le_bytes());
    out.extend_from_slice(&56u16.to_le_bytes());
    out.extend_from_slice(&(phnum as u16).to_le_bytes());
    out.extend_from_slice(&[0; 6]);
    assert_eq!(out.len(), 64);
    let mut phdr = |out: &mut Vec<u8>, p_type: u32, paddr: u64, filesz: u64, memsz: u64| {
        out.extend_from_slice(&p_type.to_le_bytes());
        out.extend_from_slice(&5u32.to_le_bytes()); // R+X
        out.extend_from_slice(&data_off.to_le_bytes());
        out.extend_from_slice(&paddr.to_le_bytes()); // vaddr
        out.extend_from_slice(&paddr.to_le_bytes());
        out.extend_from_slice(&filesz.to_le_bytes());
        out.extend_from_slice(&memsz.to_le_bytes());
        out.extend_from_slice(&0x1000u64.to_le_bytes());
        data_off += filesz;
    };
    for s in segs {
        phdr(&mut out, 1, s.paddr, s.data.len() as u64, s.memsz);
    }
    if let Some(n) = notes {
        phdr(&mut out, 4, 0, n.len() as u64, n.len() as u64);
    }
    for s in segs {
        out.extend_from_slice(&s.data);
    }
    if let Some(n) = notes {
        out.extend_from_slice(n);
    }
    out
}

fn simple_elf(notes: Option<&[u8]>) -> Vec<u8> {
    make_elf(
        0x10_0000,
        &[Seg {
            paddr: 0x10_0000,
            data: pattern(0x2345, 7),
            memsz: 0x1_0000,
        }],
        notes,
    )
}

/// A bzImage: boot sector + 1 setup sector (header at 0x1F1), then `payload`.
fn make_bzimage(tweak: impl FnOnce(&mut setup_header), payload: &[u8]) -> Vec<u8> {
    let mut h = setup_header {
        setup_sects: 1,
        boot_flag: 0xAA55,
        header: 0x5372_6448,
        version: 0x020F,
        loadflags: 0x01,
        code32_start: 0x10_0000,
        initrd_addr_max: 0x7FFF_FFFF,
        kernel_alignment: 0x20_0000,
        relocatable_kernel: 1,
        xloadflags: 0x1,
        cmdline_size: 2047,
        pref_address: 0x100_0000,
        init_size: 0x20_0000,
        ..Default::default()
    };
    tweak(&mut h);
    let mut img = vec![0u8; 1024];
    img[0x1F1..0x1F1 + h.as_slice().len()].copy_from_slice(h.as_slice());
    img.extend_from_slice(payload);
    img
}

fn boot(
    m: &GuestMemoryMmap,
    kernel: Cursor<Vec<u8>>,
    initrd: Option<&[u8]>,
    cmdline: &str,
    protocol: Protocol,
) -> Result<BootEntry> {
    load(
        m,
        BootConfig {
            kernel,
            initrd: initrd.map(|d| Cursor::new(d.to_vec())),
            cmdline: cmdline.to_string(),
            protocol,
            acpi_rsdp: None,
        },
    )
}

fn read_params(m: &GuestMemoryMmap) -> boot_params {
    m.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap()
}

fn read_bytes(m: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    m.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn e820_of(p: &boot_params) -> Vec<(u64, u64, u32)> {
    let n = p.e820_entries as usize;
    let table = p.e820_table;
    table[..n]
        .iter()
        .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
        .collect()
}

fn contract_e820(size: u64) -> Vec<(u64, u64, u32)> {
    let mut v = vec![
        (0, 0x9fc00, 1),
        (0x9fc00, 0x100000 - 0x9fc00, 2),
        (0x100000, size.min(0xC000_0000) - 0x100000, 1),
    ];
    if size > 0xC000_0000 {
        v.push((0x1_0000_0000, size - 0xC000_0000, 1));
    }
    v
}

fn check_gdt(m: &GuestMemoryMmap, code: u64) {
    let raw = read_bytes(m, BOOT_GDT_ADDR, 48);
    let words: Vec<u64> = raw
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(
        words,
        vec![0, 0, code, DATA_DESCRIPTOR, TSS_DESCRIPTOR, 0],
        "GDT (+ the zero IDT after it)"
    );
}

#[test]
fn elf_linux_128m() {
    let m = mem(128 * MIB);
    let img = simple_elf(None);
    let initrd = pattern(10_000, 3);
    let cmdline = format!("console=ttyS0 kiln.marker={MARKER}");
    let e = boot(
        &m,
        Cursor::new(img),
        Some(&initrd),
        &cmdline,
        Protocol::Auto,
    )
    .unwrap();
    assert_eq!(e.protocol, Protocol::Linux);
    assert_eq!(e.entry, GuestAddress(0x10_0000));
    assert_eq!(e.boot_info, GuestAddress(0x7000));
    assert_eq!(e.page_tables, Some(GuestAddress(0x9000)));
    assert_eq!(e.stack, GuestAddress(0x8ff0));
    assert_eq!(e.idt_base, GuestAddress(0x528));
    assert_eq!(e.gdt, GdtInfo::for_code(CODE64_DESCRIPTOR));
    assert_eq!(
        (e.kernel_start, e.kernel_end),
        (GuestAddress(0x10_0000), GuestAddress(0x11_0000))
    );

    // Kernel bytes, and the bss past p_filesz untouched (zero).
    assert_eq!(read_bytes(&m, 0x10_0000, 0x2345), pattern(0x2345, 7));
    assert!(read_bytes(&m, 0x10_2345, 0x100).iter().all(|&b| b == 0));

    // Command line, NUL-terminated.
    let mut want = cmdline.as_bytes().to_vec();
    want.push(0);
    assert_eq!(read_bytes(&m, 0x2_0000, want.len()), want);
    assert_eq!(e.cmdline, (GuestAddress(0x2_0000), want.len() as u64));

    // Initrd at the top of low RAM, page aligned.
    let addr = 128 * MIB - 0x3000;
    assert_eq!(e.initrd, Some((GuestAddress(addr), 10_000)));
    assert_eq!(read_bytes(&m, addr, 10_000), initrd);

    let p = read_params(&m);
    assert_eq!({ p.hdr.boot_flag }, 0xAA55);
    assert_eq!({ p.hdr.header }, 0x5372_6448);
    assert_eq!({ p.hdr.version }, 0x020F);
    assert_eq!({ p.hdr.type_of_loader }, 0xFF);
    assert_eq!({ p.hdr.loadflags }, 0x81);
    assert_eq!({ p.hdr.heap_end_ptr }, 0xFE00);
    assert_eq!({ p.hdr.cmd_line_ptr }, 0x2_0000);
    assert_eq!({ p.hdr.cmdline_size }, 4095);
    assert_eq!({ p.hdr.kernel_alignment }, 0x100_0000);
    assert_eq!({ p.hdr.ramdisk_image }, addr as u32);
    assert_eq!({ p.hdr.ramdisk_size }, 10_000);
    assert_eq!(e820_of(&p), contract_e820(128 * MIB));
    // RAM total is M - 0x60400 (contract).
    let ram: u64 = e820_of(&p).iter().filter(|x| x.2 == 1).map(|x| x.1).sum();
    assert_eq!(ram, 128 * MIB - 0x60400);

    check_gdt(&m, CODE64_DESCRIPTOR);
    check_page_tables(&m);
}

fn check_page_tables(m: &GuestMemoryMmap) {
    let q = |a: u64| m.read_obj::<u64>(GuestAddress(a)).unwrap();
    assert_eq!(q(0x9000), 0xa003);
    assert_eq!(q(0x9008), 0);
    for i in 0..4 {
        assert_eq!(q(0xa000 + 8 * i), (0xb000 + 0x1000 * i) | 3);
    }
    assert_eq!(q(0xa000 + 8 * 4), 0);
    assert_eq!(q(0xb000), 0x83);
    assert_eq!(q(0xb008), 0x20_0083);
    // Last 2 MiB page below 4 GiB, in the fourth PD.
    assert_eq!(q(0xb000 + 8 * 2047), 0xFFE0_0083);
    // Every PD entry maps its own index.
    let pds = read_bytes(m, 0xb000, 0x4000);
    for (k, c) in pds.chunks(8).enumerate() {
        assert_eq!(
            u64::from_le_bytes(c.try_into().unwrap()),
            ((k as u64) << 21) | 0x83
        );
    }
    assert_eq!(identity_page_tables(), read_bytes(m, 0x9000, 0x6000));
}

#[test]
fn elf_linux_5g_e820_and_initrd_limit() {
    let m = mem(5 * GIB);
    let initrd = pattern(5000, 9);
    let e = boot(
        &m,
        Cursor::new(simple_elf(None)),
        Some(&initrd),
        "",
        Protocol::Auto,
    )
    .unwrap();
    let p = read_params(&m);
    assert_eq!(e820_of(&p), contract_e820(5 * GIB));
    assert_eq!(p.e820_entries, 4);
    // ELF: no initrd_addr_max in a header, so the default 0x37FFFFFF caps it.
    let addr = 0x3800_0000 - 0x2000;
    assert_eq!(e.initrd, Some((GuestAddress(addr), 5000)));
    assert_eq!(read_bytes(&m, addr, 5000), initrd);
    // Empty command line: just the NUL.
    assert_eq!(e.cmdline.1, 1);
    assert_eq!(read_bytes(&m, 0x2_0000, 1), vec![0]);
}

#[test]
fn elf_pvh_auto_with_initrd() {
    let m = mem(128 * MIB);
    let notes = pvh_notes(0x10_0040);
    let initrd = pattern(4096, 1);
    let e = boot(
        &m,
        Cursor::new(simple_elf(Some(&notes))),
        Some(&initrd),
        "kiln.test=boot",
        Protocol::Auto,
    )
    .unwrap();
    assert_eq!(e.protocol, Protocol::Pvh);
    assert_eq!(e.entry, GuestAddress(0x10_0040));
    assert_eq!(e.boot_info, GuestAddress(0x6000));
    assert_eq!(e.page_tables, None);
    assert_eq!(e.gdt.entries[2], CODE32_DESCRIPTOR);
    check_gdt(&m, CODE32_DESCRIPTOR);
    // No page tables written for PVH.
    assert_eq!(m.read_obj::<u64>(GuestAddress(0x9000)).unwrap(), 0);

    let si: hvm_start_info = m.read_obj(GuestAddress(0x6000)).unwrap();
    assert_eq!(si.magic, 0x336e_c578);
    assert_eq!(si.version, 1);
    assert_eq!(si.flags, 0);
    assert_eq!(si.cmdline_paddr, 0x2_0000);
    assert_eq!(si.rsdp_paddr, 0);
    assert_eq!(si.memmap_paddr, 0x6040);
    assert_eq!(si.memmap_entries, 3);
    assert_eq!(si.nr_modules, 1);
    assert_eq!(si.modlist_paddr, 0x6C40);
    let memmap: Vec<_> = (0..3)
        .map(|i| {
            let e: hvm_memmap_table_entry = m.read_obj(GuestAddress(0x6040 + 24 * i)).unwrap();
            (e.addr, e.size, e.type_)
        })
        .collect();
    assert_eq!(memmap, contract_e820(128 * MIB));
    let md: hvm_modlist_entry = m.read_obj(GuestAddress(0x6C40)).unwrap();
    let (iaddr, isize) = e.initrd.unwrap();
    assert_eq!((md.paddr, md.size, md.cmdline_paddr), (iaddr.0, isize, 0));
    assert_eq!(iaddr.0, 128 * MIB - 0x1000);
    assert_eq!(read_bytes(&m, iaddr.0, 4096), initrd);
    // boot_params untouched on the PVH path.
    assert!(read_bytes(&m, 0x7000, 0x1000).iter().all(|&b| b == 0));
}

#[test]
fn elf_pvh_without_initrd_and_5g() {
    let m = mem(5 * GIB);
    let notes = pvh_notes(0x10_0040);
    let e = boot(
        &m,
        Cursor::new(simple_elf(Some(&notes))),
        None,
        "x",
        Protocol::Pvh,
    )
    .unwrap();
    assert_eq!(e.protocol, Protocol::Pvh);
    let si: hvm_start_info = m.read_obj(GuestAddress(0x6000)).unwrap();
    assert_eq!((si.nr_modules, si.modlist_paddr), (0, 0));
    assert_eq!(si.memmap_entries, 4);
    let last: hvm_memmap_table_entry = m.read_obj(GuestAddress(0x6040 + 24 * 3)).unwrap();
    assert_eq!((last.addr, last.size, last.type_), (4 * GIB, 2 * GIB, 1));
}

#[test]
fn elf_with_pvh_note_booted_as_linux() {
    let m = mem(64 * MIB);
    let notes = pvh_notes(0x10_0040);
    let img = make_elf(
        0x10_0100,
        &[Seg {
            paddr: 0x10_0000,
            data: pattern(0x1000, 2),
            memsz: 0x1000,
        }],
        Some(&notes),
    );
    let e = boot(&m, Cursor::new(img), None, "", Protocol::Linux).unwrap();
    assert_eq!(e.protocol, Protocol::Linux);
    assert_eq!(e.entry, GuestAddress(0x10_0100));
    check_gdt(&m, CODE64_DESCRIPTOR);
}

#[test]
fn pvh_requested_without_note() {
    let m = mem(64 * MIB);
    // A non-PVH note is present; it must not count.
    let notes = note(b"GNU\0", 3, &[1; 8]);
    let err = boot(
        &m,
        Cursor::new(simple_elf(Some(&notes))),
        None,
        "",
        Protocol::Pvh,
    )
    .unwrap_err();
    assert!(matches!(err, Error::PvhNoteMissing), "{err}");
}

#[test]
fn bzimage_linux() {
    let m = mem(128 * MIB);
    let payload = pattern(0x3000, 5);
    let img = make_bzimage(|_| {}, &payload);
    let initrd = pattern(0x1800, 4);
    let e = boot(
        &m,
        Cursor::new(img),
        Some(&initrd),
        "root=/dev/vda",
        Protocol::Auto,
    )
    .unwrap();
    assert_eq!(e.protocol, Protocol::Linux);
    assert_eq!(e.entry, GuestAddress(0x10_0200));
    assert_eq!(e.kernel_start, GuestAddress(0x10_0000));
    // Decompression area: max(align_up(1 MiB, 2 MiB), pref 16 MiB) + init_size 2 MiB.
    assert_eq!(e.kernel_end, GuestAddress(0x120_0000));
    assert_eq!(read_bytes(&m, 0x10_0000, 0x3000), payload);
    let p = read_params(&m);
    // Header copied from the image...
    assert_eq!({ p.hdr.setup_sects }, 1);
    assert_eq!({ p.hdr.xloadflags }, 1);
    assert_eq!({ p.hdr.init_size }, 0x20_0000);
    assert_eq!({ p.hdr.cmdline_size }, 2047);
    assert_eq!({ p.hdr.kernel_alignment }, 0x20_0000);
    assert_eq!({ p.hdr.code32_start }, 0x10_0000);
    // ...plus what the loader fills.
    assert_eq!({ p.hdr.type_of_loader }, 0xFF);
    assert_eq!({ p.hdr.loadflags }, 0x81);
    assert_eq!({ p.hdr.cmd_line_ptr }, 0x2_0000);
    assert_eq!({ p.hdr.ramdisk_image }, (128 * MIB - 0x2000) as u32);
    assert_eq!({ p.hdr.ramdisk_size }, 0x1800);
    assert_eq!(e820_of(&p), contract_e820(128 * MIB));
    check_gdt(&m, CODE64_DESCRIPTOR);
    check_page_tables(&m);
}

#[test]
fn bzimage_honours_initrd_addr_max_and_cmdline_size() {
    let m = mem(128 * MIB);
    let img = make_bzimage(
        |h| {
            h.initrd_addr_max = 0x2FF_FFFF;
            h.cmdline_size = 10;
        },
        &pattern(0x1000, 1),
    );
    let e = boot(
        &m,
        Cursor::new(img.clone()),
        Some(&[7u8; 100]),
        "0123456789",
        Protocol::Auto,
    )
    .unwrap();
    assert_eq!(e.initrd, Some((GuestAddress(0x300_0000 - 0x1000), 100)));
    let err = boot(&m, Cursor::new(img), None, "0123456789A", Protocol::Auto).unwrap_err();
    assert!(
        matches!(err, Error::CmdlineTooLong { len: 12, max: 11 }),
        "{err}"
    );
}

#[test]
fn bzimage_rejections() {
    let m = mem(64 * MIB);
    let payload = pattern(0x1000, 0);
    type Case = (Vec<u8>, Protocol, fn(&Error) -> bool);
    let cases: Vec<Case> = vec![
        (
            make_bzimage(|h| h.version = 0x0205, &payload),
            Protocol::Auto,
            |e| matches!(e, Error::BzImageTooOld { version: 0x0205 }),
        ),
        (
            make_bzimage(|h| h.xloadflags = 0x2, &payload),
            Protocol::Auto,
            |e| matches!(e, Error::BzImageNot64Bit { xloadflags: 0x2 }),
        ),
        (
            make_bzimage(|h| h.loadflags = 0, &payload),
            Protocol::Auto,
            |e| matches!(e, Error::BzImageNotLoadedHigh { loadflags: 0 }),
        ),
        (make_bzimage(|_| {}, &payload), Protocol::Pvh, |e| {
            matches!(e, Error::PvhNeedsElf)
        }),
        // Setup sectors only, no protected-mode kernel.
        (make_bzimage(|_| {}, &[]), Protocol::Auto, |e| {
            matches!(e, Error::KernelTruncated { .. })
        }),
        // Decompression area past the end of RAM.
        (
            make_bzimage(|h| h.init_size = 0x400_0000, &payload),
            Protocol::Auto,
            |e| {
                matches!(
                    e,
                    Error::KernelOutOfRam {
                        end: 0x500_0000,
                        ..
                    }
                )
            },
        ),
    ];
    for (i, (img, proto, ok)) in cases.into_iter().enumerate() {
        let err = boot(&m, Cursor::new(img), None, "", proto).unwrap_err();
        assert!(ok(&err), "case {i}: {err}");
    }
}

#[test]
fn unknown_and_truncated_kernels() {
    let m = mem(64 * MIB);
    for img in [
        vec![],
        vec![0x7F, b'E'],
        vec![0u8; 8192],
        b"MZ garbage".to_vec(),
    ] {
        let err = boot(&m, Cursor::new(img), None, "", Protocol::Auto).unwrap_err();
        assert!(matches!(err, Error::UnknownKernelFormat), "{err}");
        assert_eq!(err.to_string(), "not an ELF vmlinux or bzImage");
    }
    let full = simple_elf(None);
    for cut in [10, 64, 64 + 30, full.len() - 1] {
        let err = boot(
            &m,
            Cursor::new(full[..cut].to_vec()),
            None,
            "",
            Protocol::Auto,
        )
        .unwrap_err();
        assert!(
            matches!(err, Error::KernelTruncated { .. }),
            "cut {cut}: {err}"
        );
    }
    let mut elf32 = full.clone();
    elf32[4] = 1;
    let err = boot(&m, Cursor::new(elf32), None, "", Protocol::Auto).unwrap_err();
    assert!(matches!(err, Error::UnsupportedElf(_)), "{err}");
}

#[test]
fn kernels_outside_ram() {
    let m = mem(128 * MIB);
    let seg = |paddr, memsz| Seg {
        paddr,
        data: vec![1; 16],
        memsz,
    };
    let cases = [
        // Below 1 MiB (would overwrite the boot structures).
        make_elf(
            0x10_0000,
            &[seg(0x8000, 0x1000), seg(0x10_0000, 0x1000)],
            None,
        ),
        // Past the end of RAM (memsz counts, not just filesz).
        make_elf(
            0x10_0000,
            &[seg(0x10_0000, 0x1000), seg(128 * MIB - 0x1000, 0x2000)],
            None,
        ),
    ];
    for img in cases {
        let err = boot(&m, Cursor::new(img), None, "", Protocol::Auto).unwrap_err();
        assert!(matches!(err, Error::KernelOutOfRam { .. }), "{err}");
    }
    // Entry point outside low RAM.
    let img = make_elf(0x8000_0000, &[seg(0x10_0000, 0x1000)], None);
    let err = boot(&m, Cursor::new(img), None, "", Protocol::Auto).unwrap_err();
    assert!(
        matches!(
            err,
            Error::EntryOutOfRange {
                entry: 0x8000_0000,
                ..
            }
        ),
        "{err}"
    );
    // p_filesz > p_memsz.
    let img = make_elf(0x10_0000, &[seg(0x10_0000, 8)], None);
    let err = boot(&m, Cursor::new(img), None, "", Protocol::Auto).unwrap_err();
    assert!(
        matches!(err, Error::BadProgramHeader { index: 0, .. }),
        "{err}"
    );

    // Across the MMIO hole of a 5 GiB guest.
    let big = mem(5 * GIB);
    let img = make_elf(
        0x10_0000,
        &[seg(0x10_0000, 0x1000), seg(0xBFFF_F000, 0x2000)],
        None,
    );
    let err = boot(&big, Cursor::new(img), None, "", Protocol::Auto).unwrap_err();
    assert!(
        matches!(
            err,
            Error::KernelOutOfRam {
                max: 0xC000_0000,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn cmdline_limits() {
    let m = mem(64 * MIB);
    let ok = "a".repeat(4095);
    let e = boot(&m, Cursor::new(simple_elf(None)), None, &ok, Protocol::Auto).unwrap();
    assert_eq!(e.cmdline.1, 4096);
    assert_eq!(read_bytes(&m, 0x2_0000 + 4095, 1), vec![0]);
    let long = "a".repeat(4096);
    let err = boot(
        &m,
        Cursor::new(simple_elf(None)),
        None,
        &long,
        Protocol::Auto,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::CmdlineTooLong {
                len: 4097,
                max: 4096
            }
        ),
        "{err}"
    );
    for bad in ["caf\u{e9}", "a\tb", "nul\0byte"] {
        let err = boot(&m, Cursor::new(simple_elf(None)), None, bad, Protocol::Auto).unwrap_err();
        assert!(matches!(err, Error::InvalidCmdline(_)), "{bad:?}: {err}");
    }
}

#[test]
fn initrd_too_large() {
    let m = mem(16 * MIB);
    // Kernel ends at 0x110000; 16 MiB - 0x110000 is available.
    let available = 16 * MIB - 0x11_0000;
    let big = vec![0u8; (available + 1) as usize];
    let err = boot(
        &m,
        Cursor::new(simple_elf(None)),
        Some(&big),
        "",
        Protocol::Auto,
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::InitrdTooLarge { size, available: a } if size == available + 1 && a == available),
        "{err}"
    );
    // Exactly the available space fits, right after the kernel.
    let fits = vec![0u8; available as usize];
    let e = boot(
        &m,
        Cursor::new(simple_elf(None)),
        Some(&fits),
        "",
        Protocol::Auto,
    )
    .unwrap();
    assert_eq!(e.initrd, Some((GuestAddress(0x11_0000), available)));
}

#[test]
fn rejected_loads_write_nothing() {
    let m = mem(16 * MIB);
    let big = vec![0u8; (16 * MIB) as usize];
    let long = "a".repeat(5000);
    for (initrd, cmdline) in [(Some(&big[..]), ""), (None, long.as_str()), (None, "\u{1}")] {
        assert!(boot(
            &m,
            Cursor::new(simple_elf(None)),
            initrd,
            cmdline,
            Protocol::Auto
        )
        .is_err());
        assert!(read_bytes(&m, 0, 0x20_0000).iter().all(|&b| b == 0));
    }
}

#[test]
fn non_canonical_memory_rejected() {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1000), (32 * MIB) as usize)]).unwrap();
    let err = boot(&m, Cursor::new(simple_elf(None)), None, "", Protocol::Auto).unwrap_err();
    assert!(matches!(err, Error::Memory(_)), "{err}");
}

#[test]
fn regions_never_overlap() {
    let m = mem(128 * MIB);
    let linux = boot(
        &m,
        Cursor::new(simple_elf(None)),
        Some(&[1; 10]),
        "a b c",
        Protocol::Auto,
    )
    .unwrap();
    let names: Vec<_> = linux.regions().iter().map(|r| r.0).collect();
    assert_eq!(
        names,
        [
            "boot GDT",
            "boot IDT",
            "boot_params",
            "boot stack",
            "page tables",
            "command line",
            "kernel",
            "initrd"
        ]
    );
    check_no_overlap(&linux.regions()).unwrap();
    let notes = pvh_notes(0x10_0000);
    let pvh = boot(
        &m,
        Cursor::new(simple_elf(Some(&notes))),
        Some(&[1; 10]),
        "",
        Protocol::Auto,
    )
    .unwrap();
    let names: Vec<_> = pvh.regions().iter().map(|r| r.0).collect();
    assert!(names.contains(&"PVH module list") && names.contains(&"hvm_start_info"));
    check_no_overlap(&pvh.regions()).unwrap();

    // The checker itself catches overlaps and touching regions are fine.
    let a = ("a", GuestAddress(0x1000), 0x1000);
    let b = ("b", GuestAddress(0x1fff), 0x10);
    let c = ("c", GuestAddress(0x2000), 0x10);
    assert!(matches!(
        check_no_overlap(&[a, b]),
        Err(Error::Overlap { a: "a", b: "b", .. })
    ));
    check_no_overlap(&[a, c]).unwrap();
}

#[test]
fn e820_agrees_with_kiln_memory() {
    // The table written is the one kiln-memory computes, entry for entry.
    for size in [16 * MIB, 3 * GIB, 3 * GIB + 4096] {
        let m = mem(size);
        boot(&m, Cursor::new(simple_elf(None)), None, "", Protocol::Auto).unwrap();
        let want: Vec<_> = MemoryLayout::new(size)
            .unwrap()
            .e820()
            .iter()
            .map(|e| (e.addr, e.size, e.type_code()))
            .collect();
        assert_eq!(e820_of(&read_params(&m)), want);
        assert_eq!(want, contract_e820(size));
        assert_eq!(
            MemoryLayout::new(size).unwrap().e820()[1].kind,
            E820Type::Reserved
        );
    }
}

#[test]
fn acpi_rsdp_reaches_both_protocols() {
    for (protocol, notes) in [
        (Protocol::Linux, None),
        (Protocol::Pvh, Some(pvh_notes(0x10_0000))),
    ] {
        let m = mem(128 * MIB);
        let cfg = BootConfig {
            kernel: Cursor::new(simple_elf(notes.as_deref())),
            initrd: None::<Cursor<Vec<u8>>>,
            cmdline: "console=ttyS0".to_string(),
            protocol,
            acpi_rsdp: Some(GuestAddress(0xe_0000)),
        };
        let entry = load(&m, cfg).unwrap();
        match entry.protocol {
            Protocol::Pvh => {
                let si: hvm_start_info = m.read_obj(GuestAddress(0x6000)).unwrap();
                assert_eq!(si.rsdp_paddr, 0xe_0000);
            }
            _ => {
                let rsdp = { read_params(&m).acpi_rsdp_addr };
                assert_eq!(rsdp, 0xe_0000);
            }
        }
    }
    // Without one, 0: the kernel scans the BIOS area instead.
    let m = mem(128 * MIB);
    boot(
        &m,
        Cursor::new(simple_elf(None)),
        None,
        "x",
        Protocol::Linux,
    )
    .unwrap();
    let rsdp = { read_params(&m).acpi_rsdp_addr };
    assert_eq!(rsdp, 0);
}
