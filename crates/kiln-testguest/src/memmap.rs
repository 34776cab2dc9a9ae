//! The guest's view of the memory map (e820 or PVH memmap) and the checks against the contract.

use core::fmt;

use crate::line::{Describe, Described, LineBuf};

/// e820 type 1: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type 2: reserved.
pub const E820_RESERVED: u32 = 2;
/// Most entries either table can carry (boot_params e820_table and the contract's PVH limit).
pub const MAX_ENTRIES: usize = 128;

/// Start of the reserved EBDA/VGA/BIOS area (contract).
pub const EBDA_START: u64 = 0x9_fc00;
/// Kernel load address, end of the reserved low area (contract).
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (contract).
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the 32-bit MMIO hole / start of high RAM (contract).
pub const FOUR_GIB: u64 = 0x1_0000_0000;

/// One memory map entry, in the common form of e820 and `hvm_memmap_table_entry`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemEntry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// e820 type (1 = RAM, 2 = reserved, ...).
    pub kind: u32,
}

impl MemEntry {
    /// One past the last byte, saturating.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

impl Describe for MemEntry {
    fn describe(&self, out: &mut LineBuf) {
        out.push_str("[");
        out.push_hex(self.addr);
        out.push_str(",");
        out.push_hex(self.end());
        out.push_str(") type ");
        out.push_dec(u64::from(self.kind));
    }
}

impl fmt::Display for MemEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Described(self).fmt(f)
    }
}

/// A memory map of at most [`MAX_ENTRIES`] entries, stored inline (no allocator in the guest).
#[derive(Clone, Copy)]
pub struct MemMap {
    entries: [MemEntry; MAX_ENTRIES],
    len: usize,
}

impl fmt::Debug for MemMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl Default for MemMap {
    fn default() -> Self {
        Self::new()
    }
}

impl MemMap {
    /// An empty map.
    pub const fn new() -> Self {
        MemMap {
            entries: [MemEntry {
                addr: 0,
                size: 0,
                kind: 0,
            }; MAX_ENTRIES],
            len: 0,
        }
    }

    /// Appends an entry; returns false (and drops it) when full.
    pub fn push(&mut self, e: MemEntry) -> bool {
        if self.len == MAX_ENTRIES {
            return false;
        }
        self.entries[self.len] = e;
        self.len += 1;
        true
    }

    /// The entries, in the order the VMM gave them.
    pub fn as_slice(&self) -> &[MemEntry] {
        &self.entries[..self.len]
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A copy sorted by address (insertion sort: at most 128 entries, no allocator).
    pub fn sorted(&self) -> MemMap {
        let mut m = *self;
        let s = &mut m.entries[..m.len];
        for i in 1..s.len() {
            let mut j = i;
            while j > 0 && s[j - 1].addr > s[j].addr {
                s.swap(j - 1, j);
                j -= 1;
            }
        }
        m
    }

    /// Total bytes of type-1 RAM.
    pub fn ram_total(&self) -> u64 {
        self.as_slice()
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .fold(0u64, |acc, e| acc.saturating_add(e.size))
    }

    /// True if `[addr, addr + len)` lies entirely inside one RAM entry. Used before the guest
    /// dereferences any VMM-supplied pointer, so a bad pointer fails a check instead of faulting.
    pub fn contains_ram(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.as_slice()
            .iter()
            .any(|e| e.kind == E820_RAM && e.addr <= addr && end <= e.end())
    }
}

impl MemMap {
    /// How many bytes from `addr` to the end of the entry (of any type) that holds `addr`.
    pub fn bytes_mapped_from(&self, addr: u64) -> Option<u64> {
        self.as_slice()
            .iter()
            .find(|e| e.addr <= addr && addr < e.end())
            .map(|e| e.end() - addr)
    }
}

/// Writes the map compactly, `[start,end)type` per entry, for FAIL details.
pub struct Compact<'a>(pub &'a MemMap);

impl Describe for Compact<'_> {
    fn describe(&self, out: &mut LineBuf) {
        for (i, e) in self.0.as_slice().iter().enumerate() {
            if i > 0 {
                out.push_str(" ");
            }
            out.push_str("[");
            out.push_hex(e.addr);
            out.push_str(",");
            out.push_hex(e.end());
            out.push_str(")");
            out.push_dec(u64::from(e.kind));
        }
    }
}

/// The memory map the contract prescribes for `--memory mem` (docs/guest-contract.md, "e820").
pub fn kiln_layout(mem: u64) -> MemMap {
    let mut m = MemMap::new();
    let low_end = mem.min(MMIO_HOLE_START);
    m.push(MemEntry {
        addr: 0,
        size: EBDA_START.min(low_end),
        kind: E820_RAM,
    });
    m.push(MemEntry {
        addr: EBDA_START,
        size: HIGH_MEMORY_START - EBDA_START,
        kind: E820_RESERVED,
    });
    if low_end > HIGH_MEMORY_START {
        m.push(MemEntry {
            addr: HIGH_MEMORY_START,
            size: low_end - HIGH_MEMORY_START,
            kind: E820_RAM,
        });
    }
    if mem > MMIO_HOLE_START {
        m.push(MemEntry {
            addr: FOUR_GIB,
            size: mem - MMIO_HOLE_START,
            kind: E820_RAM,
        });
    }
    m
}

/// How a memory map differs from what was expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// The map has no entries.
    Empty,
    /// An entry has size 0 or wraps around the address space.
    BadEntry(MemEntry),
    /// Two entries overlap.
    Overlap(MemEntry, MemEntry),
    /// Entry count differs from the kiln layout.
    Count {
        /// Entries the contract prescribes.
        expected: usize,
        /// Entries found.
        found: usize,
    },
    /// An entry differs from the kiln layout (after sorting by address).
    Entry {
        /// Index after sorting.
        index: usize,
        /// What the contract prescribes.
        expected: MemEntry,
        /// What the VMM gave.
        found: MemEntry,
    },
    /// No RAM at the kernel load address (1 MiB).
    NoKernelRam,
    /// More RAM than the VMM was asked for.
    TooMuchRam {
        /// `kiln.mem`.
        asked: u64,
        /// Sum of RAM entries.
        found: u64,
    },
}

impl Describe for LayoutError {
    fn describe(&self, out: &mut LineBuf) {
        match self {
            LayoutError::Empty => out.push_str("memory map is empty"),
            LayoutError::BadEntry(e) => {
                out.push_str("bad memory map entry ");
                e.describe(out);
            }
            LayoutError::Overlap(a, b) => {
                out.push_str("memory map entries overlap: ");
                a.describe(out);
                out.push_str(" and ");
                b.describe(out);
            }
            LayoutError::Count { expected, found } => {
                out.push_str("memory map has ");
                out.push_dec(*found as u64);
                out.push_str(" entries, kiln layout has ");
                out.push_dec(*expected as u64);
            }
            LayoutError::Entry {
                index,
                expected,
                found,
            } => {
                out.push_str("memory map entry ");
                out.push_dec(*index as u64);
                out.push_str(" is ");
                found.describe(out);
                out.push_str(", expected ");
                expected.describe(out);
            }
            LayoutError::NoKernelRam => out.push_str("no RAM entry covers 1 MiB"),
            LayoutError::TooMuchRam { asked, found } => {
                out.push_str("RAM total ");
                out.push_hex(*found);
                out.push_str(" exceeds kiln.mem ");
                out.push_hex(*asked);
            }
        }
    }
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Described(self).fmt(f)
    }
}

/// Checks that hold for any sane map: not empty, no entry wraps, no overlap, RAM at 1 MiB.
/// Zero-length entries are ignored (QEMU's firmware appends one; Linux drops them too).
pub fn check_sane(map: &MemMap) -> Result<(), LayoutError> {
    let mut nonempty = MemMap::new();
    for e in map.as_slice().iter().filter(|e| e.size != 0) {
        nonempty.push(*e);
    }
    if nonempty.is_empty() {
        return Err(LayoutError::Empty);
    }
    let sorted = nonempty.sorted();
    let s = sorted.as_slice();
    for e in s {
        if e.addr.checked_add(e.size).is_none() {
            return Err(LayoutError::BadEntry(*e));
        }
    }
    for w in s.windows(2) {
        if w[0].end() > w[1].addr {
            return Err(LayoutError::Overlap(w[0], w[1]));
        }
    }
    if !map.contains_ram(HIGH_MEMORY_START, 1) {
        return Err(LayoutError::NoKernelRam);
    }
    Ok(())
}

/// Checks the map is exactly the kiln layout for `mem` (order-insensitive).
pub fn check_kiln_layout(map: &MemMap, mem: u64) -> Result<(), LayoutError> {
    let want = kiln_layout(mem);
    let got = map.sorted();
    if want.len() != got.len() {
        return Err(LayoutError::Count {
            expected: want.len(),
            found: got.len(),
        });
    }
    for (index, (w, g)) in want.as_slice().iter().zip(got.as_slice()).enumerate() {
        if w != g {
            return Err(LayoutError::Entry {
                index,
                expected: *w,
                found: *g,
            });
        }
    }
    Ok(())
}

/// The loose check used for other VMMs: no more RAM than `mem`.
pub fn check_ram_at_most(map: &MemMap, mem: u64) -> Result<(), LayoutError> {
    let found = map.ram_total();
    if found > mem {
        return Err(LayoutError::TooMuchRam { asked: mem, found });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(addr: u64, size: u64, kind: u32) -> MemEntry {
        MemEntry { addr, size, kind }
    }

    #[test]
    fn layout_128m() {
        let m = kiln_layout(128 << 20);
        assert_eq!(
            m.as_slice(),
            &[
                e(0, 0x9fc00, 1),
                e(0x9fc00, 0x60400, 2),
                e(0x100000, (128 << 20) - 0x100000, 1)
            ]
        );
        // Contract: RAM total is M - 0x60400 and the highest RAM byte + 1 is M.
        assert_eq!(m.ram_total(), (128 << 20) - 0x60400);
        assert!(check_sane(&m).is_ok());
    }

    #[test]
    fn layout_above_4g() {
        let mem = 5u64 << 30;
        let m = kiln_layout(mem);
        assert_eq!(m.len(), 4);
        assert_eq!(m.as_slice()[2].end(), MMIO_HOLE_START);
        assert_eq!(m.as_slice()[3], e(FOUR_GIB, 2 << 30, 1));
        assert_eq!(m.ram_total(), mem - 0x60400);
        // Exactly 3 GiB: no high RAM.
        assert_eq!(kiln_layout(3 << 30).len(), 3);
    }

    #[test]
    fn kiln_layout_matches_in_any_order_and_reports_differences() {
        let mem = 256 << 20;
        let want = kiln_layout(mem);
        let mut shuffled = MemMap::new();
        for x in want.as_slice().iter().rev() {
            shuffled.push(*x);
        }
        assert_eq!(check_kiln_layout(&shuffled, mem), Ok(()));
        assert_eq!(
            check_kiln_layout(&want, mem + 4096),
            Err(LayoutError::Entry {
                index: 2,
                expected: e(0x100000, mem + 4096 - 0x100000, 1),
                found: e(0x100000, mem - 0x100000, 1),
            })
        );
        let mut short = MemMap::new();
        short.push(e(0, mem, 1));
        assert_eq!(
            check_kiln_layout(&short, mem),
            Err(LayoutError::Count {
                expected: 3,
                found: 1
            })
        );
    }

    #[test]
    fn sanity_rejects_overlap_empty_and_missing_kernel_ram() {
        assert_eq!(check_sane(&MemMap::new()), Err(LayoutError::Empty));
        let mut m = MemMap::new();
        m.push(e(0, 0x200000, 1));
        m.push(e(0x100000, 0x1000, 2));
        assert!(matches!(check_sane(&m), Err(LayoutError::Overlap(..))));
        let mut m = MemMap::new();
        m.push(e(0, 0x9fc00, 1));
        assert_eq!(check_sane(&m), Err(LayoutError::NoKernelRam));
        let mut m = MemMap::new();
        m.push(e(u64::MAX - 1, 4, 1));
        assert!(matches!(check_sane(&m), Err(LayoutError::BadEntry(_))));
        // A trailing zero-length entry (QEMU's firmware) is ignored, alone it is "empty".
        let mut m = kiln_layout(64 << 20);
        m.push(e(0, 0, 0));
        assert_eq!(check_sane(&m), Ok(()));
        let mut m = MemMap::new();
        m.push(e(0, 0, 0));
        assert_eq!(check_sane(&m), Err(LayoutError::Empty));
    }

    #[test]
    fn contains_ram_is_exact() {
        let m = kiln_layout(64 << 20);
        assert!(m.contains_ram(0x100000, 0x1000));
        assert!(m.contains_ram((64 << 20) - 1, 1));
        assert!(!m.contains_ram((64 << 20) - 1, 2));
        assert!(!m.contains_ram(0x9fc00, 1), "reserved is not RAM");
        assert!(!m.contains_ram(u64::MAX, 2), "no overflow");
    }

    #[test]
    fn bytes_mapped_from_any_entry_type() {
        let m = kiln_layout(64 << 20);
        assert_eq!(m.bytes_mapped_from(0x9fc00), Some(0x60400));
        assert_eq!(m.bytes_mapped_from(0xfffff), Some(1));
        assert_eq!(m.bytes_mapped_from(64 << 20), None);
    }

    #[test]
    fn push_is_bounded() {
        let mut m = MemMap::new();
        for i in 0..MAX_ENTRIES as u64 {
            assert!(m.push(e(i * 4096, 4096, 1)));
        }
        assert!(!m.push(e(0, 1, 1)));
        assert_eq!(m.len(), MAX_ENTRIES);
    }

    #[test]
    fn compact_display() {
        let m = kiln_layout(2 << 20);
        assert_eq!(
            format!("{}", Described(&Compact(&m))),
            "[0x0,0x9fc00)1 [0x9fc00,0x100000)2 [0x100000,0x200000)1"
        );
    }

    #[test]
    fn ram_at_most() {
        let m = kiln_layout(128 << 20);
        assert!(check_ram_at_most(&m, 128 << 20).is_ok());
        assert!(check_ram_at_most(&m, 64 << 20).is_err());
    }
}
