//! Running the benchmark guest under kiln and under other VMMs, and collecting its serial
//! output.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Kinds that need a kiln-specific device or KVM feature other VMMs don't provide.
const KILN_ONLY: [&str; 3] = ["msr-user", "mmio-ioeventfd", "irqfd"];

/// The `kiln` binary next to this one (both are built into the same target directory).
pub fn default_kiln() -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("locating kiln-bench: {e}"))?;
    let k = me.with_file_name("kiln");
    if k.is_file() {
        Ok(k)
    } else {
        Err(format!(
            "no kiln binary at {}; build it (cargo build --release -p kiln) or pass --kiln PATH",
            k.display()
        ))
    }
}

/// Writes the conformance guest ELF (embedded in the kiln library) to a file other VMMs can
/// load.
pub fn guest_elf() -> Result<PathBuf, String> {
    let p = std::env::temp_dir().join(format!("kiln-bench-guest-{}.elf", std::process::id()));
    std::fs::write(&p, kiln::guest::ELF).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(p)
}

/// Pins the calling thread to host CPU `cpu` (async-signal-safe: no allocation).
pub fn pin_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET only writes inside `set` (it checks `cpu`
    // against the set's size).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: valid set pointer and size; 0 is the calling thread.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the process `cmd` starts (all its threads) to `cpu`.
fn pin_to(cmd: &mut Command, cpu: usize) {
    // SAFETY: the closure runs in the child between fork and exec and only makes an
    // async-signal-safe call (sched_setaffinity) on data it owns.
    unsafe {
        cmd.pre_exec(move || pin_thread(cpu));
    }
}

/// Runs `cmd` until the guest prints `KTEST-DONE` (then stops the VMM) or `timeout`; returns
/// the output. Fails if the guest never finished or a scenario failed.
pub fn run_until_done(mut cmd: Command, who: &str, timeout: Duration) -> Result<String, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so stopping it stops anything it started too.
        .process_group(0);
    let mut child = cmd.spawn().map_err(|e| format!("{who}: {e}"))?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let err = child.stderr.take().ok_or("no stderr")?;
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(err), &mut s);
        s
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + timeout;
    let mut text = String::new();
    let mut done = false;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                text.push_str(&line);
                text.push('\n');
                if line.starts_with("KTEST-DONE") {
                    done = true;
                    break;
                }
            }
            Err(_) => break, // timeout, or the VMM exited
        }
    }
    if let Ok(pgid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill takes no pointers; the group is the child's own.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    let _ = child.wait();
    let stderr = err_thread.join().unwrap_or_default();
    if !done {
        return Err(format!(
            "{who}: the guest did not finish within {timeout:?}\n{text}{stderr}"
        ));
    }
    if let Some(fail) = text
        .lines()
        .find(|l| l.starts_with("KTEST ") && l.contains(" FAIL"))
    {
        return Err(format!("{who}: {fail}\n{stderr}"));
    }
    Ok(text)
}

/// Runs the guest under kiln with the benchmark devices on, with `cpus` vCPUs.
pub fn run_kiln(
    kiln: &Path,
    cmdline: &str,
    cpus: u32,
    pin: Option<usize>,
    timeout: Duration,
) -> Result<String, String> {
    let mut c = Command::new(kiln);
    c.args([
        "--cpus",
        &cpus.to_string(),
        "--memory",
        "256M",
        "--rng",
        "off",
        "--exit-bench",
        "--cmdline",
        cmdline,
    ]);
    if let Some(cpu) = pin {
        pin_to(&mut c, cpu);
    }
    run_until_done(c, "kiln", timeout)
}

/// Runs the floor (`kiln-bench floor`) in a fresh process, as kiln runs in one: both start
/// from the same state (new address space, cold caches, pages faulted in on first touch).
pub fn run_floor(cmdline: &str, pin: Option<usize>, timeout: Duration) -> Result<String, String> {
    let me = std::env::current_exe().map_err(|e| format!("locating kiln-bench: {e}"))?;
    let mut c = Command::new(me);
    c.args(["floor", "--cmdline", cmdline, "--timeout"])
        .arg(timeout.as_secs().max(1).to_string());
    if let Some(cpu) = pin {
        pin_to(&mut c, cpu);
    }
    let out = c
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("floor: starting kiln-bench floor: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "{}\n{text}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    if let Some(fail) = text
        .lines()
        .find(|l| l.starts_with("KTEST ") && l.contains(" FAIL"))
    {
        return Err(format!("floor: {fail}"));
    }
    Ok(text)
}

/// Another VMM to compare with.
#[derive(Debug)]
pub struct Other {
    kind: OtherKind,
    /// Its binary.
    pub path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OtherKind {
    Qemu,
    Firecracker,
}

impl Other {
    /// Parses `--compare NAME=PATH`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (name, path) = s
            .split_once('=')
            .ok_or_else(|| format!("--compare {s:?}: expected NAME=PATH"))?;
        let kind = match name {
            "qemu" => OtherKind::Qemu,
            "firecracker" => OtherKind::Firecracker,
            _ => {
                return Err(format!(
                    "--compare {s:?}: unknown VMM {name:?} (qemu or firecracker)"
                ))
            }
        };
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(format!("--compare {s:?}: {} is not a file", path.display()));
        }
        Ok(Other { kind, path })
    }

    /// The name used in the table.
    pub fn name(&self) -> &'static str {
        match self.kind {
            OtherKind::Qemu => "qemu-microvm",
            OtherKind::Firecracker => "firecracker",
        }
    }

    /// Whether this VMM can run `kind` (it needs no kiln-specific device or KVM feature).
    pub fn supports(&self, kind: &str) -> bool {
        !KILN_ONLY.contains(&kind)
    }

    /// Runs the guest under this VMM with `cpus` vCPUs.
    pub fn run(
        &self,
        cmdline: &str,
        cpus: u32,
        pin: Option<usize>,
        timeout: Duration,
    ) -> Result<String, String> {
        let elf = guest_elf()?;
        // kiln.verify=0: no kiln test devices to read back from; kiln.cpus: kiln appends it
        // itself, others don't (the `ipi` kind needs to know there is a second vCPU).
        let cmdline = format!("{cmdline} kiln.verify=0 kiln.cpus={cpus}");
        let mut c = Command::new(&self.path);
        let mut cleanup = vec![elf.clone()];
        match self.kind {
            OtherKind::Qemu => {
                c = kiln_testguest_builder::qemu_microvm(&self.path, "256M");
                c.arg("-smp")
                    .arg(cpus.to_string())
                    .arg("-kernel")
                    .arg(&elf)
                    .arg("-append")
                    .arg(&cmdline);
            }
            OtherKind::Firecracker => {
                let cfg = serde_json::json!({
                    "boot-source": { "kernel_image_path": elf, "boot_args": cmdline },
                    "drives": [],
                    "machine-config": { "vcpu_count": cpus, "mem_size_mib": 256 },
                });
                let p = elf.with_extension("json");
                std::fs::write(&p, cfg.to_string()).map_err(|e| format!("{}: {e}", p.display()))?;
                c.args(["--no-api", "--config-file"]).arg(&p);
                cleanup.push(p);
            }
        }
        if let Some(cpu) = pin {
            pin_to(&mut c, cpu);
        }
        let r = run_until_done(c, self.name(), timeout);
        for p in cleanup {
            let _ = std::fs::remove_file(p);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_flags() {
        assert!(Other::parse("qemu").unwrap_err().contains("NAME=PATH"));
        assert!(Other::parse("bochs=/bin/sh")
            .unwrap_err()
            .contains("unknown VMM"));
        assert!(Other::parse("qemu=/nonexistent")
            .unwrap_err()
            .contains("not a file"));
        let q = Other::parse("qemu=/bin/sh").unwrap();
        assert_eq!(q.name(), "qemu-microvm");
        assert!(q.supports("pio-out") && !q.supports("irqfd"));
    }

    #[test]
    fn run_until_done_stops_at_the_summary_and_reports_failures() {
        let mut ok = Command::new("sh");
        ok.args([
            "-c",
            "echo KTEST x PASS; echo KTEST-DONE pass=1 fail=0; sleep 30",
        ]);
        let t = Instant::now();
        let out = run_until_done(ok, "sh", Duration::from_secs(20)).unwrap();
        assert!(out.contains("KTEST-DONE"));
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "must not wait for the VMM to exit"
        );
        let mut bad = Command::new("sh");
        bad.args(["-c", "echo KTEST x FAIL why; echo KTEST-DONE pass=0 fail=1"]);
        assert!(run_until_done(bad, "sh", Duration::from_secs(20))
            .unwrap_err()
            .contains("FAIL why"));
        let mut silent = Command::new("sh");
        silent.args(["-c", "exit 0"]);
        assert!(run_until_done(silent, "sh", Duration::from_secs(5))
            .unwrap_err()
            .contains("did not finish"));
    }
}
