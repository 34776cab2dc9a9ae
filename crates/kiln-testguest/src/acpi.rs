//! ACPI table discovery and checks, as a Linux guest does them: find the RSDP (from the
//! boot protocol and by the legacy BIOS-area scan), follow XSDT → FADT/MADT, FADT → DSDT,
//! verify checksums, and pull out what the other scenarios need (power registers, CPUs).

use crate::bootinfo::PhysMem;
use crate::line::LineBuf;

/// The legacy RSDP search window (ACPI 6.5, 5.2.5.1): the BIOS read-only area.
pub const SCAN_START: u64 = 0x000e_0000;
/// End (exclusive) of the scan window.
pub const SCAN_END: u64 = 0x0010_0000;

/// A Generic Address Structure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gas {
    /// Address space (0 memory, 1 system I/O).
    pub space: u8,
    /// Register width in bits.
    pub bit_width: u8,
    /// Address.
    pub address: u64,
}

/// What the scenarios use from the tables.
#[derive(Clone, Copy, Debug, Default)]
pub struct AcpiInfo {
    /// RSDP address.
    pub rsdp: u64,
    /// FADT flags.
    pub fadt_flags: u32,
    /// FADT sleep control register.
    pub sleep_control: Gas,
    /// FADT sleep status register.
    pub sleep_status: Gas,
    /// FADT reset register.
    pub reset_reg: Gas,
    /// FADT reset value.
    pub reset_value: u8,
    /// Enabled local APICs in the MADT.
    pub lapics: u32,
    /// Bit i set: APIC ID i is listed and enabled (IDs 0..255).
    pub lapic_ids: [u64; 4],
    /// IOAPIC entries and the first one's address.
    pub ioapics: u32,
    /// First IOAPIC's address.
    pub ioapic_addr: u32,
    /// GSI of ISA IRQ 0 per an interrupt source override, if any.
    pub irq0_gsi: Option<u32>,
    /// `\_S5_` SLP_TYPa from the DSDT, if found.
    pub s5_slp_typ: Option<u8>,
    /// DSDT has COM1 (`PNP0501`).
    pub has_com1: bool,
    /// DSDT has a Generic Event Device (`ACPI0013`).
    pub has_ged: bool,
    /// DSDT has a power button (`PNP0C0C`).
    pub has_power_button: bool,
}

/// Why the tables are unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiError {
    /// No RSDP given by the boot protocol nor found by the scan.
    NoRsdp,
    /// The boot protocol's RSDP and the scan's disagree.
    RsdpMismatch {
        /// From boot_params / hvm_start_info.
        given: u64,
        /// From the scan.
        scanned: u64,
    },
    /// A table is unreadable or too short.
    Unreadable(&'static str, u64),
    /// A table's signature is wrong.
    Signature(&'static str, u64),
    /// A table's checksum is wrong.
    Checksum(&'static str, u64),
    /// A table the guest needs is missing from the XSDT.
    Missing(&'static str),
}

impl crate::line::Describe for AcpiError {
    fn describe(&self, out: &mut LineBuf) {
        match *self {
            AcpiError::NoRsdp => out.push_str("no RSDP (boot protocol or BIOS-area scan)"),
            AcpiError::RsdpMismatch { given, scanned } => {
                out.push_str("RSDP from boot protocol ");
                out.push_hex(given);
                out.push_str(" != scanned ");
                out.push_hex(scanned);
            }
            AcpiError::Unreadable(t, a) => {
                out.push_str(t);
                out.push_str(" unreadable at ");
                out.push_hex(a);
            }
            AcpiError::Signature(t, a) => {
                out.push_str(t);
                out.push_str(" bad signature at ");
                out.push_hex(a);
            }
            AcpiError::Checksum(t, a) => {
                out.push_str(t);
                out.push_str(" bad checksum at ");
                out.push_hex(a);
            }
            AcpiError::Missing(t) => {
                out.push_str(t);
                out.push_str(" missing from XSDT");
            }
        }
    }
}

fn le(b: &[u8], off: usize, n: usize) -> u64 {
    b.get(off..off + n)
        .map(|s| s.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
        .unwrap_or(0)
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
}

fn gas(b: &[u8], off: usize) -> Gas {
    Gas {
        space: b.get(off).copied().unwrap_or(0),
        bit_width: b.get(off + 1).copied().unwrap_or(0),
        address: le(b, off + 4, 8),
    }
}

/// The RSDP (checked: signature, both checksums) at `addr`, or `None`.
fn rsdp_at(mem: &dyn PhysMem, addr: u64) -> Option<&[u8]> {
    let r = mem.read(addr, 36)?;
    if &r[..8] != b"RSD PTR " || sum(&r[..20]) != 0 {
        return None;
    }
    if r[15] >= 2 && sum(&r[..36]) != 0 {
        return None;
    }
    Some(r)
}

/// The legacy scan: the first valid RSDP on a 16-byte boundary in the BIOS area.
pub fn scan_rsdp(mem: &dyn PhysMem) -> Option<u64> {
    let mut a = SCAN_START;
    while a < SCAN_END {
        if mem.read(a, 8).is_some_and(|s| s == b"RSD PTR ") && rsdp_at(mem, a).is_some() {
            return Some(a);
        }
        a += 16;
    }
    None
}

/// A whole SDT at `addr` with signature `sig`, checksum verified.
fn sdt<'m>(mem: &'m dyn PhysMem, addr: u64, sig: &'static str) -> Result<&'m [u8], AcpiError> {
    let hdr = mem.read(addr, 36).ok_or(AcpiError::Unreadable(sig, addr))?;
    if &hdr[..4] != sig.as_bytes() {
        return Err(AcpiError::Signature(sig, addr));
    }
    let len = le(hdr, 4, 4) as usize;
    if !(36..=1 << 20).contains(&len) {
        return Err(AcpiError::Unreadable(sig, addr));
    }
    let t = mem
        .read(addr, len)
        .ok_or(AcpiError::Unreadable(sig, addr))?;
    if sum(t) != 0 {
        return Err(AcpiError::Checksum(sig, addr));
    }
    Ok(t)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The AML encoding of `EisaId("ABC1234")`: 3 compressed letters and 4 hex digits,
/// big-endian in the DWord's bytes.
pub fn eisa_id(id: &[u8; 7]) -> [u8; 4] {
    let c = |x: u8| u32::from(x.wrapping_sub(0x40)) & 0x1f;
    let h = |x: u8| match x {
        b'0'..=b'9' => u32::from(x - b'0'),
        b'A'..=b'F' => u32::from(x - b'A' + 10),
        _ => 0,
    };
    let v = (c(id[0]) << 26)
        | (c(id[1]) << 21)
        | (c(id[2]) << 16)
        | (h(id[3]) << 12)
        | (h(id[4]) << 8)
        | (h(id[5]) << 4)
        | h(id[6]);
    v.to_be_bytes()
}

/// SLP_TYPa from `Name(_S5_, Package(){ a, ... })` in AML, for the simple encodings
/// (ByteConst, Zero, One).
pub fn s5_slp_typ(aml: &[u8]) -> Option<u8> {
    let pos = aml.windows(4).position(|w| w == b"_S5_")?;
    let rest = aml.get(pos + 4..)?;
    if *rest.first()? != 0x12 {
        return None; // PackageOp
    }
    // PkgLength: the top two bits of the lead byte count the extra bytes.
    let lead = *rest.get(1)?;
    let pkglen_bytes = 1 + usize::from(lead >> 6);
    let elems = rest.get(1 + pkglen_bytes + 1..)?; // skip NumElements
    match *elems.first()? {
        0x0a => elems.get(1).copied(), // BytePrefix
        0x00 => Some(0),               // ZeroOp
        0x01 => Some(1),               // OneOp
        _ => None,
    }
}

fn parse_madt(m: &[u8], info: &mut AcpiInfo) {
    let mut off = 44;
    while off + 2 <= m.len() {
        let (kind, len) = (m[off], usize::from(m[off + 1]));
        if len < 2 || off + len > m.len() {
            break;
        }
        match kind {
            0 if len >= 8 && le(m, off + 4, 4) & 1 == 1 => {
                let id = m[off + 3];
                info.lapics += 1;
                info.lapic_ids[usize::from(id / 64)] |= 1 << (id % 64);
            }
            1 if len >= 12 => {
                if info.ioapics == 0 {
                    info.ioapic_addr = le(m, off + 4, 4) as u32;
                }
                info.ioapics += 1;
            }
            2 if len >= 10 && m[off + 3] == 0 => info.irq0_gsi = Some(le(m, off + 4, 4) as u32),
            _ => {}
        }
        off += len;
    }
}

/// Finds and checks the tables. `given` is the boot protocol's RSDP (0 if none); when both
/// it and the scan find one they must agree.
pub fn parse(mem: &dyn PhysMem, given: u64) -> Result<AcpiInfo, AcpiError> {
    let scanned = scan_rsdp(mem);
    let rsdp_addr = match (given, scanned) {
        (0, None) => return Err(AcpiError::NoRsdp),
        (0, Some(s)) => s,
        (g, Some(s)) if g != s => {
            return Err(AcpiError::RsdpMismatch {
                given: g,
                scanned: s,
            })
        }
        (g, _) => g,
    };
    let rsdp = rsdp_at(mem, rsdp_addr).ok_or(AcpiError::Checksum("RSDP", rsdp_addr))?;
    let xsdt_addr = le(rsdp, 24, 8);
    let xsdt = sdt(mem, xsdt_addr, "XSDT")?;
    let mut info = AcpiInfo {
        rsdp: rsdp_addr,
        ..AcpiInfo::default()
    };
    let (mut fadt, mut madt) = (None, None);
    for i in 0..(xsdt.len() - 36) / 8 {
        let a = le(xsdt, 36 + 8 * i, 8);
        match mem.read(a, 4) {
            Some(b"FACP") => fadt = Some(sdt(mem, a, "FACP")?),
            Some(b"APIC") => madt = Some(sdt(mem, a, "APIC")?),
            _ => {}
        }
    }
    let fadt = fadt.ok_or(AcpiError::Missing("FACP"))?;
    let madt = madt.ok_or(AcpiError::Missing("APIC"))?;
    if fadt.len() < 276 {
        return Err(AcpiError::Unreadable("FACP", 0));
    }
    info.fadt_flags = le(fadt, 112, 4) as u32;
    info.reset_reg = gas(fadt, 116);
    info.reset_value = fadt[128];
    info.sleep_control = gas(fadt, 244);
    info.sleep_status = gas(fadt, 256);
    let dsdt_addr = match le(fadt, 140, 8) {
        0 => le(fadt, 40, 4),
        x => x,
    };
    let dsdt = sdt(mem, dsdt_addr, "DSDT")?;
    info.s5_slp_typ = s5_slp_typ(dsdt);
    info.has_com1 = contains(dsdt, &eisa_id(b"PNP0501"));
    info.has_power_button = contains(dsdt, &eisa_id(b"PNP0C0C"));
    info.has_ged = contains(dsdt, b"ACPI0013");
    parse_madt(madt, &mut info);
    Ok(info)
}

/// FADT flag: hardware-reduced ACPI.
pub const FADT_HW_REDUCED: u32 = 1 << 20;
/// FADT flag: the reset register is supported.
pub const FADT_RESET_REG_SUP: u32 = 1 << 10;

/// The `acpi` scenario's verdict: the tables describe kiln's machine with `cpus` vCPUs
/// (when known) and the power registers of docs/guest-contract.md.
pub fn check(info: &AcpiInfo, cpus: Option<u32>, out: &mut LineBuf) -> bool {
    let fail = |why: &str, out: &mut LineBuf| {
        out.push_str(why);
        false
    };
    if info.fadt_flags & FADT_HW_REDUCED == 0 {
        return fail("FADT not hardware-reduced", out);
    }
    if info.fadt_flags & FADT_RESET_REG_SUP == 0 || info.reset_reg.space != 1 {
        return fail("FADT reset register missing", out);
    }
    if info.sleep_control.space != 1 || info.sleep_control.address == 0 {
        return fail("FADT sleep control register missing", out);
    }
    if info.ioapics != 1 || info.ioapic_addr != 0xfec0_0000 {
        return fail("MADT IOAPIC missing or misplaced", out);
    }
    if info.irq0_gsi != Some(2) {
        return fail("MADT lacks IRQ0->GSI2 override", out);
    }
    if let Some(n) = cpus {
        let expect_ids =
            (0..n.min(256)).all(|i| info.lapic_ids[(i / 64) as usize] & (1 << (i % 64)) != 0);
        if info.lapics != n || !expect_ids {
            out.push_str("MADT lists ");
            out.push_dec(u64::from(info.lapics));
            out.push_str(" CPUs, kiln.cpus=");
            out.push_dec(u64::from(n));
            return false;
        }
    }
    if !info.has_com1 || !info.has_ged || !info.has_power_button {
        return fail("DSDT lacks COM1, GED or power button", out);
    }
    if info.s5_slp_typ.is_none() {
        return fail("DSDT lacks a simple _S5_ package", out);
    }
    out.push_str("rsdp=");
    out.push_hex(info.rsdp);
    out.push_str(" cpus=");
    out.push_dec(u64::from(info.lapics));
    out.push_str(" s5=");
    out.push_dec(u64::from(info.s5_slp_typ.unwrap_or(0)));
    if cpus.is_none() {
        out.push_str(" cpu-count=unchecked(no kiln.cpus)");
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest memory for tests: one buffer at address 0.
    struct Buf(std::vec::Vec<u8>);
    impl PhysMem for Buf {
        fn read(&self, addr: u64, len: usize) -> Option<&[u8]> {
            let a = usize::try_from(addr).ok()?;
            self.0.get(a..a.checked_add(len)?)
        }
    }

    fn fix_sum(t: &mut [u8], at: usize) {
        t[at] = 0;
        t[at] = 0u8.wrapping_sub(sum(t));
    }

    fn sdt_bytes(sig: &[u8; 4], body: &[u8]) -> std::vec::Vec<u8> {
        let mut t = std::vec![0u8; 36];
        t[..4].copy_from_slice(sig);
        t.extend_from_slice(body);
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        fix_sum(&mut t, 9);
        t
    }

    fn put(mem: &mut [u8], at: u64, b: &[u8]) {
        mem[at as usize..at as usize + b.len()].copy_from_slice(b);
    }

    /// Kiln-shaped tables for `cpus` at 0xE0000.
    fn machine(cpus: u8) -> Buf {
        let mut m = std::vec![0u8; 0x10_0000];
        let (xsdt, fadt, madt, dsdt) = (0xe_0040u64, 0xe_0100u64, 0xe_0300u64, 0xe_0600u64);
        let mut r = std::vec![0u8; 36];
        r[..8].copy_from_slice(b"RSD PTR ");
        r[15] = 2;
        r[20..24].copy_from_slice(&36u32.to_le_bytes());
        r[24..32].copy_from_slice(&xsdt.to_le_bytes());
        fix_sum(&mut r[..20], 8);
        fix_sum(&mut r, 32);
        put(&mut m, 0xe_0000, &r);
        let mut xb = std::vec::Vec::new();
        xb.extend_from_slice(&fadt.to_le_bytes());
        xb.extend_from_slice(&madt.to_le_bytes());
        put(&mut m, xsdt, &sdt_bytes(b"XSDT", &xb));
        let mut fb = std::vec![0u8; 276 - 36];
        let f = |o: usize| o - 36;
        fb[f(112)..f(116)].copy_from_slice(&(FADT_HW_REDUCED | FADT_RESET_REG_SUP).to_le_bytes());
        for (o, port) in [(116usize, 0x602u64), (244, 0x600), (256, 0x601)] {
            fb[f(o)] = 1;
            fb[f(o) + 1] = 8;
            fb[f(o) + 4..f(o) + 12].copy_from_slice(&port.to_le_bytes());
        }
        fb[f(128)] = 1;
        fb[f(140)..f(148)].copy_from_slice(&dsdt.to_le_bytes());
        put(&mut m, fadt, &sdt_bytes(b"FACP", &fb));
        let mut mb = std::vec![0u8; 8];
        mb[..4].copy_from_slice(&0xfee0_0000u32.to_le_bytes());
        for id in 0..cpus {
            mb.extend_from_slice(&[0, 8, id, id, 1, 0, 0, 0]);
        }
        mb.extend_from_slice(&[1, 12, 0, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0]);
        mb.extend_from_slice(&[2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
        put(&mut m, madt, &sdt_bytes(b"APIC", &mb));
        let mut db = std::vec::Vec::new();
        db.extend_from_slice(&eisa_id(b"PNP0501"));
        db.extend_from_slice(&eisa_id(b"PNP0C0C"));
        db.extend_from_slice(b"ACPI0013\0");
        db.extend_from_slice(&[
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x0a, 0x04, 0x0a, 0x05, 0x0a, 0x05, 0, 0,
        ]);
        put(&mut m, dsdt, &sdt_bytes(b"DSDT", &db));
        Buf(m)
    }

    #[test]
    fn eisa_ids_match_known_encodings() {
        // From iasl: EisaId("PNP0501") = 0x0105D041, stored little-endian.
        assert_eq!(eisa_id(b"PNP0501"), 0x0105_d041u32.to_le_bytes());
        assert_eq!(eisa_id(b"PNP0C0C"), 0x0c0c_d041u32.to_le_bytes());
    }

    #[test]
    fn finds_and_checks_kiln_tables() {
        let m = machine(4);
        let info = parse(&m, 0xe_0000).unwrap();
        assert_eq!(info.lapics, 4);
        assert_eq!(info.lapic_ids[0], 0b1111);
        assert_eq!(info.sleep_control.address, 0x600);
        assert_eq!(info.reset_reg.address, 0x602);
        assert_eq!(info.reset_value, 1);
        assert_eq!(info.s5_slp_typ, Some(5));
        let mut out = LineBuf::new();
        assert!(check(&info, Some(4), &mut out), "{}", out.as_str());
        let mut out = LineBuf::new();
        assert!(!check(&info, Some(2), &mut out));
        // Scan only (no pointer from the boot protocol) finds the same RSDP.
        assert_eq!(parse(&m, 0).unwrap().rsdp, 0xe_0000);
    }

    #[test]
    fn rejects_bad_tables() {
        let mut m = machine(1);
        assert_eq!(
            parse(&m, 0xe_0010).unwrap_err(),
            AcpiError::RsdpMismatch {
                given: 0xe_0010,
                scanned: 0xe_0000
            }
        );
        m.0[0xe_0600 + 40] ^= 1; // corrupt the DSDT
        assert_eq!(
            parse(&m, 0).unwrap_err(),
            AcpiError::Checksum("DSDT", 0xe_0600)
        );
        let empty = Buf(std::vec![0u8; 0x10_0000]);
        assert_eq!(parse(&empty, 0).unwrap_err(), AcpiError::NoRsdp);
        let mut m = machine(1);
        m.0[0xe_0000] = b'X'; // RSDP signature gone: scan fails, pointer fails too
        assert_eq!(parse(&m, 0).unwrap_err(), AcpiError::NoRsdp);
    }

    #[test]
    fn s5_parsing() {
        assert_eq!(
            s5_slp_typ(&[b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0x00, 0x00]),
            Some(0)
        );
        assert_eq!(
            s5_slp_typ(&[b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0x0a, 0x07]),
            Some(7)
        );
        assert_eq!(s5_slp_typ(b"_S5_"), None);
        assert_eq!(s5_slp_typ(b"nothing"), None);
    }
}
