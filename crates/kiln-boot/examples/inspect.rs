//! Loads a kernel (and optional initrd) into a scratch guest memory and prints where
//! everything went and what the vCPU registers would be.
//!
//! `cargo run -p kiln-boot --example inspect -- KERNEL [INITRD] [linux|pvh|auto] [MEMORY_MIB]`

use std::fs::File;
use std::process::ExitCode;

use kiln_boot::{gdt, load, BootConfig, Protocol};
use kiln_memory::{create_guest_memory, Backing, MemoryConfig};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(kernel_path) = args.first() else {
        eprintln!("usage: inspect KERNEL [INITRD|-] [linux|pvh|auto] [MEMORY_MIB]");
        return ExitCode::from(2);
    };
    let protocol = match args.get(2).map(String::as_str) {
        None | Some("auto") => Protocol::Auto,
        Some("linux") => Protocol::Linux,
        Some("pvh") => Protocol::Pvh,
        Some(other) => {
            eprintln!("unknown protocol {other:?}");
            return ExitCode::from(2);
        }
    };
    let mib: u64 = match args.get(3).map(|s| s.parse()) {
        None => 256,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("MEMORY_MIB: {e}");
            return ExitCode::from(2);
        }
    };
    match run(
        kernel_path,
        args.get(1).filter(|p| *p != "-"),
        protocol,
        mib,
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    kernel: &str,
    initrd: Option<&String>,
    protocol: Protocol,
    mib: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let mem = create_guest_memory(&MemoryConfig {
        size: mib << 20,
        backing: Backing::Anonymous,
    })?;
    let cfg = BootConfig {
        kernel: File::open(kernel)?,
        initrd: initrd.map(File::open).transpose()?,
        cmdline: "console=ttyS0".to_string(),
        protocol,
        acpi_rsdp: None,
    };
    let entry = load(&mem, cfg)?;
    println!("protocol   {:?}", entry.protocol);
    println!("entry      {:#x}", entry.entry.0);
    println!("boot info  {:#x}", entry.boot_info.0);
    println!("stack      {:#x}", entry.stack.0);
    println!("CR3        {:?}", entry.page_tables.map(|a| a.0));
    let cs = entry.gdt.segment(gdt::CODE_SELECTOR).unwrap_or_default();
    println!("CS         l={} db={} limit={:#x}", cs.l, cs.db, cs.limit);
    for (name, addr, len) in entry.regions() {
        println!("{:>14}  [{:#010x}, {:#010x})", name, addr.0, addr.0 + len);
    }
    Ok(())
}
