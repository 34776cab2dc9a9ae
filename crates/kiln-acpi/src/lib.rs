#![warn(missing_docs)]
#![doc = include_str!("../README.md")]

use acpi_tables::aml::{
    self, Device, EISAName, Equal, If, Interrupt, Memory32Fixed, Method, Name, Notify, Package,
    Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Where the tables live: the BIOS area below 1 MiB, which the e820 map reserves, so the
/// legacy RSDP scan of 0xE0000..0x100000 finds the RSDP and no RAM the guest uses is hit.
pub const ACPI_START: u64 = 0x000e_0000;
/// End (exclusive) of the area the tables may use.
pub const ACPI_END: u64 = 0x0010_0000;
/// The RSDP's address (16-byte aligned, as the legacy scan requires).
pub const RSDP_ADDR: u64 = ACPI_START;

/// OEM ID in every table header.
pub const OEM_ID: [u8; 6] = *b"KILN  ";
/// OEM table ID in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"KILNVMM ";
/// OEM revision in every table header.
pub const OEM_REVISION: u32 = 1;

/// Local APIC MMIO base.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;

// The power device's registers (docs/guest-contract.md, kiln-legacy's consts): the FADT's
// hardware-reduced sleep control/status and reset registers. Duplicated rather than
// depending on kiln-legacy, so this crate stays a leaf; `tests::registers_match_contract`
// checks them against the contract document.
/// Sleep control register (PIO).
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// Sleep status register (PIO).
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// Reset register (PIO).
pub const RESET_PORT: u16 = 0x602;
/// Value written to the reset register to reset.
pub const RESET_VALUE: u8 = 0x01;
/// SLP_TYP of S5 (soft off), the first element of `\_S5_`.
pub const SLP_TYP_S5: u8 = 5;

/// IOAPIC input pins (GSIs 0..24) described by the MADT.
pub const IOAPIC_PINS: u32 = 24;

/// The most vCPUs the MADT describes: xAPIC IDs are 8 bits and 0xFF is the broadcast ID.
pub const MAX_CPUS: u32 = 255;

/// Errors building or placing the tables.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The vCPU count can't be described with xAPIC entries.
    #[error("--cpus {0}: the MADT describes at most {MAX_CPUS} vCPUs (8-bit APIC IDs)")]
    TooManyCpus(u32),
    /// A virtio-mmio window doesn't fit the 32-bit descriptors the DSDT uses.
    #[error("virtio-mmio device at {base:#x} (size {size:#x}) is not below 4 GiB")]
    DeviceAbove4G {
        /// Window base.
        base: u64,
        /// Window size.
        size: u64,
    },
    /// A device's interrupt is not an IOAPIC pin, or two devices share one.
    #[error("GSI {gsi} of {what} is not a free IOAPIC pin (0..{IOAPIC_PINS}, one device each)")]
    BadGsi {
        /// The GSI.
        gsi: u32,
        /// Which device.
        what: &'static str,
    },
    /// More virtio-mmio devices than the DSDT names (`V000`..`V999`).
    #[error("{0} virtio-mmio devices; the DSDT names at most 1000")]
    TooManyDevices(usize),
    /// A virtio-mmio window is empty or overlaps another.
    #[error("virtio-mmio window at {base:#x} (size {size:#x}) is empty or overlaps another")]
    BadWindow {
        /// Window base.
        base: u64,
        /// Window size.
        size: u64,
    },
    /// The tables don't fit between [`ACPI_START`] and [`ACPI_END`].
    #[error("ACPI tables need {needed} bytes, only {available} fit in the BIOS area")]
    TooLarge {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// Writing to guest memory failed.
    #[error("writing ACPI table {table} at {addr:#x}: {source}")]
    GuestWrite {
        /// Table signature.
        table: &'static str,
        /// Address.
        addr: u64,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// One virtio-mmio device to announce in the DSDT (`LNRO0005`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// MMIO window base.
    pub base: u64,
    /// MMIO window size.
    pub size: u64,
    /// IOAPIC GSI (edge, active high).
    pub gsi: u32,
}

/// What the tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// vCPUs: APIC IDs (and ACPI processor UIDs) are `0..cpus`, as CPUID reports them.
    pub cpus: u32,
    /// COM1 at 0x3f8, IRQ 4.
    pub serial: bool,
    /// The Generic Event Device's GSI; raising it is a power-button press.
    pub ged_gsi: u32,
    /// virtio-mmio devices.
    pub virtio_mmio: Vec<VirtioMmioDevice>,
}

/// The generated tables (SDTs with their signature) and the RSDP.
#[derive(Debug, Clone)]
pub struct AcpiTables {
    /// DSDT bytes.
    pub dsdt: Vec<u8>,
    /// FADT (`FACP`) bytes, X_DSDT filled in by [`AcpiTables::place`].
    pub fadt: Vec<u8>,
    /// MADT (`APIC`) bytes.
    pub madt: Vec<u8>,
    /// XSDT bytes, entries filled in by [`AcpiTables::place`].
    pub xsdt: Vec<u8>,
    /// RSDP bytes (36, ACPI 2.0+).
    pub rsdp: Vec<u8>,
    /// Guest-physical address of each table after placement, by signature.
    pub addresses: Vec<(&'static str, u64)>,
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_sub(*b))
}

fn set_sdt_checksum(table: &mut [u8]) {
    if table.len() > 9 {
        table[9] = 0;
        table[9] = checksum(table);
    }
}

fn align(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// A Generic Address Structure for an 8-bit system-I/O register.
fn gas_io8(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // SystemIO
    g[1] = 8; // bit width
    g[2] = 0; // bit offset
    g[3] = 1; // access size: byte
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// FADT field offsets (ACPI 6.5, table 5.9).
mod fadt {
    pub const LEN: u32 = 276;
    pub const PREFERRED_PM_PROFILE: usize = 45;
    pub const IAPC_BOOT_ARCH: usize = 109;
    pub const FLAGS: usize = 112;
    pub const RESET_REG: usize = 116;
    pub const RESET_VALUE: usize = 128;
    pub const MINOR_VERSION: usize = 131;
    pub const X_DSDT: usize = 140;
    pub const SLEEP_CONTROL_REG: usize = 244;
    pub const SLEEP_STATUS_REG: usize = 256;
    pub const HYPERVISOR_VENDOR: usize = 268;

    pub const FLAG_WBINVD: u32 = 1 << 0;
    pub const FLAG_PWR_BUTTON: u32 = 1 << 4;
    pub const FLAG_SLP_BUTTON: u32 = 1 << 5;
    pub const FLAG_RESET_REG_SUP: u32 = 1 << 10;
    pub const FLAG_HW_REDUCED_ACPI: u32 = 1 << 20;

    /// IAPC_BOOT_ARCH: no VGA, no CMOS RTC (and no 8042 advertised: kiln's i8042 only
    /// resets, so Linux should not probe it for a keyboard).
    pub const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
    pub const BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
}

fn build_fadt() -> Vec<u8> {
    let mut t = Sdt::new(*b"FACP", fadt::LEN, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.write_u8(fadt::PREFERRED_PM_PROFILE, 0); // unspecified
    t.write_u16(
        fadt::IAPC_BOOT_ARCH,
        fadt::BOOT_ARCH_VGA_NOT_PRESENT | fadt::BOOT_ARCH_CMOS_RTC_NOT_PRESENT,
    );
    t.write_u32(
        fadt::FLAGS,
        fadt::FLAG_WBINVD
            | fadt::FLAG_PWR_BUTTON
            | fadt::FLAG_SLP_BUTTON
            | fadt::FLAG_RESET_REG_SUP
            | fadt::FLAG_HW_REDUCED_ACPI,
    );
    t.write_bytes(fadt::RESET_REG, &gas_io8(RESET_PORT));
    t.write_u8(fadt::RESET_VALUE, RESET_VALUE);
    t.write_u8(fadt::MINOR_VERSION, 5);
    t.write_bytes(fadt::SLEEP_CONTROL_REG, &gas_io8(SLEEP_CONTROL_PORT));
    t.write_bytes(fadt::SLEEP_STATUS_REG, &gas_io8(SLEEP_STATUS_PORT));
    t.write_bytes(fadt::HYPERVISOR_VENDOR, b"KILNVMM\0");
    t.as_slice().to_vec()
}

/// MADT entry types (ACPI 6.5, 5.2.12).
mod madt {
    pub const HEADER_LEN: u32 = 44;
    pub const PCAT_COMPAT: u32 = 1;
    pub const LOCAL_APIC: u8 = 0;
    pub const IO_APIC: u8 = 1;
    pub const INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
    pub const LOCAL_APIC_NMI: u8 = 4;
}

fn build_madt(cpus: u32) -> Vec<u8> {
    let mut t = Sdt::new(
        *b"APIC",
        madt::HEADER_LEN,
        5,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    t.write_u32(36, LAPIC_ADDR);
    t.write_u32(40, madt::PCAT_COMPAT);
    let mut e = Vec::with_capacity(cpus as usize * 8 + 32);
    for id in 0..cpus {
        // uid == APIC ID == vCPU index; flags: enabled.
        let id = id as u8;
        e.extend_from_slice(&[madt::LOCAL_APIC, 8, id, id]);
        e.extend_from_slice(&1u32.to_le_bytes());
    }
    e.extend_from_slice(&[madt::IO_APIC, 12, 0, 0]);
    e.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    e.extend_from_slice(&0u32.to_le_bytes()); // GSI base
                                              // ISA IRQ 0 (PIT) is wired to IOAPIC pin 2, as on PCs and in KVM's routing.
    e.extend_from_slice(&[madt::INTERRUPT_SOURCE_OVERRIDE, 10, 0, 0]);
    e.extend_from_slice(&2u32.to_le_bytes());
    e.extend_from_slice(&0u16.to_le_bytes()); // conforms to the bus
                                              // LINT1 of every processor is NMI (kiln-vcpu programs the LAPIC the same way).
    e.extend_from_slice(&[madt::LOCAL_APIC_NMI, 6, 0xff, 0, 0, 1]);
    t.append_slice(&e);
    t.as_slice().to_vec()
}

/// AML that is already encoded: lets each device be built (and its temporaries dropped) in
/// one statement, then nested in the `\_SB` scope.
struct Encoded(Vec<u8>);

impl Aml for Encoded {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn encode(a: &dyn Aml) -> Encoded {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    Encoded(v)
}

/// Interrupts must be distinct IOAPIC pins; windows non-empty and disjoint.
fn validate(cfg: &AcpiConfig) -> Result<()> {
    if cfg.virtio_mmio.len() > 1000 {
        return Err(Error::TooManyDevices(cfg.virtio_mmio.len()));
    }
    let mut used = 0u32;
    if cfg.serial {
        used |= 1 << 4;
    }
    let mut claim = |gsi: u32, what: &'static str| {
        if gsi >= IOAPIC_PINS || used & (1 << gsi) != 0 {
            return Err(Error::BadGsi { gsi, what });
        }
        used |= 1 << gsi;
        Ok(())
    };
    claim(cfg.ged_gsi, "the GED")?;
    for d in &cfg.virtio_mmio {
        claim(d.gsi, "a virtio-mmio device")?;
    }
    for (i, a) in cfg.virtio_mmio.iter().enumerate() {
        let end = a.base.checked_add(a.size);
        let overlaps = cfg.virtio_mmio[..i].iter().any(|b| {
            a.base < b.base.saturating_add(b.size) && b.base < a.base.saturating_add(a.size)
        });
        if a.size == 0 || end.is_none() || overlaps {
            return Err(Error::BadWindow {
                base: a.base,
                size: a.size,
            });
        }
    }
    Ok(())
}

fn build_dsdt(cfg: &AcpiConfig) -> Result<Vec<u8>> {
    let mut sb_children: Vec<Encoded> = Vec::new();
    if cfg.serial {
        sb_children.push(encode(&Device::new(
            Path::new("COM1"),
            vec![
                &Name::new(Path::new("_HID"), &EISAName::new("PNP0501")),
                &Name::new(Path::new("_UID"), &aml::ZERO),
                &Name::new(
                    Path::new("_CRS"),
                    &ResourceTemplate::new(vec![
                        &IO::new(0x3f8, 0x3f8, 0, 8),
                        &Interrupt::new(true, true, false, false, 4),
                    ]),
                ),
            ],
        )));
    }
    sb_children.push(encode(&Device::new(
        Path::new("PWRB"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0C0C")),
            &Name::new(Path::new("_UID"), &aml::ZERO),
        ],
    )));
    let ged_gsi = cfg.ged_gsi;
    sb_children.push(encode(&Device::new(
        Path::new("GED0"),
        vec![
            &Name::new(Path::new("_HID"), &"ACPI0013"),
            &Name::new(Path::new("_UID"), &aml::ZERO),
            &Name::new(
                Path::new("_CRS"),
                &ResourceTemplate::new(vec![&Interrupt::new(true, true, false, false, ged_gsi)]),
            ),
            &Method::new(
                Path::new("_EVT"),
                1,
                false,
                vec![&If::new(
                    &Equal::new(&aml::Arg(0), &ged_gsi),
                    vec![&Notify::new(&Path::new("\\_SB_.PWRB"), &0x80u8)],
                )],
            ),
        ],
    )));
    for (i, d) in cfg.virtio_mmio.iter().enumerate() {
        let (Ok(base), Ok(size)) = (u32::try_from(d.base), u32::try_from(d.size)) else {
            return Err(Error::DeviceAbove4G {
                base: d.base,
                size: d.size,
            });
        };
        if u64::from(base) + u64::from(size) > 1 << 32 {
            return Err(Error::DeviceAbove4G {
                base: d.base,
                size: d.size,
            });
        }
        // Names V000..V999 (four characters each, as AML requires; `validate` caps the count).
        let name = format!("V{i:03}");
        sb_children.push(encode(&Device::new(
            Path::new(&name),
            vec![
                &Name::new(Path::new("_HID"), &"LNRO0005"),
                &Name::new(Path::new("_UID"), &(i as u32)),
                &Name::new(
                    Path::new("_CRS"),
                    &ResourceTemplate::new(vec![
                        &Memory32Fixed::new(true, base, size),
                        &Interrupt::new(true, true, false, false, d.gsi),
                    ]),
                ),
            ],
        )));
    }
    let sb_refs: Vec<&dyn Aml> = sb_children.iter().map(|b| b as &dyn Aml).collect();
    let mut body = Vec::new();
    Scope::new(Path::new("\\_SB_"), sb_refs).to_aml_bytes(&mut body);
    // \_S5_: SLP_TYPa, SLP_TYPb, reserved, reserved.
    Name::new(
        Path::new("_S5_"),
        &Package::new(vec![&SLP_TYP_S5, &SLP_TYP_S5, &aml::ZERO, &aml::ZERO]),
    )
    .to_aml_bytes(&mut body);
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.append_slice(&body);
    Ok(t.as_slice().to_vec())
}

/// Builds every table for `cfg` (not yet placed: see [`AcpiTables::place`] or [`write`]).
pub fn build(cfg: &AcpiConfig) -> Result<AcpiTables> {
    if cfg.cpus == 0 || cfg.cpus > MAX_CPUS {
        return Err(Error::TooManyCpus(cfg.cpus));
    }
    validate(cfg)?;
    let mut tables = AcpiTables {
        dsdt: build_dsdt(cfg)?,
        fadt: build_fadt(),
        madt: build_madt(cfg.cpus),
        xsdt: Vec::new(),
        rsdp: Vec::new(),
        addresses: Vec::new(),
    };
    tables.place()?;
    Ok(tables)
}

impl AcpiTables {
    /// Assigns addresses from [`ACPI_START`] (RSDP, XSDT, FADT, MADT, DSDT, each 16-byte
    /// aligned), then fills the pointers (RSDP → XSDT → FADT/MADT, FADT → DSDT) and
    /// checksums.
    fn place(&mut self) -> Result<()> {
        const XSDT_ENTRIES: usize = 2;
        let rsdp_len = Rsdp::len() as u64;
        let xsdt_len = 36 + 8 * XSDT_ENTRIES as u64;
        let xsdt_addr = align(RSDP_ADDR + rsdp_len, 16);
        let fadt_addr = align(xsdt_addr + xsdt_len, 16);
        let madt_addr = align(fadt_addr + self.fadt.len() as u64, 16);
        let dsdt_addr = align(madt_addr + self.madt.len() as u64, 16);
        let end = dsdt_addr + self.dsdt.len() as u64;
        if end > ACPI_END {
            return Err(Error::TooLarge {
                needed: end - ACPI_START,
                available: ACPI_END - ACPI_START,
            });
        }
        self.fadt[fadt::X_DSDT..fadt::X_DSDT + 8].copy_from_slice(&dsdt_addr.to_le_bytes());
        set_sdt_checksum(&mut self.fadt);
        let mut xsdt = Sdt::new(*b"XSDT", 36, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        let mut entries = Vec::with_capacity(16);
        entries.extend_from_slice(&fadt_addr.to_le_bytes());
        entries.extend_from_slice(&madt_addr.to_le_bytes());
        xsdt.append_slice(&entries);
        self.xsdt = xsdt.as_slice().to_vec();
        let mut rsdp = Vec::new();
        Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
        self.rsdp = rsdp;
        self.addresses = vec![
            ("RSDP", RSDP_ADDR),
            ("XSDT", xsdt_addr),
            ("FACP", fadt_addr),
            ("APIC", madt_addr),
            ("DSDT", dsdt_addr),
        ];
        Ok(())
    }

    /// The tables with their addresses, in placement order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64, &[u8])> {
        let bytes: [&[u8]; 5] = [&self.rsdp, &self.xsdt, &self.fadt, &self.madt, &self.dsdt];
        self.addresses
            .iter()
            .zip(bytes)
            .map(|(&(sig, addr), b)| (sig, addr, b))
    }

    /// Writes the SDTs as `<SIGNATURE>.aml` (`DSDT.aml`, `FACP.aml`, `APIC.aml`,
    /// `XSDT.aml`) and the RSDP as `RSDP.bin` into `dir`, for `iasl -d`.
    pub fn dump(&self, dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
        std::fs::create_dir_all(dir)?;
        let mut written = Vec::new();
        for (sig, _, bytes) in self.iter() {
            let name = if sig == "RSDP" {
                "RSDP.bin".to_string()
            } else {
                format!("{sig}.aml")
            };
            let p = dir.join(name);
            std::fs::write(&p, bytes)?;
            written.push(p);
        }
        Ok(written)
    }
}

/// Builds the tables for `cfg` and writes them to guest memory; returns the RSDP address
/// for `boot_params.acpi_rsdp_addr` / `hvm_start_info.rsdp_paddr`.
pub fn write<M: GuestMemory>(mem: &M, cfg: &AcpiConfig) -> Result<GuestAddress> {
    let tables = build(cfg)?;
    for (sig, addr, bytes) in tables.iter() {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| Error::GuestWrite {
                table: sig,
                addr,
                source,
            })?;
    }
    Ok(GuestAddress(RSDP_ADDR))
}

#[cfg(test)]
mod tests;
