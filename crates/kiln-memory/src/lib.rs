//! Guest physical memory for x86_64 Kiln guests.
//!
//! This crate owns three things that must always agree with each other and with
//! `docs/guest-contract.md`:
//!
//! * the **layout**: low RAM `[0, min(size, 3 GiB))`, the 32-bit MMIO hole
//!   `[0xC000_0000, 4 GiB)` that is never RAM, and high RAM from 4 GiB for the rest
//!   ([`MemoryLayout`]);
//! * the **e820 / PVH memory map** derived from that layout ([`MemoryLayout::e820`]);
//! * the **host mappings** backing the guest RAM ([`create_guest_memory`],
//!   [`create_guest_memory_with`]) and their registration as KVM memory slots
//!   ([`register_memory`]).
//!
//! What backs the RAM ([`Backing`]: private anonymous memory, a shared memfd, hugetlb pages
//! or a host file) is part of [`MemoryConfig`]; what the host kernel is asked to do with the
//! pages (prefault, KSM, transparent hugepages, NUMA binding) is a [`MemoryPolicy`]. Guest
//! RAM is always excluded from core dumps (`MADV_DONTDUMP`).
//!
//! ```
//! use kiln_memory::{Backing, MemoryConfig, MemoryLayout, E820Type, create_guest_memory};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! let cfg = MemoryConfig { size: 64 << 20, backing: Backing::Anonymous };
//! let mem = create_guest_memory(&cfg).unwrap();
//! mem.write_obj(0x1234_5678u32, GuestAddress(0x10_0000)).unwrap();
//!
//! let layout = MemoryLayout::from_guest_memory(&mem).unwrap();
//! assert_eq!(layout.ram_end(), 64 << 20);
//! let e820 = layout.e820();
//! assert_eq!(e820[1].kind, E820Type::Reserved);
//! ```
//!
//! With a policy:
//!
//! ```
//! use kiln_memory::{create_guest_memory_with, Backing, MemoryConfig, MemoryPolicy};
//!
//! let cfg = MemoryConfig { size: 32 << 20, backing: Backing::Anonymous };
//! // Fault every page in now (no page faults once the guest runs) and let KSM merge them.
//! let policy = MemoryPolicy { prefault: true, mergeable: true, ..MemoryPolicy::default() };
//! let mem = create_guest_memory_with(&cfg, &policy).unwrap();
//! ```

#![warn(missing_docs)]

mod dirty;
mod host;

pub use dirty::{DirtyTracker, RegionBitmap};

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestMemoryBackend, GuestMemoryRegion, GuestRegionCollectionError, MmapRegion,
};

pub use vm_memory::{Address, GuestAddress};

/// Guest memory as used by every Kiln crate: mmap-backed, no dirty bitmap.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
/// One mmap-backed region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<()>;

/// Page size the layout is expressed in; memory sizes must be a multiple of it.
pub const PAGE_SIZE: u64 = 0x1000;
/// Smallest accepted guest memory size (16 MiB).
///
/// The boot structures live below 1 MiB and the kernel is loaded at 1 MiB; 16 MiB leaves
/// room for a small kernel plus an initrd. Linux itself needs considerably more.
pub const MIN_MEMORY_SIZE: u64 = 16 << 20;
/// First address of the 32-bit MMIO hole (3 GiB). Never RAM.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// First address after the 32-bit MMIO hole (4 GiB), where high RAM starts.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Start of the reserved legacy area (EBDA, VGA hole, BIOS) reported as e820 type 2.
pub const EBDA_START: u64 = 0x9_fc00;
/// End of the reserved legacy area; the kernel is loaded here (1 MiB).
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// Errors from building, describing or registering guest memory.
///
/// Messages describe the memory size without naming a command-line flag, so that a
/// VMM can prefix them with its own option name (e.g. `--memory`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The requested size was zero.
    #[error("memory size must not be zero")]
    ZeroSize,
    /// The requested size is not a multiple of [`PAGE_SIZE`].
    #[error("memory size {size} bytes is not a multiple of 4 KiB")]
    Unaligned {
        /// Requested size in bytes.
        size: u64,
    },
    /// The requested size is below [`MIN_MEMORY_SIZE`].
    #[error("memory size {size} bytes is below the minimum of {min} bytes (16 MiB)")]
    TooSmall {
        /// Requested size in bytes.
        size: u64,
        /// The minimum in bytes.
        min: u64,
    },
    /// The requested size exceeds the host's physical RAM.
    #[error("memory size {size} bytes exceeds the host's physical RAM of {host} bytes")]
    TooLarge {
        /// Requested size in bytes.
        size: u64,
        /// Host RAM in bytes.
        host: u64,
    },
    /// The requested size makes the guest physical address space overflow 64 bits.
    #[error("memory size {size} bytes overflows the guest physical address space")]
    AddressOverflow {
        /// Requested size in bytes.
        size: u64,
    },
    /// `sysconf` could not report the host's RAM size.
    #[error("cannot determine the host's RAM size: {0}")]
    HostRam(#[source] io::Error),
    /// A host setting in sysfs could not be read.
    #[error("cannot read the host's memory settings: {0}")]
    HostQuery(#[source] io::Error),
    /// `memfd_create` failed.
    #[error("memfd_create for guest RAM failed: {0}")]
    MemfdCreate(#[source] io::Error),
    /// Sizing the memfd with `ftruncate` failed.
    #[error("cannot size the guest RAM memfd to {size} bytes: {source}")]
    MemfdResize {
        /// Requested size in bytes.
        size: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The size is not a whole number of the backing's hugepages.
    #[error("memory size {size} bytes is not a multiple of the {page_size} hugepage size")]
    HugePageUnaligned {
        /// Requested size in bytes.
        size: u64,
        /// The hugepage size.
        page_size: HugePageSize,
    },
    /// A [`MemoryPolicy`] setting makes no sense with the chosen [`Backing`].
    #[error("{what}: {why}")]
    Conflict {
        /// The two settings that clash.
        what: &'static str,
        /// Why they can't be combined.
        why: &'static str,
    },
    /// The host has no pool of hugepages of this size.
    #[error("the host has no {page_size} hugepage pool ({dir} is missing)")]
    NoHugePagePool {
        /// The hugepage size.
        page_size: HugePageSize,
        /// The sysfs directory that would describe it.
        dir: PathBuf,
    },
    /// The host's hugepage pool is too small for guest RAM.
    #[error(
        "guest RAM needs {needed} {page_size} hugepages but only {available} are available \
         ({free} free, {reserved} reserved, {overcommit} more allowed by overcommit, in \
         {dir}); raise {dir}/nr_hugepages"
    )]
    NotEnoughHugePages {
        /// The hugepage size.
        page_size: HugePageSize,
        /// Pages guest RAM needs.
        needed: u64,
        /// Pages that can be had now: `free - reserved + overcommit`.
        available: u64,
        /// `free_hugepages`.
        free: u64,
        /// `resv_hugepages`: free pages already promised to other mappings.
        reserved: u64,
        /// `nr_overcommit_hugepages - surplus_hugepages`: surplus pages still allowed.
        overcommit: u64,
        /// The pool's sysfs directory.
        dir: PathBuf,
    },
    /// The host has transparent hugepages turned off for this kind of memory.
    #[error("transparent hugepages are off on the host ({knob} is {setting:?})")]
    ThpDisabled {
        /// The sysfs knob that says so.
        knob: PathBuf,
        /// Its current setting.
        setting: String,
    },
    /// The requested host NUMA node does not exist or has no memory.
    #[error(
        "host NUMA node {node} does not exist or has no memory (nodes with memory: {available})"
    )]
    NoSuchNumaNode {
        /// The node asked for.
        node: u32,
        /// The host's nodes with memory, as sysfs lists them (empty without NUMA support).
        available: String,
    },
    /// The host file backing guest RAM can't be used.
    #[error("guest RAM file {path}: {why}")]
    HostFile {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Applying a policy to a mapped region failed (`mbind`, `madvise`, prefaulting).
    #[error("{what} on guest RAM at {addr:#x} ({size} bytes) failed: {source}")]
    Policy {
        /// What was being done.
        what: String,
        /// Guest physical start of the region.
        addr: u64,
        /// Region size in bytes.
        size: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `mmap` of one RAM region failed.
    #[error("cannot map guest RAM at {addr:#x} ({size} bytes): {source}")]
    Mmap {
        /// Guest physical start of the region.
        addr: u64,
        /// Region size in bytes.
        size: u64,
        /// The underlying error.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// vm-memory refused the region collection.
    #[error("invalid guest RAM region set: {0}")]
    Regions(#[source] GuestRegionCollectionError),
    /// A [`GuestMemoryMmap`] does not have the layout this crate produces.
    #[error(
        "guest memory region {index} ({start:#x}, {len} bytes) does not match the x86_64 \
         layout (expected {expected_start:#x}, {expected_len} bytes)"
    )]
    NonCanonicalLayout {
        /// Index of the offending region (or of the missing one).
        index: usize,
        /// Start of the region found (0 if missing).
        start: u64,
        /// Length of the region found (0 if missing).
        len: u64,
        /// Start the layout requires.
        expected_start: u64,
        /// Length the layout requires.
        expected_len: u64,
    },
    /// `KVM_GET_DIRTY_LOG` failed for one slot (or logging is off: EINVAL).
    #[error("KVM_GET_DIRTY_LOG for memory slot {slot} failed: {source}")]
    DirtyLog {
        /// KVM slot number.
        slot: u32,
        /// The underlying error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_USER_MEMORY_REGION` failed for one slot (registering it, or turning its
    /// dirty log on or off).
    #[error(
        "KVM_SET_USER_MEMORY_REGION for slot {slot} ({addr:#x}, {size} bytes) failed: {source}"
    )]
    RegisterSlot {
        /// KVM slot number.
        slot: u32,
        /// Guest physical start of the region.
        addr: u64,
        /// Region size in bytes.
        size: u64,
        /// The underlying error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Size of the hugetlb pages backing guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HugePageSize {
    /// 2 MiB pages (x86_64 PMD size), the pool in `/proc/sys/vm/nr_hugepages`.
    Size2M,
    /// 1 GiB pages (x86_64 PUD size; the CPU must have `pdpe1gb`).
    Size1G,
}

impl HugePageSize {
    /// The page size in bytes.
    pub fn bytes(self) -> u64 {
        match self {
            HugePageSize::Size2M => 2 << 20,
            HugePageSize::Size1G => 1 << 30,
        }
    }

    /// The pool's directory under `/sys/kernel/mm/hugepages`, e.g. `hugepages-2048kB`.
    pub fn sysfs_name(self) -> String {
        format!("hugepages-{}kB", self.bytes() >> 10)
    }

    fn mmap_flag(self) -> libc::c_int {
        match self {
            HugePageSize::Size2M => libc::MAP_HUGE_2MB,
            HugePageSize::Size1G => libc::MAP_HUGE_1GB,
        }
    }

    fn memfd_flag(self) -> libc::c_uint {
        match self {
            HugePageSize::Size2M => libc::MFD_HUGE_2MB,
            HugePageSize::Size1G => libc::MFD_HUGE_1GB,
        }
    }
}

impl fmt::Display for HugePageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HugePageSize::Size2M => "2 MiB",
            HugePageSize::Size1G => "1 GiB",
        })
    }
}

/// How guest RAM is backed on the host.
///
/// Every backing maps low RAM and high RAM as two mappings of one object; the file-backed
/// ones put low RAM at file offset 0 and high RAM at offset `low RAM size`, and each
/// region's [`vm_memory::GuestMemoryRegion::file_offset`] names the fd and offset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory (`MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`).
    #[default]
    Anonymous,
    /// One `memfd` mapped `MAP_SHARED | MAP_NORESERVE`, so the same RAM can later be
    /// handed to another process (vhost-user backend) or written out for a snapshot.
    SharedMemfd,
    /// Hugetlb pages from the host's preallocated pool: fewer TLB misses and page-table
    /// walks (in the host and, with EPT/NPT, in the two-level walk the guest's accesses
    /// take), and pages that are never swapped or merged.
    ///
    /// Private: `MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_HUGE_*`; shared: a
    /// `memfd_create(MFD_HUGETLB | MFD_HUGE_*)` mapped `MAP_SHARED`. Neither uses
    /// `MAP_NORESERVE`, so the pool's pages are reserved when the RAM is mapped: a pool
    /// that runs short fails then, not with a `SIGBUS` in the middle of a guest access.
    /// The size must be a multiple of the page size; [`MemoryConfig::validate`] checks the
    /// pool has enough pages.
    Hugetlb {
        /// Page size (which pool).
        page_size: HugePageSize,
        /// Shared memfd (true) or private anonymous (false).
        shared: bool,
    },
    /// A host file mapped `MAP_SHARED`: created if missing (mode 0600), extended to the
    /// RAM size if shorter (sparse; never shortened), and locked (`flock(LOCK_EX)`) so two
    /// VMs can't share it by mistake. The guest's memory is the file's contents: it is there
    /// before the VM starts and stays after the VMM exits, however it exits.
    File(PathBuf),
}

impl Backing {
    fn huge_page_size(&self) -> Option<HugePageSize> {
        match self {
            Backing::Hugetlb { page_size, .. } => Some(*page_size),
            _ => None,
        }
    }
}

/// What guest RAM to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Total RAM in bytes (the `--memory` value). Must be a non-zero multiple of 4 KiB (of
    /// the hugepage size for [`Backing::Hugetlb`]), at least [`MIN_MEMORY_SIZE`] and at most
    /// the host's physical RAM.
    pub size: u64,
    /// Host backing.
    pub backing: Backing,
}

impl MemoryConfig {
    /// Checks the rules that depend only on this configuration (size, hugepage alignment)
    /// and returns the layout. Touches nothing on the host.
    pub fn check(&self) -> Result<MemoryLayout> {
        let layout = MemoryLayout::new(self.size)?;
        if let Some(page_size) = self.backing.huge_page_size() {
            // Both regions are then whole pages too: the hole starts at 3 GiB.
            if self.size % page_size.bytes() != 0 {
                return Err(Error::HugePageUnaligned {
                    size: self.size,
                    page_size,
                });
            }
        }
        if let Backing::File(path) = &self.backing {
            if path.as_os_str().is_empty() {
                return Err(Error::HostFile {
                    path: path.clone(),
                    why: "the path is empty".into(),
                });
            }
        }
        Ok(layout)
    }

    /// [`MemoryConfig::check`], then against the host: the size fits the host's RAM and,
    /// for [`Backing::Hugetlb`], the pool has enough free pages. Returns the layout.
    pub fn validate(&self) -> Result<MemoryLayout> {
        self.validate_on(Path::new(host::SYSFS))
    }

    fn validate_on(&self, sysfs: &Path) -> Result<MemoryLayout> {
        let layout = self.check()?;
        let host = host_ram_bytes()?;
        if self.size > host {
            return Err(Error::TooLarge {
                size: self.size,
                host,
            });
        }
        if let Some(page_size) = self.backing.huge_page_size() {
            host::check_hugepage_pool(sysfs, page_size, self.size / page_size.bytes())?;
        }
        Ok(layout)
    }
}

/// What the host kernel is asked to do with guest RAM pages, whatever backs them.
///
/// The default asks for nothing (pages are allocated on first touch, by the first-touch
/// NUMA policy). Guest RAM is excluded from core dumps (`MADV_DONTDUMP`) whatever the
/// policy: a VMM's core dump is for debugging the VMM, and the guest's memory is both
/// large and the guest's private data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryPolicy {
    /// Fault every page in before the guest runs (`MADV_POPULATE_WRITE`, after the other
    /// advice so the pages are allocated as hugepages and on the bound node): no page
    /// faults later, at the price of committing all of the RAM up front.
    pub prefault: bool,
    /// Let KSM merge identical pages (`MADV_MERGEABLE`). Private anonymous memory only.
    pub mergeable: bool,
    /// Ask for transparent hugepages (`MADV_HUGEPAGE`). Anonymous memory or a shared
    /// memfd, not hugetlb (already huge) nor a host file.
    pub transparent_hugepages: bool,
    /// Allocate pages only from this host NUMA node (`mbind(MPOL_BIND)`). Not for a host
    /// file.
    pub host_numa_node: Option<u32>,
}

impl MemoryPolicy {
    /// Checks that this policy means something for `backing` (the kernel accepts most
    /// advice on any mapping and silently ignores what it can't do). Touches nothing on
    /// the host.
    pub fn check(&self, backing: &Backing) -> Result<()> {
        let conflict = |what, why| Err(Error::Conflict { what, why });
        if self.mergeable && *backing != Backing::Anonymous {
            return conflict(
                "KSM (mergeable) needs private anonymous memory, not shared, hugetlb or file",
                "KSM only merges ordinary private anonymous pages; on other memory the kernel \
                 accepts the advice and ignores it",
            );
        }
        if self.transparent_hugepages {
            match backing {
                Backing::Hugetlb { .. } => {
                    return conflict(
                        "transparent hugepages with hugetlb pages",
                        "hugetlb pages are already huge; THP applies to ordinary anonymous \
                         and shmem pages",
                    )
                }
                Backing::File(_) => {
                    return conflict(
                        "transparent hugepages with a host file",
                        "the kernel gives THP to anonymous and shmem memory, not to writable \
                         file mappings",
                    )
                }
                Backing::Anonymous | Backing::SharedMemfd => {}
            }
        }
        if self.host_numa_node.is_some() && matches!(backing, Backing::File(_)) {
            return conflict(
                "NUMA binding with a host file",
                "the kernel ignores mbind for shared file mappings: page-cache pages go where \
                 the thread that faults them runs",
            );
        }
        Ok(())
    }

    /// [`MemoryPolicy::check`], then against the host: transparent hugepages are not turned
    /// off for this kind of memory, and the NUMA node exists and has memory.
    pub fn validate(&self, backing: &Backing) -> Result<()> {
        self.validate_on(backing, Path::new(host::SYSFS))
    }

    fn validate_on(&self, backing: &Backing, sysfs: &Path) -> Result<()> {
        self.check(backing)?;
        if self.transparent_hugepages {
            host::check_thp(sysfs, matches!(backing, Backing::SharedMemfd))?;
        }
        if let Some(node) = self.host_numa_node {
            host::check_numa_node(sysfs, node)?;
        }
        Ok(())
    }
}

/// Physical RAM of the host in bytes (`_SC_PHYS_PAGES * _SC_PAGESIZE`).
pub fn host_ram_bytes() -> Result<u64> {
    // SAFETY: sysconf only reads a system parameter; it has no memory-safety preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if pages <= 0 || page_size <= 0 {
        return Err(Error::HostRam(io::Error::last_os_error()));
    }
    Ok((pages as u64).saturating_mul(page_size as u64))
}

/// e820 / PVH memory map entry type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM (type 1).
    Ram = 1,
    /// Reserved (type 2).
    Reserved = 2,
}

/// One entry of the e820 table (identical contents to the PVH memory map).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Entry type.
    pub kind: E820Type,
}

impl E820Entry {
    /// The numeric type as written into `boot_e820_entry` / `hvm_memmap_table_entry`.
    pub fn type_code(&self) -> u32 {
        self.kind as u32
    }
}

/// The x86_64 guest physical RAM layout for one memory size.
///
/// Low RAM is `[0, min(size, MMIO_HOLE_START))`; when `size` exceeds 3 GiB the rest is
/// high RAM `[4 GiB, 4 GiB + size - 3 GiB)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    size: u64,
}

impl MemoryLayout {
    /// Layout for `size` bytes of RAM. Checks everything except the host RAM limit
    /// (see [`MemoryConfig::validate`]).
    pub fn new(size: u64) -> Result<Self> {
        if size == 0 {
            return Err(Error::ZeroSize);
        }
        if size % PAGE_SIZE != 0 {
            return Err(Error::Unaligned { size });
        }
        if size < MIN_MEMORY_SIZE {
            return Err(Error::TooSmall {
                size,
                min: MIN_MEMORY_SIZE,
            });
        }
        // High RAM ends at size + hole length; that must be representable.
        if size.checked_add(MMIO_HOLE_END - MMIO_HOLE_START).is_none() {
            return Err(Error::AddressOverflow { size });
        }
        Ok(MemoryLayout { size })
    }

    /// Recovers the layout from guest memory built by [`create_guest_memory`] (or from
    /// the ranges of [`MemoryLayout::regions`]), and fails if the regions differ in any way.
    /// Boot code uses this so that the e820 table it writes is exactly the real RAM.
    pub fn from_guest_memory(mem: &GuestMemoryMmap) -> Result<Self> {
        let total: u64 = mem.iter().map(|r| r.len()).sum();
        let found = |i: usize| {
            mem.iter()
                .nth(i)
                .map(|r| (r.start_addr().raw_value(), r.len()))
                .unwrap_or((0, 0))
        };
        let layout = MemoryLayout::new(total).map_err(|_| {
            let (start, len) = found(0);
            Error::NonCanonicalLayout {
                index: 0,
                start,
                len,
                expected_start: 0,
                expected_len: total,
            }
        })?;
        let expected = layout.regions();
        for i in 0..expected.len().max(mem.num_regions()) {
            let got = found(i);
            let want = expected
                .get(i)
                .map(|(a, l)| (a.raw_value(), *l))
                .unwrap_or((0, 0));
            if got != want {
                return Err(Error::NonCanonicalLayout {
                    index: i,
                    start: got.0,
                    len: got.1,
                    expected_start: want.0,
                    expected_len: want.1,
                });
            }
        }
        Ok(layout)
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// End (exclusive) of low RAM: `min(size, MMIO_HOLE_START)`.
    pub fn low_ram_end(&self) -> u64 {
        self.size.min(MMIO_HOLE_START)
    }

    /// High RAM `(start, len)` when the size exceeds 3 GiB.
    pub fn high_ram(&self) -> Option<(GuestAddress, u64)> {
        (self.size > MMIO_HOLE_START)
            .then(|| (GuestAddress(MMIO_HOLE_END), self.size - MMIO_HOLE_START))
    }

    /// Highest RAM address + 1.
    pub fn ram_end(&self) -> u64 {
        match self.high_ram() {
            Some((start, len)) => start.raw_value() + len,
            None => self.low_ram_end(),
        }
    }

    /// The RAM regions `(start, len)`, sorted: low RAM, then high RAM if any.
    pub fn regions(&self) -> Vec<(GuestAddress, u64)> {
        let mut v = vec![(GuestAddress(0), self.low_ram_end())];
        v.extend(self.high_ram());
        v
    }

    /// Whether `addr` is backed by RAM in this layout (the reserved legacy area counts as
    /// RAM here: it is mapped, only reported reserved to the guest).
    pub fn is_ram(&self, addr: u64) -> bool {
        addr < self.low_ram_end()
            || self.high_ram().is_some_and(|(start, len)| {
                addr >= start.raw_value() && addr - start.raw_value() < len
            })
    }

    /// Whether the whole range `[addr, addr + len)` is RAM within a single region.
    pub fn is_ram_range(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.regions()
            .iter()
            .any(|(start, rlen)| addr >= start.raw_value() && end <= start.raw_value() + rlen)
    }

    /// The e820 table (also the PVH memory map), per the guest contract:
    /// `[0, 0x9fc00)` RAM, `[0x9fc00, 1 MiB)` reserved, `[1 MiB, low end)` RAM and
    /// `[4 GiB, high end)` RAM when there is high RAM.
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut v = vec![
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820Type::Ram,
            },
            E820Entry {
                addr: EBDA_START,
                size: HIGH_MEMORY_START - EBDA_START,
                kind: E820Type::Reserved,
            },
            E820Entry {
                addr: HIGH_MEMORY_START,
                // MIN_MEMORY_SIZE > 1 MiB, so this cannot underflow.
                size: self.low_ram_end() - HIGH_MEMORY_START,
                kind: E820Type::Ram,
            },
        ];
        if let Some((start, len)) = self.high_ram() {
            v.push(E820Entry {
                addr: start.raw_value(),
                size: len,
                kind: E820Type::Ram,
            });
        }
        v
    }
}

/// Creates guest RAM per `cfg` with the default [`MemoryPolicy`] (see
/// [`create_guest_memory_with`]).
pub fn create_guest_memory(cfg: &MemoryConfig) -> Result<GuestMemoryMmap> {
    create_guest_memory_with(cfg, &MemoryPolicy::default())
}

/// Creates guest RAM per `cfg` (validated with [`MemoryConfig::validate`]) and applies
/// `policy` (validated with [`MemoryPolicy::validate`]) to every region.
///
/// Except for hugetlb and file backings, mappings use `MAP_NORESERVE`: host memory is
/// committed only when touched (or prefaulted). Per region, in this order: `mbind` to the
/// NUMA node, `MADV_DONTDUMP`, `MADV_MERGEABLE`, `MADV_HUGEPAGE`, a name for private
/// anonymous mappings (`[anon:kiln-guest-ram]` in `/proc/PID/maps`, where the kernel
/// supports it), then the prefault, so that the pages it allocates already follow the
/// binding and the hugepage advice. (`MAP_POPULATE` would fault them in at `mmap` time,
/// before any of that applies.)
pub fn create_guest_memory_with(
    cfg: &MemoryConfig,
    policy: &MemoryPolicy,
) -> Result<GuestMemoryMmap> {
    let layout = cfg.validate()?;
    policy.validate(&cfg.backing)?;
    let (file, flags) = match &cfg.backing {
        Backing::Anonymous => (
            None,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        ),
        Backing::SharedMemfd => (
            Some(create_memfd(cfg.size, 0)?),
            libc::MAP_SHARED | libc::MAP_NORESERVE,
        ),
        Backing::Hugetlb {
            page_size,
            shared: false,
        } => (
            None,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | page_size.mmap_flag(),
        ),
        Backing::Hugetlb {
            page_size,
            shared: true,
        } => (
            Some(create_memfd(
                cfg.size,
                libc::MFD_HUGETLB | page_size.memfd_flag(),
            )?),
            libc::MAP_SHARED,
        ),
        Backing::File(path) => (Some(open_host_file(path, cfg.size)?), libc::MAP_SHARED),
    };
    let file = file.map(Arc::new);
    let page = cfg
        .backing
        .huge_page_size()
        .map_or(PAGE_SIZE, |p| p.bytes());
    let mut regions = Vec::with_capacity(2);
    let mut file_pos = 0u64;
    for (addr, len) in layout.regions() {
        let mmap_err = |source| Error::Mmap {
            addr: addr.raw_value(),
            size: len,
            source,
        };
        let mut builder = MmapRegionBuilder::<()>::new(len as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_hugetlbfs(cfg.backing.huge_page_size().is_some());
        if let Some(f) = &file {
            builder = builder.with_file_offset(FileOffset::from_arc(f.clone(), file_pos));
        }
        let region: MmapRegion = builder.build().map_err(mmap_err)?;
        file_pos += len;
        let private_anon = flags & libc::MAP_ANONYMOUS != 0;
        // SAFETY: `region` is a live mapping of exactly `len` bytes that nothing else uses
        // yet (the guest does not exist); the calls below only change its policy, advice
        // and name, and prefaulting keeps its contents.
        unsafe { host::apply_policy(region.as_ptr(), len, page, policy, private_anon) }.map_err(
            |(what, source)| Error::Policy {
                what,
                addr: addr.raw_value(),
                size: len,
                source,
            },
        )?;
        // The layout guarantees addr + len does not overflow, so `new` cannot fail; map it anyway.
        let region =
            GuestRegionMmap::new(region, addr).ok_or(Error::AddressOverflow { size: cfg.size })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(Error::Regions)
}

fn create_memfd(size: u64, extra_flags: libc::c_uint) -> Result<File> {
    // SAFETY: the name is a valid NUL-terminated C string; memfd_create has no other
    // memory-safety preconditions.
    let fd =
        unsafe { libc::memfd_create(c"kiln-guest-ram".as_ptr(), libc::MFD_CLOEXEC | extra_flags) };
    if fd < 0 {
        return Err(Error::MemfdCreate(io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by memfd_create, is valid and owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| Error::MemfdResize { size, source })?;
    Ok(file)
}

/// Opens (creating it if needed) and locks the file behind [`Backing::File`], and makes it
/// at least `size` bytes long.
fn open_host_file(path: &Path, size: u64) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |why: String| Error::HostFile {
        path: path.to_path_buf(),
        why,
    };
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| err(e.to_string()))?;
    let meta = file.metadata().map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    // SAFETY: flock takes no pointers; the fd is valid while `file` lives, and the lock
    // goes with it.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(err(format!(
            "can't lock it ({e}); is another VM using it as its RAM?"
        )));
    }
    if meta.len() < size {
        file.set_len(size)
            .map_err(|e| err(format!("can't extend it to {size} bytes: {e}")))?;
    }
    Ok(file)
}

/// Registers every region of `mem` as a KVM memory slot: region `i` becomes slot `i`
/// (slot 0 = low RAM, slot 1 = high RAM), with no flags.
///
/// # Safety
///
/// KVM keeps the host virtual addresses of the mappings and the guest reads and writes
/// them for as long as the slots exist. The caller must keep the mappings alive (hold
/// `mem` or a clone of it: clones share the mappings through `Arc`) until the VM is
/// destroyed (every `VmFd` and `VcpuFd` of it closed) or the slots have been deleted
/// (`memory_size = 0`). Dropping the last clone earlier unmaps memory the guest can still
/// reach, which lets the guest corrupt whatever the host reuses that address range for.
/// The slots must not already be in use by overlapping memory.
pub unsafe fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let addr = region.start_addr().raw_value();
        let size = region.len();
        let slot = slot as u32;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: addr,
            memory_size: size,
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: `userspace_addr .. + memory_size` is exactly one live mapping owned by
        // `region` (vm-memory checked the size at mmap time); regions of a GuestMemoryMmap
        // never overlap, and each gets its own slot. The lifetime obligation is passed on
        // to our caller (see `# Safety`).
        unsafe { vm.set_user_memory_region(desc) }.map_err(|source| Error::RegisterSlot {
            slot,
            addr,
            size,
            source,
        })?;
    }
    Ok(())
}

/// The raw fd and offset of a region backed by a file (shared memfd, shared hugetlb memfd
/// or host file), if it has one.
pub fn region_fd(region: &GuestRegionMmap) -> Option<(RawFd, u64)> {
    region
        .file_offset()
        .map(|f| (f.file().as_raw_fd(), f.start()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(MemoryLayout::new(0), Err(Error::ZeroSize)));
        assert!(matches!(
            MemoryLayout::new(64 * MIB + 1),
            Err(Error::Unaligned { size }) if size == 64 * MIB + 1
        ));
        assert!(matches!(
            MemoryLayout::new(8 * MIB),
            Err(Error::TooSmall { size, min }) if size == 8 * MIB && min == MIN_MEMORY_SIZE
        ));
        assert!(matches!(
            MemoryLayout::new(!(PAGE_SIZE - 1)),
            Err(Error::AddressOverflow { .. })
        ));
        assert!(MemoryLayout::new(MIN_MEMORY_SIZE).is_ok());
        let host = host_ram_bytes().unwrap();
        let too_big = (host + PAGE_SIZE) & !(PAGE_SIZE - 1);
        let cfg = MemoryConfig {
            size: too_big,
            backing: Backing::Anonymous,
        };
        let err = cfg.validate().unwrap_err();
        assert!(matches!(err, Error::TooLarge { size, host: h } if size == too_big && h == host));
        assert!(err.to_string().contains("exceeds the host"));
    }

    #[test]
    fn layout_below_hole() {
        let l = MemoryLayout::new(128 * MIB).unwrap();
        assert_eq!(l.low_ram_end(), 128 * MIB);
        assert_eq!(l.high_ram(), None);
        assert_eq!(l.ram_end(), 128 * MIB);
        assert_eq!(l.regions(), vec![(GuestAddress(0), 128 * MIB)]);
        assert!(l.is_ram(0));
        assert!(l.is_ram(128 * MIB - 1));
        assert!(!l.is_ram(128 * MIB));
        assert!(!l.is_ram(MMIO_HOLE_END));
        assert!(l.is_ram_range(HIGH_MEMORY_START, 127 * MIB));
        assert!(!l.is_ram_range(HIGH_MEMORY_START, 127 * MIB + 1));
        assert!(!l.is_ram_range(u64::MAX, 2));
    }

    #[test]
    fn layout_at_hole() {
        let l = MemoryLayout::new(3 * GIB).unwrap();
        assert_eq!(l.low_ram_end(), MMIO_HOLE_START);
        assert_eq!(l.high_ram(), None);
        assert_eq!(l.ram_end(), 3 * GIB);
        assert!(l.is_ram(MMIO_HOLE_START - 1));
        assert!(!l.is_ram(MMIO_HOLE_START));
        assert_eq!(l.e820().len(), 3);
    }

    #[test]
    fn layout_above_hole() {
        let l = MemoryLayout::new(5 * GIB).unwrap();
        assert_eq!(l.low_ram_end(), MMIO_HOLE_START);
        assert_eq!(l.high_ram(), Some((GuestAddress(4 * GIB), 2 * GIB)));
        assert_eq!(l.ram_end(), 6 * GIB);
        assert_eq!(
            l.regions(),
            vec![(GuestAddress(0), 3 * GIB), (GuestAddress(4 * GIB), 2 * GIB)]
        );
        for a in [MMIO_HOLE_START, 0xFEC0_0000, 0xFEE0_0000, MMIO_HOLE_END - 1] {
            assert!(!l.is_ram(a), "{a:#x} is in the hole");
        }
        assert!(l.is_ram(MMIO_HOLE_END));
        assert!(l.is_ram(6 * GIB - 1));
        assert!(!l.is_ram(6 * GIB));
        // A range crossing the hole is not RAM even though both ends are.
        assert!(!l.is_ram_range(MMIO_HOLE_START - PAGE_SIZE, 2 * GIB));
    }

    #[test]
    fn e820_matches_contract() {
        let l = MemoryLayout::new(128 * MIB).unwrap();
        let want = vec![
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820Type::Ram,
            },
            E820Entry {
                addr: 0x9fc00,
                size: 0x100000 - 0x9fc00,
                kind: E820Type::Reserved,
            },
            E820Entry {
                addr: 0x100000,
                size: 128 * MIB - 0x100000,
                kind: E820Type::Ram,
            },
        ];
        assert_eq!(l.e820(), want);
        // Contract: RAM total is M - 0x60400 for M <= 3 GiB.
        let ram: u64 = l
            .e820()
            .iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, 128 * MIB - 0x60400);
        assert_eq!(want[1].type_code(), 2);

        let l = MemoryLayout::new(5 * GIB).unwrap();
        let e = l.e820();
        assert_eq!(e.len(), 4);
        assert_eq!(
            e[2],
            E820Entry {
                addr: 0x100000,
                size: 0xC000_0000 - 0x100000,
                kind: E820Type::Ram
            }
        );
        assert_eq!(
            e[3],
            E820Entry {
                addr: 4 * GIB,
                size: 2 * GIB,
                kind: E820Type::Ram
            }
        );
    }

    #[test]
    fn anonymous_memory_matches_layout() {
        let cfg = MemoryConfig {
            size: 32 * MIB,
            backing: Backing::Anonymous,
        };
        let mem = create_guest_memory(&cfg).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(
            MemoryLayout::from_guest_memory(&mem).unwrap().size(),
            32 * MIB
        );
        assert!(mem.iter().all(|r| region_fd(r).is_none()));
        mem.write_obj(0xdead_beefu32, GuestAddress(32 * MIB - 4))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(32 * MIB - 4)).unwrap(),
            0xdead_beef
        );
        assert!(mem.write_obj(0u32, GuestAddress(32 * MIB)).is_err());
    }

    #[test]
    fn memory_above_hole_has_two_regions() {
        // MAP_NORESERVE: nothing is committed until touched. Skip where the host is smaller.
        if host_ram_bytes().unwrap() < 5 * GIB {
            eprintln!("skipping: host has less than 5 GiB");
            return;
        }
        let cfg = MemoryConfig {
            size: 5 * GIB,
            backing: Backing::SharedMemfd,
        };
        let mem = create_guest_memory(&cfg).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let regions: Vec<_> = mem.iter().collect();
        assert_eq!(regions[1].start_addr(), GuestAddress(4 * GIB));
        assert_eq!(region_fd(regions[1]).unwrap().1, 3 * GIB);
        assert!(mem.write_obj(1u8, GuestAddress(MMIO_HOLE_START)).is_err());
        mem.write_obj(7u8, GuestAddress(4 * GIB)).unwrap();
        assert_eq!(
            MemoryLayout::from_guest_memory(&mem).unwrap().ram_end(),
            6 * GIB
        );
    }

    #[test]
    fn memfd_backing_is_shared() {
        let cfg = MemoryConfig {
            size: 16 * MIB,
            backing: Backing::SharedMemfd,
        };
        let mem = create_guest_memory(&cfg).unwrap();
        let region = mem.iter().next().unwrap();
        let fo = region.file_offset().unwrap();
        assert_eq!(fo.start(), 0);
        assert_eq!(fo.file().metadata().unwrap().len(), 16 * MIB);
        // Write through the guest mapping, read through the fd.
        mem.write_slice(b"kiln", GuestAddress(0x12345)).unwrap();
        let mut buf = [0u8; 4];
        fo.file().read_exact_at(&mut buf, 0x12345).unwrap();
        assert_eq!(&buf, b"kiln");
        // And the other way round.
        fo.file().write_all_at(b"back", 0x2000).unwrap();
        let mut buf = [0u8; 4];
        mem.read_slice(&mut buf, GuestAddress(0x2000)).unwrap();
        assert_eq!(&buf, b"back");
    }

    /// The `/proc/self/smaps` entry of the mapping that starts at `addr`: its lines.
    fn smaps_entry(addr: *const u8) -> Vec<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{:x}-", addr as usize);
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        let mut out = vec![lines.next().expect("mapping in smaps").to_string()];
        // Field lines are "Name: value"; the next mapping's header has no colon before
        // its first space.
        out.extend(
            lines
                .take_while(|l| {
                    l.split_whitespace()
                        .next()
                        .is_some_and(|w| w.ends_with(':'))
                })
                .map(str::to_string),
        );
        out
    }

    fn smaps_kb(entry: &[String], field: &str) -> u64 {
        entry
            .iter()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} missing in {entry:?}"))
    }

    fn vm_flags(entry: &[String]) -> Vec<String> {
        entry
            .iter()
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .expect("VmFlags")
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    fn scratch_file(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("kiln-memory-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn hugepage_backing_needs_whole_pages() {
        let cfg = |size| MemoryConfig {
            size,
            backing: Backing::Hugetlb {
                page_size: HugePageSize::Size2M,
                shared: false,
            },
        };
        cfg(32 * MIB).check().unwrap();
        let err = cfg(33 * MIB).check().unwrap_err();
        assert!(matches!(err, Error::HugePageUnaligned { .. }), "{err}");
        assert!(err.to_string().contains("2 MiB hugepage"), "{err}");
        let gib = MemoryConfig {
            size: 3 * GIB / 2,
            backing: Backing::Hugetlb {
                page_size: HugePageSize::Size1G,
                shared: true,
            },
        };
        assert!(gib.check().unwrap_err().to_string().contains("1 GiB"));
        let empty = MemoryConfig {
            size: 32 * MIB,
            backing: Backing::File(PathBuf::new()),
        };
        assert!(matches!(empty.check(), Err(Error::HostFile { .. })));
    }

    #[test]
    fn policies_that_mean_nothing_for_a_backing_are_refused() {
        let huge = Backing::Hugetlb {
            page_size: HugePageSize::Size2M,
            shared: false,
        };
        let file = Backing::File("/tmp/x".into());
        let p = |f: fn(&mut MemoryPolicy)| {
            let mut p = MemoryPolicy::default();
            f(&mut p);
            p
        };
        let mergeable = p(|p| p.mergeable = true);
        let thp = p(|p| p.transparent_hugepages = true);
        let numa = p(|p| p.host_numa_node = Some(0));
        let prefault = p(|p| p.prefault = true);
        for (policy, backing, why) in [
            (mergeable, Backing::SharedMemfd, "KSM only merges"),
            (mergeable, huge.clone(), "KSM only merges"),
            (mergeable, file.clone(), "KSM only merges"),
            (thp, huge.clone(), "already huge"),
            (thp, file.clone(), "not to writable file mappings"),
            (numa, file.clone(), "ignores mbind"),
        ] {
            let err = policy.check(&backing).unwrap_err();
            assert!(
                err.to_string().contains(why),
                "{policy:?} {backing:?}: {err}"
            );
        }
        for (policy, backing) in [
            (mergeable, Backing::Anonymous),
            (thp, Backing::Anonymous),
            (thp, Backing::SharedMemfd),
            (numa, huge.clone()),
            (prefault, file.clone()),
            (prefault, huge),
        ] {
            policy.check(&backing).unwrap();
        }
    }

    #[test]
    fn guest_ram_is_never_dumped_and_committed_lazily() {
        let mem = create_guest_memory(&MemoryConfig {
            size: 32 * MIB,
            backing: Backing::Anonymous,
        })
        .unwrap();
        let e = smaps_entry(mem.iter().next().unwrap().as_ptr());
        assert!(vm_flags(&e).contains(&"dd".to_string()), "{e:?}");
        assert!(!vm_flags(&e).contains(&"mg".to_string()), "{e:?}");
        assert_eq!(smaps_kb(&e, "Size"), 32 << 10);
        assert!(smaps_kb(&e, "Rss") < 1024, "{e:?}");
    }

    #[test]
    fn prefault_and_mergeable_show_in_smaps() {
        let policy = MemoryPolicy {
            prefault: true,
            mergeable: true,
            ..MemoryPolicy::default()
        };
        let cfg = MemoryConfig {
            size: 32 * MIB,
            backing: Backing::Anonymous,
        };
        let mem = create_guest_memory_with(&cfg, &policy).unwrap();
        let e = smaps_entry(mem.iter().next().unwrap().as_ptr());
        // Every page is resident before anything touched it.
        assert_eq!(smaps_kb(&e, "Rss"), 32 << 10, "{e:?}");
        let flags = vm_flags(&e);
        assert!(flags.contains(&"mg".to_string()), "{e:?}");
        assert!(flags.contains(&"dd".to_string()), "{e:?}");
    }

    #[test]
    fn transparent_hugepages_advice() {
        let policy = MemoryPolicy {
            transparent_hugepages: true,
            ..MemoryPolicy::default()
        };
        let cfg = MemoryConfig {
            size: 32 * MIB,
            backing: Backing::Anonymous,
        };
        match policy.validate(&cfg.backing) {
            Err(Error::ThpDisabled { .. }) => {
                // The refusal is the behaviour under test on such a host.
                let err = create_guest_memory_with(&cfg, &policy).unwrap_err();
                assert!(matches!(err, Error::ThpDisabled { .. }), "{err}");
            }
            Err(e) => panic!("{e}"),
            Ok(()) => {
                let mem = create_guest_memory_with(&cfg, &policy).unwrap();
                let e = smaps_entry(mem.iter().next().unwrap().as_ptr());
                assert!(vm_flags(&e).contains(&"hg".to_string()), "{e:?}");
            }
        }
    }

    #[test]
    fn numa_binding_shows_in_numa_maps() {
        let Ok(nodes) = std::fs::read_to_string("/sys/devices/system/node/has_memory") else {
            eprintln!("skipping: host kernel without NUMA support");
            return;
        };
        let node: u32 = nodes
            .trim()
            .split([',', '-'])
            .next()
            .and_then(|n| n.parse().ok())
            .expect("a node with memory");
        let policy = MemoryPolicy {
            host_numa_node: Some(node),
            prefault: true,
            ..MemoryPolicy::default()
        };
        let mem = create_guest_memory_with(
            &MemoryConfig {
                size: 16 * MIB,
                backing: Backing::Anonymous,
            },
            &policy,
        )
        .unwrap();
        let addr = format!("{:x} ", mem.iter().next().unwrap().as_ptr() as usize);
        let maps = std::fs::read_to_string("/proc/self/numa_maps").unwrap();
        let line = maps
            .lines()
            .find(|l| l.starts_with(&addr))
            .expect("in numa_maps");
        assert!(line.contains(&format!("bind:{node} ")), "{line}");
        assert!(line.contains(&format!("N{node}=4096")), "{line}");
        let err = MemoryPolicy {
            host_numa_node: Some(4095),
            ..MemoryPolicy::default()
        }
        .validate(&Backing::Anonymous)
        .unwrap_err();
        assert!(
            matches!(err, Error::NoSuchNumaNode { node: 4095, .. }),
            "{err}"
        );
    }

    #[test]
    fn file_backing_keeps_the_guest_memory() {
        let path = scratch_file("ram");
        let cfg = MemoryConfig {
            size: 16 * MIB,
            backing: Backing::File(path.clone()),
        };
        let mem = create_guest_memory(&cfg).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 16 * MIB);
        // A second VM can't take the same file.
        let err = create_guest_memory(&cfg).unwrap_err();
        assert!(err.to_string().contains("can't lock it"), "{err}");
        mem.write_slice(b"guest data", GuestAddress(0x20000))
            .unwrap();
        drop(mem);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[0x20000..0x2000a], b"guest data");
        // Mapping it again shows the same memory; a longer file is not shortened.
        let f = File::options().write(true).open(&path).unwrap();
        f.set_len(20 * MIB).unwrap();
        drop(f);
        let mem = create_guest_memory(&cfg).unwrap();
        let mut buf = [0u8; 10];
        mem.read_slice(&mut buf, GuestAddress(0x20000)).unwrap();
        assert_eq!(&buf, b"guest data");
        let fo = mem.iter().next().unwrap().file_offset().unwrap();
        assert_eq!(fo.start(), 0);
        drop(mem);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 20 * MIB);
        std::fs::remove_file(&path).unwrap();
        // Something that is not a regular file.
        let dir = std::env::temp_dir();
        let err = create_guest_memory(&MemoryConfig {
            size: 16 * MIB,
            backing: Backing::File(dir),
        })
        .unwrap_err();
        assert!(matches!(err, Error::HostFile { .. }), "{err}");
    }

    #[test]
    fn hugetlb_backing_uses_the_pool() {
        // Whether the pool has pages depends on the host (the kiln integration test sizes
        // it); either the mapping is made of hugepages or the error says how many are
        // missing.
        for shared in [false, true] {
            let cfg = MemoryConfig {
                size: 16 * MIB,
                backing: Backing::Hugetlb {
                    page_size: HugePageSize::Size2M,
                    shared,
                },
            };
            match create_guest_memory(&cfg) {
                Ok(mem) => {
                    let region = mem.iter().next().unwrap();
                    assert_eq!(region.file_offset().is_some(), shared);
                    let e = smaps_entry(region.as_ptr());
                    assert_eq!(smaps_kb(&e, "KernelPageSize"), 2048, "{e:?}");
                    mem.write_obj(1u8, GuestAddress(0)).unwrap();
                }
                Err(Error::NotEnoughHugePages { needed, .. }) => assert_eq!(needed, 8),
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn from_guest_memory_rejects_other_shapes() {
        // Starts at 1 MiB instead of 0.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(MIB), 16 * MIB as usize)]).unwrap();
        assert!(matches!(
            MemoryLayout::from_guest_memory(&mem),
            Err(Error::NonCanonicalLayout { index: 0, start, .. }) if start == MIB
        ));
        // Low RAM short of the hole while high RAM exists.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 16 * MIB as usize),
            (GuestAddress(4 * GIB), 16 * MIB as usize),
        ])
        .unwrap();
        assert!(matches!(
            MemoryLayout::from_guest_memory(&mem),
            Err(Error::NonCanonicalLayout { index: 0, .. })
        ));
    }

    #[test]
    fn registers_with_kvm() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("skipping: /dev/kvm not available");
            return;
        };
        // Declared before `vm`, so dropped after it.
        let mem = create_guest_memory(&MemoryConfig {
            size: 16 * MIB,
            backing: Backing::SharedMemfd,
        })
        .unwrap();
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (8 * MIB) as usize)]).unwrap();
        let vm = kvm.create_vm().unwrap();
        // SAFETY: `mem` is declared before `vm` and therefore outlives it.
        unsafe { register_memory(&vm, &mem) }.unwrap();
        // Changing an existing slot's size in place is refused by KVM; the error names
        // the slot.
        // SAFETY: `small` is declared before `vm` and therefore outlives it.
        let err = unsafe { register_memory(&vm, &small) }.unwrap_err();
        assert!(matches!(err, Error::RegisterSlot { slot: 0, .. }), "{err}");
        assert!(err.to_string().contains("slot 0"));
    }
}
