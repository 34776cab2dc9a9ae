//! ACPI table discovery and checks, as a Linux guest does them (ACPI 6.5): find the RSDP from
//! the boot protocol and by the legacy BIOS-area scan, follow the XSDT (or, for revision-0
//! RSDPs, the RSDT) to the FADT and MADT, the FADT to the DSDT, verify every checksum, and pull
//! out what the other scenarios need (power and reset registers, CPUs, `\_S5_`).
//!
//! [`parse`] only reads; [`check`] is the `acpi` scenario's verdict: generic checks for any
//! hardware-reduced PC-like VMM, plus kiln's exact values (docs/guest-contract.md) when
//! `kiln.layout=kiln` is given.

use crate::bootinfo::PhysMem;
use crate::line::{Describe, LineBuf};

/// The legacy RSDP search window (ACPI 6.5, 5.2.5.1): the BIOS read-only area.
pub const SCAN_START: u64 = 0x000e_0000;
/// End (exclusive) of the scan window.
pub const SCAN_END: u64 = 0x0010_0000;
/// Where kiln puts the RSDP (contract).
pub const KILN_RSDP: u64 = 0x000e_0000;
/// Local APIC base every PC uses.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// First IOAPIC base every PC uses.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Kiln's FADT sleep control register (system I/O).
pub const KILN_SLEEP_CONTROL: u64 = 0x600;
/// Kiln's FADT sleep status register (system I/O).
pub const KILN_SLEEP_STATUS: u64 = 0x601;
/// Kiln's FADT reset register (system I/O).
pub const KILN_RESET_REG: u64 = 0x602;
/// Kiln's FADT reset value.
pub const KILN_RESET_VALUE: u8 = 0x01;
/// SLP_TYP used when the DSDT's `\_S5_` can't be read (kiln's value, and QEMU's).
pub const DEFAULT_SLP_TYP_S5: u8 = 5;

/// Generic Address Structure address space: system memory.
pub const GAS_MEMORY: u8 = 0;
/// IOAPICs remembered from the MADT.
pub const MAX_IOAPICS: usize = 4;
/// Generic Address Structure address space: system I/O.
pub const GAS_IO: u8 = 1;

/// FADT flag: hardware-reduced ACPI.
pub const FADT_HW_REDUCED: u32 = 1 << 20;
/// FADT flag: the reset register is supported.
pub const FADT_RESET_REG_SUP: u32 = 1 << 10;

/// FADT field offsets (ACPI 6.5, table 5.9).
mod fadt {
    pub const DSDT: usize = 40;
    pub const FLAGS: usize = 112;
    pub const RESET_REG: usize = 116;
    pub const RESET_VALUE: usize = 128;
    pub const X_DSDT: usize = 140;
    pub const SLEEP_CONTROL_REG: usize = 244;
    pub const SLEEP_STATUS_REG: usize = 256;
    /// ACPI 1.0's FADT ends at the flags; shorter ones are unusable.
    pub const MIN_LEN: usize = 116;
}

/// A Generic Address Structure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gas {
    /// Address space ([`GAS_MEMORY`], [`GAS_IO`], ...).
    pub space: u8,
    /// Register width in bits.
    pub bit_width: u8,
    /// Address.
    pub address: u64,
}

impl Gas {
    /// Appends `io:0x600` / `mem:0xfea00200` / `space5:0x...`.
    pub fn describe_into(&self, out: &mut LineBuf) {
        match self.space {
            GAS_IO => out.push_str("io:"),
            GAS_MEMORY => out.push_str("mem:"),
            s => {
                out.push_str("space");
                out.push_dec(u64::from(s));
                out.push_str(":");
            }
        }
        out.push_hex(self.address);
    }

    /// True if this is the 8-bit-or-unspecified system-I/O register at `port`.
    pub fn is_io(&self, port: u64) -> bool {
        self.space == GAS_IO && self.address == port
    }
}

/// What the scenarios use from the tables.
#[derive(Clone, Copy, Debug, Default)]
pub struct AcpiInfo {
    /// The RSDP used.
    pub rsdp: u64,
    /// RSDP address given by boot_params / hvm_start_info (0: none).
    pub rsdp_given: u64,
    /// RSDP found by the BIOS-area scan.
    pub rsdp_scanned: Option<u64>,
    /// RSDP revision (0: ACPI 1.0, RSDT only; 2: XSDT).
    pub revision: u8,
    /// The root table is the XSDT (else the RSDT).
    pub xsdt: bool,
    /// SDTs whose signature and checksum were verified (root, its entries, DSDT).
    pub tables: u32,
    /// FADT length.
    pub fadt_len: u32,
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
    /// FADT `X_DSDT` (0 if absent or the FADT is too short).
    pub x_dsdt: u64,
    /// MADT local interrupt controller address.
    pub lapic_addr: u32,
    /// Enabled local APICs (and x2APICs) in the MADT.
    pub lapics: u32,
    /// Bit i set: APIC ID i is listed and enabled (IDs 0..255).
    pub lapic_ids: [u64; 4],
    /// IOAPIC entries.
    pub ioapics: u32,
    /// First IOAPIC's address.
    pub ioapic_addr: u32,
    /// The first [`MAX_IOAPICS`] IOAPICs as (address, GSI base), in MADT order (routing a
    /// GSI above 23: QEMU microvm puts its virtio-mmio GSIs on a second IOAPIC).
    pub ioapic_list: [(u32, u32); MAX_IOAPICS],
    /// The DSDT actually used (from `X_DSDT`, else `DSDT`) and its length.
    pub dsdt_addr: u64,
    /// Length of the DSDT in bytes (header included).
    pub dsdt_len: u32,
    /// GSI of ISA IRQ 0 per an interrupt source override, if any.
    pub irq0_gsi: Option<u32>,
    /// The DSDT names `_S5_`.
    pub has_s5: bool,
    /// `\_S5_` SLP_TYPa, if its package is one of the simple encodings.
    pub s5_slp_typ: Option<u8>,
    /// DSDT has COM1 (`PNP0501`, as EisaId or string).
    pub has_com1: bool,
    /// DSDT has a Generic Event Device (`ACPI0013`).
    pub has_ged: bool,
    /// DSDT has a power button (`PNP0C0C`, as EisaId or string).
    pub has_power_button: bool,
}

impl AcpiInfo {
    /// True if `id` is an enabled APIC ID in the MADT.
    pub fn has_apic_id(&self, id: u32) -> bool {
        id < 256 && self.lapic_ids[(id / 64) as usize] & (1 << (id % 64)) != 0
    }

    /// The IOAPIC (address, GSI base) with the highest GSI base not above `gsi`; the caller
    /// checks the pin against the IOAPIC's own redirection-entry count.
    pub fn ioapic_for_gsi(&self, gsi: u32) -> Option<(u32, u32)> {
        let n = (self.ioapics as usize).min(MAX_IOAPICS);
        self.ioapic_list[..n]
            .iter()
            .copied()
            .filter(|&(a, base)| a != 0 && base <= gsi)
            .max_by_key(|&(_, base)| base)
    }

    /// SLP_TYP for S5: the DSDT's, else [`DEFAULT_SLP_TYP_S5`].
    pub fn slp_typ_s5(&self) -> u8 {
        self.s5_slp_typ.unwrap_or(DEFAULT_SLP_TYP_S5)
    }
}

/// Why the tables are unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiError {
    /// No RSDP given by the boot protocol nor found by the scan.
    NoRsdp,
    /// The boot protocol named an address without a valid RSDP.
    BadGivenRsdp(u64),
    /// The boot protocol's RSDP and the scan's disagree.
    RsdpMismatch {
        /// From boot_params / hvm_start_info.
        given: u64,
        /// From the scan.
        scanned: u64,
    },
    /// A table is unreadable or has an impossible length.
    Unreadable(&'static str, u64),
    /// A table's signature is not the one its pointer promised.
    Signature(&'static str, u64),
    /// A table's checksum is wrong.
    Checksum([u8; 4], u64),
    /// A table the guest needs is missing from the root table.
    Missing(&'static str),
    /// The FADT is shorter than ACPI 1.0's.
    ShortFadt(u64),
}

impl Describe for AcpiError {
    fn describe(&self, out: &mut LineBuf) {
        match *self {
            AcpiError::NoRsdp => out.push_str("no RSDP (boot protocol or BIOS-area scan)"),
            AcpiError::BadGivenRsdp(a) => {
                out.push_str("no valid RSDP at the boot protocol's address ");
                out.push_hex(a);
            }
            AcpiError::RsdpMismatch { given, scanned } => {
                out.push_str("RSDP from boot protocol ");
                out.push_hex(given);
                out.push_str(" != scanned ");
                out.push_hex(scanned);
            }
            AcpiError::Unreadable(t, a) => {
                out.push_str(t);
                out.push_str(" unreadable or bad length at ");
                out.push_hex(a);
            }
            AcpiError::Signature(t, a) => {
                out.push_str(t);
                out.push_str(" bad signature at ");
                out.push_hex(a);
            }
            AcpiError::Checksum(sig, a) => {
                out.push_escaped(&sig);
                out.push_str(" bad checksum at ");
                out.push_hex(a);
            }
            AcpiError::Missing(t) => {
                out.push_str(t);
                out.push_str(" missing from the root table");
            }
            AcpiError::ShortFadt(a) => {
                out.push_str("FACP too short at ");
                out.push_hex(a);
            }
        }
    }
}

/// Little-endian field, 0 where it lies past the end (short tables).
fn le(b: &[u8], off: usize, n: usize) -> u64 {
    b.get(off..off + n)
        .map(|s| s.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
        .unwrap_or(0)
}

/// Byte sum; 0 for a valid ACPI checksum.
pub fn checksum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
}

fn gas(b: &[u8], off: usize) -> Gas {
    if b.len() < off + 12 {
        return Gas::default();
    }
    Gas {
        space: b[off],
        bit_width: b[off + 1],
        address: le(b, off + 4, 8),
    }
}

/// The RSDP at `addr` if valid: signature, the ACPI 1.0 checksum over 20 bytes and, for
/// revision ≥ 2, the extended checksum over `Length` (≥ 36) bytes.
pub fn rsdp_at(mem: &dyn PhysMem, addr: u64) -> Option<&[u8]> {
    let r = mem.read(addr, 20)?;
    if &r[..8] != b"RSD PTR " || checksum(r) != 0 {
        return None;
    }
    if r[15] < 2 {
        return Some(r);
    }
    let ext = mem.read(addr, 36)?;
    let len = le(ext, 20, 4) as usize;
    if !(36..=4096).contains(&len) {
        return None;
    }
    let full = mem.read(addr, len)?;
    (checksum(full) == 0).then_some(full)
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

/// A whole SDT at `addr`: length sane, checksum over all of it verified.
fn sdt_any<'m>(mem: &'m dyn PhysMem, addr: u64, what: &'static str) -> Result<&'m [u8], AcpiError> {
    let hdr = mem
        .read(addr, 36)
        .ok_or(AcpiError::Unreadable(what, addr))?;
    let len = le(hdr, 4, 4) as usize;
    if !(36..=1 << 20).contains(&len) {
        return Err(AcpiError::Unreadable(what, addr));
    }
    let t = mem
        .read(addr, len)
        .ok_or(AcpiError::Unreadable(what, addr))?;
    if checksum(t) != 0 {
        let mut sig = [0u8; 4];
        sig.copy_from_slice(&t[..4]);
        return Err(AcpiError::Checksum(sig, addr));
    }
    Ok(t)
}

/// An SDT that must have signature `sig`.
fn sdt<'m>(mem: &'m dyn PhysMem, addr: u64, sig: &'static str) -> Result<&'m [u8], AcpiError> {
    let hdr = mem.read(addr, 4).ok_or(AcpiError::Unreadable(sig, addr))?;
    if hdr != sig.as_bytes() {
        return Err(AcpiError::Signature(sig, addr));
    }
    sdt_any(mem, addr, sig)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The AML encoding of `EisaId("ABC1234")`: the compressed 32-bit EISA ID (three 5-bit
/// letters, four hex digits) stored byte-swapped, i.e. these 4 bytes follow AML's DWordPrefix.
pub fn eisa_id(id: &[u8; 7]) -> [u8; 4] {
    let c = |x: u8| u32::from(x.wrapping_sub(0x40)) & 0x1f;
    let h = |x: u8| match x {
        b'0'..=b'9' => u32::from(x - b'0'),
        b'A'..=b'F' => u32::from(x - b'A' + 10),
        b'a'..=b'f' => u32::from(x - b'a' + 10),
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

/// True if the AML names the hardware ID `id` as `EisaId(...)` or as a string.
fn has_hid(aml: &[u8], id: &[u8; 7]) -> bool {
    let mut s = [0u8; 8];
    s[..7].copy_from_slice(id);
    contains(aml, &eisa_id(id)) || contains(aml, &s)
}

/// SLP_TYPa from `Name(_S5_, Package(){ a, ... })` in AML, for the simple encodings of the
/// first element (ZeroOp, OneOp, BytePrefix, WordPrefix, DWordPrefix: low 3 bits are what
/// SLP_TYP holds, the rest must be zero).
pub fn s5_slp_typ(aml: &[u8]) -> Option<u8> {
    let pos = aml.windows(4).position(|w| w == b"_S5_")?;
    let rest = aml.get(pos + 4..)?;
    if *rest.first()? != 0x12 {
        return None; // not PackageOp
    }
    // PkgLength: bits 6..7 of the lead byte count the bytes that follow it.
    let lead = *rest.get(1)?;
    let pkglen_bytes = 1 + usize::from(lead >> 6);
    let elems = rest.get(1 + pkglen_bytes + 1..)?; // skip NumElements
    let v = match *elems.first()? {
        0x00 => 0,
        0x01 => 1,
        0x0a if elems.len() >= 2 => le(elems, 1, 1),
        0x0b if elems.len() >= 3 => le(elems, 1, 2),
        0x0c if elems.len() >= 5 => le(elems, 1, 4),
        _ => return None,
    };
    u8::try_from(v).ok().filter(|&t| t <= 7)
}

fn parse_madt(m: &[u8], info: &mut AcpiInfo) {
    info.lapic_addr = le(m, 36, 4) as u32;
    let add_cpu = |id: u32, flags: u64, info: &mut AcpiInfo| {
        if flags & 1 == 1 {
            info.lapics += 1;
            if id < 256 {
                info.lapic_ids[(id / 64) as usize] |= 1 << (id % 64);
            }
        }
    };
    let mut off = 44;
    while off + 2 <= m.len() {
        let (kind, len) = (m[off], usize::from(m[off + 1]));
        if len < 2 || off + len > m.len() {
            break;
        }
        match kind {
            // Processor Local APIC: UID, APIC ID, flags (bit 0 enabled).
            0 if len >= 8 => add_cpu(u32::from(m[off + 3]), le(m, off + 4, 4), info),
            // I/O APIC: ID, reserved, address, GSI base.
            1 if len >= 12 => {
                if info.ioapics == 0 {
                    info.ioapic_addr = le(m, off + 4, 4) as u32;
                }
                if let Some(slot) = info.ioapic_list.get_mut(info.ioapics as usize) {
                    *slot = (le(m, off + 4, 4) as u32, le(m, off + 8, 4) as u32);
                }
                info.ioapics += 1;
            }
            // Interrupt Source Override on the ISA bus (0) for IRQ 0.
            2 if len >= 10 && m[off + 2] == 0 && m[off + 3] == 0 => {
                info.irq0_gsi = Some(le(m, off + 4, 4) as u32)
            }
            // Processor Local x2APIC: reserved, x2APIC ID, flags, UID.
            9 if len >= 16 => add_cpu(le(m, off + 4, 4) as u32, le(m, off + 8, 4), info),
            _ => {}
        }
        off += len;
    }
}

/// Finds and checks the tables. `given` is the boot protocol's RSDP (0 if none): it must
/// hold a valid RSDP, and when the scan finds one too they must agree.
pub fn parse(mem: &dyn PhysMem, given: u64) -> Result<AcpiInfo, AcpiError> {
    let scanned = scan_rsdp(mem);
    if given != 0 && rsdp_at(mem, given).is_none() {
        return Err(AcpiError::BadGivenRsdp(given));
    }
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
    let rsdp = rsdp_at(mem, rsdp_addr).ok_or(AcpiError::BadGivenRsdp(rsdp_addr))?;
    let mut info = AcpiInfo {
        rsdp: rsdp_addr,
        rsdp_given: given,
        rsdp_scanned: scanned,
        revision: rsdp[15],
        ..AcpiInfo::default()
    };
    let xsdt_addr = if info.revision >= 2 {
        le(rsdp, 24, 8)
    } else {
        0
    };
    let (root, entry_size) = if xsdt_addr != 0 {
        info.xsdt = true;
        (sdt(mem, xsdt_addr, "XSDT")?, 8)
    } else {
        (sdt(mem, le(rsdp, 16, 4), "RSDT")?, 4)
    };
    info.tables = 1;
    let (mut fadt, mut madt) = (None, None);
    for i in 0..(root.len() - 36) / entry_size {
        let a = le(root, 36 + entry_size * i, entry_size);
        let t = sdt_any(mem, a, "root table entry")?;
        info.tables += 1;
        match &t[..4] {
            b"FACP" if fadt.is_none() => fadt = Some((a, t)),
            b"APIC" if madt.is_none() => madt = Some(t),
            _ => {}
        }
    }
    let (fadt_addr, fadt) = fadt.ok_or(AcpiError::Missing("FACP"))?;
    let madt = madt.ok_or(AcpiError::Missing("APIC"))?;
    if fadt.len() < fadt::MIN_LEN {
        return Err(AcpiError::ShortFadt(fadt_addr));
    }
    // Fields past a short FADT's end read as zero / absent.
    info.fadt_len = fadt.len() as u32;
    info.fadt_flags = le(fadt, fadt::FLAGS, 4) as u32;
    info.reset_reg = gas(fadt, fadt::RESET_REG);
    info.reset_value = le(fadt, fadt::RESET_VALUE, 1) as u8;
    info.x_dsdt = le(fadt, fadt::X_DSDT, 8);
    info.sleep_control = gas(fadt, fadt::SLEEP_CONTROL_REG);
    info.sleep_status = gas(fadt, fadt::SLEEP_STATUS_REG);
    let dsdt_addr = match info.x_dsdt {
        0 => le(fadt, fadt::DSDT, 4),
        x => x,
    };
    let dsdt = sdt(mem, dsdt_addr, "DSDT")?;
    info.tables += 1;
    info.dsdt_addr = dsdt_addr;
    info.dsdt_len = dsdt.len() as u32;
    info.has_s5 = contains(dsdt, b"_S5_");
    info.s5_slp_typ = s5_slp_typ(dsdt);
    info.has_com1 = has_hid(dsdt, b"PNP0501");
    info.has_power_button = has_hid(dsdt, b"PNP0C0C");
    info.has_ged = contains(dsdt, b"ACPI0013");
    parse_madt(madt, &mut info);
    Ok(info)
}

/// What [`check`] compares the tables against.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expect {
    /// `kiln.cpus`: the MADT must list exactly APIC IDs `0..cpus`, all enabled.
    pub cpus: Option<u32>,
    /// The BSP's initial APIC ID (CPUID leaf 1 EBX[31:24]): must be in the MADT.
    pub bsp_apic_id: Option<u32>,
    /// `kiln.layout=kiln`: also kiln's exact placement and registers (contract).
    pub kiln: bool,
}

/// The `acpi` scenario's verdict; on failure `out` holds the first reason, on success a
/// summary.
pub fn check(info: &AcpiInfo, exp: &Expect, out: &mut LineBuf) -> bool {
    let fail = |why: &str, out: &mut LineBuf| {
        out.push_str(why);
        false
    };
    if exp.kiln {
        if info.rsdp_given == 0 {
            return fail("no RSDP address in boot_params / hvm_start_info", out);
        }
        if info.rsdp_scanned.is_none() {
            return fail("the BIOS-area scan finds no RSDP", out);
        }
        if info.rsdp != KILN_RSDP {
            out.push_str("RSDP at ");
            out.push_hex(info.rsdp);
            out.push_str(", contract says ");
            out.push_hex(KILN_RSDP);
            return false;
        }
        if !info.xsdt || info.x_dsdt == 0 {
            return fail("no XSDT or no FADT X_DSDT", out);
        }
    }
    if info.fadt_flags & FADT_HW_REDUCED == 0 {
        return fail("FADT not HW_REDUCED_ACPI", out);
    }
    if info.sleep_control.address == 0 || info.sleep_status.address == 0 {
        return fail("FADT sleep control/status register missing", out);
    }
    if info.fadt_flags & FADT_RESET_REG_SUP == 0 || info.reset_reg.address == 0 {
        return fail("FADT reset register missing (RESET_REG_SUP)", out);
    }
    if exp.kiln {
        let regs_ok = info.sleep_control.is_io(KILN_SLEEP_CONTROL)
            && info.sleep_status.is_io(KILN_SLEEP_STATUS)
            && info.reset_reg.is_io(KILN_RESET_REG)
            && info.reset_value == KILN_RESET_VALUE;
        if !regs_ok {
            out.push_str("FADT registers differ from the contract: sleep=");
            info.sleep_control.describe_into(out);
            out.push_str(" status=");
            info.sleep_status.describe_into(out);
            out.push_str(" reset=");
            info.reset_reg.describe_into(out);
            out.push_str(" value=");
            out.push_hex(u64::from(info.reset_value));
            return false;
        }
    }
    if info.lapic_addr != LAPIC_ADDR {
        return fail("MADT local APIC address is not 0xfee00000", out);
    }
    if info.ioapics == 0 || info.ioapic_addr != IOAPIC_ADDR {
        return fail("MADT: first IOAPIC missing or not at 0xfec00000", out);
    }
    if exp.kiln && info.ioapics != 1 {
        return fail("MADT lists more than one IOAPIC", out);
    }
    if exp.kiln && info.irq0_gsi != Some(2) {
        return fail("MADT lacks the IRQ0->GSI2 interrupt source override", out);
    }
    if let Some(n) = exp.cpus {
        let all = (0..n.min(256)).all(|i| info.has_apic_id(i));
        if info.lapics != n || !all {
            out.push_str("MADT lists ");
            out.push_dec(u64::from(info.lapics));
            out.push_str(" enabled CPUs (APIC IDs 0..");
            out.push_dec(u64::from(n));
            out.push_str(" expected), kiln.cpus=");
            out.push_dec(u64::from(n));
            return false;
        }
    }
    if let Some(id) = exp.bsp_apic_id {
        if !info.has_apic_id(id) {
            out.push_str("BSP APIC ID ");
            out.push_dec(u64::from(id));
            out.push_str(" (CPUID) not in the MADT");
            return false;
        }
    }
    if !info.has_com1 {
        return fail("DSDT lacks COM1 (PNP0501)", out);
    }
    if !info.has_ged {
        return fail("DSDT lacks the GED (ACPI0013)", out);
    }
    if !info.has_power_button {
        return fail("DSDT lacks the power button (PNP0C0C)", out);
    }
    if !info.has_s5 {
        return fail("DSDT lacks _S5_", out);
    }
    if exp.kiln && info.s5_slp_typ.is_none() {
        return fail("DSDT _S5_ is not a simple package", out);
    }
    out.push_str("rsdp=");
    out.push_hex(info.rsdp);
    out.push_str(match (info.rsdp_given != 0, info.rsdp_scanned.is_some()) {
        (true, true) => "(boot+scan)",
        (true, false) => "(boot only)",
        _ => "(scan only)",
    });
    out.push_str(if info.xsdt { " xsdt" } else { " rsdt" });
    out.push_str(" tables=");
    out.push_dec(u64::from(info.tables));
    out.push_str(" cpus=");
    out.push_dec(u64::from(info.lapics));
    out.push_str(" ioapics=");
    out.push_dec(u64::from(info.ioapics));
    out.push_str(" sleep=");
    info.sleep_control.describe_into(out);
    out.push_str(" reset=");
    info.reset_reg.describe_into(out);
    out.push_str("/");
    out.push_hex(u64::from(info.reset_value));
    out.push_str(" s5=");
    match info.s5_slp_typ {
        Some(t) => out.push_dec(u64::from(t)),
        None => out.push_str("unparsed"),
    }
    if exp.cpus.is_none() {
        out.push_str(" cpu-count=unchecked(no kiln.cpus)");
    }
    if !exp.kiln {
        out.push_str(" kiln-values=unchecked(no kiln.layout=kiln)");
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
        t[at] = 0u8.wrapping_sub(checksum(t));
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

    const XSDT: u64 = 0xe_0040;
    const FADT: u64 = 0xe_0100;
    const MADT: u64 = 0xe_0300;
    const DSDT: u64 = 0xe_0600;
    const OTHER: u64 = 0xe_0800;

    fn rsdp_bytes(rev: u8, rsdt: u32, xsdt: u64) -> std::vec::Vec<u8> {
        let mut r = std::vec![0u8; 36];
        r[..8].copy_from_slice(b"RSD PTR ");
        r[15] = rev;
        r[16..20].copy_from_slice(&rsdt.to_le_bytes());
        r[20..24].copy_from_slice(&36u32.to_le_bytes());
        r[24..32].copy_from_slice(&xsdt.to_le_bytes());
        fix_sum(&mut r[..20], 8);
        fix_sum(&mut r, 32);
        r
    }

    fn fadt_body(len: usize) -> std::vec::Vec<u8> {
        let mut fb = std::vec![0u8; 276 - 36];
        let f = |o: usize| o - 36;
        fb[f(112)..f(116)].copy_from_slice(&(FADT_HW_REDUCED | FADT_RESET_REG_SUP).to_le_bytes());
        for (o, port) in [(116usize, 0x602u64), (244, 0x600), (256, 0x601)] {
            fb[f(o)] = 1;
            fb[f(o) + 1] = 8;
            fb[f(o) + 4..f(o) + 12].copy_from_slice(&port.to_le_bytes());
        }
        fb[f(128)] = 1;
        fb[f(40)..f(44)].copy_from_slice(&(DSDT as u32).to_le_bytes());
        fb[f(140)..f(148)].copy_from_slice(&DSDT.to_le_bytes());
        fb.truncate(len - 36);
        fb
    }

    fn dsdt_body(s5: &[u8]) -> std::vec::Vec<u8> {
        let mut db = std::vec::Vec::new();
        db.extend_from_slice(&[0x08, b'_', b'H', b'I', b'D', 0x0c]);
        db.extend_from_slice(&eisa_id(b"PNP0501"));
        db.extend_from_slice(&[0x08, b'_', b'H', b'I', b'D', 0x0c]);
        db.extend_from_slice(&eisa_id(b"PNP0C0C"));
        db.extend_from_slice(b"\x08_HID\x0dACPI0013\0");
        db.extend_from_slice(&[0x08, b'_', b'S', b'5', b'_']);
        db.extend_from_slice(s5);
        db
    }

    /// Kiln-shaped tables for `cpus` at 0xE0000 (plus an extra table in the XSDT).
    fn machine(cpus: u8) -> Buf {
        let mut m = std::vec![0u8; 0x10_0000];
        put(&mut m, 0xe_0000, &rsdp_bytes(2, 0, XSDT));
        let mut xb = std::vec::Vec::new();
        for a in [FADT, MADT, OTHER] {
            xb.extend_from_slice(&a.to_le_bytes());
        }
        put(&mut m, XSDT, &sdt_bytes(b"XSDT", &xb));
        put(&mut m, FADT, &sdt_bytes(b"FACP", &fadt_body(276)));
        put(&mut m, OTHER, &sdt_bytes(b"SSDT", b"whatever"));
        let mut mb = std::vec![0u8; 8];
        mb[..4].copy_from_slice(&0xfee0_0000u32.to_le_bytes());
        for id in 0..cpus {
            mb.extend_from_slice(&[0, 8, id, id, 1, 0, 0, 0]);
        }
        mb.extend_from_slice(&[0, 8, 99, 99, 0, 0, 0, 0]); // disabled: not counted
        mb.extend_from_slice(&[1, 12, 0, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0]);
        mb.extend_from_slice(&[2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
        put(&mut m, MADT, &sdt_bytes(b"APIC", &mb));
        let s5 = [0x12, 0x0a, 0x04, 0x0a, 0x05, 0x0a, 0x05, 0, 0];
        put(&mut m, DSDT, &sdt_bytes(b"DSDT", &dsdt_body(&s5)));
        Buf(m)
    }

    fn kiln(cpus: u32) -> Expect {
        Expect {
            cpus: Some(cpus),
            bsp_apic_id: Some(0),
            kiln: true,
        }
    }

    fn verdict(info: &AcpiInfo, exp: &Expect) -> (bool, std::string::String) {
        let mut out = LineBuf::new();
        let ok = check(info, exp, &mut out);
        (ok, out.as_str().into())
    }

    /// Rewrites a table's checksum after a test edited it.
    fn resum(m: &mut Buf, at: u64) {
        let a = at as usize;
        let len = le(&m.0[a..], 4, 4) as usize;
        fix_sum(&mut m.0[a..a + len], 9);
    }

    #[test]
    fn eisa_ids_match_iasl() {
        // iasl: EisaId("PNP0501") is the DWord 0x0105D041, stored little-endian.
        assert_eq!(eisa_id(b"PNP0501"), 0x0105_d041u32.to_le_bytes());
        assert_eq!(eisa_id(b"PNP0C0C"), 0x0c0c_d041u32.to_le_bytes());
        assert_eq!(eisa_id(b"PNP0A03"), 0x030a_d041u32.to_le_bytes());
        assert_ne!(eisa_id(b"PNP0501"), eisa_id(b"PNP0502"));
    }

    #[test]
    fn finds_and_checks_kiln_tables() {
        let m = machine(4);
        let info = parse(&m, 0xe_0000).unwrap();
        assert_eq!(info.tables, 5, "XSDT, FACP, APIC, SSDT, DSDT");
        assert!(info.xsdt);
        assert_eq!(info.lapics, 4);
        assert_eq!(info.lapic_ids[0], 0b1111);
        assert!(!info.has_apic_id(99));
        assert_eq!(info.sleep_control.address, 0x600);
        assert_eq!(info.sleep_status.address, 0x601);
        assert_eq!(info.reset_reg.address, 0x602);
        assert_eq!(info.reset_value, 1);
        assert_eq!(info.s5_slp_typ, Some(5));
        assert_eq!(info.irq0_gsi, Some(2));
        let (ok, why) = verdict(&info, &kiln(4));
        assert!(ok, "{why}");
        assert!(
            why.contains("rsdp=0xe0000(boot+scan) xsdt tables=5 cpus=4"),
            "{why}"
        );
        let (ok, why) = verdict(&info, &kiln(2));
        assert!(!ok);
        assert!(why.contains("MADT lists 4"), "{why}");
        let (ok, why) = verdict(
            &info,
            &Expect {
                bsp_apic_id: Some(7),
                ..kiln(4)
            },
        );
        assert!(!ok && why.contains("BSP APIC ID 7"), "{why}");
    }

    #[test]
    fn boot_pointer_and_scan_must_agree() {
        let m = machine(1);
        // Scan only (no pointer from the boot protocol) finds the same RSDP...
        let info = parse(&m, 0).unwrap();
        assert_eq!(info.rsdp, 0xe_0000);
        // ...but kiln's contract wants the pointer too.
        let (ok, why) = verdict(&info, &kiln(1));
        assert!(
            !ok && why.contains("no RSDP address in boot_params"),
            "{why}"
        );
        let (ok, why) = verdict(
            &info,
            &Expect {
                kiln: false,
                ..kiln(1)
            },
        );
        assert!(ok && why.contains("(scan only)"), "{why}");
        // A second valid RSDP elsewhere, named by the boot protocol: mismatch.
        let mut m = machine(1);
        put(&mut m.0, 0xf_0000, &rsdp_bytes(2, 0, XSDT));
        assert_eq!(
            parse(&m, 0xf_0000).unwrap_err(),
            AcpiError::RsdpMismatch {
                given: 0xf_0000,
                scanned: 0xe_0000
            }
        );
        // A pointer to garbage.
        assert_eq!(
            parse(&m, 0xe_0010).unwrap_err(),
            AcpiError::BadGivenRsdp(0xe_0010)
        );
        // Pointer outside the scan window, nothing in it: pointer only.
        let mut m = machine(1);
        put(&mut m.0, 0xe_0000, &[0; 36]);
        put(&mut m.0, 0x9_0000, &rsdp_bytes(2, 0, XSDT));
        let info = parse(&m, 0x9_0000).unwrap();
        assert_eq!(info.rsdp_scanned, None);
        let (ok, why) = verdict(&info, &kiln(1));
        assert!(!ok && why.contains("scan finds no RSDP"), "{why}");
    }

    #[test]
    fn every_checksum_is_verified() {
        let empty = Buf(std::vec![0u8; 0x10_0000]);
        assert_eq!(parse(&empty, 0).unwrap_err(), AcpiError::NoRsdp);
        // RSDP: the 20-byte checksum and the extended one.
        for at in [0xe_0000 + 9, 0xe_0000 + 33] {
            let mut m = machine(1);
            m.0[at] ^= 0x40;
            assert_eq!(parse(&m, 0).unwrap_err(), AcpiError::NoRsdp, "byte {at:#x}");
        }
        // Every SDT, including one the guest does not otherwise use.
        for (at, sig) in [
            (XSDT, b"XSDT"),
            (FADT, b"FACP"),
            (MADT, b"APIC"),
            (DSDT, b"DSDT"),
            (OTHER, b"SSDT"),
        ] {
            let mut m = machine(1);
            m.0[at as usize + 40] ^= 1;
            assert_eq!(
                parse(&m, 0xe_0000).unwrap_err(),
                AcpiError::Checksum(*sig, at)
            );
        }
        // An impossible length.
        let mut m = machine(1);
        put(&mut m.0, MADT + 4, &20u32.to_le_bytes());
        assert!(matches!(
            parse(&m, 0).unwrap_err(),
            AcpiError::Unreadable(_, MADT)
        ));
    }

    #[test]
    fn missing_and_misplaced_pieces_fail() {
        // FADT X_DSDT pointing at a non-DSDT.
        let mut m = machine(1);
        put(&mut m.0, FADT + 140, &MADT.to_le_bytes());
        resum(&mut m, FADT);
        assert_eq!(
            parse(&m, 0).unwrap_err(),
            AcpiError::Signature("DSDT", MADT)
        );
        // No MADT in the XSDT.
        let mut m = machine(1);
        put(&mut m.0, XSDT + 44, &OTHER.to_le_bytes());
        resum(&mut m, XSDT);
        assert_eq!(parse(&m, 0).unwrap_err(), AcpiError::Missing("APIC"));
        // Sleep register moved: generic checks pass, kiln's fail.
        let mut m = machine(2);
        put(&mut m.0, FADT + 248, &0x700u64.to_le_bytes());
        resum(&mut m, FADT);
        let info = parse(&m, 0xe_0000).unwrap();
        let (ok, why) = verdict(&info, &kiln(2));
        assert!(!ok && why.contains("sleep=io:0x700"), "{why}");
        assert!(
            verdict(
                &info,
                &Expect {
                    kiln: false,
                    ..kiln(2)
                }
            )
            .0
        );
        // Not hardware-reduced.
        let mut m = machine(1);
        put(&mut m.0, FADT + 112, &FADT_RESET_REG_SUP.to_le_bytes());
        resum(&mut m, FADT);
        let (ok, why) = verdict(&parse(&m, 0xe_0000).unwrap(), &kiln(1));
        assert!(!ok && why.contains("HW_REDUCED"), "{why}");
        // No IRQ0 override (QEMU microvm has none): only kiln requires it.
        let mut m = machine(1);
        let iso = MADT as usize + 44 + 8 * 2 + 12;
        m.0[iso] = 0x7f; // unknown entry type: skipped
        resum(&mut m, MADT);
        let info = parse(&m, 0xe_0000).unwrap();
        assert_eq!(info.irq0_gsi, None);
        let (ok, why) = verdict(&info, &kiln(1));
        assert!(!ok && why.contains("IRQ0->GSI2"), "{why}");
    }

    #[test]
    fn short_fadt_and_rsdt() {
        // ACPI 1.0 style: RSDP revision 0, RSDT, 116-byte FADT with only DSDT.
        let mut m = machine(1);
        put(&mut m.0, 0xe_0000, &rsdp_bytes(0, 0xe_0a00, 0)[..20]);
        let mut rb = std::vec::Vec::new();
        for a in [FADT, MADT] {
            rb.extend_from_slice(&(a as u32).to_le_bytes());
        }
        put(&mut m.0, 0xe_0a00, &sdt_bytes(b"RSDT", &rb));
        put(&mut m.0, FADT, &sdt_bytes(b"FACP", &fadt_body(116)));
        let info = parse(&m, 0).unwrap();
        assert!(!info.xsdt);
        assert_eq!(info.x_dsdt, 0);
        assert_eq!(info.sleep_control, Gas::default());
        assert!(info.has_com1);
        let (ok, why) = verdict(
            &info,
            &Expect {
                kiln: false,
                ..kiln(1)
            },
        );
        assert!(!ok && why.contains("sleep control"), "{why}");
        // QEMU-style 268-byte FADT: sleep registers present, no hypervisor ID.
        let mut m = machine(1);
        put(&mut m.0, FADT, &sdt_bytes(b"FACP", &fadt_body(268)));
        let info = parse(&m, 0xe_0000).unwrap();
        assert_eq!(info.sleep_status.address, 0x601);
        assert!(verdict(&info, &kiln(1)).0);
        // Too short to have flags at all.
        put(&mut m.0, FADT, &sdt_bytes(b"FACP", &fadt_body(100)));
        assert_eq!(parse(&m, 0).unwrap_err(), AcpiError::ShortFadt(FADT));
    }

    #[test]
    fn madt_x2apic_and_string_hids() {
        let mut m = machine(1);
        // Replace the DSDT with string _HIDs (as QEMU writes PNP0C0C).
        let mut db = std::vec::Vec::new();
        db.extend_from_slice(b"\x08_HID\x0dPNP0501\0\x08_HID\x0dPNP0C0C\0ACPI0013\0");
        db.extend_from_slice(b"\x08_S5_\x12\x06\x04\x0c\x05\0\0\0");
        put(&mut m.0, DSDT, &sdt_bytes(b"DSDT", &db));
        // MADT: one x2APIC entry, ID 1, enabled.
        let mut mb = std::vec![0u8; 8];
        mb[..4].copy_from_slice(&0xfee0_0000u32.to_le_bytes());
        mb.extend_from_slice(&[0, 8, 0, 0, 1, 0, 0, 0]);
        mb.extend_from_slice(&[9, 16, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]);
        mb.extend_from_slice(&[1, 12, 0, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0]);
        mb.extend_from_slice(&[2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
        put(&mut m.0, MADT, &sdt_bytes(b"APIC", &mb));
        let info = parse(&m, 0xe_0000).unwrap();
        assert!(info.has_com1 && info.has_power_button && info.has_ged);
        assert_eq!(info.s5_slp_typ, Some(5));
        assert_eq!(info.lapics, 2);
        assert!(info.has_apic_id(1));
        assert!(verdict(&info, &kiln(2)).0);
    }

    #[test]
    fn ioapics_and_dsdt_location() {
        let mut m = machine(1);
        let info = parse(&m, 0xe_0000).unwrap();
        assert_eq!((info.dsdt_addr, info.ioapics), (DSDT, 1));
        assert_eq!(
            info.dsdt_len as usize,
            m.read(DSDT, 36).map(|h| le(h, 4, 4)).unwrap() as usize
        );
        assert_eq!(info.ioapic_for_gsi(16), Some((0xfec0_0000, 0)));
        // QEMU microvm with ioapic2: a second IOAPIC for GSIs 24 and up.
        let mut mb = std::vec![0u8; 8];
        mb[..4].copy_from_slice(&0xfee0_0000u32.to_le_bytes());
        mb.extend_from_slice(&[0, 8, 0, 0, 1, 0, 0, 0]);
        mb.extend_from_slice(&[1, 12, 0, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0]);
        mb.extend_from_slice(&[1, 12, 1, 0, 0, 0, 0xc1, 0xfe, 24, 0, 0, 0]);
        put(&mut m.0, MADT, &sdt_bytes(b"APIC", &mb));
        let info = parse(&m, 0xe_0000).unwrap();
        assert_eq!(info.ioapics, 2);
        assert_eq!(info.ioapic_for_gsi(5), Some((0xfec0_0000, 0)));
        assert_eq!(info.ioapic_for_gsi(23), Some((0xfec0_0000, 0)));
        assert_eq!(info.ioapic_for_gsi(24), Some((0xfec1_0000, 24)));
        assert_eq!(info.ioapic_for_gsi(40), Some((0xfec1_0000, 24)));
        assert_eq!(AcpiInfo::default().ioapic_for_gsi(0), None);
    }

    #[test]
    fn s5_parsing() {
        assert_eq!(s5_slp_typ(b"_S5_\x12\x06\x04\x00\x00"), Some(0));
        assert_eq!(s5_slp_typ(b"_S5_\x12\x06\x04\x01\x00"), Some(1));
        assert_eq!(s5_slp_typ(b"_S5_\x12\x06\x04\x0a\x07"), Some(7));
        assert_eq!(s5_slp_typ(b"_S5_\x12\x06\x04\x0b\x05\x00"), Some(5));
        // Two-byte PkgLength (lead byte 0x4N).
        assert_eq!(s5_slp_typ(b"_S5_\x12\x40\x01\x04\x0a\x03"), Some(3));
        // Values that don't fit SLP_TYP's 3 bits are not guessed at.
        assert_eq!(s5_slp_typ(b"_S5_\x12\x06\x04\x0a\x08"), None);
        assert_eq!(s5_slp_typ(b"_S5_\x12\x06\x04\x0b\x05\x01"), None);
        // Not a package, truncated, absent.
        assert_eq!(s5_slp_typ(b"_S5_\x0a\x05"), None);
        assert_eq!(s5_slp_typ(b"_S5_\x12\x06\x04\x0a"), None);
        assert_eq!(s5_slp_typ(b"_S5_"), None);
        assert_eq!(s5_slp_typ(b"nothing"), None);
    }
}
