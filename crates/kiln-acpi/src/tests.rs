use super::*;

fn cfg(cpus: u32) -> AcpiConfig {
    AcpiConfig {
        cpus,
        serial: true,
        ged_gsi: 23,
        virtio_mmio: vec![
            VirtioMmioDevice {
                base: 0xd000_0000,
                size: 0x1000,
                gsi: 16,
            },
            VirtioMmioDevice {
                base: 0xd000_1000,
                size: 0x1000,
                gsi: 17,
            },
        ],
    }
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from(u32_at(b, o)) | (u64::from(u32_at(b, o + 4)) << 32)
}
fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

fn assert_sdt(t: &[u8], sig: &[u8; 4], revision: u8) {
    assert_eq!(&t[0..4], sig);
    assert_eq!(u32_at(t, 4) as usize, t.len(), "{:?} length", sig);
    assert_eq!(t[8], revision);
    assert_eq!(sum(t), 0, "{:?} checksum", sig);
    assert_eq!(&t[10..16], &OEM_ID);
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The compressed EISA ID encoding AML uses for `EisaId("PNP0501")` and friends.
fn eisa(id: &str) -> [u8; 4] {
    let b = id.as_bytes();
    let c = |x: u8| u32::from(x - 0x40) & 0x1f;
    let h = |x: u8| (x as char).to_digit(16).unwrap_or(0);
    let v = (c(b[0]) << 26)
        | (c(b[1]) << 21)
        | (c(b[2]) << 16)
        | (h(b[3]) << 12)
        | (h(b[4]) << 8)
        | (h(b[5]) << 4)
        | h(b[6]);
    v.swap_bytes().to_le_bytes()
}

#[test]
fn rsdp_checksums_and_points_at_the_xsdt() {
    let t = build(&cfg(1)).unwrap();
    let r = &t.rsdp;
    assert_eq!(r.len(), 36);
    assert_eq!(&r[0..8], b"RSD PTR ");
    assert_eq!(sum(&r[..20]), 0, "ACPI 1.0 checksum");
    assert_eq!(sum(r), 0, "extended checksum");
    assert_eq!(r[15], 2, "revision 2 (ACPI 2.0+)");
    assert_eq!(u32_at(r, 20), 36);
    assert_eq!(u64_at(r, 24), t.addresses[1].1);
    assert_eq!(RSDP_ADDR % 16, 0);
    assert!((0xe0000..0x100000).contains(&RSDP_ADDR));
}

#[test]
fn xsdt_lists_fadt_and_madt() {
    let t = build(&cfg(2)).unwrap();
    assert_sdt(&t.xsdt, b"XSDT", 1);
    assert_eq!(t.xsdt.len(), 36 + 16);
    assert_eq!(u64_at(&t.xsdt, 36), t.addresses[2].1);
    assert_eq!(u64_at(&t.xsdt, 44), t.addresses[3].1);
}

#[test]
fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
    let t = build(&cfg(1)).unwrap();
    let f = &t.fadt;
    assert_sdt(f, b"FACP", 6);
    assert_eq!(f.len(), 276);
    let flags = u32_at(f, fadt::FLAGS);
    assert_ne!(flags & fadt::FLAG_HW_REDUCED_ACPI, 0);
    assert_ne!(flags & fadt::FLAG_RESET_REG_SUP, 0);
    // GAS: SystemIO, 8 bits, byte access, port.
    let gas = |o: usize| (f[o], f[o + 1], f[o + 3], u64_at(f, o + 4));
    assert_eq!(gas(fadt::RESET_REG), (1, 8, 1, 0x602));
    assert_eq!(f[fadt::RESET_VALUE], 1);
    assert_eq!(gas(fadt::SLEEP_CONTROL_REG), (1, 8, 1, 0x600));
    assert_eq!(gas(fadt::SLEEP_STATUS_REG), (1, 8, 1, 0x601));
    assert_eq!(u64_at(f, fadt::X_DSDT), t.addresses[4].1);
    assert_eq!(u32_at(f, 40), 0, "32-bit DSDT pointer unused");
    assert_eq!(
        &f[fadt::HYPERVISOR_VENDOR..fadt::HYPERVISOR_VENDOR + 4],
        b"KILN"
    );
}

#[test]
fn madt_has_one_enabled_lapic_per_cpu_ioapic_override_and_nmi() {
    for cpus in [1u32, 2, 8, 255] {
        let t = build(&cfg(cpus)).unwrap();
        let m = &t.madt;
        assert_sdt(m, b"APIC", 5);
        assert_eq!(u32_at(m, 36), 0xfee0_0000);
        assert_eq!(u32_at(m, 40) & 1, 1, "PCAT_COMPAT");
        let mut off = 44;
        let (mut lapics, mut ioapics, mut isos, mut nmis) = (vec![], 0, 0, 0);
        while off < m.len() {
            let (kind, len) = (m[off], m[off + 1] as usize);
            assert!(len >= 2 && off + len <= m.len());
            match kind {
                0 => {
                    assert_eq!(m[off + 2], m[off + 3], "UID == APIC ID");
                    assert_eq!(u32_at(m, off + 4) & 1, 1, "enabled");
                    lapics.push(u32::from(m[off + 3]));
                }
                1 => {
                    assert_eq!(u32_at(m, off + 4), 0xfec0_0000);
                    assert_eq!(u32_at(m, off + 8), 0);
                    ioapics += 1;
                }
                2 => {
                    assert_eq!((m[off + 3], u32_at(m, off + 4)), (0, 2), "IRQ0 -> GSI2");
                    isos += 1;
                }
                4 => {
                    assert_eq!((m[off + 2], u16_at(m, off + 3), m[off + 5]), (0xff, 0, 1));
                    nmis += 1;
                }
                other => panic!("unexpected MADT entry type {other}"),
            }
            off += len;
        }
        assert_eq!(lapics, (0..cpus).collect::<Vec<_>>());
        assert_eq!((ioapics, isos, nmis), (1, 1, 1));
    }
}

#[test]
fn dsdt_names_the_devices() {
    let t = build(&cfg(1)).unwrap();
    let d = &t.dsdt;
    assert_sdt(d, b"DSDT", 6);
    assert!(contains(d, &eisa("PNP0501")), "COM1");
    assert!(contains(d, &eisa("PNP0C0C")), "power button");
    assert!(contains(d, b"ACPI0013\0"), "GED");
    assert_eq!(d.windows(9).filter(|w| w == b"LNRO0005\0").count(), 2);
    assert!(contains(d, b"_S5_"));
    assert!(contains(d, b"_EVT"));
    // Memory32Fixed for the first virtio window: tag 0x86, len 9, RW, base, size.
    let mut m32 = vec![0x86, 9, 0, 1];
    m32.extend_from_slice(&0xd000_0000u32.to_le_bytes());
    m32.extend_from_slice(&0x1000u32.to_le_bytes());
    assert!(contains(d, &m32));
}

#[test]
fn serial_and_virtio_are_optional() {
    let mut c = cfg(1);
    c.serial = false;
    c.virtio_mmio.clear();
    let t = build(&c).unwrap();
    assert!(!contains(&t.dsdt, &eisa("PNP0501")));
    assert!(!contains(&t.dsdt, b"LNRO0005"));
}

#[test]
fn bad_configs_are_rejected() {
    assert!(matches!(build(&cfg(0)), Err(Error::TooManyCpus(0))));
    assert!(matches!(build(&cfg(256)), Err(Error::TooManyCpus(256))));
    let mut c = cfg(1);
    c.virtio_mmio[0].base = 0x1_0000_0000;
    assert!(matches!(build(&c), Err(Error::DeviceAbove4G { .. })));
    let mut c = cfg(1);
    c.virtio_mmio = (0..1001)
        .map(|i| VirtioMmioDevice {
            base: 0xd000_0000 + i * 0x1000,
            size: 0x1000,
            gsi: 16,
        })
        .collect();
    assert!(matches!(build(&c), Err(Error::TooManyDevices(1001))));
    let mut c = cfg(1);
    c.virtio_mmio[1].gsi = 16;
    assert!(matches!(build(&c), Err(Error::BadGsi { gsi: 16, .. })));
    let mut c = cfg(1);
    c.ged_gsi = 4; // COM1's
    assert!(matches!(build(&c), Err(Error::BadGsi { gsi: 4, .. })));
    let mut c = cfg(1);
    c.virtio_mmio[0].gsi = 24;
    assert!(matches!(build(&c), Err(Error::BadGsi { gsi: 24, .. })));
    let mut c = cfg(1);
    c.virtio_mmio[1].base = 0xd000_0800;
    assert!(matches!(build(&c), Err(Error::BadWindow { .. })));
    let mut c = cfg(1);
    c.virtio_mmio[0].size = 0;
    assert!(matches!(build(&c), Err(Error::BadWindow { .. })));
}

#[test]
fn tables_are_placed_in_order_without_overlap_inside_the_bios_area() {
    let t = build(&cfg(255)).unwrap();
    let mut end = ACPI_START;
    for (_, addr, bytes) in t.iter() {
        assert!(addr >= end, "overlap");
        assert_eq!(addr % 16, 0);
        end = addr + bytes.len() as u64;
    }
    assert!(end <= ACPI_END);
}

#[test]
fn write_puts_the_tables_in_guest_memory() {
    let mem =
        vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let rsdp = write(&mem, &cfg(4)).unwrap();
    assert_eq!(rsdp.0, RSDP_ADDR);
    let mut sig = [0u8; 8];
    mem.read_slice(&mut sig, rsdp).unwrap();
    assert_eq!(&sig, b"RSD PTR ");
    let t = build(&cfg(4)).unwrap();
    for (_, addr, bytes) in t.iter() {
        let mut got = vec![0u8; bytes.len()];
        mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
        assert_eq!(got, bytes);
    }
    // Too little memory: an error, not a panic.
    let small =
        vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    assert!(matches!(
        write(&small, &cfg(1)),
        Err(Error::GuestWrite { .. })
    ));
}

#[test]
fn registers_match_contract() {
    let doc = include_str!("../../../docs/guest-contract.md");
    assert!(doc.contains("PIO 0x600 (sleep control"));
    assert!(doc.contains("0x601 (sleep status)"));
    assert!(doc.contains("0x602 (reset register)"));
    assert!(doc.contains("write 0x01 to 0x602"));
    assert!(doc.contains("SLP_TYP (bits 2..4) = 5"));
    assert_eq!(
        (
            SLEEP_CONTROL_PORT,
            SLEEP_STATUS_PORT,
            RESET_PORT,
            RESET_VALUE,
            SLP_TYP_S5
        ),
        (0x600, 0x601, 0x602, 1, 5)
    );
}

/// Decompiles every table with `iasl -d` and fails on any error. Needs acpica-tools (CI
/// installs it); without iasl the test fails unless KILN_SKIP_IASL=1.
#[test]
fn iasl_decompiles_every_table() {
    if std::env::var_os("KILN_SKIP_IASL").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED iasl_decompiles_every_table: KILN_SKIP_IASL=1");
        return;
    }
    let dir = std::env::temp_dir().join(format!("kiln-acpi-iasl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let t = build(&cfg(4)).unwrap();
    let files = t.dump(&dir).unwrap();
    for f in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "aml"))
    {
        let out = match std::process::Command::new("iasl").arg("-d").arg(f).output() {
            Ok(o) => o,
            Err(e) => {
                panic!("iasl not runnable ({e}): apt-get install acpica-tools, or KILN_SKIP_IASL=1")
            }
        };
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "iasl -d {}: {text}", f.display());
        assert!(
            !text
                .lines()
                .any(|l| l.contains("Error") && !l.contains(" 0 Errors")),
            "iasl -d {}: {text}",
            f.display()
        );
        let dsl = f.with_extension("dsl");
        let decompiled = std::fs::read_to_string(&dsl).unwrap_or_default();
        assert!(!decompiled.is_empty(), "no {}", dsl.display());
        if f.file_stem().is_some_and(|s| s == "DSDT") {
            for want in ["PNP0501", "PNP0C0C", "ACPI0013", "LNRO0005", "_S5_", "_EVT"] {
                assert!(
                    decompiled.contains(want),
                    "DSDT.dsl lacks {want}:\n{decompiled}"
                );
            }
        }
        if f.file_stem().is_some_and(|s| s == "FACP") {
            assert!(
                decompiled.contains("Hardware Reduced (V5) : 1"),
                "{decompiled}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
