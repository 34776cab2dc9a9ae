//! `kiln-bench exits` end to end on KVM: kiln, the floor and the JSON/PNG outputs.

use std::path::PathBuf;
use std::process::Command;

fn skip_kvm(test: &str) -> bool {
    if std::env::var_os("KILN_SKIP_KVM").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED {test}: KILN_SKIP_KVM=1");
        return true;
    }
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "{test} needs /dev/kvm; set KILN_SKIP_KVM=1 to skip KVM tests"
    );
    false
}

/// The `kiln` binary beside `kiln-bench`. `cargo test --workspace` builds it with everything
/// else; this package's tests alone can't build it (cargo holds the build lock), so run
/// `cargo build -p kiln` first then.
fn kiln() -> PathBuf {
    let k = PathBuf::from(env!("CARGO_BIN_EXE_kiln-bench")).with_file_name("kiln");
    assert!(
        k.is_file(),
        "{} is missing: run `cargo build -p kiln` first (or `cargo test --workspace`)",
        k.display()
    );
    k
}

#[test]
fn measures_kiln_and_the_floor_and_writes_json() {
    if skip_kvm("measures_kiln_and_the_floor_and_writes_json") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("kiln-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("r.json");
    let png = dir.join("h.png");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-bench"))
        .args([
            "exits",
            "--n",
            "300",
            "--warmup",
            "30",
            "--rounds",
            "2",
            "--kinds",
            "pio-out,mmio-in,cpuid,msr-user,hlt-timer,ipi,irqfd",
            "--kiln",
        ])
        .arg(kiln())
        .arg("--json")
        .arg(&json)
        .arg("--histogram")
        .arg(&png)
        .output()
        .expect("run kiln-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for row in [
        "pio-out         kiln",
        "pio-out         floor",
        "ipi             kiln",
    ] {
        assert!(stdout.contains(row), "no row {row:?}:\n{stdout}");
    }
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(!doc["host"]["kernel"].as_str().unwrap().is_empty());
    assert!(doc["host"]["kvm_modules"]["kvm"].is_object());
    let kiln = &doc["vmms"]["kiln"]["kinds"];
    for kind in ["pio-out", "mmio-in", "cpuid", "hlt-timer", "ipi", "irqfd"] {
        let k = &kiln[kind];
        assert_eq!(k["n"], 600, "{kind}: two rounds of 300");
        let (p50, p99) = (k["p50_ns"].as_u64().unwrap(), k["p99_ns"].as_u64().unwrap());
        assert!(p50 > 0 && p50 <= p99, "{kind}: p50 {p50} p99 {p99}");
        assert!(k["buckets"].as_array().is_some_and(|b| !b.is_empty()));
    }
    // The VMM's own CPU time per exit was measured for the exits that reach kiln.
    assert!(kiln["pio-out"]["sys_ns_per_exit"].as_f64().unwrap() > 0.0);
    // And its user-space time handling each exit, as the floor measures its own.
    for vmm in ["kiln", "floor"] {
        let v = doc["vmms"][vmm]["kinds"]["pio-out"]["vmm_ns_per_exit"].as_f64();
        assert!(
            v.is_some_and(|v| v > 0.0),
            "{vmm}: {v:?} (an old target/debug/kiln? `cargo build -p kiln`)"
        );
        // The typical time per exit (mean of the uninterrupted exits) lies in the
        // histogram's range and is there for each round.
        let k = &doc["vmms"][vmm]["kinds"]["pio-out"];
        let typ = k["vmm_typical_ns_per_exit"].as_f64();
        assert!(
            typ.is_some_and(|t| t > 0.0 && t < 512.0),
            "{vmm}: typical {typ:?}"
        );
        assert_eq!(
            k["vmm_typical_ns_per_exit_rounds"].as_array().map(Vec::len),
            Some(2),
            "{vmm}"
        );
    }
    // msr-user runs or says why not; nothing is silently missing.
    assert!(kiln["msr-user"].is_object() || doc["vmms"]["kiln"]["skipped"]["msr-user"].is_string());
    let floor = &doc["vmms"]["floor"]["kinds"];
    assert_eq!(floor["pio-out"]["n"], 600);
    assert!(
        floor["cpuid"].is_null(),
        "the floor runs only kinds that leave the kernel"
    );
    // The histogram image, a PNG because of the file name (`.ci/run` installs the font
    // plotters needs for its labels).
    assert!(stdout.contains("histograms (Png)"), "{stdout}");
    let img = std::fs::read(&png).unwrap();
    assert_eq!(&img[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&img[12..16], b"IHDR");
    let _ = std::fs::remove_dir_all(dir);
}

/// `--interleave`: kiln and the floor run at the same time by turns; kiln's other kinds run
/// on their own as before, and every kind is still measured once per round.
#[test]
fn interleaved_kiln_and_floor() {
    if skip_kvm("interleaved_kiln_and_floor") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("kiln-bench-il-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("r.json");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-bench"))
        .args(["exits", "--n", "300", "--warmup", "30", "--rounds", "2"])
        .args([
            "--kinds",
            "pio-out,mmio-out,cpuid",
            "--interleave",
            "2",
            "--kiln",
        ])
        .arg(kiln())
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run kiln-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("kiln and the floor by turns (2 ms)"),
        "{stderr}"
    );
    assert!(stdout.contains("ran by turns (2 ms slices"), "{stdout}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["config"]["interleave_ms"], 2);
    for (vmm, kind) in [
        ("kiln", "pio-out"),
        ("kiln", "mmio-out"),
        ("kiln", "cpuid"),
        ("floor", "pio-out"),
        ("floor", "mmio-out"),
    ] {
        let k = &doc["vmms"][vmm]["kinds"][kind];
        assert_eq!(k["n"], 600, "{vmm} {kind}: two rounds of 300");
        if kind != "cpuid" {
            assert_eq!(
                k["vmm_typical_ns_per_exit_rounds"].as_array().map(Vec::len),
                Some(2),
                "{vmm} {kind}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_arguments_are_named() {
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_kiln-bench"))
            .args(args)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&["exits", "--kinds", "pio-out,warp-drive"]);
    assert!(
        !ok && err.contains("--kinds: unknown kind \"warp-drive\""),
        "{err}"
    );
    let (ok, err) = run(&["exits", "--compare", "bochs=/bin/sh"]);
    assert!(!ok && err.contains("unknown VMM"), "{err}");
    let (ok, err) = run(&["exits", "--n", "0"]);
    assert!(!ok && err.contains("--n"), "{err}");
    let (ok, err) = run(&["exits", "--interleave", "0"]);
    assert!(
        !ok && err.contains("--interleave must be at least 1 ms"),
        "{err}"
    );
    let (ok, err) = run(&["exits", "--histogram", "h.gif"]);
    assert!(
        !ok && err.contains("--histogram h.gif: the file name must end in .svg or .png"),
        "{err}"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_kiln-bench"))
        .args(["exits", "--list"])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&o.stdout);
    assert!(
        list.lines().count() == 12 && list.contains("irqfd"),
        "{list}"
    );
}

/// Comparison mode end to end: QEMU microvm (CI installs it) and a Firecracker. No Firecracker
/// binary is installed here, so the test uses kiln under the name `firecracker`, which takes
/// Firecracker's `--no-api --config-file` command line and configuration format: that checks
/// what kiln-bench hands a Firecracker (config file, vCPU counts, which kinds it runs).
#[test]
fn compares_with_qemu_and_a_firecracker() {
    if skip_kvm("compares_with_qemu_and_a_firecracker") {
        return;
    }
    let qemu = [
        "/usr/bin/qemu-system-x86_64",
        "/usr/local/bin/qemu-system-x86_64",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).is_file())
    .expect("qemu-system-x86_64 is missing (apt-get install qemu-system-x86; .ci/run does)");
    let dir = std::env::temp_dir().join(format!("kiln-bench-cmp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fc = dir.join("firecracker");
    std::os::unix::fs::symlink(kiln(), &fc).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-bench"))
        .args([
            "exits",
            "--n",
            "200",
            "--warmup",
            "20",
            "--rounds",
            "1",
            "--no-floor",
            "--kinds",
            "pio-out,mmio-ioeventfd,ipi",
            "--kiln",
        ])
        .arg(kiln())
        .arg("--compare")
        .arg(format!("qemu={qemu}"))
        .arg("--compare")
        .arg(format!("firecracker={}", fc.display()))
        .output()
        .expect("run kiln-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for row in [
        "pio-out         kiln",
        "pio-out         qemu-microvm",
        "pio-out         firecracker",
        "ipi             qemu-microvm",
        "ipi             firecracker",
        "mmio-ioeventfd  qemu-microvm skipped: qemu-microvm can't run it",
        "mmio-ioeventfd  firecracker  skipped: firecracker can't run it",
    ] {
        assert!(stdout.contains(row), "no row {row:?}:\n{stdout}\n{stderr}");
    }
    // Each VMM ran the two-vCPU kind in a run of its own.
    for vmm in ["qemu-microvm", "firecracker"] {
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(&format!(": {vmm} (")) && l.ends_with("2 vCPU(s): ipi")),
            "{stderr}"
        );
    }
}
