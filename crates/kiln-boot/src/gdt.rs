//! The boot GDT (guest contract: 5 descriptors at 0x500) and a pure descriptor decoder
//! that turns a raw 8-byte descriptor into the fields a `kvm_segment` wants.

use vm_memory::GuestAddress;

use crate::layout::BOOT_GDT_ADDR;

/// Selector of the code segment (CS).
pub const CODE_SELECTOR: u16 = 0x10;
/// Selector of the flat data segment (DS, ES, FS, GS, SS).
pub const DATA_SELECTOR: u16 = 0x18;
/// Selector of the busy 32-bit TSS (TR).
pub const TSS_SELECTOR: u16 = 0x20;

/// 64-bit code descriptor used for the Linux 64-bit boot protocol.
pub const CODE64_DESCRIPTOR: u64 = 0x00AF_9B00_0000_FFFF;
/// 32-bit flat code descriptor used for PVH.
pub const CODE32_DESCRIPTOR: u64 = 0x00CF_9B00_0000_FFFF;
/// Flat read/write data descriptor.
pub const DATA_DESCRIPTOR: u64 = 0x00CF_9300_0000_FFFF;
/// 32-bit busy TSS, base 0, limit 0x67.
pub const TSS_DESCRIPTOR: u64 = 0x0000_8B00_0000_0067;

/// Number of descriptors in the boot GDT.
pub const GDT_ENTRIES: usize = 5;

/// The boot GDT as written to guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GdtInfo {
    /// Guest physical address of the table (GDTR base), 0x500.
    pub base: GuestAddress,
    /// GDTR limit: size in bytes minus one (0x27).
    pub limit: u16,
    /// The descriptors, indexed by `selector >> 3`.
    pub entries: [u64; GDT_ENTRIES],
}

impl GdtInfo {
    /// The boot GDT for a protocol: the code descriptor is 64-bit for Linux and 32-bit
    /// flat for PVH; everything else is the same.
    pub fn for_code(code: u64) -> Self {
        GdtInfo {
            base: GuestAddress(BOOT_GDT_ADDR),
            limit: (GDT_ENTRIES * 8 - 1) as u16,
            entries: [0, 0, code, DATA_DESCRIPTOR, TSS_DESCRIPTOR],
        }
    }

    /// Decoded descriptor for `selector` (RPL and TI bits ignored), or `None` when the
    /// selector is past the table.
    pub fn segment(&self, selector: u16) -> Option<SegmentDescriptor> {
        self.entries
            .get(usize::from(selector >> 3))
            .map(|&d| SegmentDescriptor::decode(d))
    }

    /// The table as little-endian bytes, as it sits in guest memory.
    pub fn to_bytes(&self) -> [u8; GDT_ENTRIES * 8] {
        let mut out = [0u8; GDT_ENTRIES * 8];
        for (chunk, e) in out.chunks_exact_mut(8).zip(self.entries) {
            chunk.copy_from_slice(&e.to_le_bytes());
        }
        out
    }
}

/// The fields of one segment descriptor, laid out like `kvm_segment` (minus selector
/// and `unusable`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentDescriptor {
    /// Segment base (32 bits for these descriptors).
    pub base: u64,
    /// Effective limit in bytes: the raw 20-bit limit, scaled to 4 KiB units
    /// (`raw << 12 | 0xfff`) when `g` is set. This is what `kvm_segment.limit` expects.
    pub limit: u32,
    /// Raw 20-bit limit field as stored in the descriptor.
    pub raw_limit: u32,
    /// Type field (4 bits), e.g. 0xB = execute/read accessed code, or busy TSS when `s` is 0.
    pub type_: u8,
    /// Present bit.
    pub present: bool,
    /// Descriptor privilege level (0..=3).
    pub dpl: u8,
    /// Default operation size (D/B): 32-bit when set.
    pub db: bool,
    /// Descriptor type: code/data when set, system (TSS, LDT) when clear.
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Granularity: limit in 4 KiB units when set.
    pub g: bool,
    /// Available for software use.
    pub avl: bool,
}

/// Decodes a raw 8-byte legacy segment descriptor (same as [`SegmentDescriptor::decode`]).
pub fn decode_descriptor(desc: u64) -> SegmentDescriptor {
    SegmentDescriptor::decode(desc)
}

impl SegmentDescriptor {
    /// Decodes a raw 8-byte legacy segment descriptor.
    pub fn decode(desc: u64) -> Self {
        let bit = |n: u32| (desc >> n) & 1 == 1;
        let raw_limit = ((desc & 0xFFFF) | ((desc >> 32) & 0xF_0000)) as u32;
        let g = bit(55);
        SegmentDescriptor {
            base: ((desc >> 16) & 0xFF_FFFF) | ((desc >> 32) & 0xFF00_0000),
            limit: if g {
                (raw_limit << 12) | 0xFFF
            } else {
                raw_limit
            },
            raw_limit,
            type_: ((desc >> 40) & 0xF) as u8,
            s: bit(44),
            dpl: ((desc >> 45) & 0x3) as u8,
            present: bit(47),
            avl: bit(52),
            l: bit(53),
            db: bit(54),
            g,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_code64() {
        let d = SegmentDescriptor::decode(CODE64_DESCRIPTOR);
        assert_eq!(
            d,
            SegmentDescriptor {
                base: 0,
                limit: 0xFFFF_FFFF,
                raw_limit: 0xF_FFFF,
                type_: 0xB,
                present: true,
                dpl: 0,
                db: false,
                s: true,
                l: true,
                g: true,
                avl: false,
            }
        );
    }

    #[test]
    fn decodes_code32_data_tss() {
        let c = SegmentDescriptor::decode(CODE32_DESCRIPTOR);
        assert!(c.db && !c.l && c.g && c.s && c.present);
        assert_eq!((c.type_, c.limit), (0xB, 0xFFFF_FFFF));

        let d = SegmentDescriptor::decode(DATA_DESCRIPTOR);
        assert!(d.db && !d.l && d.g && d.s && d.present);
        assert_eq!((d.type_, d.base, d.limit), (0x3, 0, 0xFFFF_FFFF));

        let t = SegmentDescriptor::decode(TSS_DESCRIPTOR);
        assert!(!t.s && t.present && !t.g && !t.db && !t.l);
        assert_eq!(
            (t.type_, t.base, t.limit, t.raw_limit),
            (0xB, 0, 0x67, 0x67)
        );
    }

    #[test]
    fn decodes_base_dpl_and_avl() {
        // base 0x12345678, limit 0xABCDE (byte granular), type 0x2, s, dpl 3, present, avl.
        let desc: u64 = 0x12 << 56
            | 0x1A << 48 // avl (bit 52) + limit[19:16] = 0xA
            | 0xF2 << 40 // present, dpl 3, s, type 2
            | 0x34_5678 << 16
            | 0xBCDE;
        let d = SegmentDescriptor::decode(desc);
        assert_eq!(d.base, 0x1234_5678);
        assert_eq!(d.raw_limit, 0xA_BCDE);
        assert_eq!(d.limit, 0xA_BCDE);
        assert_eq!(d.dpl, 3);
        assert_eq!(d.type_, 2);
        assert!(d.avl && d.present && d.s && !d.g && !d.l && !d.db);
        assert_eq!(SegmentDescriptor::decode(0), SegmentDescriptor::default());
    }

    #[test]
    fn gdt_tables() {
        let linux = GdtInfo::for_code(CODE64_DESCRIPTOR);
        assert_eq!(linux.limit, 0x27);
        assert_eq!(linux.base, GuestAddress(0x500));
        assert!(linux.segment(CODE_SELECTOR).unwrap().l);
        assert!(
            !GdtInfo::for_code(CODE32_DESCRIPTOR)
                .segment(CODE_SELECTOR)
                .unwrap()
                .l
        );
        assert_eq!(linux.segment(TSS_SELECTOR).unwrap().limit, 0x67);
        assert_eq!(linux.segment(0x28), None);
        let bytes = linux.to_bytes();
        assert_eq!(&bytes[0x10..0x18], &CODE64_DESCRIPTOR.to_le_bytes());
        assert_eq!(&bytes[0x20..0x28], &TSS_DESCRIPTOR.to_le_bytes());
    }
}
