//! ACPI, SMP, interrupts and power control through both entry protocols and 1 to 8 vCPUs,
//! judged by the conformance guest's `KTEST` lines and kiln's exit status.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

const PROTOCOLS: [&str; 2] = ["linux", "pvh"];

#[test]
fn acpi_smp_and_clock_with_1_to_8_vcpus() {
    if skip_kvm("acpi_smp_and_clock_with_1_to_8_vcpus") {
        return;
    }
    for protocol in PROTOCOLS {
        for cpus in [1u32, 2, 4, 8] {
            let n = cpus.to_string();
            let cmdline = format!("console=ttyS0 kiln.test=cpuid,acpi,smp,clock kiln.cpus={cpus}");
            let r = run(&[
                "--boot-protocol",
                protocol,
                "--cpus",
                &n,
                "--cmdline",
                &cmdline,
            ]);
            eprintln!("{protocol} cpus={cpus}: {:?}", r.code);
            r.assert_passed(&["cpuid", "acpi", "smp", "clock"]);
            let want = format!("aps={} of {}", cpus - 1, cpus - 1);
            assert!(cpus == 1 || r.stdout.contains(&want), "{}", r.stdout);
        }
    }
}

#[test]
fn interrupts_reach_the_guest() {
    if skip_kvm("interrupts_reach_the_guest") {
        return;
    }
    for protocol in PROTOCOLS {
        let mut child = kiln()
            .args([
                "--boot-protocol",
                protocol,
                "--cmdline",
                "console=ttyS0 kiln.test=irq",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn kiln");
        let mut stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        // Type a line only once the guest has armed its interrupts.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut lines = Vec::new();
        let mut result = None;
        while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            if line.starts_with("KTEST-IRQ-READY") {
                stdin.write_all(b"interrupt me\n").expect("write stdin");
            }
            if line.starts_with("KTEST irq ") {
                result = Some(line.clone());
            }
            let done = line.starts_with("KTEST-DONE");
            lines.push(line);
            if done {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        let result =
            result.unwrap_or_else(|| panic!("{protocol}: no irq result:\n{}", lines.join("\n")));
        assert!(result.starts_with("KTEST irq PASS"), "{protocol}: {result}");
    }
}

#[test]
fn acpi_poweroff_and_reset_end_kiln_with_their_statuses() {
    if skip_kvm("acpi_poweroff_and_reset_end_kiln_with_their_statuses") {
        return;
    }
    for protocol in PROTOCOLS {
        let r = run(&[
            "--boot-protocol",
            protocol,
            "--cmdline",
            "console=ttyS0 kiln.test=poweroff",
        ]);
        assert!(r.stdout.contains("KTEST poweroff PASS"), "{r:?}");
        assert!(!r.stdout.contains("FAIL"), "{r:?}");
        assert_eq!(r.code, Some(0), "{r:?}");
        let r = run(&[
            "--boot-protocol",
            protocol,
            "--cmdline",
            "console=ttyS0 kiln.test=reset",
        ]);
        assert!(r.stdout.contains("KTEST reset PASS"), "{r:?}");
        assert!(!r.stdout.contains("FAIL"), "{r:?}");
        assert_eq!(r.code, Some(3), "{r:?}");
    }
}
