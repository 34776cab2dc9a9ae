//! Free RAM: what the memory map calls RAM, minus what the guest itself uses, as sorted,
//! page-aligned ranges. `memory-stress` writes every page of it; `balloon` gives the top of
//! it to the device ([`FreeRam::top`], [`next_batch`]).
//!
//! Only RAM below the 32-bit MMIO hole counts: the guest's page tables map the first 4 GiB,
//! and high RAM (from 4 GiB) is reported as [`FreeRam::unmapped`] instead.

use crate::memmap::{MemMap, E820_RAM, MMIO_HOLE_START};

/// Page size (and the balloon's PFN unit).
pub const PAGE: u64 = 4096;
/// Most ranges kept (a memory map of a few entries and a handful of holes needs far fewer).
pub const MAX_RANGES: usize = 32;

/// One page-aligned range `[start, end)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Range {
    /// First byte (page aligned).
    pub start: u64,
    /// One past the last byte (page aligned).
    pub end: u64,
}

impl Range {
    /// Pages in the range.
    pub fn pages(&self) -> u64 {
        (self.end - self.start) / PAGE
    }
}

/// The free RAM of a memory map.
#[derive(Clone, Copy, Debug)]
pub struct FreeRam {
    ranges: [Range; MAX_RANGES],
    len: usize,
    /// Bytes of RAM at or above the MMIO hole start (not mapped by the guest), left out.
    pub unmapped: u64,
    /// Bytes left out because [`MAX_RANGES`] was reached.
    pub dropped: u64,
}

const fn page_down(a: u64) -> u64 {
    a & !(PAGE - 1)
}

const fn page_up(a: u64) -> u64 {
    match a.checked_add(PAGE - 1) {
        Some(v) => v & !(PAGE - 1),
        None => page_down(u64::MAX),
    }
}

impl FreeRam {
    /// The RAM entries of `map` (type 1; in address order, overlaps counted once) from
    /// `floor` up to the MMIO hole, without `holes` (`(start, end)` pairs, empty ones
    /// ignored, widened to whole pages). Partial pages at the edges are left out.
    pub fn new(map: &MemMap, floor: u64, holes: &[(u64, u64)]) -> FreeRam {
        let mut fr = FreeRam {
            ranges: [Range::default(); MAX_RANGES],
            len: 0,
            unmapped: 0,
            dropped: 0,
        };
        let sorted = map.sorted();
        let mut covered = 0u64;
        for e in sorted.as_slice() {
            if e.kind != E820_RAM || e.size == 0 {
                continue;
            }
            let end = e.end();
            let unmapped_from = e.addr.max(MMIO_HOLE_START).max(covered);
            if end > unmapped_from {
                fr.unmapped += end - unmapped_from;
            }
            let start = page_up(e.addr.max(floor).max(covered));
            let stop = page_down(end.min(MMIO_HOLE_START));
            covered = covered.max(end);
            fr.add(start, stop, holes);
        }
        fr
    }

    fn add(&mut self, start: u64, end: u64, holes: &[(u64, u64)]) {
        if start >= end {
            return;
        }
        let Some((&(s, e), rest)) = holes.split_first() else {
            if self.len == MAX_RANGES {
                self.dropped += end - start;
            } else {
                self.ranges[self.len] = Range { start, end };
                self.len += 1;
            }
            return;
        };
        if s >= e || e <= start || s >= end {
            return self.add(start, end, rest);
        }
        let (hs, he) = (page_down(s), page_up(e));
        if hs > start {
            self.add(start, hs, rest);
        }
        if he < end {
            self.add(he, end, rest);
        }
    }

    /// The ranges, ascending and disjoint.
    pub fn as_slice(&self) -> &[Range] {
        &self.ranges[..self.len]
    }

    /// Pages in all ranges.
    pub fn pages(&self) -> u64 {
        self.as_slice().iter().map(Range::pages).sum()
    }

    /// Whether the page at `addr` is free RAM.
    pub fn contains(&self, addr: u64) -> bool {
        self.as_slice()
            .iter()
            .any(|r| r.start <= addr && addr < r.end)
    }

    /// The address `cut` such that exactly the top `n` free pages lie at or above it (the
    /// balloon's pages); None if there are fewer than `n` free pages.
    pub fn top(&self, n: u64) -> Option<u64> {
        let mut left = n;
        let mut cut = self.as_slice().last().map_or(0, |r| r.end);
        for r in self.as_slice().iter().rev() {
            if left == 0 {
                break;
            }
            let take = left.min(r.pages());
            cut = r.end - take * PAGE;
            left -= take;
        }
        (left == 0).then_some(cut)
    }

    /// Free pages below `cut`, ascending, as ranges: calls `f` for each non-empty piece.
    pub fn below(&self, cut: u64, mut f: impl FnMut(Range)) {
        for r in self.as_slice() {
            let end = r.end.min(cut);
            if r.start < end {
                f(Range {
                    start: r.start,
                    end,
                });
            }
        }
    }

    /// Free pages at or above `cut`, ascending, as ranges.
    pub fn above(&self, cut: u64, mut f: impl FnMut(Range)) {
        for r in self.as_slice() {
            let start = r.start.max(cut);
            if start < r.end {
                f(Range { start, end: r.end });
            }
        }
    }

    /// The lowest run of `pages` contiguous free pages below `cut` (fewer if no range below
    /// `cut` has that many: the longest run of the lowest range that has the most); None if
    /// there is no free page below `cut`.
    pub fn low_run(&self, cut: u64, pages: u64) -> Option<Range> {
        let mut best: Option<Range> = None;
        self.below(cut, |r| {
            let run = Range {
                start: r.start,
                end: r.start + r.pages().min(pages) * PAGE,
            };
            if best.is_none_or(|b| b.pages() < pages && run.pages() > b.pages()) {
                best = Some(run);
            }
        });
        best
    }
}

/// Where [`next_batch`] goes on from: the next page handed out lies below `below`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    below: u64,
}

impl Cursor {
    /// Starts at the top of free RAM.
    pub const fn top() -> Cursor {
        Cursor { below: u64::MAX }
    }
}

/// Fills `out` with the frame numbers (address / 4096, as the balloon wants them) of the next
/// free pages at or above `cut`, from the top of RAM downward; returns how many (0 when
/// all are out). Frames above 16 TiB (not a u32) end the walk.
pub fn next_batch(fr: &FreeRam, cut: u64, cursor: &mut Cursor, out: &mut [u32]) -> usize {
    let mut n = 0;
    for r in fr.as_slice().iter().rev() {
        let lo = r.start.max(cut);
        let mut page = r.end.min(cursor.below);
        while page > lo && n < out.len() {
            page -= PAGE;
            let Ok(pfn) = u32::try_from(page / PAGE) else {
                cursor.below = 0;
                return n;
            };
            out[n] = pfn;
            n += 1;
            cursor.below = page;
        }
        if n == out.len() {
            break;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memmap::{kiln_layout, MemEntry, E820_RESERVED};
    use std::vec::Vec;

    const MIB: u64 = 1 << 20;

    fn map(entries: &[(u64, u64, u32)]) -> MemMap {
        let mut m = MemMap::new();
        for &(addr, size, kind) in entries {
            m.push(MemEntry { addr, size, kind });
        }
        m
    }

    fn ranges(fr: &FreeRam) -> Vec<(u64, u64)> {
        fr.as_slice().iter().map(|r| (r.start, r.end)).collect()
    }

    #[test]
    fn kiln_layout_minus_floor_and_holes() {
        let m = kiln_layout(256 * MIB);
        // Floor at the driver's region end, an initrd at the top and a command line low.
        let initrd = (256 * MIB - 3 * MIB + 100, 256 * MIB - 100);
        let fr = FreeRam::new(&m, 17 * MIB, &[initrd, (0x20000, 0x20100), (5, 5)]);
        assert_eq!(
            ranges(&fr),
            [(17 * MIB, 256 * MIB - 3 * MIB)],
            "the initrd's partial pages go too"
        );
        assert_eq!(fr.pages(), (236 * MIB) / PAGE);
        assert_eq!((fr.unmapped, fr.dropped), (0, 0));
        // A floor at the image end and the driver's region as a hole.
        let fr = FreeRam::new(&m, 0x11_2345, &[(8 * MIB, 17 * MIB)]);
        assert_eq!(
            ranges(&fr),
            [(0x11_3000, 8 * MIB), (17 * MIB, 256 * MIB)],
            "floor rounded up"
        );
        assert!(fr.contains(8 * MIB - PAGE) && !fr.contains(8 * MIB) && !fr.contains(0x11_2000));
    }

    #[test]
    fn high_ram_reserved_entries_and_overlaps() {
        let m = map(&[
            (0, 0x9fc00, E820_RAM),
            (0x9fc00, 0x60400, E820_RESERVED),
            (MIB, 0xC000_0000 - MIB, E820_RAM),
            (0x1_0000_0000, 1 << 30, E820_RAM),
            // Overlaps the big entry: counted once.
            (32 * MIB, 4 * MIB, E820_RAM),
            (0x2000_0000, 0, E820_RAM),
        ]);
        let fr = FreeRam::new(&m, MIB, &[]);
        assert_eq!(ranges(&fr), [(MIB, 0xC000_0000)]);
        assert_eq!(fr.unmapped, 1 << 30);
        // Unaligned RAM edges lose their partial pages.
        let fr = FreeRam::new(&map(&[(MIB + 1, 3 * PAGE, E820_RAM)]), 0, &[]);
        assert_eq!(ranges(&fr), [(MIB + PAGE, MIB + 3 * PAGE)]);
        assert_eq!(FreeRam::new(&MemMap::new(), 0, &[]).pages(), 0);
    }

    #[test]
    fn many_holes_split_and_overflow_is_counted() {
        let m = map(&[(0, 1 << 30, E820_RAM)]);
        let holes: Vec<(u64, u64)> = (0..6)
            .map(|i| (i * 2 * MIB + MIB, i * 2 * MIB + 2 * MIB))
            .collect();
        let fr = FreeRam::new(&m, 0, &holes);
        assert_eq!(fr.as_slice().len(), 7);
        assert_eq!(fr.pages(), (1 << 30) / PAGE - 6 * MIB / PAGE);
        assert!(fr.as_slice().windows(2).all(|w| w[0].end < w[1].start));
        // 40 holes: more pieces than MAX_RANGES; the rest is counted, never lost silently.
        let holes: Vec<(u64, u64)> = (0..40)
            .map(|i| (i * 2 * MIB + MIB, i * 2 * MIB + 2 * MIB))
            .collect();
        let fr = FreeRam::new(&m, 0, &holes);
        assert_eq!(fr.as_slice().len(), MAX_RANGES);
        assert_eq!(fr.pages() * PAGE + fr.dropped + 40 * MIB, 1 << 30);
    }

    #[test]
    fn top_pages_and_the_rest() {
        let m = map(&[(0, 64 * MIB, E820_RAM)]);
        let fr = FreeRam::new(&m, 16 * MIB, &[(60 * MIB, 61 * MIB)]);
        assert_eq!(fr.top(0), Some(64 * MIB));
        assert_eq!(fr.top(1), Some(64 * MIB - PAGE));
        // 3 MiB above the hole, then below it.
        assert_eq!(fr.top(768), Some(61 * MIB));
        assert_eq!(fr.top(769), Some(60 * MIB - PAGE));
        assert_eq!(fr.top(fr.pages()), Some(16 * MIB));
        assert_eq!(fr.top(fr.pages() + 1), None);
        let cut = fr.top(1024).unwrap();
        let (mut below, mut above) = (0, 0);
        fr.below(cut, |r| below += r.pages());
        fr.above(cut, |r| {
            assert!(r.start >= cut);
            above += r.pages();
        });
        assert_eq!((above, below), (1024, fr.pages() - 1024));
        // A low run: the first 4 MiB of the lowest range.
        assert_eq!(
            fr.low_run(cut, 1024),
            Some(Range {
                start: 16 * MIB,
                end: 20 * MIB
            })
        );
        assert_eq!(fr.low_run(16 * MIB, 1), None);
    }

    #[test]
    fn low_run_takes_the_longest_when_none_is_long_enough() {
        let m = map(&[(0, 64 * MIB, E820_RAM)]);
        let fr = FreeRam::new(&m, 0, &[(PAGE, 2 * PAGE), (3 * PAGE, 10 * PAGE)]);
        // Ranges: [0,1p) [2p,3p) [10p,64M): the third has the run.
        assert_eq!(fr.low_run(u64::MAX, 4).unwrap().start, 10 * PAGE);
        // Below 12p nothing has 4 pages: the longest piece wins, the lowest on a tie.
        assert_eq!(
            fr.low_run(12 * PAGE, 4),
            Some(Range {
                start: 10 * PAGE,
                end: 12 * PAGE
            })
        );
        assert_eq!(fr.low_run(3 * PAGE, 4).unwrap().start, 0);
    }

    #[test]
    fn batches_walk_down_from_the_top_across_ranges() {
        let m = map(&[(0, 64 * MIB, E820_RAM)]);
        // Free: [16M, 17M) and [18M, 64M); the top 11776 + 10 pages go to the balloon.
        let fr = FreeRam::new(&m, 16 * MIB, &[(17 * MIB, 18 * MIB)]);
        let n = (46 * MIB) / PAGE + 10;
        let cut = fr.top(n).unwrap();
        assert_eq!(cut, 17 * MIB - 10 * PAGE);
        let mut cursor = Cursor::top();
        let mut buf = [0u32; 256];
        let mut all = Vec::new();
        let mut sizes = Vec::new();
        loop {
            let k = next_batch(&fr, cut, &mut cursor, &mut buf);
            if k == 0 {
                break;
            }
            sizes.push(k);
            all.extend_from_slice(&buf[..k]);
        }
        assert_eq!(all.len() as u64, n);
        assert!(sizes[..sizes.len() - 1].iter().all(|&s| s == 256));
        assert_eq!(*sizes.last().unwrap() as u64, n % 256);
        assert_eq!(all[0], (64 * MIB / PAGE - 1) as u32);
        assert!(all.windows(2).all(|w| w[0] > w[1]), "strictly descending");
        assert!(all.iter().all(|&p| fr.contains(u64::from(p) * PAGE)));
        assert!(
            !all.contains(&(((17 * MIB) / PAGE) as u32)),
            "the hole is skipped"
        );
        assert_eq!(*all.last().unwrap() as u64, cut / PAGE);
        // Done: stays done.
        assert_eq!(next_batch(&fr, cut, &mut cursor, &mut buf), 0);
        // Nothing at or above the top.
        let mut c = Cursor::top();
        assert_eq!(next_batch(&fr, fr.top(0).unwrap(), &mut c, &mut buf), 0);
    }
}
