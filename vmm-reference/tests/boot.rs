//! Boots the conformance guest through every boot path, vCPU count and memory size, and
//! fails on any missing or failing `KTEST` line.

mod common;

use common::*;
use std::time::Duration;

/// The three boot paths: (name, which image, --boot-protocol).
const PATHS: [(&str, bool, &str); 3] = [
    ("elf-linux64", false, "linux"),
    ("elf-pvh", false, "pvh"),
    ("bzimage", true, "auto"),
];

fn boot_matrix(name: &str, cpus: &[u32], memories: &[&str]) {
    // Tests run in parallel: each matrix gets its own files.
    let dir = scratch(name);
    let (elf, bz) = guest_files(&dir);
    let initrd: Vec<u8> = (0..100_003u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let initrd_path = dir.join("initrd.img");
    std::fs::write(&initrd_path, &initrd).expect("write initrd");
    for (name, use_bz, protocol) in PATHS {
        for &cpus in cpus {
            for &memory in memories {
                let bytes = kiln::config::parse_memory(memory).expect("memory");
                let cmdline = format!(
                    "console=ttyS0 kiln.test=all kiln.layout=kiln kiln.mem={bytes} kiln.cpus={cpus} kiln.marker={MARKER} kiln.initrd_size={} kiln.initrd_sum={:016x} kiln.exits=200",
                    initrd.len(),
                    fnv1a64(&initrd)
                );
                let kernel = if use_bz { &bz } else { &elf };
                let cpus_s = cpus.to_string();
                let r = run(&[
                    "--kernel",
                    kernel.to_str().expect("path"),
                    "--initrd",
                    initrd_path.to_str().expect("path"),
                    "--boot-protocol",
                    protocol,
                    "--cpus",
                    &cpus_s,
                    "--memory",
                    memory,
                    "--cmdline",
                    &cmdline,
                ]);
                eprintln!("{name} cpus={cpus} memory={memory}: exit {:?}", r.code);
                r.assert_passed(&["boot", "cpuid", "exits", "acpi", "smp", "clock"]);
            }
        }
    }
}

#[test]
fn boots_every_path_with_one_and_two_vcpus() {
    if skip_kvm("boots_every_path_with_one_and_two_vcpus") {
        return;
    }
    boot_matrix("matrix-small", &[1, 2], &["128M", "1G"]);
}

#[test]
fn boots_with_memory_above_the_mmio_hole() {
    if skip_kvm("boots_with_memory_above_the_mmio_hole") {
        return;
    }
    // 3 GiB fills low RAM exactly; 5 GiB puts 2 GiB above 4 GiB.
    boot_matrix("matrix-large", &[1], &["3G", "5G", "33M"]);
}

#[test]
fn default_run_boots_the_bundled_guest() {
    if skip_kvm("default_run_boots_the_bundled_guest") {
        return;
    }
    let r = run(&[]);
    r.assert_passed(&["boot", "cpuid", "exits", "acpi", "smp", "clock"]);
}

#[test]
fn serial_input_reaches_the_guest() {
    if skip_kvm("serial_input_reaches_the_guest") {
        return;
    }
    let mut cmd = kiln();
    cmd.args(["--cmdline", "console=ttyS0 kiln.test=serial"]);
    let r = run_with(cmd, Some(b"hello kiln\n"), Duration::from_secs(30));
    r.assert_passed(&["serial"]);
    assert!(r.stdout.contains("KTEST-ECHO hello kiln"), "{}", r.stdout);
}

#[test]
fn serial_to_file_and_null() {
    if skip_kvm("serial_to_file_and_null") {
        return;
    }
    let dir = scratch("serial-file");
    let log = dir.join("console.log");
    let arg = format!("file:{}", log.display());
    let r = run(&["--serial", &arg]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(!r.stdout.contains("KTEST"), "console must not reach stdout");
    let text = std::fs::read_to_string(&log).expect("console log");
    assert!(
        text.contains("KTEST boot PASS") && text.contains("KTEST-DONE"),
        "{text}"
    );
    let r = run(&["--serial", "null"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(!r.stdout.contains("KTEST"));
}

/// Sends `signal` to a kiln whose guest waits for input forever and checks it ends with
/// `128 + signal` within `limit`; returns how long that took.
fn stop_with_signal(signal: i32, extra: &[&str], limit: Duration) -> Duration {
    let mut child = kiln()
        .args(["--cmdline", "console=ttyS0 kiln.test=serial"])
        .args(extra)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: plain kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as i32, signal) };
    assert_eq!(rc, 0);
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(start.elapsed() < limit, "kiln ignored signal {signal}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(128 + signal));
    start.elapsed()
}

#[test]
fn sigterm_stops_the_vm_cleanly() {
    if skip_kvm("sigterm_stops_the_vm_cleanly") {
        return;
    }
    // The guest ignores the power button, so kiln stops it after the timeout.
    let took = stop_with_signal(
        libc::SIGTERM,
        &["--shutdown-timeout", "1"],
        Duration::from_secs(10),
    );
    assert!(
        took >= Duration::from_millis(900),
        "SIGTERM must wait for the guest first: {took:?}"
    );
}

#[test]
fn sigint_and_zero_timeout_stop_at_once() {
    if skip_kvm("sigint_and_zero_timeout_stop_at_once") {
        return;
    }
    stop_with_signal(libc::SIGINT, &[], Duration::from_secs(2));
    stop_with_signal(
        libc::SIGTERM,
        &["--shutdown-timeout", "0"],
        Duration::from_secs(2),
    );
}
