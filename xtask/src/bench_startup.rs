//! `cargo xtask bench-startup [--runs N]`: whole-process time for `kiln` to boot the
//! conformance guest's `exits` scenario with N=0 and power off, with peak RSS and CPU time
//! (from `wait4`'s rusage); and the same guest image under QEMU microvm in the same run when
//! `qemu-system-x86_64` is installed. Both get 128 MiB and 1 vCPU; both send the guest's
//! console to stdout, which goes to /dev/null.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::{cargo, have, testguest, workspace_root};

const GUEST_ARGS: &str = "kiln.test=exits kiln.exits=0";

struct Sample {
    wall_ms: f64,
    cpu_ms: f64,
    rss_kib: u64,
}

/// Spawns `cmd`, waits for it with `wait4` and returns its time, CPU and peak RSS, or an
/// error if its exit status isn't `ok_status`.
fn measure(mut cmd: Command, ok_status: i32) -> Result<Sample, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let start = Instant::now();
    let child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data, filled by wait4.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; both pointers are valid for the call.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let wall = start.elapsed();
    if rc != pid {
        return Err(format!("wait4: {}", std::io::Error::last_os_error()));
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    if code != ok_status {
        return Err(format!("exit status {code}, expected {ok_status}"));
    }
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    Ok(Sample {
        wall_ms: wall.as_secs_f64() * 1e3,
        cpu_ms: ms(ru.ru_utime) + ms(ru.ru_stime),
        rss_kib: ru.ru_maxrss as u64,
    })
}

/// Runs once with the console captured and checks the guest passed.
fn verify(mut cmd: Command, who: &str) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{who}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("KTEST exits PASS") && text.contains("KTEST-DONE pass=1 fail=0") {
        Ok(())
    } else {
        Err(format!(
            "{who} did not run the guest's exits scenario to PASS:\n{text}"
        ))
    }
}

struct Summary {
    median_ms: f64,
    min_ms: f64,
    cpu_ms: f64,
    rss_kib: u64,
}

fn summarize(mut s: Vec<Sample>) -> Summary {
    s.sort_by(|a, b| a.wall_ms.total_cmp(&b.wall_ms));
    let mid = s.len() / 2;
    let mut cpu: Vec<f64> = s.iter().map(|x| x.cpu_ms).collect();
    cpu.sort_by(f64::total_cmp);
    let mut rss: Vec<u64> = s.iter().map(|x| x.rss_kib).collect();
    rss.sort_unstable();
    Summary {
        median_ms: s[mid].wall_ms,
        min_ms: s[0].wall_ms,
        cpu_ms: cpu[mid],
        rss_kib: rss[mid],
    }
}

fn series(runs: usize, make: impl Fn() -> Command, ok: i32) -> Result<Summary, String> {
    // One untimed run warms the page cache.
    measure(make(), ok)?;
    let samples = (0..runs)
        .map(|_| measure(make(), ok))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(summarize(samples))
}

pub fn run(args: &[String]) -> Result<(), String> {
    let mut runs = 20usize;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => {
                runs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .ok_or("--runs needs a positive number")?;
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    cargo(&["build", "--release", "--locked", "-p", "kiln"])?;
    let root = workspace_root();
    let kiln = root.join("target/release/kiln");
    let images = kiln_testguest_builder::build(&root, &root.join("target/testguest"))
        .map_err(|e| e.to_string())?;

    let kiln_cmd = || {
        let mut c = Command::new(&kiln);
        c.args(["--memory", "128M", "--cpus", "1", "--cmdline", GUEST_ARGS]);
        c
    };
    verify(kiln_cmd(), "kiln")?;
    let k = series(runs, kiln_cmd, 0)?;

    println!("\nboot to power-off, conformance guest `exits` N=0, 128 MiB, 1 vCPU, {runs} runs:");
    println!(
        "{:<14} {:>10} {:>10} {:>12} {:>12}",
        "", "median ms", "min ms", "CPU ms", "peak RSS"
    );
    let row = |name: &str, s: &Summary| {
        println!(
            "{:<14} {:>10.1} {:>10.1} {:>12.1} {:>8.2} MiB",
            name,
            s.median_ms,
            s.min_ms,
            s.cpu_ms,
            s.rss_kib as f64 / 1024.0
        );
    };
    row("kiln", &k);

    if !have("qemu-system-x86_64") {
        println!("QEMU microvm: not measured (qemu-system-x86_64 not installed)");
        return Ok(());
    }
    let qemu_cmd = |elf: &Path| {
        let mut c = testguest::qemu_microvm("128M");
        c.arg("-kernel")
            .arg(elf)
            .arg("-append")
            .arg(format!("{GUEST_ARGS} kiln.verify=0"));
        c
    };
    verify(qemu_cmd(&images.elf), "QEMU microvm")?;
    // isa-debug-exit turns the guest's power-off write of 0 into exit status 1.
    let q = series(runs, || qemu_cmd(&images.elf), 1)?;
    row("QEMU microvm", &q);
    println!(
        "kiln / QEMU: wall {:.2}x, CPU {:.2}x, peak RSS {:.2}x",
        k.median_ms / q.median_ms,
        k.cpu_ms / q.cpu_ms,
        k.rss_kib as f64 / q.rss_kib as f64
    );
    Ok(())
}
