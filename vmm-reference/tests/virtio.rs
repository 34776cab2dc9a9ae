//! virtio-blk and virtio-rng under kiln, checked from both sides: the conformance guest's
//! `virtio-*` scenarios, then the host image file (what was written, flushed, discarded).

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{kiln, run_with, scratch, skip_kvm};

const SECTOR: u64 = 512;
/// Every u64 of sector `s` of a fresh test image (docs/guest-contract.md).
fn fresh_word(s: u64) -> u64 {
    0x4b49_4c4e_0000_0000 | s
}
/// Every u64 of a sector the `virtio-blk` scenario wrote.
fn written_word(s: u64) -> u64 {
    0x5752_4954_0000_0000 | s
}

fn sector_bytes(word: u64) -> Vec<u8> {
    word.to_le_bytes().repeat((SECTOR / 8) as usize)
}

/// Writes the pattern into sectors `range` of `f`.
fn fill(f: &File, range: std::ops::Range<u64>) {
    let mut buf = Vec::with_capacity(((range.end - range.start) * SECTOR) as usize);
    for s in range.clone() {
        buf.extend_from_slice(&sector_bytes(fresh_word(s)));
    }
    f.write_all_at(&buf, range.start * SECTOR)
        .expect("test image I/O");
}

fn image(path: &Path, sectors: u64, patterned: std::ops::Range<u64>) {
    let f = File::create(path).expect("test image I/O");
    f.set_len(sectors * SECTOR).expect("test image I/O");
    fill(&f, patterned);
}

fn read_sector(path: &Path, s: u64) -> Vec<u8> {
    let mut buf = vec![0u8; SECTOR as usize];
    File::open(path)
        .expect("test image I/O")
        .read_exact_at(&mut buf, s * SECTOR)
        .expect("test image I/O");
    buf
}

fn assert_sectors(path: &Path, range: std::ops::Range<u64>, expect: impl Fn(u64) -> Vec<u8>) {
    for s in range {
        assert!(
            read_sector(path, s) == expect(s),
            "{}: sector {s} has unexpected contents",
            path.display()
        );
    }
}

fn blk_cmdline(scenarios: &str, sectors: u64, extra: &str) -> String {
    format!(
        "console=ttyS0 kiln.test={scenarios} kiln.blk.id=kiln-disk-0 kiln.blk.sectors={sectors} {extra}"
    )
}

#[test]
fn blk_scenarios_and_the_host_file_agree() {
    if skip_kvm("blk_scenarios_and_the_host_file_agree") {
        return;
    }
    let dir = scratch("virtio-blk");
    let img = dir.join("disk.img");
    let sectors = 65536; // 32 MiB
    image(&img, sectors, 0..sectors);
    let mut cmd = kiln();
    cmd.arg("--disk")
        .arg(format!("path={},id=kiln-disk-0", img.display()))
        .arg("--cmdline")
        .arg(blk_cmdline(
            "virtio-blk,virtio-rng,virtio-reset,virtio-evil",
            sectors,
            "",
        ));
    let r = run_with(cmd, None, Duration::from_secs(120));
    r.assert_passed(&["virtio-blk", "virtio-rng", "virtio-reset", "virtio-evil"]);
    // What the guest wrote, discarded and zeroed is in the file; nothing else changed.
    assert_sectors(&img, 64..72, |s| sector_bytes(written_word(s)));
    assert_sectors(&img, 2048..4096, |_| vec![0; SECTOR as usize]);
    assert_sectors(&img, 4096..4104, |_| vec![0; SECTOR as usize]);
    for s in [0, 63, 72, 2047, 4104, sectors - 1] {
        assert_eq!(
            read_sector(&img, s),
            sector_bytes(fresh_word(s)),
            "sector {s}"
        );
    }
    // The hostile scenario left the VMM running to the end and said what each device did.
    assert!(r.stdout.contains("KTEST-INFO virtio-evil"), "{}", r.stdout);
    let _ = std::fs::remove_dir_all(dir);
}

/// Allocated bytes of `[from, to)` in `f`, found with SEEK_DATA/SEEK_HOLE.
fn allocated(f: &File, from: u64, to: u64) -> u64 {
    let mut total = 0;
    let mut pos = from as libc::off_t;
    while (pos as u64) < to {
        // SAFETY: lseek takes no pointers; the fd is valid.
        let data = unsafe { libc::lseek(f.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 || data as u64 >= to {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = (hole as u64).min(to);
        total += end - data as u64;
        pos = hole;
    }
    total
}

#[test]
fn a_sparse_gigabyte_stays_sparse_and_discards_punch_holes() {
    if skip_kvm("a_sparse_gigabyte_stays_sparse_and_discards_punch_holes") {
        return;
    }
    let dir = scratch("virtio-sparse");
    let img = dir.join("sparse.img");
    let sectors = (1u64 << 30) / SECTOR;
    // Data only where the guest reads (sectors 0..64 and its eight in-flight reads, see
    // kiln-testguest's virtio/blk.rs), plus the range it will discard.
    image(&img, sectors, 0..64);
    let f = File::options().write(true).open(&img).unwrap();
    for s in [8, 100, 1000, 4200, 9000, 17000, 25000, 32760] {
        fill(&f, s..s + 8);
    }
    fill(&f, 2048..4096);
    drop(f);
    let before = File::open(&img).unwrap().metadata().unwrap().blocks() * 512;
    assert!(
        allocated(&File::open(&img).unwrap(), 2048 * SECTOR, 4096 * SECTOR) > 0,
        "the test must start with data in the discard range"
    );
    let mut cmd = kiln();
    cmd.arg("--disk")
        .arg(format!("path={},id=kiln-disk-0", img.display()))
        .arg("--cmdline")
        .arg(blk_cmdline("virtio-blk", sectors, ""));
    let r = run_with(cmd, None, Duration::from_secs(120));
    r.assert_passed(&["virtio-blk"]);
    let f = File::open(&img).unwrap();
    let meta = f.metadata().unwrap();
    assert_eq!(meta.len(), 1 << 30, "the image keeps its size");
    assert_eq!(
        allocated(&f, 2048 * SECTOR, 4096 * SECTOR),
        0,
        "DISCARD must punch a hole"
    );
    let after = meta.blocks() * 512;
    assert!(
        after < 4 << 20 && after < before,
        "image must stay thin: {after} bytes allocated (was {before})"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_flushed_write_survives_kill_9() {
    if skip_kvm("a_flushed_write_survives_kill_9") {
        return;
    }
    let dir = scratch("virtio-kill9");
    let img = dir.join("disk.img");
    let sectors = 65536;
    image(&img, sectors, 0..sectors);
    let mut child = kiln()
        .arg("--disk")
        .arg(format!("path={},id=kiln-disk-0", img.display()))
        .arg("--cmdline")
        .arg(blk_cmdline("virtio-blk", sectors, "kiln.blk.hold=1"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kiln");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let done = line.contains("KTEST-INFO virtio-blk flushed") || line.contains(" FAIL");
            let _ = tx.send(line);
            if done {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut seen = Vec::new();
    let flushed = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(l) if l.contains("KTEST-INFO virtio-blk flushed") => break true,
            Ok(l) => seen.push(l),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(_) => break false,
        }
    };
    child.kill().expect("SIGKILL kiln");
    let status = child.wait().expect("wait");
    assert!(
        flushed,
        "guest never reported its flush:\n{}",
        seen.join("\n")
    );
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    assert_sectors(&img, 64..72, |s| sector_bytes(written_word(s)));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn blk_bench_reports_iops() {
    if skip_kvm("blk_bench_reports_iops") {
        return;
    }
    let dir = scratch("virtio-bench");
    let img = dir.join("disk.img");
    let sectors = 131072; // 64 MiB
    image(&img, sectors, 0..0);
    let mut cmd = kiln();
    cmd.arg("--disk")
        .arg(format!("path={}", img.display()))
        .arg("--cmdline")
        .arg("console=ttyS0 kiln.test=blk-bench kiln.blk.bench_ms=200 kiln.blk.qd=4");
    let r = run_with(cmd, None, Duration::from_secs(120));
    r.assert_passed(&["blk-bench"]);
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("KBENCH blk "))
        .unwrap_or_else(|| panic!("no KBENCH line:\n{}", r.stdout));
    for key in [
        "randread_iops",
        "randwrite_iops",
        "seqread_mibs",
        "seqwrite_mibs",
    ] {
        let v: f64 = line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} missing in {line}"));
        assert!(v > 0.0, "{key} = {v} in {line}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn throttled_rng_is_slower_than_its_limit_allows() {
    if skip_kvm("throttled_rng_is_slower_than_its_limit_allows") {
        return;
    }
    // 512 bytes per second with no burst: the scenario's three 1 KiB requests need at least
    // ~2 s of refills whatever the host's speed (a lower bound, not a speed target).
    let start = Instant::now();
    let mut cmd = kiln();
    cmd.args([
        "--rng",
        "bw_size=512,bw_refill_time=1000",
        "--cmdline",
        "console=ttyS0 kiln.test=virtio-rng",
    ]);
    let r = run_with(cmd, None, Duration::from_secs(120));
    r.assert_passed(&["virtio-rng"]);
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "rate limit not applied: {:?}",
        start.elapsed()
    );
}

#[test]
fn a_disk_in_use_by_another_vm_is_refused() {
    // No KVM needed: the image is opened and locked before KVM is touched.
    let dir = scratch("virtio-lock");
    let img = dir.join("disk.img");
    image(&img, 2048, 0..0);
    let holder = File::options().read(true).write(true).open(&img).unwrap();
    // SAFETY: flock takes no pointers; the fd is valid.
    let rc = unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(rc, 0);
    let r = common::run(&["--disk", &format!("path={}", img.display())]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(
        r.stderr.contains("--disk path=") && r.stderr.contains("another VM"),
        "{}",
        r.stderr
    );
    drop(holder);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_disk_and_rng_options_name_the_flag() {
    for (args, status, needle) in [
        (
            vec!["--disk", "path=/nonexistent/kiln.img"],
            1,
            "--disk path=/nonexistent/kiln.img",
        ),
        (vec!["--disk", "path=/"], 1, "--disk path=/"),
        (vec!["--disk", "readonly=on"], 2, "path=PATH is required"),
        (vec!["--disk", "path=/x,cache=none"], 2, "unknown option"),
        (vec!["--rng", "sometimes"], 2, "--rng"),
        (vec!["--disk", "path=/x,bw_size=5"], 2, "bw_refill_time"),
    ] {
        let r = common::run(&args);
        assert_eq!(r.code, Some(status), "{args:?}: {r:?}");
        assert!(r.stderr.contains(needle), "{args:?}: {}", r.stderr);
    }
}

#[test]
fn acpi_announces_each_virtio_device() {
    let dir = scratch("virtio-acpi");
    let img = dir.join("disk.img");
    image(&img, 2048, 0..0);
    let count = |extra: &[&str]| {
        let out = dir.join(format!("acpi-{}", extra.len()));
        let mut args = vec!["--dump-acpi", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        let r = common::run(&args);
        assert_eq!(r.code, Some(0), "{r:?}");
        let dsdt = std::fs::read(out.join("DSDT.aml")).unwrap();
        dsdt.windows(9).filter(|w| w == b"LNRO0005\0").count()
    };
    let disk = format!("path={}", img.display());
    assert_eq!(count(&[]), 1, "the entropy device is on by default");
    assert_eq!(count(&["--rng", "off"]), 0);
    assert_eq!(count(&["--disk", &disk, "--disk", &disk, "--rng", "on"]), 3);
    let _ = std::fs::remove_dir_all(dir);
}
