//! Loads an x86_64 kernel, initrd and command line into guest memory and writes every
//! boot structure the guest contract (`docs/guest-contract.md`) defines: the boot GDT,
//! the identity page tables, Linux `boot_params` or PVH `hvm_start_info` with its memory
//! map and module list. It does not touch KVM: the returned [`BootEntry`] says what the
//! vCPU registers must be set to.
//!
//! ```
//! use std::io::Cursor;
//! use kiln_boot::{load, BootConfig, Protocol};
//! use kiln_memory::{create_guest_memory, Backing, MemoryConfig};
//!
//! let mem = create_guest_memory(&MemoryConfig { size: 64 << 20, backing: Backing::Anonymous })
//!     .unwrap();
//! // Anything that is neither an ELF nor a bzImage is refused.
//! let cfg: BootConfig<_> = BootConfig {
//!     kernel: Cursor::new(vec![0u8; 4096]),
//!     initrd: None,
//!     cmdline: "console=ttyS0".to_string(),
//!     protocol: Protocol::Auto,
//!     acpi_rsdp: None,
//! };
//! let err = load(&mem, cfg).unwrap_err();
//! assert!(matches!(err, kiln_boot::Error::UnknownKernelFormat));
//! ```

#![warn(missing_docs)]

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

use kiln_memory::{GuestMemoryMmap, MemoryLayout};
use linux_loader::bootparam::{boot_e820_entry, boot_params, CAN_USE_HEAP, LOADED_HIGH};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, ReadVolatile};

pub mod gdt;
mod image;
pub mod layout;

pub use gdt::{decode_descriptor, GdtInfo, SegmentDescriptor};
pub use image::MIN_BZIMAGE_VERSION;

use gdt::{CODE32_DESCRIPTOR, CODE64_DESCRIPTOR};
use image::ImageInfo;
use layout::*;

/// Errors from loading a kernel. Each names the input it is about (kernel, initrd,
/// command line) so a VMM can map it to its own option.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel is neither an ELF nor a bzImage.
    #[error("not an ELF vmlinux or bzImage")]
    UnknownKernelFormat,
    /// Reading or seeking the kernel image failed.
    #[error("cannot read the kernel image: {0}")]
    KernelIo(#[source] io::Error),
    /// The kernel image ends before a structure its headers describe.
    #[error("kernel image is truncated: the {what} needs {needed} bytes, the image has {len}")]
    KernelTruncated {
        /// Which part is cut off.
        what: &'static str,
        /// File size needed.
        needed: u64,
        /// Actual file size.
        len: u64,
    },
    /// An ELF that is not a 64-bit little-endian x86_64 executable.
    #[error("unsupported ELF kernel: {0}")]
    UnsupportedElf(&'static str),
    /// An ELF program header is malformed.
    #[error("ELF program header {index} is invalid: {reason}")]
    BadProgramHeader {
        /// Index in the program header table.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// The bzImage speaks a boot protocol older than [`MIN_BZIMAGE_VERSION`].
    #[error("bzImage boot protocol {version:#06x} is older than the required 0x0206")]
    BzImageTooOld {
        /// `version` from the setup header.
        version: u16,
    },
    /// The bzImage has no 64-bit entry point.
    #[error("bzImage is not a 64-bit kernel (xloadflags {xloadflags:#x} lacks XLF_KERNEL_64)")]
    BzImageNot64Bit {
        /// `xloadflags` from the setup header.
        xloadflags: u16,
    },
    /// The bzImage cannot be loaded at 1 MiB.
    #[error("bzImage must be loaded high (loadflags {loadflags:#x} lacks LOADED_HIGH)")]
    BzImageNotLoadedHigh {
        /// `loadflags` from the setup header.
        loadflags: u8,
    },
    /// PVH was requested for an ELF without a `XEN_ELFNOTE_PHYS32_ENTRY` note.
    #[error("PVH boot requested but the ELF kernel has no XEN_ELFNOTE_PHYS32_ENTRY note")]
    PvhNoteMissing,
    /// PVH was requested for a bzImage.
    #[error("PVH boot requested but the kernel is a bzImage; PVH needs an ELF vmlinux")]
    PvhNeedsElf,
    /// The kernel (including, for a bzImage, its decompression area) does not fit in
    /// low RAM above 1 MiB.
    #[error(
        "kernel needs [{start:#x}, {end:#x}) but only [{min:#x}, {max:#x}) of low RAM is \
         available"
    )]
    KernelOutOfRam {
        /// First byte the kernel needs.
        start: u64,
        /// End (exclusive) of what the kernel needs.
        end: u64,
        /// Lowest usable address (1 MiB).
        min: u64,
        /// End of low RAM.
        max: u64,
    },
    /// The entry point is outside low RAM.
    #[error("kernel entry point {entry:#x} is outside low RAM [{min:#x}, {max:#x})")]
    EntryOutOfRange {
        /// The entry point.
        entry: u64,
        /// Lowest allowed (1 MiB).
        min: u64,
        /// End of low RAM.
        max: u64,
    },
    /// linux-loader failed while copying the kernel.
    #[error("loading the kernel failed: {0}")]
    Loader(#[source] linux_loader::loader::Error),
    /// The command line is too long.
    #[error("command line is {len} bytes including the NUL; the maximum is {max}")]
    CmdlineTooLong {
        /// Length including the terminating NUL.
        len: usize,
        /// Maximum including the terminating NUL.
        max: usize,
    },
    /// The command line contains something other than printable ASCII.
    #[error("invalid command line: {0}")]
    InvalidCmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line to guest memory failed.
    #[error("writing the command line failed: {0}")]
    CmdlineWrite(#[source] linux_loader::loader::Error),
    /// The initrd does not fit between the kernel and the initrd limit.
    #[error(
        "initrd of {size} bytes does not fit: {available} bytes are available between the end \
         of the kernel and the initrd limit"
    )]
    InitrdTooLarge {
        /// Initrd size in bytes.
        size: u64,
        /// Bytes available (page aligned).
        available: u64,
    },
    /// Reading the initrd failed.
    #[error("cannot read the initrd: {0}")]
    InitrdRead(#[source] io::Error),
    /// Guest memory does not have the layout kiln-memory produces.
    #[error("guest memory: {0}")]
    Memory(#[source] kiln_memory::Error),
    /// A write of a boot structure to guest memory failed.
    #[error("writing the {what} at {addr:#x} failed: {source}")]
    GuestWrite {
        /// Which structure.
        what: &'static str,
        /// Where.
        addr: u64,
        /// The underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// linux-loader's boot configurator failed.
    #[error("writing the {what} failed: {source}")]
    Configurator {
        /// Which structure.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: linux_loader::configurator::Error,
    },
    /// Two boot regions overlap (a placement bug; should not happen).
    #[error(
        "boot layout error: {a} [{a_start:#x}, {a_end:#x}) overlaps {b} [{b_start:#x}, {b_end:#x})"
    )]
    Overlap {
        /// First region.
        a: &'static str,
        /// Its start.
        a_start: u64,
        /// Its end.
        a_end: u64,
        /// Second region.
        b: &'static str,
        /// Its start.
        b_start: u64,
        /// Its end.
        b_end: u64,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Boot protocol: what [`BootConfig::protocol`] asks for, and what
/// [`BootEntry::protocol`] reports (never [`Protocol::Auto`] there).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// PVH when the ELF has a PVH note, the Linux 64-bit protocol otherwise (and always
    /// for a bzImage).
    #[default]
    Auto,
    /// Linux 64-bit boot protocol: long mode, paging on, RSI = boot_params.
    Linux,
    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh,
}

/// What to load. `K` and `I` are usually `File` (or `&mut File`); tests use
/// `Cursor<Vec<u8>>`.
#[derive(Debug)]
pub struct BootConfig<K = File, I = File> {
    /// The kernel: an ELF vmlinux or a bzImage.
    pub kernel: K,
    /// The initrd, if any.
    pub initrd: Option<I>,
    /// Kernel command line. Leading and trailing whitespace is dropped; the rest must be
    /// printable ASCII (0x20..=0x7E) and at most 4095 bytes (less if a bzImage's
    /// `cmdline_size` says so).
    pub cmdline: String,
    /// Requested protocol.
    pub protocol: Protocol,
    /// Where the VMM put the ACPI RSDP (e.g. with kiln-acpi), passed to the kernel in
    /// `boot_params.acpi_rsdp_addr` or `hvm_start_info.rsdp_paddr`. `None`: 0, and the
    /// kernel falls back to scanning the BIOS area.
    pub acpi_rsdp: Option<GuestAddress>,
}

/// Where things ended up, and what the vCPU must be set to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootEntry {
    /// The protocol chosen.
    pub protocol: Protocol,
    /// RIP (Linux) or EIP (PVH).
    pub entry: GuestAddress,
    /// RSI for Linux (`boot_params`, 0x7000) or EBX for PVH (`hvm_start_info`, 0x6000).
    pub boot_info: GuestAddress,
    /// The GDT written at 0x500 (64-bit code descriptor for Linux, 32-bit for PVH).
    pub gdt: GdtInfo,
    /// IDTR base (0x528, 8 zero bytes written); the limit is 0.
    pub idt_base: GuestAddress,
    /// CR3 (the PML4 at 0x9000) for Linux; `None` for PVH (paging off).
    pub page_tables: Option<GuestAddress>,
    /// Initial RSP (0x8ff0). The Linux protocol needs it; PVH guests set their own.
    pub stack: GuestAddress,
    /// Lowest address the kernel occupies.
    pub kernel_start: GuestAddress,
    /// End (exclusive) of what the kernel occupies: for an ELF the highest
    /// `p_paddr + p_memsz`; for a bzImage the larger of the loaded image's end and the
    /// end of its decompression area (`init_size` from the run address).
    pub kernel_end: GuestAddress,
    /// The command line: address (0x20000) and length including the NUL.
    pub cmdline: (GuestAddress, u64),
    /// The initrd: page-aligned address and length in bytes.
    pub initrd: Option<(GuestAddress, u64)>,
}

impl BootEntry {
    /// Every guest memory range this load wrote or reserved, named, sorted by address.
    /// No two overlap (checked by [`load`]).
    pub fn regions(&self) -> Vec<(&'static str, GuestAddress, u64)> {
        let mut v = vec![
            ("boot GDT", self.gdt.base, u64::from(self.gdt.limit) + 1),
            ("boot IDT", self.idt_base, IDT_SIZE),
            ("command line", self.cmdline.0, self.cmdline.1),
            (
                "kernel",
                self.kernel_start,
                self.kernel_end.0.saturating_sub(self.kernel_start.0),
            ),
        ];
        // A BootEntry never carries Auto; anything but PVH is the Linux layout.
        match self.protocol {
            Protocol::Linux | Protocol::Auto => {
                v.push(("boot_params", GuestAddress(ZERO_PAGE_ADDR), ZERO_PAGE_SIZE));
                v.push((
                    "boot stack",
                    GuestAddress(BOOT_STACK_BOTTOM),
                    BOOT_STACK_POINTER - BOOT_STACK_BOTTOM,
                ));
                v.push(("page tables", GuestAddress(PML4_ADDR), PAGE_TABLES_SIZE));
            }
            Protocol::Pvh => {
                v.push((
                    "hvm_start_info",
                    GuestAddress(PVH_START_INFO_ADDR),
                    START_INFO_SIZE,
                ));
                v.push((
                    "PVH memory map",
                    GuestAddress(PVH_MEMMAP_ADDR),
                    (PVH_MEMMAP_MAX_ENTRIES * MEMMAP_ENTRY_SIZE) as u64,
                ));
                if self.initrd.is_some() {
                    v.push((
                        "PVH module list",
                        GuestAddress(PVH_MODLIST_ADDR),
                        MODLIST_ENTRY_SIZE,
                    ));
                }
            }
        }
        if let Some((a, l)) = self.initrd {
            v.push(("initrd", a, l));
        }
        v.sort_by_key(|r| r.1);
        v
    }
}

/// Loads kernel, initrd and command line into `mem` and writes the boot structures for
/// the chosen protocol. `mem` must have the layout `kiln_memory` builds (checked).
pub fn load<K, I>(mem: &GuestMemoryMmap, cfg: BootConfig<K, I>) -> Result<BootEntry>
where
    K: Read + ReadVolatile + Seek,
    I: Read + Seek,
{
    let BootConfig {
        mut kernel,
        initrd,
        cmdline,
        protocol,
        acpi_rsdp,
    } = cfg;
    let rsdp = acpi_rsdp.map_or(0, |a| a.0);
    let mem_layout = MemoryLayout::from_guest_memory(mem).map_err(Error::Memory)?;
    let low_end = mem_layout.low_ram_end();
    let info = image::inspect(&mut kernel)?;

    // Validate everything before writing anything to guest memory.
    let is_bzimage = matches!(info, ImageInfo::BzImage(_));
    let (protocol, entry, kernel_start, kernel_end, setup_header) = match info {
        ImageInfo::Elf(elf) => {
            let (protocol, entry) = match (protocol, elf.pvh_entry) {
                (Protocol::Auto | Protocol::Pvh, Some(pvh)) => (Protocol::Pvh, u64::from(pvh)),
                (Protocol::Pvh, None) => return Err(Error::PvhNoteMissing),
                (Protocol::Auto | Protocol::Linux, _) => (Protocol::Linux, elf.entry),
            };
            check_kernel_fits(elf.start, elf.end, low_end)?;
            check_entry(entry, low_end)?;
            (protocol, entry, elf.start, elf.end, None)
        }
        ImageInfo::BzImage(bz) => {
            if protocol == Protocol::Pvh {
                return Err(Error::PvhNeedsElf);
            }
            let end = bzimage_footprint_end(&bz, low_end)?;
            check_kernel_fits(KERNEL_LOAD_ADDR, end, low_end)?;
            let mut header = bz.header;
            // We load at 1 MiB whatever the header says (linux-loader does the same).
            header.code32_start = KERNEL_LOAD_ADDR as u32;
            (
                Protocol::Linux,
                KERNEL_LOAD_ADDR + BZIMAGE_64BIT_ENTRY_OFFSET,
                KERNEL_LOAD_ADDR,
                end,
                Some(header),
            )
        }
    };

    let max = match &setup_header {
        // cmdline_size excludes the NUL.
        Some(h) => CMDLINE_MAX_SIZE.min((h.cmdline_size as usize).saturating_add(1)),
        None => CMDLINE_MAX_SIZE,
    };
    let text = cmdline.trim();
    let len = text.len() + 1;
    if len > max {
        return Err(Error::CmdlineTooLong { len, max });
    }
    let mut line = Cmdline::new(max).map_err(Error::InvalidCmdline)?;
    line.insert_str(text).map_err(Error::InvalidCmdline)?;

    let initrd_max = match &setup_header {
        Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
        _ => DEFAULT_INITRD_ADDR_MAX,
    };
    let initrd = match initrd {
        Some(mut src) => {
            let size = src.seek(SeekFrom::End(0)).map_err(Error::InitrdRead)?;
            let addr = place_initrd(size, kernel_end, low_end, initrd_max)?;
            Some((src, addr, size))
        }
        None => None,
    };

    // Now copy kernel, command line and initrd.
    if is_bzimage {
        // No highmem check against the header's code32_start: we override it.
        BzImage::load(mem, Some(GuestAddress(KERNEL_LOAD_ADDR)), &mut kernel, None)
            .map_err(Error::Loader)?;
    } else {
        // No offset: load at p_paddr, which keeps linux-loader's PVH note parsing on.
        Elf::load(mem, None, &mut kernel, Some(GuestAddress(KERNEL_LOAD_ADDR)))
            .map_err(Error::Loader)?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &line).map_err(Error::CmdlineWrite)?;
    let initrd = match initrd {
        Some((mut src, addr, size)) => {
            copy_initrd(mem, &mut src, addr, size)?;
            Some((GuestAddress(addr), size))
        }
        None => None,
    };

    let e820 = mem_layout.e820();
    // `protocol` is resolved here: Linux or Pvh, never Auto.
    let code = match protocol {
        Protocol::Pvh => CODE32_DESCRIPTOR,
        Protocol::Linux | Protocol::Auto => CODE64_DESCRIPTOR,
    };
    let gdt = GdtInfo::for_code(code);
    write_bytes(mem, "boot GDT", BOOT_GDT_ADDR, &gdt.to_bytes())?;
    write_bytes(mem, "boot IDT", BOOT_IDT_ADDR, &[0u8; IDT_SIZE as usize])?;

    let (boot_info, page_tables) = match protocol {
        Protocol::Linux | Protocol::Auto => {
            let mut params = boot_params::default();
            match setup_header {
                Some(h) => params.hdr = h,
                None => {
                    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
                    params.hdr.header = HDRS_MAGIC_U32;
                    params.hdr.version = SYNTHETIC_HEADER_VERSION;
                    params.hdr.kernel_alignment = SYNTHETIC_KERNEL_ALIGNMENT;
                    params.hdr.cmdline_size = (CMDLINE_MAX_SIZE - 1) as u32;
                }
            }
            params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
            params.hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
            params.hdr.heap_end_ptr = HEAP_END_PTR;
            params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
            if let Some((addr, size)) = initrd {
                // Both below 4 GiB by construction (low RAM ends at 3 GiB).
                params.hdr.ramdisk_image = addr.0 as u32;
                params.hdr.ramdisk_size = size as u32;
            }
            params.acpi_rsdp_addr = rsdp;
            params.e820_entries = e820.len() as u8;
            for (slot, e) in params.e820_table.iter_mut().zip(&e820) {
                *slot = boot_e820_entry {
                    addr: e.addr,
                    size: e.size,
                    r#type: e.type_code(),
                };
            }
            LinuxBootConfigurator::write_bootparams(
                &BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)),
                mem,
            )
            .map_err(|source| Error::Configurator {
                what: "boot_params",
                source,
            })?;
            write_bytes(mem, "page tables", PML4_ADDR, &identity_page_tables())?;
            (ZERO_PAGE_ADDR, Some(GuestAddress(PML4_ADDR)))
        }
        Protocol::Pvh => {
            let (nr_modules, modlist_paddr) = match initrd {
                Some(_) => (1, PVH_MODLIST_ADDR),
                None => (0, 0),
            };
            let start_info = hvm_start_info {
                magic: XEN_HVM_START_MAGIC_VALUE,
                version: 1,
                flags: 0,
                nr_modules,
                modlist_paddr,
                cmdline_paddr: CMDLINE_ADDR,
                rsdp_paddr: rsdp,
                memmap_paddr: PVH_MEMMAP_ADDR,
                memmap_entries: e820.len() as u32,
                reserved: 0,
            };
            let memmap: Vec<hvm_memmap_table_entry> = e820
                .iter()
                .map(|e| hvm_memmap_table_entry {
                    addr: e.addr,
                    size: e.size,
                    type_: e.type_code(),
                    reserved: 0,
                })
                .collect();
            let mut params = BootParams::new(&start_info, GuestAddress(PVH_START_INFO_ADDR));
            params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
            if let Some((addr, size)) = initrd {
                params.set_modules(
                    &[hvm_modlist_entry {
                        paddr: addr.0,
                        size,
                        cmdline_paddr: 0,
                        reserved: 0,
                    }],
                    GuestAddress(PVH_MODLIST_ADDR),
                );
            }
            PvhBootConfigurator::write_bootparams(&params, mem).map_err(|source| {
                Error::Configurator {
                    what: "hvm_start_info",
                    source,
                }
            })?;
            (PVH_START_INFO_ADDR, None)
        }
    };

    let entry = BootEntry {
        protocol,
        entry: GuestAddress(entry),
        boot_info: GuestAddress(boot_info),
        gdt,
        idt_base: GuestAddress(BOOT_IDT_ADDR),
        page_tables,
        stack: GuestAddress(BOOT_STACK_POINTER),
        kernel_start: GuestAddress(kernel_start),
        kernel_end: GuestAddress(kernel_end),
        cmdline: (GuestAddress(CMDLINE_ADDR), len as u64),
        initrd,
    };
    check_no_overlap(&entry.regions())?;
    Ok(entry)
}

fn check_kernel_fits(start: u64, end: u64, low_end: u64) -> Result<()> {
    if start < KERNEL_LOAD_ADDR || end > low_end || start >= end {
        return Err(Error::KernelOutOfRam {
            start,
            end,
            min: KERNEL_LOAD_ADDR,
            max: low_end,
        });
    }
    Ok(())
}

fn check_entry(entry: u64, low_end: u64) -> Result<()> {
    if !(KERNEL_LOAD_ADDR..low_end).contains(&entry) {
        return Err(Error::EntryOutOfRange {
            entry,
            min: KERNEL_LOAD_ADDR,
            max: low_end,
        });
    }
    Ok(())
}

/// End of the memory a bzImage needs: the copied image, and the buffer its 64-bit entry
/// decompresses into, `[max(align_up(load, kernel_alignment), pref_address), + init_size)`
/// (what `arch/x86/boot/compressed/head_64.S` computes for a relocatable kernel; a
/// non-relocatable one runs at `pref_address`).
fn bzimage_footprint_end(bz: &image::BzInfo, low_end: u64) -> Result<u64> {
    let overflow = || Error::KernelOutOfRam {
        start: KERNEL_LOAD_ADDR,
        end: u64::MAX,
        min: KERNEL_LOAD_ADDR,
        max: low_end,
    };
    let image_end = KERNEL_LOAD_ADDR
        .checked_add(bz.payload_len)
        .ok_or_else(overflow)?;
    let h = &bz.header;
    let (init_size, pref, align, relocatable) = (
        u64::from(h.init_size),
        h.pref_address,
        u64::from(h.kernel_alignment),
        h.relocatable_kernel != 0,
    );
    if h.version < 0x020a || init_size == 0 {
        return Ok(image_end);
    }
    let aligned_load = if align.is_power_of_two() {
        KERNEL_LOAD_ADDR.next_multiple_of(align)
    } else {
        KERNEL_LOAD_ADDR
    };
    let run_at = match (relocatable, pref) {
        (true, _) => aligned_load.max(pref),
        (false, 0) => KERNEL_LOAD_ADDR,
        (false, p) => p,
    };
    let run_end = run_at.checked_add(init_size).ok_or_else(overflow)?;
    Ok(image_end.max(run_end))
}

/// Page-aligned initrd address: as high as possible below
/// `min(low_end, initrd_addr_max + 1)` and not below the kernel's end.
fn place_initrd(size: u64, kernel_end: u64, low_end: u64, initrd_addr_max: u64) -> Result<u64> {
    // initrd_addr_max is the highest address the initrd may occupy (inclusive).
    let limit = low_end.min(initrd_addr_max.saturating_add(1)) & !(PAGE_SIZE - 1);
    let floor = kernel_end.next_multiple_of(PAGE_SIZE);
    let available = limit.saturating_sub(floor);
    if size > available {
        return Err(Error::InitrdTooLarge { size, available });
    }
    Ok((limit - size) & !(PAGE_SIZE - 1))
}

fn copy_initrd<I: Read + Seek>(
    mem: &GuestMemoryMmap,
    src: &mut I,
    addr: u64,
    size: u64,
) -> Result<()> {
    src.rewind().map_err(Error::InitrdRead)?;
    // Copy through a bounce buffer: the source only has to be Read.
    let mut buf = vec![0u8; 64 << 10];
    let mut done = 0u64;
    while done < size {
        let n = (size - done).min(buf.len() as u64) as usize;
        src.read_exact(&mut buf[..n]).map_err(Error::InitrdRead)?;
        write_bytes(mem, "initrd", addr + done, &buf[..n])?;
        done += n as u64;
    }
    Ok(())
}

fn write_bytes(mem: &GuestMemoryMmap, what: &'static str, addr: u64, bytes: &[u8]) -> Result<()> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| Error::GuestWrite { what, addr, source })
}

/// PML4, PDPT and four page directories of 2 MiB pages mapping `[0, 4 GiB)` 1:1, as
/// one contiguous image starting at [`layout::PML4_ADDR`].
pub fn identity_page_tables() -> Vec<u8> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    let mut words = vec![0u64; (PAGE_TABLES_SIZE / 8) as usize];
    // PML4[0] -> PDPT.
    words[0] = PDPT_ADDR | PRESENT_RW;
    // PDPT[i] -> PD i.
    let pdpt = ((PDPT_ADDR - PML4_ADDR) / 8) as usize;
    for i in 0..4u64 {
        words[pdpt + i as usize] = (PD_ADDR + i * 0x1000) | PRESENT_RW;
    }
    let pd = ((PD_ADDR - PML4_ADDR) / 8) as usize;
    for (k, w) in words[pd..pd + 4 * 512].iter_mut().enumerate() {
        *w = ((k as u64) << 21) | PRESENT_RW | PAGE_SIZE_2M;
    }
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn check_no_overlap(regions: &[(&'static str, GuestAddress, u64)]) -> Result<()> {
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[i + 1..] {
            let (a_end, b_end) = (a.1 .0.saturating_add(a.2), b.1 .0.saturating_add(b.2));
            if a.2 > 0 && b.2 > 0 && a.1 .0 < b_end && b.1 .0 < a_end {
                return Err(Error::Overlap {
                    a: a.0,
                    a_start: a.1 .0,
                    a_end,
                    b: b.0,
                    b_start: b.1 .0,
                    b_end,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
