//! Writes the tables for N vCPUs to a directory: `cargo run -p kiln-acpi --example dump --
//! DIR [CPUS]`, then `iasl -d DIR/*.aml`.

use kiln_acpi::{AcpiConfig, VirtioMmioDevice};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().ok_or("usage: dump DIR [CPUS]")?;
    let cpus = args.next().map(|c| c.parse()).transpose()?.unwrap_or(2);
    let cfg = AcpiConfig {
        cpus,
        serial: true,
        ged_gsi: 23,
        virtio_mmio: vec![VirtioMmioDevice {
            base: 0xd000_0000,
            size: 0x1000,
            gsi: 16,
        }],
    };
    let tables = kiln_acpi::build(&cfg)?;
    for p in tables.dump(std::path::Path::new(&dir))? {
        println!("{}", p.display());
    }
    Ok(())
}
