//! A stock Debian kernel reads kiln's boot structures: e820, ACPI (RSDP, XSDT, FADT, DSDT,
//! MADT with 4 CPUs and the IOAPIC), through PVH and the Linux 64-bit protocol.
//!
//! On a host whose KVM can't run Linux to user space (this project's nested `kvm-pvm`
//! emulates guest ring 0 instruction by instruction; the kernel takes tens of seconds to
//! get through early boot and later dies on an unemulated instruction) the test checks the
//! early log and says, with the last kernel line, why it did not wait for user space. Where
//! the kernel does reach the initramfs, its marker is required too.
//!
//! Artifacts come from `cargo xtask linux-guest` (apt-get download; the test runs it when
//! they are missing). `KILN_SKIP_LINUX=1` skips the test with a printed reason if they
//! can't be had; without it, a failed download fails the test.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

const INIT_MARKER: &str = "KILN-LINUX-INIT-OK";
/// Long enough for the early log under kvm-pvm (the MADT lines come ~8 s of guest time in).
const EARLY_LIMIT: Duration = Duration::from_secs(120);

fn artifacts() -> Option<(PathBuf, PathBuf)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/linux-guest");
    let (vmlinux, initrd) = (dir.join("vmlinux"), dir.join("initramfs.cpio.gz"));
    if !vmlinux.exists() || !initrd.exists() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args(["xtask", "linux-guest"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .output()
            .expect("run cargo xtask linux-guest");
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr).into_owned();
            if std::env::var_os("KILN_SKIP_LINUX").is_some_and(|v| v == "1") {
                eprintln!("SKIPPED linux_early_boot: no Debian kernel ({why})");
                return None;
            }
            panic!("cargo xtask linux-guest failed (KILN_SKIP_LINUX=1 skips): {why}");
        }
    }
    Some((vmlinux, initrd))
}

/// What one boot printed, and whether user space was reached.
struct Boot {
    lines: Vec<String>,
    reached_init: bool,
    crash: String,
}

fn boot(vmlinux: &Path, initrd: &Path, protocol: &str) -> Boot {
    let mut child = kiln()
        .args(["--kernel", vmlinux.to_str().expect("path")])
        .args(["--initrd", initrd.to_str().expect("path")])
        .args([
            "--boot-protocol",
            protocol,
            "--cpus",
            "4",
            "--memory",
            "512M",
        ])
        .args([
            "--cmdline",
            "console=ttyS0 earlyprintk=ttyS0 loglevel=8 ignore_loglevel",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let deadline = Instant::now() + EARLY_LIMIT;
    let mut lines = Vec::new();
    let mut reached_init = false;
    while let Ok(l) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        reached_init |= l.contains(INIT_MARKER);
        // The MADT has been parsed once SMP is sized; stop here unless the kernel is fast
        // enough to reach user space (then wait for that).
        let sized = l.contains("smpboot: Allowing");
        lines.push(l);
        if reached_init || (sized && !fast_host(&lines)) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Boot {
        lines,
        reached_init,
        crash: err.join().unwrap_or_default(),
    }
}

/// A host that runs Linux at hardware speed prints its timestamps in real time; under
/// instruction emulation the kernel's clock races ahead of what it manages to do. Treat a
/// host as fast when SMP sizing happened within the first second of kernel time.
fn fast_host(lines: &[String]) -> bool {
    lines
        .iter()
        .find(|l| l.contains("smpboot: Allowing"))
        .and_then(|l| {
            l.trim_start_matches('[')
                .split(']')
                .next()
                .map(str::trim)
                .map(str::to_string)
        })
        .and_then(|t| t.parse::<f64>().ok())
        .is_some_and(|t| t < 1.0)
}

fn has(lines: &[String], needle: &str) -> bool {
    lines.iter().any(|l| l.contains(needle))
}

#[test]
fn linux_early_boot() {
    if skip_kvm("linux_early_boot") {
        return;
    }
    let Some((vmlinux, initrd)) = artifacts() else {
        return;
    };
    for protocol in ["pvh", "linux"] {
        let b = boot(&vmlinux, &initrd, protocol);
        let log = b.lines.join("\n");
        let ctx = format!(
            "--boot-protocol {protocol}\n{log}\nkiln stderr:\n{}",
            b.crash
        );
        for e820 in [
            "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
            "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
            "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
        ] {
            assert!(has(&b.lines, e820), "missing {e820:?}\n{ctx}");
        }
        for table in [
            "ACPI: RSDP",
            "ACPI: XSDT",
            "ACPI: FACP",
            "ACPI: DSDT",
            "ACPI: APIC",
        ] {
            assert!(has(&b.lines, table), "missing {table:?}\n{ctx}");
        }
        assert!(
            has(&b.lines, "smpboot: Allowing 4 CPUs"),
            "MADT CPUs\n{ctx}"
        );
        assert!(
            b.lines
                .iter()
                .any(|l| l.contains("IOAPIC[0]: apic_id 0") && l.contains("address 0xfec00000")),
            "MADT IOAPIC\n{ctx}"
        );
        for bad in ["ACPI Error", "ACPI BIOS Error", "Firmware Bug"] {
            assert!(!has(&b.lines, bad), "kernel complained: {bad:?}\n{ctx}");
        }
        if b.reached_init {
            eprintln!("{protocol}: Linux reached user space ({INIT_MARKER})");
        } else if fast_host(&b.lines) {
            panic!("a host that runs Linux at speed must reach {INIT_MARKER}\n{ctx}");
        } else {
            eprintln!(
                "{protocol}: early boot checked; this host's KVM emulates guest ring 0 and \
                 cannot run Linux to user space in bounded time (last kernel line: {:?})",
                b.lines.last().map(String::as_str).unwrap_or("")
            );
        }
    }
}
