//! `kiln --dump-acpi`: the tables a VM gets, decompiled by `iasl` (Debian acpica-tools).

mod common;

use common::*;

#[test]
fn dumped_tables_decompile_cleanly_for_1_to_8_cpus() {
    if std::env::var_os("KILN_SKIP_IASL").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED dumped_tables_decompile_cleanly_for_1_to_8_cpus: KILN_SKIP_IASL=1");
        return;
    }
    for cpus in ["1", "2", "4", "8"] {
        let dir = scratch(&format!("acpi-{cpus}"));
        let r = run(&["--cpus", cpus, "--dump-acpi", dir.to_str().expect("path")]);
        assert_eq!(r.code, Some(0), "{r:?}");
        for sig in ["DSDT", "FACP", "APIC", "XSDT"] {
            let aml = dir.join(format!("{sig}.aml"));
            assert!(r.stdout.contains(&*aml.to_string_lossy()), "{}", r.stdout);
            let out = std::process::Command::new("iasl")
                .arg("-d")
                .arg(&aml)
                .output()
                .unwrap_or_else(|e| {
                    panic!("iasl ({e}): apt-get install acpica-tools, or KILN_SKIP_IASL=1")
                });
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "iasl -d {sig}: {text}");
            assert!(
                !text.contains("Error") || text.contains(" 0 Errors"),
                "{text}"
            );
        }
        let madt = std::fs::read_to_string(dir.join("APIC.dsl")).expect("APIC.dsl");
        let lapics = madt.matches("[Processor Local APIC]").count();
        assert_eq!(lapics.to_string(), cpus, "{madt}");
    }
}

#[test]
fn too_many_cpus_for_acpi_is_an_error() {
    let dir = scratch("acpi-too-many");
    let r = run(&["--cpus", "256", "--dump-acpi", dir.to_str().expect("path")]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("--cpus 256"), "{}", r.stderr);
}
