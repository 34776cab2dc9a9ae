//! A stock Debian kernel reads kiln's boot structures: e820 (from boot_params, and from the
//! PVH memory map), ACPI (RSDP, XSDT, FADT, DSDT, MADT with 4 CPUs and the IOAPIC), through
//! PVH and the Linux 64-bit protocol.
//!
//! On a host whose KVM can't run Linux to user space (this project's nested `kvm-pvm`
//! emulates guest ring 0 instruction by instruction: the kernel takes tens of seconds to get
//! through early boot, then dies on an instruction the host can't emulate, and kiln exits 4)
//! the test checks the early log and prints why it could not check user space, quoting the
//! last kernel line and kiln's crash report. Where the kernel runs at hardware speed it must
//! also reach the initramfs's marker.
//!
//! Artifacts come from `cargo xtask linux-guest` (apt-get download; the test runs it when
//! they are missing). `KILN_SKIP_LINUX=1` skips the test with a printed reason if they
//! can't be had; without it, a failed download fails the test.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

const INIT_MARKER: &str = "KILN-LINUX-INIT-OK";
/// One boot's bound. Under kvm-pvm the MADT lines come ~15 s in and the kernel dies ~50 s
/// in; on hardware-speed KVM the whole boot to power-off takes a second or two.
const BOOT_LIMIT: Duration = Duration::from_secs(100);
const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 loglevel=8 ignore_loglevel";

fn artifacts() -> Option<(PathBuf, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = root.join("target/linux-guest");
    let (vmlinux, initrd) = (dir.join("vmlinux"), dir.join("initramfs.cpio.gz"));
    if vmlinux.exists() && initrd.exists() {
        return Some((vmlinux, initrd));
    }
    let out = Command::new(env!("CARGO"))
        .args(["xtask", "linux-guest"])
        .current_dir(&root)
        .output();
    let why = match out {
        Ok(o) if o.status.success() && vmlinux.exists() && initrd.exists() => {
            return Some((vmlinux, initrd))
        }
        Ok(o) => format!(
            "cargo xtask linux-guest failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("running cargo xtask linux-guest: {e}"),
    };
    if std::env::var_os("KILN_SKIP_LINUX").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED linux_early_boot: no Debian kernel: {why}");
        return None;
    }
    panic!(
        "{why}\n(set KILN_SKIP_LINUX=1 to skip this test when the Debian archive is out of reach)"
    );
}

/// What one boot printed and how it ended.
struct Boot {
    protocol: &'static str,
    lines: Vec<String>,
    stderr: String,
    /// None: still running at the bound (then killed).
    status: Option<ExitStatus>,
    wall: Duration,
}

impl Boot {
    fn has(&self, needle: &str) -> bool {
        self.lines.iter().any(|l| l.contains(needle))
    }

    fn reached_init(&self) -> bool {
        self.has(INIT_MARKER)
    }

    fn context(&self) -> String {
        format!(
            "--boot-protocol {}: kiln {} after {:.1?}\n--- serial ---\n{}\n--- kiln stderr ---\n{}",
            self.protocol,
            self.status
                .map_or("still running at the bound (killed)".into(), |s| s
                    .to_string()),
            self.wall,
            self.lines.join("\n"),
            self.stderr
        )
    }

    /// A host that runs Linux at hardware speed sizes SMP within a fraction of a second of
    /// kernel time; under instruction emulation it takes several (the kernel's clock keeps
    /// real time while the emulated code crawls).
    fn fast_host(&self) -> bool {
        self.lines
            .iter()
            .find(|l| l.contains("smpboot: Allowing"))
            .and_then(|l| l.strip_prefix('['))
            .and_then(|l| l.split(']').next())
            .and_then(|t| t.trim().parse::<f64>().ok())
            .is_some_and(|t| t < 1.0)
    }
}

/// Boots `vmlinux` and reads COM1 until kiln exits or `BOOT_LIMIT` passes.
fn boot(vmlinux: &Path, initrd: &Path, protocol: &'static str) -> Boot {
    let start = Instant::now();
    let mut child = kiln()
        .arg("--kernel")
        .arg(vmlinux)
        .arg("--initrd")
        .arg(initrd)
        .args(["--boot-protocol", protocol])
        .args(["--cpus", "4", "--memory", "512M", "--cmdline", CMDLINE])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let l = String::from_utf8_lossy(&l)
                .trim_end_matches('\r')
                .to_string();
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = start + BOOT_LIMIT;
    let mut lines = Vec::new();
    // Ends when kiln exits (COM1's stdout closes) or at the bound.
    let closed = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) => lines.push(l),
            Err(mpsc::RecvTimeoutError::Disconnected) => break true,
            Err(mpsc::RecvTimeoutError::Timeout) => break false,
        }
    };
    // An exiting kiln still joins its vCPU threads after closing stdout; give it a few
    // seconds to report its status before stopping it.
    let reap_by = Instant::now() + Duration::from_secs(if closed { 10 } else { 0 });
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < reap_by => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    Boot {
        protocol,
        lines,
        stderr: err.join().unwrap_or_default(),
        status,
        wall: start.elapsed(),
    }
}

/// The lines a stock kernel must print from kiln's tables (docs/guest-contract.md: 512 MiB
/// RAM, 4 vCPUs).
const REQUIRED: &[&str] = &[
    // e820: [0, 0x9fc00) RAM, [0x9fc00, 1 MiB) reserved, [1 MiB, 512 MiB) RAM.
    "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
    "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
    "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
    // ACPI: the RSDP at 0xE0000 and every table it leads to, with kiln's OEM id.
    "ACPI: RSDP 0x00000000000E0000 000024 (v02 KILN  )",
    "ACPI: XSDT 0x00000000000E0030",
    "ACPI: FACP 0x00000000000E0070",
    "ACPI: DSDT ",
    "ACPI: APIC ",
    // MADT: used for SMP, 4 CPUs, IOAPIC 0 at 0xFEC00000, IRQ0 → GSI 2, LINT1 NMI.
    "ACPI: Using ACPI (MADT) for SMP configuration information",
    "smpboot: Allowing 4 CPUs, 0 hotplug CPUs",
    "IOAPIC[0]: apic_id 0, version 17, address 0xfec00000, GSI 0-23",
    "ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2 dfl dfl)",
    "ACPI: LAPIC_NMI (acpi_id[0xff] dfl dfl lint[0x1])",
];

/// What the kernel says about firmware it doesn't like.
const FORBIDDEN: &[&str] = &[
    "ACPI Error",
    "ACPI BIOS Error",
    "ACPI Warning",
    "ACPI BIOS Warning",
    "Firmware Bug",
];

fn check(b: &Boot) {
    let ctx = b.context();
    for want in REQUIRED {
        assert!(b.has(want), "kernel never printed {want:?}\n{ctx}");
    }
    for table in ["XSDT", "FACP", "DSDT", "APIC"] {
        assert!(
            b.lines
                .iter()
                .any(|l| l.contains(&format!("ACPI: {table} ")) && l.contains("KILN   KILNVMM")),
            "{table} without kiln's OEM id\n{ctx}"
        );
    }
    for bad in FORBIDDEN {
        let hit = b.lines.iter().find(|l| l.contains(bad));
        assert!(hit.is_none(), "kernel complained: {hit:?}\n{ctx}");
    }
    if b.reached_init() {
        assert!(
            b.status.is_some_and(|s| s.code() == Some(0)),
            "user space ran `poweroff -f` but kiln did not exit 0\n{ctx}"
        );
        eprintln!(
            "{}: Linux reached user space ({INIT_MARKER}) and powered off in {:.1?}",
            b.protocol, b.wall
        );
        return;
    }
    assert!(
        !b.fast_host(),
        "this host runs Linux at speed, so it must reach {INIT_MARKER}\n{ctx}"
    );
    let crash = b.stderr.trim();
    eprintln!(
        "{}: early boot checked in {:.1?}, but this host could not run Linux past early boot \
         (its KVM emulates guest ring 0 instruction by instruction).\n  last kernel line: {:?}\n  \
         kiln: {}\n{}",
        b.protocol,
        b.wall,
        b.lines.last().map(String::as_str).unwrap_or(""),
        b.status
            .map_or("still running at the bound (killed)".into(), |s| s
                .to_string()),
        if crash.is_empty() {
            "(no crash report)"
        } else {
            crash
        },
    );
}

#[test]
fn linux_early_boot() {
    if skip_kvm("linux_early_boot") {
        return;
    }
    let Some((vmlinux, initrd)) = artifacts() else {
        return;
    };
    // Both boots at once: each keeps one host CPU busy, and the pair then fits well inside
    // the suite's time.
    let boots: Vec<Boot> = std::thread::scope(|s| {
        let handles: Vec<_> = ["pvh", "linux"]
            .map(|p| {
                let (k, i) = (&vmlinux, &initrd);
                s.spawn(move || boot(k, i, p))
            })
            .into_iter()
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("boot thread"))
            .collect()
    });
    for b in &boots {
        check(b);
    }
}
