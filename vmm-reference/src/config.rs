//! Command-line flags and their validation into a [`VmConfig`].
//!
//! Every error names the flag at fault, since that is what the user has to change.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// Errors in the user's configuration; each names the flag at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--memory` could not be parsed.
    #[error("--memory {value:?}: {why} (examples: 128, 512M, 2G)")]
    MemorySyntax {
        /// What the user gave.
        value: String,
        /// Why it is wrong.
        why: &'static str,
    },
    /// `--serial` could not be parsed.
    #[error("--serial {0:?}: expected stdio, null or file:PATH")]
    Serial(String),
}

/// How a guest kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BootProtocolArg {
    /// PVH if the ELF kernel has a PVH note, else the Linux 64-bit boot protocol.
    Auto,
    /// The Linux 64-bit boot protocol (boot_params).
    Linux,
    /// PVH (hvm_start_info); needs an ELF kernel with a PVH note.
    Pvh,
}

/// Where the guest's COM1 goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialArg {
    /// Output to stdout, input from stdin.
    Stdio,
    /// Output appended to a file, no input.
    File(PathBuf),
    /// Discarded.
    Null,
}

impl std::str::FromStr for SerialArg {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "stdio" => Ok(SerialArg::Stdio),
            "null" => Ok(SerialArg::Null),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(SerialArg::File(PathBuf::from(p))),
                _ => Err(ConfigError::Serial(s.to_string())),
            },
        }
    }
}

/// kiln: boot a guest on KVM.
///
/// With no --kernel, kiln boots its bundled conformance guest, which checks the virtual
/// machine and prints `KTEST <scenario> PASS|FAIL` lines on the serial console.
///
/// Exit status: 0 guest powered off; 1 error (message names the flag or resource);
/// 2 bad command line; 3 guest requested a reset; 4 guest crashed (triple fault, KVM internal
/// error; vCPU registers printed); 128+N stopped by signal N.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, long_about)]
pub struct Cli {
    /// Guest kernel: ELF vmlinux (PVH note optional) or bzImage. Default: the bundled
    /// conformance guest.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk loaded for the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line. Default for the bundled guest: `console=ttyS0 kiln.test=all`
    /// (kiln appends kiln.mem and kiln.cpus for it).
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cpus: u32,
    /// Guest memory: MiB, or with a K, M or G suffix.
    #[arg(long, default_value = "128M", value_name = "SIZE")]
    pub memory: String,
    /// Serial console: stdio, null or file:PATH.
    #[arg(long, default_value = "stdio", value_name = "WHERE")]
    pub serial: SerialArg,
    /// Boot protocol.
    #[arg(long, value_enum, default_value_t = BootProtocolArg::Auto)]
    pub boot_protocol: BootProtocolArg,
    /// On SIGTERM, press the ACPI power button and wait this many seconds for the guest to
    /// power off before stopping it (0: stop at once). SIGINT always stops at once.
    #[arg(long, default_value_t = 3.0, value_name = "SECS", value_parser = parse_timeout)]
    pub shutdown_timeout: f64,
    /// Write the ACPI tables this VM would get (DSDT.aml, FACP.aml, APIC.aml, XSDT.aml,
    /// RSDP.bin) into DIR for `iasl -d`, then exit without starting a VM.
    #[arg(long, value_name = "DIR")]
    pub dump_acpi: Option<PathBuf>,
}

fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=3600.0).contains(&v) => Ok(v),
        _ => Err("expected seconds between 0 and 3600".to_string()),
    }
}

/// The default command line for the bundled guest.
pub const BUNDLED_GUEST_CMDLINE: &str = "console=ttyS0 kiln.test=all";

/// Parses a `--memory` value into bytes: a plain number is MiB; K, M, G (or KiB, MiB, GiB)
/// suffixes are binary multiples. The result must be a whole number of 4 KiB pages.
pub fn parse_memory(value: &str) -> Result<u64, ConfigError> {
    let err = |why| ConfigError::MemorySyntax {
        value: value.to_string(),
        why,
    };
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, suffix) = v.split_at(split);
    if digits.is_empty() {
        return Err(err("expected a number"));
    }
    let n: u64 = digits.parse().map_err(|_| err("number too large"))?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => 20,
        "K" | "KB" | "KIB" => 10,
        "G" | "GB" | "GIB" => 30,
        _ => return Err(err("unknown unit")),
    };
    let bytes = n
        .checked_shl(shift)
        .filter(|b| b >> shift == n)
        .ok_or(err("too large"))?;
    if bytes == 0 {
        return Err(err("must be more than zero"));
    }
    if bytes % 4096 != 0 {
        return Err(err("must be a multiple of 4 KiB"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_units() {
        assert_eq!(parse_memory("128").unwrap(), 128 << 20);
        assert_eq!(parse_memory("128M").unwrap(), 128 << 20);
        assert_eq!(parse_memory("2G").unwrap(), 2 << 30);
        assert_eq!(parse_memory("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_memory("65536K").unwrap(), 64 << 20);
        assert_eq!(parse_memory("64m").unwrap(), 64 << 20);
    }

    #[test]
    fn memory_errors_name_the_flag() {
        for bad in [
            "",
            "M",
            "0",
            "12X",
            "1K1",
            "3K",
            "99999999999999999999G",
            "18446744073709551615G",
        ] {
            let e = parse_memory(bad).expect_err(bad).to_string();
            assert!(e.starts_with("--memory"), "{bad}: {e}");
        }
    }

    #[test]
    fn serial_values() {
        assert_eq!("stdio".parse::<SerialArg>().unwrap(), SerialArg::Stdio);
        assert_eq!("null".parse::<SerialArg>().unwrap(), SerialArg::Null);
        assert_eq!(
            "file:/tmp/x".parse::<SerialArg>().unwrap(),
            SerialArg::File("/tmp/x".into())
        );
        for bad in ["file:", "tty", ""] {
            assert!(bad
                .parse::<SerialArg>()
                .unwrap_err()
                .to_string()
                .starts_with("--serial"));
        }
    }
}
