//! `cargo xtask testguest`: build the conformance guest, optionally run it under QEMU microvm.
//!
//! `testguest` builds the conformance guest to `target/testguest/kiln-testguest.{elf,bzImage}`
//! and prints the paths. With `--qemu` it then boots the ELF (PVH) under QEMU microvm with KVM
//! once per scenario and checks that every `KTEST` line says PASS and `KTEST-DONE` reports no
//! failure. Every boot has a virtio-rng device; the virtio-blk cases also get a disk image in
//! the contract's pattern (`target/testguest/qemu-disk.img`, rewritten for each), checked
//! afterwards the way kiln's own test checks its image. The balloon case gets a
//! virtio-balloon whose target is set through QMP while `memory-stress` holds.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_testguest::cmdline::EXPECTED_MARKER;
use kiln_testguest::fnv::fnv1a64;

use crate::workspace_root;

pub const USAGE: &str = "usage: cargo xtask testguest [--qemu] [--out DIR] [--timeout SECS]";

struct Opts {
    qemu: bool,
    out: PathBuf,
    timeout: Duration,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        qemu: false,
        out: workspace_root().join("target/testguest"),
        timeout: Duration::from_secs(30),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--qemu" => o.qemu = true,
            "--out" => o.out = PathBuf::from(it.next().ok_or("--out needs a directory")?),
            "--timeout" => {
                let s = it.next().ok_or("--timeout needs seconds")?;
                let secs: u64 = s.parse().map_err(|_| format!("bad --timeout {s}"))?;
                o.timeout = Duration::from_secs(secs);
            }
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(o)
}

pub fn testguest(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    let images =
        kiln_testguest_builder::build(&workspace_root(), &o.out).map_err(|e| e.to_string())?;
    println!("{}", images.elf.display());
    println!("{}", images.bzimage.display());
    if o.qemu {
        run_qemu_suite(&images.elf, &o.out, o.timeout)?;
    }
    Ok(())
}

/// QEMU microvm as the cross-check and the start-up comparison run it: KVM, no default
/// devices, COM1 on stdio, `isa-debug-exit` at 0xf4 so the guest's power-off ends QEMU
/// (with status 1), `-cpu host,-arch-capabilities` as this host's nested KVM needs, and
/// virtio-mmio devices in their virtio 1.x (version 2) form: QEMU's default is the legacy
/// interface, which the conformance guest (like kiln) doesn't speak.
pub fn qemu_microvm(memory: &str) -> Command {
    kiln_testguest_builder::qemu_microvm(std::path::Path::new("qemu-system-x86_64"), memory)
}

/// GET_ID string of the QEMU cases' disk (its `serial`).
const DISK_SERIAL: &str = "kiln-disk-0";

/// Where QEMU's answers to `virtio-evil` differ from kiln's, and why (docs in the crate
/// README, "Notes on other VMMs"):
/// - buffers outside RAM (`oob-*`) are "mapped" through QEMU's bounce buffer to unassigned
///   memory: the data goes nowhere and the request ends OK (blk) or filled (rng);
/// - `qnum3`: QEMU takes a queue size that is not a power of two;
/// - `notify-early`: QEMU's virtio-blk serves a queue notified before DRIVER_OK;
/// - `no-version1`: FEATURES_OK sticks without VIRTIO_F_VERSION_1;
/// - `rng:huge-len` is skipped: mapping a 4 GiB entropy buffer keeps QEMU busy for tens of
///   seconds with the vCPU stalled (it then marks the device broken, which is fine).
const QEMU_EVIL: &str =
    "kiln.evil.allow=oob-ram-end,oob-top,oob-mmio,qnum3,notify-early,no-version1 \
                         kiln.evil.skip=rng:huge-len";

/// Sectors of the QEMU cases' disk image (32 MiB).
const DISK_SECTORS: u64 = 65536;

/// Every u64 of sector `s` of a fresh test image (docs/guest-contract.md).
fn fresh_word(s: u64) -> u64 {
    0x4b49_4c4e_0000_0000 | s
}

/// Writes a fresh image in the contract's pattern.
fn write_disk(path: &Path) -> Result<(), String> {
    let mut buf = Vec::with_capacity((DISK_SECTORS * 512) as usize);
    for s in 0..DISK_SECTORS {
        for _ in 0..64 {
            buf.extend_from_slice(&fresh_word(s).to_le_bytes());
        }
    }
    std::fs::write(path, buf).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// The first u64 of each of `sectors` of the image.
fn disk_words(path: &Path, sectors: &[u64]) -> Result<Vec<u64>, String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    sectors
        .iter()
        .map(|&s| {
            let mut b = [0u8; 8];
            f.read_exact_at(&mut b, s * 512)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(u64::from_le_bytes(b))
        })
        .collect()
}

/// What `virtio-blk` leaves in the image: sectors 64..72 written, 2048..4104 zero, the rest
/// as it was.
fn check_disk_after_blk(path: &Path) -> Result<(), String> {
    let probe = [
        0,
        63,
        64,
        71,
        72,
        2047,
        2048,
        4095,
        4096,
        4103,
        4104,
        DISK_SECTORS - 1,
    ];
    let words = disk_words(path, &probe)?;
    for (&s, &w) in probe.iter().zip(&words) {
        let want = match s {
            64..=71 => 0x5752_4954_0000_0000 | s,
            2048..=4103 => 0,
            _ => fresh_word(s),
        };
        if w != want {
            return Err(format!(
                "image sector {s} starts with {w:#x}, expected {want:#x}"
            ));
        }
    }
    Ok(())
}

/// A disk for a case: the QEMU `cache=` mode, and whether to check the image afterwards.
struct Disk {
    cache: &'static str,
    check_blk: bool,
}

/// One QEMU boot.
struct Case {
    name: &'static str,
    append: String,
    initrd: Option<PathBuf>,
    /// A line to type on the serial console once the guest asks for it.
    input: Option<&'static str>,
    /// vCPUs (`-smp`).
    smp: u32,
    /// Scenarios expected to PASS.
    expect_pass: u32,
    /// A virtio-blk disk.
    disk: Option<Disk>,
    /// `-machine acpi=off`: no DSDT, so the guest finds virtio devices through the
    /// `virtio_mmio.device=` tokens QEMU appends to the command line.
    acpi_off: bool,
    /// A virtio-balloon.
    balloon: Option<Balloon>,
}

/// A virtio-balloon for a case (after the entropy device, as kiln orders them), with free
/// page reporting, deflate-on-OOM and 1 s statistics polling. QEMU's target starts at 0 and
/// is set through QMP (`balloon`, the guest RAM to keep) when the guest prints
/// `KTEST-INFO memory-stress touched` (`kiln.stress.hold=1`); the console line that lets the
/// guest go on is typed after the answer, so the balloon scenario sees the target.
struct Balloon {
    /// Bytes of guest RAM QEMU should leave the guest.
    keep: u64,
    /// What the `balloon` PASS line must contain.
    expect: &'static [&'static str],
}

/// Deterministic initrd contents, so a failure can be reproduced byte for byte.
fn initrd_bytes(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn run_qemu_suite(elf: &Path, out: &Path, timeout: Duration) -> Result<(), String> {
    const MEM: u64 = 128 << 20;
    let marker = String::from_utf8_lossy(EXPECTED_MARKER).into_owned();
    let initrd = initrd_bytes(12_345);
    let initrd_path = out.join("qemu-initrd.bin");
    std::fs::write(&initrd_path, &initrd)
        .map_err(|e| format!("writing {}: {e}", initrd_path.display()))?;

    // QEMU's memory map is not kiln's (no kiln.layout=kiln), and the exit-test device does not
    // exist there (kiln.verify=0). With -smp 1 on an AMD host, QEMU sets CPUID.1:EDX.HTT with
    // a logical processor count of 0, which the topology check rightly rejects, so the
    // topology is checked with -smp 2 only.
    let cases = [
        Case {
            name: "boot",
            append: format!("kiln.test=boot kiln.mem={MEM} kiln.cpus=1 kiln.marker={marker}"),
            initrd: None,
            input: None,
            smp: 1,
            expect_pass: 1,
            disk: None,
            acpi_off: false,
            balloon: None,
        },
        Case {
            name: "boot+initrd",
            append: format!(
                "kiln.test=boot kiln.mem={MEM} kiln.marker={marker} kiln.initrd_size={} \
                 kiln.initrd_sum={:016x}",
                initrd.len(),
                fnv1a64(&initrd)
            ),
            initrd: Some(initrd_path.clone()),
            input: None,
            smp: 1,
            expect_pass: 1,
            disk: None,
            acpi_off: false,
            balloon: None,
        },
        Case {
            name: "cpuid",
            append: "kiln.test=cpuid".into(),
            initrd: None,
            input: None,
            smp: 1,
            expect_pass: 1,
            disk: None,
            acpi_off: false,
            balloon: None,
        },
        Case {
            name: "cpuid smp2",
            append: "kiln.test=cpuid kiln.cpus=2".into(),
            initrd: None,
            input: None,
            smp: 2,
            expect_pass: 1,
            disk: None,
            acpi_off: false,
            balloon: None,
        },
        Case {
            name: "exits",
            append: "kiln.test=exits kiln.exits=2000 kiln.verify=0".into(),
            initrd: None,
            input: None,
            smp: 1,
            expect_pass: 1,
            disk: None,
            acpi_off: false,
            balloon: None,
        },
        Case {
            name: "serial",
            append: "kiln.test=serial".into(),
            initrd: None,
            input: Some("hello from xtask"),
            smp: 1,
            expect_pass: 1,
            disk: None,
            acpi_off: false,
            balloon: None,
        },
        Case {
            name: "acpi+smp+clock smp2",
            append: "kiln.test=acpi,smp,clock kiln.cpus=2".to_string(),
            initrd: None,
            input: None,
            smp: 2,
            expect_pass: 3,
            disk: None,
            acpi_off: false,
            balloon: None,
        },
        Case {
            name: "default (all)",
            append: format!("kiln.verify=0 kiln.mem={MEM}"),
            initrd: None,
            input: None,
            smp: 1,
            expect_pass: 7,
            disk: None,
            acpi_off: false,
            balloon: None,
        },
        Case {
            name: "virtio-blk+rng+reset",
            append: format!(
                "kiln.test=virtio-blk,virtio-rng,virtio-reset kiln.blk.id={DISK_SERIAL} \
                 kiln.blk.sectors={DISK_SECTORS}"
            ),
            initrd: None,
            input: None,
            smp: 1,
            expect_pass: 3,
            disk: Some(Disk {
                cache: "none",
                check_blk: true,
            }),
            acpi_off: false,
            balloon: None,
        },
        Case {
            name: "virtio-blk+rng acpi=off",
            append: "kiln.test=virtio-blk,virtio-rng".into(),
            initrd: None,
            input: None,
            smp: 1,
            expect_pass: 2,
            disk: Some(Disk {
                cache: "writeback",
                check_blk: true,
            }),
            acpi_off: true,
            balloon: None,
        },
        Case {
            name: "virtio-evil",
            append: format!("kiln.test=virtio-evil {QEMU_EVIL}"),
            initrd: None,
            input: None,
            smp: 1,
            expect_pass: 1,
            disk: Some(Disk {
                cache: "writeback",
                check_blk: false,
            }),
            acpi_off: false,
            balloon: None,
        },
        Case {
            name: "blk-bench",
            append: "kiln.test=blk-bench kiln.blk.bench_ms=200 kiln.blk.qd=16".into(),
            initrd: None,
            input: None,
            smp: 1,
            expect_pass: 1,
            disk: Some(Disk {
                cache: "writeback",
                check_blk: false,
            }),
            acpi_off: false,
            balloon: None,
        },
        Case {
            name: "memory-stress+balloon",
            append: "kiln.test=memory-stress,balloon kiln.stress.hold=1".into(),
            initrd: None,
            input: None,
            smp: 1,
            expect_pass: 2,
            disk: None,
            acpi_off: false,
            // 96 of 128 MiB: a target of 8192 pages.
            balloon: Some(Balloon {
                keep: 96 << 20,
                expect: &[
                    "features=version_1,stats_vq,deflate_on_oom,reporting ",
                    "target=8192 inflated=8192 ",
                    "deflated=8192 zero_after_deflate=8192/8192 ",
                    "stats_round_trips=1 ",
                    "reporting=done(pages=1024,zeroed=1024)",
                ],
            }),
        },
    ];
    let mut failed = 0;
    let disk = out.join("qemu-disk.img");
    for c in &cases {
        let start = Instant::now();
        if c.disk.is_some() {
            write_disk(&disk)?;
        }
        let r = run_case(elf, c, &disk, timeout).and_then(|()| match &c.disk {
            Some(d) if d.check_blk => check_disk_after_blk(&disk),
            _ => Ok(()),
        });
        match r {
            Ok(()) => println!(
                "qemu {:<14} ok ({:.2}s)",
                c.name,
                start.elapsed().as_secs_f64()
            ),
            Err(e) => {
                failed += 1;
                println!("qemu {:<14} FAILED: {e}", c.name);
            }
        }
    }
    if failed > 0 {
        return Err(format!("{failed} of {} QEMU cases failed", cases.len()));
    }
    println!("all {} QEMU cases passed", cases.len());
    Ok(())
}

fn run_case(elf: &Path, c: &Case, disk: &Path, timeout: Duration) -> Result<(), String> {
    let mut cmd = qemu_microvm("128M");
    cmd.arg("-smp").arg(c.smp.to_string());
    // Like kiln, which always has one; after the disk, as kiln orders them.
    if let Some(d) = &c.disk {
        cmd.arg("-drive")
            .arg(format!(
                "file={},if=none,id=d0,format=raw,cache={},discard=unmap",
                disk.display(),
                d.cache
            ))
            .arg("-device")
            .arg(format!("virtio-blk-device,drive=d0,serial={DISK_SERIAL}"));
    }
    cmd.args(["-device", "virtio-rng-device"]);
    let qmp = disk.with_file_name("qemu-qmp.sock");
    if c.balloon.is_some() {
        let _ = std::fs::remove_file(&qmp);
        cmd.args([
            "-device",
            "virtio-balloon-device,free-page-reporting=on,deflate-on-oom=on",
            "-global",
            "virtio-balloon-device.guest-stats-polling-interval=1",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    }
    if c.acpi_off {
        cmd.args(["-machine", "acpi=off"]);
    }
    cmd.arg("-kernel").arg(elf).arg("-append").arg(&c.append);
    if let Some(i) = &c.initrd {
        cmd.arg("-initrd").arg(i);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start qemu-system-x86_64: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut stdin = child.stdin.take();

    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let deadline = Instant::now() + timeout;
    let mut lines = Vec::new();
    let mut result: Result<(), String> = Err("no KTEST-DONE line".into());
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_string();
                if line == "KTEST-SERIAL-READY" {
                    if let (Some(input), Some(w)) = (c.input, stdin.as_mut()) {
                        // QEMU's stdio serial passes the bytes through; the guest stops at '\n'.
                        let _ = writeln!(w, "{input}").and_then(|_| w.flush());
                    }
                }
                if let (Some(b), true) = (
                    &c.balloon,
                    line.starts_with("KTEST-INFO memory-stress touched"),
                ) {
                    let typed = qmp_balloon(&qmp, b.keep).and_then(|()| {
                        let w = stdin.as_mut().ok_or("no stdin")?;
                        writeln!(w)
                            .and_then(|_| w.flush())
                            .map_err(|e| format!("typing to the guest: {e}"))
                    });
                    if let Err(e) = typed {
                        result = Err(e);
                        lines.push(line);
                        break;
                    }
                }
                if let Some(rest) = line.strip_prefix("KTEST-DONE ") {
                    result = check_done(rest, c.expect_pass);
                    lines.push(line);
                    break;
                }
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                result = Err(format!("timed out after {}s", timeout.as_secs()));
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // The guest powers off through isa-debug-exit; give QEMU a moment, then make sure.
    let wait_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < wait_until {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        if result.is_ok() {
            result = Err("guest did not power off".into());
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    drop(stdin);
    let _ = reader.join();

    for l in lines.iter().filter(|l| l.starts_with("KTEST ")) {
        if !l.contains(" PASS") && result.is_ok() {
            result = Err(format!("failing line: {l}"));
        }
    }
    if let (Some(b), true) = (&c.balloon, result.is_ok()) {
        let pass = lines.iter().find(|l| l.starts_with("KTEST balloon PASS "));
        if let Some(missing) = b
            .expect
            .iter()
            .find(|want| !pass.is_some_and(|l| l.contains(*want)))
        {
            result = Err(format!("the balloon line lacks '{missing}'"));
        }
    }
    if let (Some(input), true) = (c.input, result.is_ok()) {
        let want = format!("KTEST-ECHO {input}");
        if !lines.contains(&want) {
            result = Err(format!("no '{want}' line"));
        }
    }
    // isa-debug-exit makes QEMU exit with (value << 1) | 1 = 1 for the guest's write of 0.
    if result.is_ok() && status.code() != Some(1) {
        result = Err(format!("unexpected QEMU exit status {status}"));
    }
    if let Err(mut msg) = result {
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        msg.push_str("\n    append: ");
        msg.push_str(&c.append);
        for l in &lines {
            msg.push_str("\n    | ");
            msg.push_str(l);
        }
        for l in stderr.lines().take(20) {
            msg.push_str("\n    qemu: ");
            msg.push_str(l);
        }
        return Err(msg);
    }
    Ok(())
}

/// Sets QEMU's balloon target through its QMP socket at `path`: the guest should keep `keep`
/// bytes of RAM.
fn qmp_balloon(path: &Path, keep: u64) -> Result<(), String> {
    let err = |e: std::io::Error| format!("QMP {}: {e}", path.display());
    let s = UnixStream::connect(path).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(err)?;
    let mut w = s.try_clone().map_err(err)?;
    let mut r = BufReader::new(s);
    // The greeting, then each command's answer (asynchronous events in between are skipped).
    let answer = |r: &mut BufReader<UnixStream>| -> Result<String, String> {
        loop {
            let mut l = String::new();
            if r.read_line(&mut l).map_err(err)? == 0 {
                return Err("QMP closed the connection".into());
            }
            if !l.contains("\"event\"") {
                return Ok(l);
            }
        }
    };
    answer(&mut r)?;
    for cmd in [
        "{\"execute\":\"qmp_capabilities\"}".to_string(),
        format!("{{\"execute\":\"balloon\",\"arguments\":{{\"value\":{keep}}}}}"),
    ] {
        writeln!(w, "{cmd}").map_err(err)?;
        let a = answer(&mut r)?;
        if !a.contains("\"return\"") {
            return Err(format!("QMP {cmd}: {}", a.trim()));
        }
    }
    Ok(())
}

/// Parses `pass=N fail=M`.
fn check_done(rest: &str, expect_pass: u32) -> Result<(), String> {
    let mut pass = None;
    let mut fail = None;
    for kv in rest.split_whitespace() {
        if let Some(v) = kv.strip_prefix("pass=") {
            pass = v.parse::<u32>().ok();
        } else if let Some(v) = kv.strip_prefix("fail=") {
            fail = v.parse::<u32>().ok();
        }
    }
    match (pass, fail) {
        (Some(p), Some(0)) if p == expect_pass => Ok(()),
        (Some(p), Some(f)) => Err(format!(
            "KTEST-DONE pass={p} fail={f}, expected pass={expect_pass} fail=0"
        )),
        _ => Err(format!("malformed KTEST-DONE line: {rest}")),
    }
}
