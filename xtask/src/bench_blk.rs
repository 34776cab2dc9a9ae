//! `cargo xtask bench-blk [--runs N] [--ms MS] [--qd N] [--image-mib N]`: the conformance
//! guest's `blk-bench` scenario (4 KiB random read/write IOPS, 128 KiB sequential MiB/s,
//! measured inside the guest) under `kiln`, and under QEMU microvm on the same image and the
//! same guest when `qemu-system-x86_64` is installed. Runs alternate between the two VMMs so
//! host noise hits both alike; the table shows the median of each metric and kiln / QEMU.
//!
//! Both VMMs get 1 vCPU, 256 MiB and the image opened with the host page cache
//! (QEMU `cache=writeback`, kiln's default): the comparison is of the device model and
//! notification path, not of the host disk.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::{cargo, have, testguest, workspace_root};

const METRICS: [&str; 4] = [
    "randread_iops",
    "randwrite_iops",
    "seqread_mibs",
    "seqwrite_mibs",
];

struct Opts {
    runs: usize,
    ms: u32,
    qd: u32,
    image_mib: u64,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        runs: 3,
        ms: 1000,
        qd: 16,
        image_mib: 64,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = |what: &str| -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .filter(|n| *n > 0)
                .ok_or(format!("{what} needs a positive number"))
        };
        match a.as_str() {
            "--runs" => o.runs = num("--runs")? as usize,
            "--ms" => o.ms = u32::try_from(num("--ms")?).map_err(|_| "--ms too large")?,
            "--qd" => o.qd = u32::try_from(num("--qd")?).map_err(|_| "--qd too large")?,
            "--image-mib" => o.image_mib = num("--image-mib")?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

/// Runs `cmd` and returns the guest's `KBENCH blk` metrics (in `METRICS` order).
fn bench_once(mut cmd: Command, who: &str) -> Result<[f64; 4], String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("{who}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let fail = || {
        format!(
            "{who}: no passing blk-bench:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    };
    if !text.contains("KTEST blk-bench PASS") {
        return Err(fail());
    }
    let line = text
        .lines()
        .find(|l| l.starts_with("KBENCH blk "))
        .ok_or_else(fail)?;
    let mut v = [0.0; 4];
    for (slot, key) in v.iter_mut().zip(METRICS) {
        *slot = line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|x| x.parse().ok())
            .ok_or_else(|| format!("{who}: {key} missing in {line}"))?;
    }
    Ok(v)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

pub fn run(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    cargo(&["build", "--release", "--locked", "-p", "kiln"])?;
    let root = workspace_root();
    let kiln = root.join("target/release/kiln");
    let images = kiln_testguest_builder::build(&root, &root.join("target/testguest"))
        .map_err(|e| e.to_string())?;
    let dir = root.join("target/bench-blk");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let img = dir.join("disk.img");
    // Allocated (not sparse), so reads hit real blocks in the page cache in both VMMs.
    let bytes = vec![0x5au8; 1 << 20];
    let mut f = std::fs::File::create(&img).map_err(|e| format!("{}: {e}", img.display()))?;
    for _ in 0..o.image_mib {
        std::io::Write::write_all(&mut f, &bytes).map_err(|e| format!("writing image: {e}"))?;
    }
    drop(f);

    let guest = format!(
        "console=ttyS0 kiln.test=blk-bench kiln.blk.bench_ms={} kiln.blk.qd={}",
        o.ms, o.qd
    );
    let kiln_cmd = || {
        let mut c = Command::new(&kiln);
        c.args(["--memory", "256M", "--cpus", "1", "--rng", "off"])
            .arg("--disk")
            .arg(format!("path={}", img.display()))
            .arg("--cmdline")
            .arg(&guest);
        c
    };
    let qemu = have("qemu-system-x86_64");
    let qemu_cmd = |elf: &Path| {
        let mut c = testguest::qemu_microvm("256M");
        c.arg("-kernel")
            .arg(elf)
            .arg("-append")
            .arg(format!("{guest} kiln.verify=0"))
            .arg("-drive")
            .arg(format!(
                "file={},if=none,id=d0,format=raw,cache=writeback,aio=threads",
                img.display()
            ))
            .args(["-device", "virtio-blk-device,drive=d0"]);
        c
    };
    let mut k: Vec<[f64; 4]> = Vec::new();
    let mut q: Vec<[f64; 4]> = Vec::new();
    for i in 0..o.runs {
        println!("== run {}/{}", i + 1, o.runs);
        k.push(bench_once(kiln_cmd(), "kiln")?);
        if qemu {
            q.push(bench_once(qemu_cmd(&images.elf), "QEMU microvm")?);
        }
    }
    let med = |s: &[[f64; 4]], m: usize| median(s.iter().map(|r| r[m]).collect());
    println!(
        "\nblk-bench in the conformance guest: 1 vCPU, queue depth {}, {} ms per phase, {} MiB raw image, median of {} runs",
        o.qd, o.ms, o.image_mib, o.runs
    );
    println!(
        "{:<16} {:>14} {:>14} {:>10}",
        "metric", "kiln", "QEMU microvm", "kiln/QEMU"
    );
    for (m, name) in METRICS.iter().enumerate() {
        let kv = med(&k, m);
        if qemu {
            let qv = med(&q, m);
            println!("{name:<16} {kv:>14.1} {qv:>14.1} {:>10.2}", kv / qv);
        } else {
            println!("{name:<16} {kv:>14.1} {:>14} {:>10}", "-", "-");
        }
    }
    if !qemu {
        println!("QEMU microvm: not measured (qemu-system-x86_64 not installed)");
    }
    Ok(())
}
