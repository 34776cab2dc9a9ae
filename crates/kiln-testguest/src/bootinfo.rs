//! What the VMM handed the guest at entry: Linux `boot_params` or PVH `hvm_start_info`, parsed
//! from byte slices so that all of it can be unit-tested on the host.

use core::fmt;

use crate::cmdline::{Cmdline, MAX_CMDLINE};
use crate::line::{Describe, Described, LineBuf};
use crate::memmap::{MemEntry, MemMap, MAX_ENTRIES};

/// Read access to guest-physical memory. The guest implements it over its identity map and
/// refuses ranges that would touch MMIO; tests implement it over a `Vec`.
pub trait PhysMem {
    /// The bytes of `[addr, addr + len)`, or `None` if that range may not be read.
    fn read(&self, addr: u64, len: usize) -> Option<&[u8]>;
}

/// How the guest was entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// Linux 64-bit boot protocol (RSI = boot_params).
    Linux64,
    /// PVH (EBX = hvm_start_info).
    Pvh,
    /// Linux 32-bit boot protocol (ESI = boot_params), through the bzImage `code32_start` entry.
    Linux32,
}

impl Protocol {
    /// Decodes the protocol number the entry code passes to `kmain` (1, 2, 3).
    pub fn from_raw(raw: u32) -> Option<Protocol> {
        match raw {
            1 => Some(Protocol::Linux64),
            2 => Some(Protocol::Pvh),
            3 => Some(Protocol::Linux32),
            _ => None,
        }
    }

    /// Short name used in output lines.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Linux64 => "linux64",
            Protocol::Pvh => "pvh",
            Protocol::Linux32 => "linux32",
        }
    }

    /// True for the protocols that pass a Linux `boot_params`.
    pub fn is_linux(self) -> bool {
        matches!(self, Protocol::Linux64 | Protocol::Linux32)
    }
}

/// Reads a little-endian integer at `off`, or 0 if the slice is too short (callers size their
/// slices up front, so this only guards against programming errors without panicking).
fn le(bytes: &[u8], off: usize, n: usize) -> u64 {
    bytes
        .get(off..off + n)
        .map(|b| {
            b.iter()
                .rev()
                .fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
        })
        .unwrap_or(0)
}

/// Size of `boot_params` (the zero page).
pub const BOOT_PARAMS_SIZE: usize = 4096;
/// `"HdrS"`, the setup header magic at offset 0x202.
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// Boot sector signature at offset 0x1FE.
pub const BOOT_FLAG: u16 = 0xAA55;

/// Byte offsets inside `boot_params` (Documentation/arch/x86/zero-page.rst and boot.rst).
pub mod bp {
    /// `ext_ramdisk_image`: high 32 bits of the initrd address.
    pub const EXT_RAMDISK_IMAGE: usize = 0x0C0;
    /// `ext_ramdisk_size`: high 32 bits of the initrd size.
    pub const EXT_RAMDISK_SIZE: usize = 0x0C4;
    /// `ext_cmd_line_ptr`: high 32 bits of the command-line address.
    pub const EXT_CMD_LINE_PTR: usize = 0x0C8;
    /// `acpi_rsdp_addr` (u64).
    pub const ACPI_RSDP_ADDR: usize = 0x070;
    /// `e820_entries` (u8).
    pub const E820_ENTRIES: usize = 0x1E8;
    /// `setup_sects` (u8), start of the setup header.
    pub const SETUP_SECTS: usize = 0x1F1;
    /// `boot_flag` (u16).
    pub const BOOT_FLAG: usize = 0x1FE;
    /// `header` (u32, "HdrS").
    pub const HEADER: usize = 0x202;
    /// `version` (u16).
    pub const VERSION: usize = 0x206;
    /// `type_of_loader` (u8).
    pub const TYPE_OF_LOADER: usize = 0x210;
    /// `loadflags` (u8).
    pub const LOADFLAGS: usize = 0x211;
    /// `code32_start` (u32).
    pub const CODE32_START: usize = 0x214;
    /// `ramdisk_image` (u32).
    pub const RAMDISK_IMAGE: usize = 0x218;
    /// `ramdisk_size` (u32).
    pub const RAMDISK_SIZE: usize = 0x21C;
    /// `cmd_line_ptr` (u32).
    pub const CMD_LINE_PTR: usize = 0x228;
    /// `initrd_addr_max` (u32).
    pub const INITRD_ADDR_MAX: usize = 0x22C;
    /// `cmdline_size` (u32).
    pub const CMDLINE_SIZE: usize = 0x238;
    /// `e820_table`: 128 entries of 20 bytes.
    pub const E820_TABLE: usize = 0x2D0;
    /// Size of one `boot_e820_entry`.
    pub const E820_ENTRY_SIZE: usize = 20;
}

/// A borrowed Linux `boot_params`.
#[derive(Clone, Copy, Debug)]
pub struct BootParams<'a>(&'a [u8]);

impl<'a> BootParams<'a> {
    /// Wraps a zero page; `None` if shorter than [`BOOT_PARAMS_SIZE`].
    pub fn new(bytes: &'a [u8]) -> Option<Self> {
        (bytes.len() >= BOOT_PARAMS_SIZE).then_some(BootParams(bytes))
    }

    /// `hdr.header`.
    pub fn header(&self) -> u32 {
        le(self.0, bp::HEADER, 4) as u32
    }
    /// `hdr.boot_flag`.
    pub fn boot_flag(&self) -> u16 {
        le(self.0, bp::BOOT_FLAG, 2) as u16
    }
    /// `hdr.version`.
    pub fn version(&self) -> u16 {
        le(self.0, bp::VERSION, 2) as u16
    }
    /// `hdr.type_of_loader`.
    pub fn type_of_loader(&self) -> u8 {
        self.0[bp::TYPE_OF_LOADER]
    }
    /// `hdr.loadflags`.
    pub fn loadflags(&self) -> u8 {
        self.0[bp::LOADFLAGS]
    }
    /// `acpi_rsdp_addr` (0: not given).
    pub fn acpi_rsdp_addr(&self) -> u64 {
        le(self.0, bp::ACPI_RSDP_ADDR, 8)
    }
    /// `e820_entries`.
    pub fn e820_entries(&self) -> u8 {
        self.0[bp::E820_ENTRIES]
    }
    /// Entry `i` of `e820_table` (`i < 128`).
    pub fn e820_entry(&self, i: usize) -> Option<MemEntry> {
        if i >= MAX_ENTRIES {
            return None;
        }
        let off = bp::E820_TABLE + i * bp::E820_ENTRY_SIZE;
        Some(MemEntry {
            addr: le(self.0, off, 8),
            size: le(self.0, off + 8, 8),
            kind: le(self.0, off + 16, 4) as u32,
        })
    }
    /// Command-line address including `ext_cmd_line_ptr`.
    pub fn cmd_line_ptr(&self) -> u64 {
        le(self.0, bp::CMD_LINE_PTR, 4) | (le(self.0, bp::EXT_CMD_LINE_PTR, 4) << 32)
    }
    /// Initrd address including `ext_ramdisk_image`.
    pub fn ramdisk_image(&self) -> u64 {
        le(self.0, bp::RAMDISK_IMAGE, 4) | (le(self.0, bp::EXT_RAMDISK_IMAGE, 4) << 32)
    }
    /// Initrd size including `ext_ramdisk_size`.
    pub fn ramdisk_size(&self) -> u64 {
        le(self.0, bp::RAMDISK_SIZE, 4) | (le(self.0, bp::EXT_RAMDISK_SIZE, 4) << 32)
    }
}

/// `XEN_HVM_START_MAGIC_VALUE`.
pub const PVH_MAGIC: u32 = 0x336e_c578;
/// Size of `hvm_start_info` version 1.
pub const START_INFO_SIZE: usize = 0x38;
/// Size of one `hvm_modlist_entry`.
pub const MODLIST_ENTRY_SIZE: usize = 32;
/// Size of one `hvm_memmap_table_entry`.
pub const MEMMAP_ENTRY_SIZE: usize = 24;

/// A borrowed PVH `hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h).
#[derive(Clone, Copy, Debug)]
pub struct StartInfo<'a>(&'a [u8]);

impl<'a> StartInfo<'a> {
    /// Wraps a start info; `None` if shorter than [`START_INFO_SIZE`].
    pub fn new(bytes: &'a [u8]) -> Option<Self> {
        (bytes.len() >= START_INFO_SIZE).then_some(StartInfo(bytes))
    }
    /// `magic`.
    pub fn magic(&self) -> u32 {
        le(self.0, 0x00, 4) as u32
    }
    /// `version`.
    pub fn version(&self) -> u32 {
        le(self.0, 0x04, 4) as u32
    }
    /// `nr_modules`.
    pub fn nr_modules(&self) -> u32 {
        le(self.0, 0x0C, 4) as u32
    }
    /// `modlist_paddr`.
    pub fn modlist_paddr(&self) -> u64 {
        le(self.0, 0x10, 8)
    }
    /// `cmdline_paddr`.
    pub fn cmdline_paddr(&self) -> u64 {
        le(self.0, 0x18, 8)
    }
    /// `rsdp_paddr`.
    pub fn rsdp_paddr(&self) -> u64 {
        le(self.0, 0x20, 8)
    }
    /// `memmap_paddr` (version >= 1).
    pub fn memmap_paddr(&self) -> u64 {
        le(self.0, 0x28, 8)
    }
    /// `memmap_entries` (version >= 1).
    pub fn memmap_entries(&self) -> u32 {
        le(self.0, 0x30, 4) as u32
    }
}

/// A guest-physical range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
}

/// The first structural problem found while reading the boot information.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProblem {
    /// The entry code passed an unknown protocol number.
    UnknownProtocol(u32),
    /// `boot_params`/`hvm_start_info` could not be read at this address.
    InfoUnreadable(u64),
    /// Setup header present but `header` is not "HdrS".
    HeaderMagic(u32),
    /// "HdrS" present but `boot_flag` is not 0xAA55.
    BootFlag(u16),
    /// `type_of_loader` is 0 (the VMM did not identify itself).
    TypeOfLoader,
    /// `e820_entries` not in 1..=128.
    E820Count(u8),
    /// No command line pointer.
    NoCmdline,
    /// Command line not inside any memory map entry at this address.
    CmdlineUnreadable(u64),
    /// No NUL within 4096 bytes.
    CmdlineUnterminated,
    /// `hvm_start_info.magic` wrong.
    PvhMagic(u32),
    /// `hvm_start_info.version` < 1 (no memmap).
    PvhVersion(u32),
    /// `memmap_paddr` is 0 or `memmap_entries` not in 1..=128.
    PvhMemmap(u32),
    /// The memory map could not be read at this address.
    MemmapUnreadable(u64),
    /// The module list is not inside any memory map entry at this address.
    ModlistUnreadable(u64),
}

impl Describe for BootProblem {
    fn describe(&self, out: &mut LineBuf) {
        let (text, value): (&str, Option<u64>) = match *self {
            BootProblem::UnknownProtocol(p) => ("unknown entry protocol ", Some(u64::from(p))),
            BootProblem::InfoUnreadable(a) => ("boot info unreadable at ", Some(a)),
            BootProblem::HeaderMagic(m) => ("setup header magic is not HdrS: ", Some(u64::from(m))),
            BootProblem::BootFlag(b) => ("boot_flag is not 0xaa55: ", Some(u64::from(b))),
            BootProblem::TypeOfLoader => ("type_of_loader is 0", None),
            BootProblem::E820Count(n) => ("e820_entries not in 1..=128: ", Some(u64::from(n))),
            BootProblem::NoCmdline => ("no command line pointer", None),
            BootProblem::CmdlineUnreadable(a) => {
                ("command line outside the memory map at ", Some(a))
            }
            BootProblem::CmdlineUnterminated => ("command line not NUL-terminated", None),
            BootProblem::PvhMagic(m) => ("hvm_start_info magic is ", Some(u64::from(m))),
            BootProblem::PvhVersion(v) => ("hvm_start_info version < 1: ", Some(u64::from(v))),
            BootProblem::PvhMemmap(n) => ("PVH memmap missing, entries: ", Some(u64::from(n))),
            BootProblem::MemmapUnreadable(a) => ("memory map unreadable at ", Some(a)),
            BootProblem::ModlistUnreadable(a) => {
                ("module list outside the memory map at ", Some(a))
            }
        };
        out.push_str(text);
        if let Some(v) = value {
            out.push_hex(v);
        }
    }
}

impl fmt::Display for BootProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Described(self).fmt(f)
    }
}

/// Everything the scenarios need from the entry state.
#[derive(Debug)]
pub struct BootInfo<'a> {
    /// Entry protocol.
    pub protocol: Option<Protocol>,
    /// Address of `boot_params` / `hvm_start_info`.
    pub info_addr: u64,
    /// e820 / PVH memory map, in the VMM's order.
    pub memmap: MemMap,
    /// Command line (empty if missing).
    pub cmdline: Cmdline<'a>,
    /// Initrd / module 0, if the VMM reported one.
    pub initrd: Option<Region>,
    /// ACPI RSDP address from boot_params / hvm_start_info (0: not given).
    pub rsdp: u64,
    /// First structural problem, if any (the `boot` scenario fails with it).
    pub problem: Option<BootProblem>,
}

impl<'a> BootInfo<'a> {
    fn empty(protocol: Option<Protocol>, info_addr: u64) -> Self {
        BootInfo {
            protocol,
            info_addr,
            memmap: MemMap::new(),
            cmdline: Cmdline::new(&[]),
            initrd: None,
            rsdp: 0,
            problem: None,
        }
    }

    fn note(&mut self, p: BootProblem) {
        if self.problem.is_none() {
            self.problem = Some(p);
        }
    }

    /// Reads the boot information at `info_addr` for `protocol_raw` (as passed by the entry
    /// code). Never panics: every problem is recorded in [`BootInfo::problem`].
    pub fn collect(protocol_raw: u32, info_addr: u64, mem: &'a dyn PhysMem) -> Self {
        let protocol = Protocol::from_raw(protocol_raw);
        let mut info = BootInfo::empty(protocol, info_addr);
        match protocol {
            None => info.note(BootProblem::UnknownProtocol(protocol_raw)),
            Some(Protocol::Pvh) => info.collect_pvh(mem),
            Some(_) => info.collect_linux(mem),
        }
        info
    }

    fn collect_linux(&mut self, mem: &'a dyn PhysMem) {
        let Some(p) = mem
            .read(self.info_addr, BOOT_PARAMS_SIZE)
            .and_then(BootParams::new)
        else {
            self.note(BootProblem::InfoUnreadable(self.info_addr));
            return;
        };
        // A zero header means the VMM did not fill the setup header (allowed for ELF kernels).
        if p.header() != 0 {
            if p.header() != HDRS_MAGIC {
                self.note(BootProblem::HeaderMagic(p.header()));
            } else if p.boot_flag() != BOOT_FLAG {
                self.note(BootProblem::BootFlag(p.boot_flag()));
            }
        }
        if p.type_of_loader() == 0 {
            self.note(BootProblem::TypeOfLoader);
        }
        let n = p.e820_entries();
        if n == 0 || usize::from(n) > MAX_ENTRIES {
            self.note(BootProblem::E820Count(n));
        }
        for i in 0..usize::from(n).min(MAX_ENTRIES) {
            if let Some(e) = p.e820_entry(i) {
                self.memmap.push(e);
            }
        }
        self.rsdp = p.acpi_rsdp_addr();
        match p.cmd_line_ptr() {
            0 => self.note(BootProblem::NoCmdline),
            addr => self.read_cmdline(addr, mem),
        }
        if p.ramdisk_size() != 0 || p.ramdisk_image() != 0 {
            self.initrd = Some(Region {
                addr: p.ramdisk_image(),
                size: p.ramdisk_size(),
            });
        }
    }

    fn collect_pvh(&mut self, mem: &'a dyn PhysMem) {
        let Some(s) = mem
            .read(self.info_addr, START_INFO_SIZE)
            .and_then(StartInfo::new)
        else {
            self.note(BootProblem::InfoUnreadable(self.info_addr));
            return;
        };
        if s.magic() != PVH_MAGIC {
            // Nothing else in the structure can be trusted.
            self.note(BootProblem::PvhMagic(s.magic()));
            return;
        }
        if s.version() < 1 {
            self.note(BootProblem::PvhVersion(s.version()));
        } else {
            let n = s.memmap_entries();
            if s.memmap_paddr() == 0 || n == 0 || n as usize > MAX_ENTRIES {
                self.note(BootProblem::PvhMemmap(n));
            } else {
                match mem.read(s.memmap_paddr(), n as usize * MEMMAP_ENTRY_SIZE) {
                    None => self.note(BootProblem::MemmapUnreadable(s.memmap_paddr())),
                    Some(b) => {
                        for e in b.chunks_exact(MEMMAP_ENTRY_SIZE) {
                            self.memmap.push(MemEntry {
                                addr: le(e, 0, 8),
                                size: le(e, 8, 8),
                                kind: le(e, 16, 4) as u32,
                            });
                        }
                    }
                }
            }
        }
        self.rsdp = s.rsdp_paddr();
        match s.cmdline_paddr() {
            0 => self.note(BootProblem::NoCmdline),
            addr => self.read_cmdline(addr, mem),
        }
        if s.nr_modules() > 0 {
            let addr = s.modlist_paddr();
            let len = MODLIST_ENTRY_SIZE as u64;
            match mem.read(addr, MODLIST_ENTRY_SIZE).filter(|_| {
                self.memmap
                    .bytes_mapped_from(addr)
                    .is_some_and(|n| n >= len)
            }) {
                None => self.note(BootProblem::ModlistUnreadable(addr)),
                Some(m) => {
                    self.initrd = Some(Region {
                        addr: le(m, 0, 8),
                        size: le(m, 8, 8),
                    })
                }
            }
        }
    }

    fn read_cmdline(&mut self, addr: u64, mem: &'a dyn PhysMem) {
        // Read at most 4096 bytes, and only as far as the memory map entry holding `addr`
        // reaches. Any type will do: QEMU's firmware puts it in the reserved BIOS area.
        let avail = self
            .memmap
            .bytes_mapped_from(addr)
            .map(|n| n.min(MAX_CMDLINE as u64));
        let Some(bytes) = avail.and_then(|n| mem.read(addr, n as usize)) else {
            self.note(BootProblem::CmdlineUnreadable(addr));
            return;
        };
        if !bytes.contains(&0) {
            self.note(BootProblem::CmdlineUnterminated);
        }
        self.cmdline = Cmdline::new(bytes);
    }
}

#[cfg(test)]
pub(crate) mod testmem {
    //! A fake guest-physical memory for tests.
    use super::PhysMem;

    /// `size` bytes of guest memory starting at address 0.
    pub struct FakeMem(pub Vec<u8>);

    impl FakeMem {
        pub fn new(size: usize) -> Self {
            FakeMem(vec![0; size])
        }
        pub fn put(&mut self, addr: u64, bytes: &[u8]) {
            let a = addr as usize;
            self.0[a..a + bytes.len()].copy_from_slice(bytes);
        }
        pub fn put_u(&mut self, addr: u64, val: u64, n: usize) {
            self.put(addr, &val.to_le_bytes()[..n]);
        }
    }

    impl PhysMem for FakeMem {
        fn read(&self, addr: u64, len: usize) -> Option<&[u8]> {
            let a = usize::try_from(addr).ok()?;
            if a == 0 {
                return None;
            }
            self.0.get(a..a.checked_add(len)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testmem::FakeMem;
    use super::*;
    use crate::memmap::kiln_layout;

    const BP: u64 = 0x7000;
    const SI: u64 = 0x6000;
    const CMD: u64 = 0x2_0000;

    /// A boot_params as the contract describes it, over 2 MiB of fake RAM.
    pub(crate) fn linux_mem(cmdline: &[u8]) -> FakeMem {
        let mut m = FakeMem::new(2 << 20);
        m.put_u(BP + bp::BOOT_FLAG as u64, 0xAA55, 2);
        m.put_u(BP + bp::HEADER as u64, u64::from(HDRS_MAGIC), 4);
        m.put_u(BP + bp::TYPE_OF_LOADER as u64, 0xff, 1);
        let layout = kiln_layout(2 << 20);
        m.put_u(BP + bp::E820_ENTRIES as u64, layout.len() as u64, 1);
        for (i, e) in layout.as_slice().iter().enumerate() {
            let off = BP + (bp::E820_TABLE + i * 20) as u64;
            m.put_u(off, e.addr, 8);
            m.put_u(off + 8, e.size, 8);
            m.put_u(off + 16, u64::from(e.kind), 4);
        }
        m.put_u(BP + bp::CMD_LINE_PTR as u64, CMD, 4);
        m.put(CMD, cmdline);
        m
    }

    #[test]
    fn linux_boot_params_are_read() {
        let mut m = linux_mem(b"kiln.test=boot\0");
        m.put_u(BP + bp::RAMDISK_IMAGE as u64, 0x1f_0000, 4);
        m.put_u(BP + bp::RAMDISK_SIZE as u64, 0x800, 4);
        let info = BootInfo::collect(1, BP, &m);
        assert_eq!(info.problem, None);
        assert_eq!(info.protocol, Some(Protocol::Linux64));
        assert_eq!(info.memmap.as_slice(), kiln_layout(2 << 20).as_slice());
        assert_eq!(info.cmdline.as_bytes(), b"kiln.test=boot");
        assert_eq!(
            info.initrd,
            Some(Region {
                addr: 0x1f_0000,
                size: 0x800
            })
        );
    }

    #[test]
    fn rsdp_pointer_is_read_from_both_protocols() {
        // boot_params.acpi_rsdp_addr is a u64 at 0x070; hvm_start_info.rsdp_paddr at 0x20.
        let mut m = linux_mem(b"x\0");
        assert_eq!(BootInfo::collect(1, BP, &m).rsdp, 0);
        m.put_u(BP + 0x70, 0x1_000e_0000, 8);
        assert_eq!(BootInfo::collect(1, BP, &m).rsdp, 0x1_000e_0000);
        let mut m = pvh_mem(b"x\0");
        assert_eq!(BootInfo::collect(2, SI, &m).rsdp, 0);
        m.put_u(SI + 0x20, 0xe_0000, 8);
        assert_eq!(BootInfo::collect(2, SI, &m).rsdp, 0xe_0000);
    }

    #[test]
    fn linux_problems_are_reported() {
        let mut m = linux_mem(b"x\0");
        m.put_u(BP + bp::HEADER as u64, 0x1234, 4);
        assert_eq!(
            BootInfo::collect(1, BP, &m).problem,
            Some(BootProblem::HeaderMagic(0x1234))
        );
        // No setup header at all is fine for an ELF kernel.
        m.put_u(BP + bp::HEADER as u64, 0, 4);
        assert_eq!(BootInfo::collect(1, BP, &m).problem, None);
        m.put_u(BP + bp::TYPE_OF_LOADER as u64, 0, 1);
        assert_eq!(
            BootInfo::collect(1, BP, &m).problem,
            Some(BootProblem::TypeOfLoader)
        );
        let mut m = linux_mem(b"x\0");
        m.put_u(BP + bp::E820_ENTRIES as u64, 200, 1);
        assert_eq!(
            BootInfo::collect(1, BP, &m).problem,
            Some(BootProblem::E820Count(200))
        );
        let mut m = linux_mem(b"x\0");
        m.put_u(BP + bp::CMD_LINE_PTR as u64, 0, 4);
        assert_eq!(
            BootInfo::collect(1, BP, &m).problem,
            Some(BootProblem::NoCmdline)
        );
        // Command line outside every memory map entry is rejected without reading it.
        m.put_u(BP + bp::CMD_LINE_PTR as u64, 0x20_0000, 4);
        assert_eq!(
            BootInfo::collect(1, BP, &m).problem,
            Some(BootProblem::CmdlineUnreadable(0x20_0000))
        );
        // In the reserved area (where QEMU's firmware puts it) is fine.
        m.put_u(BP + bp::CMD_LINE_PTR as u64, 0xf_0000, 4);
        m.put(0xf_0000, b"kiln.test=boot\0");
        let info = BootInfo::collect(1, BP, &m);
        assert_eq!(info.problem, None);
        assert_eq!(info.cmdline.get("kiln.test"), Some(&b"boot"[..]));
        // boot_params outside memory.
        assert_eq!(
            BootInfo::collect(1, 0x1000_0000, &m).problem,
            Some(BootProblem::InfoUnreadable(0x1000_0000))
        );
        assert_eq!(
            BootInfo::collect(9, BP, &m).problem,
            Some(BootProblem::UnknownProtocol(9))
        );
    }

    #[test]
    fn unterminated_cmdline_is_cut_at_4096() {
        let m = linux_mem(&[b'a'; 5000]);
        let info = BootInfo::collect(1, BP, &m);
        assert_eq!(info.problem, Some(BootProblem::CmdlineUnterminated));
        assert_eq!(info.cmdline.as_bytes().len(), 4096);
    }

    fn pvh_mem(cmdline: &[u8]) -> FakeMem {
        let mut m = FakeMem::new(2 << 20);
        m.put_u(SI, u64::from(PVH_MAGIC), 4);
        m.put_u(SI + 4, 1, 4);
        let layout = kiln_layout(2 << 20);
        m.put_u(SI + 0x28, 0x6040, 8);
        m.put_u(SI + 0x30, layout.len() as u64, 4);
        for (i, e) in layout.as_slice().iter().enumerate() {
            let off = 0x6040 + (i * MEMMAP_ENTRY_SIZE) as u64;
            m.put_u(off, e.addr, 8);
            m.put_u(off + 8, e.size, 8);
            m.put_u(off + 16, u64::from(e.kind), 4);
        }
        m.put_u(SI + 0x18, CMD, 8);
        m.put(CMD, cmdline);
        m
    }

    #[test]
    fn pvh_start_info_is_read() {
        let mut m = pvh_mem(b"kiln.test=cpuid\0");
        m.put_u(SI + 0x0C, 1, 4);
        m.put_u(SI + 0x10, 0x6800, 8);
        m.put_u(0x6800, 0x1e_0000, 8);
        m.put_u(0x6808, 12345, 8);
        let info = BootInfo::collect(2, SI, &m);
        assert_eq!(info.problem, None);
        assert_eq!(info.protocol, Some(Protocol::Pvh));
        assert_eq!(info.memmap.len(), 3);
        assert_eq!(info.cmdline.get("kiln.test"), Some(&b"cpuid"[..]));
        assert_eq!(
            info.initrd,
            Some(Region {
                addr: 0x1e_0000,
                size: 12345
            })
        );
    }

    #[test]
    fn pvh_problems_are_reported() {
        let mut m = pvh_mem(b"\0");
        m.put_u(SI, 0xdead, 4);
        assert_eq!(
            BootInfo::collect(2, SI, &m).problem,
            Some(BootProblem::PvhMagic(0xdead))
        );
        let mut m = pvh_mem(b"\0");
        m.put_u(SI + 4, 0, 4);
        assert_eq!(
            BootInfo::collect(2, SI, &m).problem,
            Some(BootProblem::PvhVersion(0))
        );
        let mut m = pvh_mem(b"\0");
        m.put_u(SI + 0x30, 0, 4);
        assert_eq!(
            BootInfo::collect(2, SI, &m).problem,
            Some(BootProblem::PvhMemmap(0))
        );
        let mut m = pvh_mem(b"\0");
        m.put_u(SI + 0x0C, 1, 4);
        m.put_u(SI + 0x10, 0x20_0000, 8);
        assert_eq!(
            BootInfo::collect(2, SI, &m).problem,
            Some(BootProblem::ModlistUnreadable(0x20_0000))
        );
    }
}
