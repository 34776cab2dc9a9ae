//! Finding virtio-mmio devices: `LNRO0005` devices in the DSDT (as kiln and QEMU microvm
//! describe them), else Linux-style `virtio_mmio.device=<size>@<base>:<irq>` tokens.
//!
//! The DSDT is not interpreted: the scan finds `Name(_HID, "LNRO0005")`, the `Device` whose
//! package encloses it, and in that package `Name(_CRS, Buffer)` with a `Memory32Fixed`
//! (large item 0x86) and an interrupt: extended (large item 0x89) or small IRQ (0x22/0x23).

use crate::cmdline::Cmdline;

/// Most devices the guest drives (one interrupt vector each).
pub const MAX_DEVICES: usize = 8;

/// One virtio-mmio device: its register window and interrupt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmioDev {
    /// Window base (guest-physical).
    pub base: u64,
    /// Window size.
    pub size: u64,
    /// IOAPIC GSI.
    pub gsi: u32,
    /// Level-triggered (else edge).
    pub level: bool,
    /// Active low (else active high).
    pub active_low: bool,
    /// `_UID` if it was a plain integer.
    pub uid: Option<u64>,
    /// Position in the [`DevList`] (picks the interrupt vector).
    pub slot: u8,
}

/// Devices found, deduplicated by base, in discovery order.
#[derive(Clone, Copy, Debug, Default)]
pub struct DevList {
    devs: [MmioDev; MAX_DEVICES],
    len: usize,
    /// Devices seen but not kept (beyond [`MAX_DEVICES`]).
    pub dropped: u32,
}

impl DevList {
    /// An empty list.
    pub const fn new() -> Self {
        DevList {
            devs: [MmioDev {
                base: 0,
                size: 0,
                gsi: 0,
                level: false,
                active_low: false,
                uid: None,
                slot: 0,
            }; MAX_DEVICES],
            len: 0,
            dropped: 0,
        }
    }

    /// Adds `d` unless a device with the same base is already listed; assigns its slot.
    pub fn push(&mut self, mut d: MmioDev) {
        if self.as_slice().iter().any(|x| x.base == d.base) {
            return;
        }
        if self.len == MAX_DEVICES {
            self.dropped += 1;
            return;
        }
        d.slot = self.len as u8;
        self.devs[self.len] = d;
        self.len += 1;
    }

    /// The devices.
    pub fn as_slice(&self) -> &[MmioDev] {
        &self.devs[..self.len]
    }
}

/// `Name(_HID, "LNRO0005")` in AML: NameOp, the name, StringPrefix, the string, NUL.
const HID_LNRO0005: &[u8] = b"\x08_HID\x0dLNRO0005\x00";
/// `Name(_CRS, Buffer ...)`: NameOp, the name, BufferOp.
const CRS_BUFFER: &[u8] = b"\x08_CRS\x11";
/// `Name(_UID, ...)`.
const UID: &[u8] = b"\x08_UID";
/// `DeviceOp` (ExtOpPrefix 0x5B, 0x82).
const DEVICE_OP: [u8; 2] = [0x5b, 0x82];

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

fn le(b: &[u8], off: usize, n: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(n)?)?;
    Some(s.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
}

/// Decodes an AML PkgLength at `b[0..]`: (length, bytes the encoding takes). The length
/// counts the encoding itself.
pub fn pkg_length(b: &[u8]) -> Option<(usize, usize)> {
    let lead = *b.first()?;
    let extra = usize::from(lead >> 6);
    if extra == 0 {
        return Some((usize::from(lead & 0x3f), 1));
    }
    let mut len = usize::from(lead & 0x0f);
    for i in 0..extra {
        len |= usize::from(*b.get(1 + i)?) << (4 + 8 * i);
    }
    Some((len, 1 + extra))
}

/// An AML integer term at `b[0..]`: ZeroOp, OneOp, OnesOp, Byte/Word/DWord/QWordPrefix.
fn integer(b: &[u8]) -> Option<(u64, usize)> {
    match *b.first()? {
        0x00 => Some((0, 1)),
        0x01 => Some((1, 1)),
        0xff => Some((u64::MAX, 1)),
        0x0a => Some((le(b, 1, 1)?, 2)),
        0x0b => Some((le(b, 1, 2)?, 3)),
        0x0c => Some((le(b, 1, 4)?, 5)),
        0x0e => Some((le(b, 1, 8)?, 9)),
        _ => None,
    }
}

/// The `[start, end)` of the innermost `Device` package enclosing `pos`.
fn enclosing_device(aml: &[u8], pos: usize) -> Option<(usize, usize)> {
    let mut j = pos;
    while j >= 2 {
        j -= 1;
        if aml[j - 1..=j] != DEVICE_OP {
            continue;
        }
        let at = j + 1;
        if let Some((len, _)) = pkg_length(&aml[at..]) {
            let end = at + len;
            if end > pos && end <= aml.len() {
                return Some((j - 1, end));
            }
        }
    }
    None
}

/// Memory window and interrupt from a resource template (the bytes of the `_CRS` buffer).
/// The first Memory32Fixed and the first interrupt count.
pub fn parse_crs(res: &[u8]) -> Option<MmioDev> {
    let (mut mem, mut irq) = (None, None);
    let mut i = 0;
    while i < res.len() {
        let tag = res[i];
        if tag & 0x80 == 0 {
            // Small item: type in bits 3..6, length in bits 0..2.
            let len = usize::from(tag & 7);
            let body = res.get(i + 1..i + 1 + len)?;
            match (tag >> 3) & 0x0f {
                0x0f => break,
                0x04 if len >= 2 && irq.is_none() => {
                    let mask = le(body, 0, 2)? as u16;
                    // Without the flags byte: edge, active high (ACPI 6.5, 6.4.2.1).
                    let flags = body.get(2).copied().unwrap_or(0x01);
                    if mask != 0 {
                        irq = Some((mask.trailing_zeros(), flags & 1 == 0, flags & 8 != 0));
                    }
                }
                _ => {}
            }
            i += 1 + len;
        } else {
            let len = le(res, i + 1, 2)? as usize;
            let body = res.get(i + 3..i + 3 + len)?;
            match tag {
                // Memory32Fixed: information, base, length.
                0x86 if len >= 9 && mem.is_none() => mem = Some((le(body, 1, 4)?, le(body, 5, 4)?)),
                // Extended interrupt: flags (bit 1 edge, bit 2 active low), count, numbers.
                0x89 if len >= 6 && irq.is_none() && body[1] >= 1 => {
                    let flags = body[0];
                    irq = Some((le(body, 2, 4)? as u32, flags & 2 == 0, flags & 4 != 0));
                }
                _ => {}
            }
            i += 3 + len;
        }
    }
    let ((base, size), (gsi, level, active_low)) = (mem?, irq?);
    Some(MmioDev {
        base,
        size,
        gsi,
        level,
        active_low,
        uid: None,
        slot: 0,
    })
}

/// Adds every `LNRO0005` device of the DSDT `aml` (whole table or body) to `list`.
pub fn scan_dsdt(aml: &[u8], list: &mut DevList) {
    let mut from = 0;
    while let Some(hid) = find(aml, HID_LNRO0005, from) {
        from = hid + HID_LNRO0005.len();
        let Some((start, end)) = enclosing_device(aml, hid) else {
            continue;
        };
        let scope = &aml[start..end];
        let Some(crs) = find(scope, CRS_BUFFER, 0) else {
            continue;
        };
        let b = &scope[crs + CRS_BUFFER.len()..];
        let Some((len, n)) = pkg_length(b) else {
            continue;
        };
        let Some((_, size_len)) = integer(&b[n..]) else {
            continue;
        };
        let Some(res) = b.get(n + size_len..len) else {
            continue;
        };
        if let Some(mut d) = parse_crs(res) {
            d.uid = find(scope, UID, 0)
                .and_then(|u| integer(&scope[u + UID.len()..]))
                .map(|(v, _)| v);
            list.push(d);
        }
    }
}

/// A number as Linux's `memparse`/`%lli` read it: decimal or `0x` hex, with an optional
/// K/M/G suffix (either case) when `suffix` is allowed.
fn number(s: &[u8], suffix: bool) -> Option<u64> {
    let (digits, shift) = match s.last() {
        Some(b'k' | b'K') if suffix => (&s[..s.len() - 1], 10),
        Some(b'm' | b'M') if suffix => (&s[..s.len() - 1], 20),
        Some(b'g' | b'G') if suffix => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let v = match digits {
        [b'0', b'x' | b'X', hex @ ..] => crate::cmdline::parse_hex(hex)?,
        d => crate::cmdline::parse_dec(d)?,
    };
    v.checked_mul(1u64 << shift)
}

/// Parses one `virtio_mmio.device=` value, `<size>@<base>:<irq>[:<id>]` (Linux's
/// virtio_mmio module parameter). The interrupt is taken as edge, active high (kiln's).
pub fn parse_cmdline_device(v: &[u8]) -> Option<MmioDev> {
    let at = v.iter().position(|&b| b == b'@')?;
    let (size, rest) = (&v[..at], &v[at + 1..]);
    let colon = rest.iter().position(|&b| b == b':')?;
    let (base, rest) = (&rest[..colon], &rest[colon + 1..]);
    let irq = rest.split(|&b| b == b':').next()?;
    let size = number(size, true).filter(|&s| s != 0)?;
    let base = number(base, false)?;
    base.checked_add(size)?;
    let gsi = u32::try_from(number(irq, false)?).ok()?;
    Some(MmioDev {
        base,
        size,
        gsi,
        level: false,
        active_low: false,
        uid: None,
        slot: 0,
    })
}

/// Adds the devices of every `virtio_mmio.device=` token to `list`; returns how many
/// tokens did not parse.
pub fn scan_cmdline(c: &Cmdline<'_>, list: &mut DevList) -> u32 {
    let mut bad = 0;
    for t in c.tokens() {
        if let Some(v) = t.strip_prefix(b"virtio_mmio.device=") {
            match parse_cmdline_device(v) {
                Some(d) => list.push(d),
                None => bad += 1,
            }
        }
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    /// PkgLength encoding of a package whose contents are `n` bytes.
    fn pkg(n: usize) -> Vec<u8> {
        if n + 1 < 0x40 {
            return std::vec![(n + 1) as u8];
        }
        let len = n + 2;
        assert!(len < 0x1000);
        std::vec![0x40 | (len & 0xf) as u8, (len >> 4) as u8]
    }

    fn device(name: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut inner = name.to_vec();
        inner.extend_from_slice(body);
        let mut d = DEVICE_OP.to_vec();
        d.extend(pkg(inner.len()));
        d.extend(inner);
        d
    }

    fn crs(res: &[u8]) -> Vec<u8> {
        let mut inner = std::vec![0x0a, res.len() as u8];
        inner.extend_from_slice(res);
        let mut c = CRS_BUFFER.to_vec();
        c.extend(pkg(inner.len()));
        c.extend(inner);
        c
    }

    fn mem32(base: u32, size: u32) -> Vec<u8> {
        let mut m = std::vec![0x86, 9, 0, 1];
        m.extend_from_slice(&base.to_le_bytes());
        m.extend_from_slice(&size.to_le_bytes());
        m
    }

    /// QEMU microvm's virtio device (tests/data/acpi/microvm/DSDT.dsl): `_CCA`, a level,
    /// active-high extended interrupt.
    fn qemu_device(slot: u8, base: u32, gsi: u32) -> Vec<u8> {
        let mut res = mem32(base, 0x200);
        res.extend_from_slice(&[0x89, 6, 0, 0x01, 1]);
        res.extend_from_slice(&gsi.to_le_bytes());
        res.extend_from_slice(&[0x79, 0]);
        let mut body = HID_LNRO0005.to_vec();
        body.extend_from_slice(&[0x08, b'_', b'U', b'I', b'D', 0x0a, slot]);
        body.extend_from_slice(b"\x08_CCA\x01");
        body.extend(crs(&res));
        device(&[b'V', b'R', b'0', b'0' + slot], &body)
    }

    #[test]
    fn kiln_dsdt_from_kiln_acpi() {
        let cfg = kiln_acpi::AcpiConfig {
            cpus: 1,
            serial: true,
            ged_gsi: 23,
            virtio_mmio: (0..3)
                .map(|i| kiln_acpi::VirtioMmioDevice {
                    base: 0xd000_0000 + i * 0x1000,
                    size: 0x1000,
                    gsi: 16 + i as u32,
                })
                .collect(),
        };
        let tables = kiln_acpi::build(&cfg).unwrap();
        let mut l = DevList::new();
        scan_dsdt(&tables.dsdt, &mut l);
        assert_eq!(l.as_slice().len(), 3);
        for (i, d) in l.as_slice().iter().enumerate() {
            assert_eq!(d.base, 0xd000_0000 + i as u64 * 0x1000, "{d:?}");
            assert_eq!((d.size, d.gsi), (0x1000, 16 + i as u32), "{d:?}");
            assert!(!d.level && !d.active_low, "{d:?}");
            assert_eq!((d.uid, d.slot), (Some(i as u64), i as u8));
        }
        // The GED's interrupt (also 0x89) is not mistaken for a virtio device.
        let mut none = DevList::new();
        let cfg0 = kiln_acpi::AcpiConfig {
            virtio_mmio: std::vec![],
            ..cfg
        };
        scan_dsdt(&kiln_acpi::build(&cfg0).unwrap().dsdt, &mut none);
        assert!(none.as_slice().is_empty());
    }

    #[test]
    fn qemu_microvm_devices() {
        let mut aml = b"DSDT-header-stand-in".to_vec();
        aml.extend(device(b"COM1", b"\x08_HID\x0c\x41\xd0\x05\x01"));
        aml.extend(qemu_device(7, 0xfeb0_0e00, 0x17));
        aml.extend(qemu_device(6, 0xfeb0_0c00, 0x16));
        let mut l = DevList::new();
        scan_dsdt(&aml, &mut l);
        let d = l.as_slice();
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].base, d[0].size, d[0].gsi), (0xfeb0_0e00, 0x200, 0x17));
        assert!(d[0].level && !d[0].active_low);
        assert_eq!(d[0].uid, Some(7));
        assert_eq!((d[1].base, d[1].gsi, d[1].slot), (0xfeb0_0c00, 0x16, 1));
        // Scanning again adds nothing (deduplicated by base).
        scan_dsdt(&aml, &mut l);
        assert_eq!(l.as_slice().len(), 2);
    }

    #[test]
    fn small_irq_descriptors_and_bad_templates() {
        let mut r = mem32(0xd000_0000, 0x1000);
        r.extend_from_slice(&[0x22, 0x00, 0x02, 0x79, 0]); // IRQNoFlags {9}
        let d = parse_crs(&r).unwrap();
        assert_eq!((d.gsi, d.level, d.active_low), (9, false, false));
        let mut r = mem32(0xd000_0000, 0x1000);
        r.extend_from_slice(&[0x23, 0x20, 0x00, 0x18, 0x79, 0]); // IRQ(Level, ActiveLow) {5}
        let d = parse_crs(&r).unwrap();
        assert_eq!((d.gsi, d.level, d.active_low), (5, true, true));
        // Edge, active low extended interrupt.
        let mut r = std::vec![0x89, 6, 0, 0x07, 1, 20, 0, 0, 0];
        r.extend(mem32(0xd000_1000, 0x1000));
        let d = parse_crs(&r).unwrap();
        assert_eq!(
            (d.base, d.gsi, d.level, d.active_low),
            (0xd000_1000, 20, false, true)
        );
        // No interrupt, no memory, truncated, empty IRQ mask.
        assert_eq!(parse_crs(&mem32(1, 2)), None);
        assert_eq!(parse_crs(&[0x22, 0x10, 0x00, 0x79, 0]), None);
        assert_eq!(parse_crs(&[0x86, 9, 0, 1, 0]), None);
        let mut r = mem32(0xd000_0000, 0x1000);
        r.extend_from_slice(&[0x22, 0, 0]);
        assert_eq!(parse_crs(&r), None);
    }

    #[test]
    fn malformed_dsdt_is_skipped() {
        // A _HID outside any Device, a Device whose _CRS is not a buffer, a huge PkgLength.
        let mut aml = HID_LNRO0005.to_vec();
        aml.extend(device(
            b"V000",
            &[HID_LNRO0005, b"\x08_CRS\x0a\x05"].concat(),
        ));
        aml.extend_from_slice(&[0x5b, 0x82, 0xff, 0xff, 0xff, 0xff]);
        aml.extend_from_slice(HID_LNRO0005);
        let mut l = DevList::new();
        scan_dsdt(&aml, &mut l);
        assert!(l.as_slice().is_empty());
        scan_dsdt(&[], &mut l);
        scan_dsdt(&aml[..7], &mut l);
        assert!(l.as_slice().is_empty());
    }

    #[test]
    fn pkg_lengths() {
        assert_eq!(pkg_length(&[0x3f]), Some((0x3f, 1)));
        assert_eq!(pkg_length(&[0x45, 0x12]), Some((0x125, 2)));
        assert_eq!(pkg_length(&[0x81, 0x23, 0x01]), Some((0x1231, 3)));
        assert_eq!(pkg_length(&[0xc1, 0, 0, 1]), Some((0x10_0001, 4)));
        assert_eq!(pkg_length(&[0x41]), None);
        for n in [0, 5, 61, 62, 63, 200, 4000] {
            let enc = pkg(n);
            assert_eq!(pkg_length(&enc), Some((n + enc.len(), enc.len())), "{n}");
        }
    }

    #[test]
    fn cmdline_devices() {
        let d = parse_cmdline_device(b"4K@0xd0000000:16").unwrap();
        assert_eq!(
            (d.base, d.size, d.gsi, d.level),
            (0xd000_0000, 0x1000, 16, false)
        );
        let d = parse_cmdline_device(b"0x200@0xFEB00E00:23:7").unwrap();
        assert_eq!((d.base, d.size, d.gsi), (0xfeb0_0e00, 0x200, 23));
        let d = parse_cmdline_device(b"1m@4096:5").unwrap();
        assert_eq!((d.base, d.size, d.gsi), (4096, 1 << 20, 5));
        for bad in [
            &b""[..],
            b"4K",
            b"4K@0xd0000000",
            b"0@0xd0000000:5",
            b"4K@0xd0000000:",
            b"4X@0xd0000000:5",
            b"4K@zz:5",
            b"4K@0xd0000000:0x1ffffffff",
            b"4K@0xfffffffffffff000:5",
        ] {
            assert_eq!(
                parse_cmdline_device(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let c = Cmdline::new(
            b"console=ttyS0 virtio_mmio.device=4K@0xd0000000:16 virtio_mmio.device=bad \
              virtio_mmio.device=4K@0xd0001000:17 virtio_mmio.device=4K@0xd0000000:16",
        );
        let mut l = DevList::new();
        assert_eq!(scan_cmdline(&c, &mut l), 1);
        let d = l.as_slice();
        assert_eq!(d.len(), 2);
        assert_eq!((d[1].base, d[1].gsi, d[1].slot), (0xd000_1000, 17, 1));
    }

    #[test]
    fn list_is_bounded() {
        let mut l = DevList::new();
        for i in 0..10u64 {
            l.push(MmioDev {
                base: 0x1000 * (i + 1),
                ..MmioDev::default()
            });
        }
        assert_eq!((l.as_slice().len(), l.dropped), (MAX_DEVICES, 2));
        assert_eq!(l.as_slice()[7].slot, 7);
    }
}
