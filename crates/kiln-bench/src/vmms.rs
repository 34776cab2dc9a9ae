//! Running the benchmark guest under kiln and under other VMMs, and collecting its serial
//! output.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
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

/// The guest's first failed scenario line (`KTEST <name> FAIL ...`), if any.
fn failed_scenario(output: &str) -> Option<&str> {
    output
        .lines()
        .find(|l| l.starts_with("KTEST ") && l.contains(" FAIL"))
}

/// Starts `cmd` in a process group of its own (so signalling the group reaches anything it
/// starts too), with stdin closed; returns the child, its stdout, and a thread collecting
/// its stderr.
fn spawn_piped(
    mut cmd: Command,
    who: &str,
) -> Result<(Child, ChildStdout, JoinHandle<String>), String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().map_err(|e| format!("{who}: {e}"))?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let err = child.stderr.take().ok_or("no stderr")?;
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(err), &mut s);
        s
    });
    Ok((child, out, err_thread))
}

/// Runs `cmd` until the guest prints `KTEST-DONE` (then stops the VMM) or `timeout`; returns
/// the output. Fails if the guest never finished or a scenario failed.
pub fn run_until_done(cmd: Command, who: &str, timeout: Duration) -> Result<String, String> {
    let (mut child, out, err_thread) = spawn_piped(cmd, who)?;
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
    if let Some(fail) = failed_scenario(&text) {
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
    run_until_done(kiln_command(kiln, cmdline, cpus, pin), "kiln", timeout)
}

/// The command that runs the guest under kiln (see [`run_kiln`]).
fn kiln_command(kiln: &Path, cmdline: &str, cpus: u32, pin: Option<usize>) -> Command {
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
    c
}

/// Runs the floor (`kiln-bench floor`) in a fresh process, as kiln runs in one: both start
/// from the same state (new address space, cold caches, pages faulted in on first touch).
pub fn run_floor(cmdline: &str, pin: Option<usize>, timeout: Duration) -> Result<String, String> {
    let out = floor_command(cmdline, pin, timeout)?
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
    if let Some(fail) = failed_scenario(&text) {
        return Err(format!("floor: {fail}"));
    }
    Ok(text)
}

/// The command that runs the floor (see [`run_floor`]).
fn floor_command(cmdline: &str, pin: Option<usize>, timeout: Duration) -> Result<Command, String> {
    let me = std::env::current_exe().map_err(|e| format!("locating kiln-bench: {e}"))?;
    let mut c = Command::new(me);
    c.args(["floor", "--cmdline", cmdline, "--timeout"])
        .arg(timeout.as_secs().max(1).to_string());
    if let Some(cpu) = pin {
        pin_to(&mut c, cpu);
    }
    Ok(c)
}

/// Runs the guest under kiln (one vCPU) and the floor at the same time, taking turns on the
/// CPU every `slice` (the other one stopped with `SIGSTOP`), and lined up kind by kind: one
/// that begins a kind (`KBENCH begin`) ahead of the other waits until the other begins it
/// too. So both measure each kind under the same host conditions, and a change in the host's
/// load (other tenants, frequency) hits both alike instead of one run or the other. A pause
/// lands in the guest's round-trip histograms as one long round trip per slice, and in a
/// VMM-side exit time when it catches the VMM in user space (the typical time leaves such
/// an exit out).
///
/// Returns (kiln's output, the floor's output).
pub fn run_kiln_and_floor_interleaved(
    kiln: &Path,
    cmdline: &str,
    pin: Option<usize>,
    slice: Duration,
    timeout: Duration,
) -> Result<(String, String), String> {
    let cmds = [
        kiln_command(kiln, cmdline, 1, pin),
        floor_command(cmdline, pin, timeout)?,
    ];
    let [k, f] = run_interleaved(cmds, ["kiln", "floor"], slice, timeout)?;
    Ok((k, f))
}

/// One of the processes [`run_interleaved`] drives.
struct Turn {
    who: &'static str,
    child: std::process::Child,
    /// Its process group (it is the leader).
    pgid: libc::pid_t,
    text: String,
    /// `KBENCH begin` lines seen: how many kinds it has started.
    begun: usize,
    done: bool,
    stderr: Option<JoinHandle<String>>,
}

impl Turn {
    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill takes no pointers; the group is our child's own.
        unsafe { libc::kill(-self.pgid, sig) };
    }
}

/// Runs two guests by turns (see [`run_kiln_and_floor_interleaved`]) until both print
/// `KTEST-DONE`; returns their outputs.
fn run_interleaved(
    cmds: [Command; 2],
    names: [&'static str; 2],
    slice: Duration,
    timeout: Duration,
) -> Result<[String; 2], String> {
    let (tx, rx) = mpsc::channel::<(usize, Option<String>)>();
    let mut turns = Vec::new();
    for (i, (mut cmd, who)) in cmds.into_iter().zip(names).enumerate() {
        // SAFETY: runs in the child between fork and exec and makes one async-signal-safe
        // call. If kiln-bench dies (Ctrl-C), a child it had stopped would otherwise stay
        // stopped for good, holding its VM.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (child, out, stderr) = spawn_piped(cmd, who)?;
        let pgid = libc::pid_t::try_from(child.id()).map_err(|e| format!("{who}: {e}"))?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((i, Some(line))).is_err() {
                    return;
                }
            }
            let _ = tx.send((i, None));
        });
        turns.push(Turn {
            who,
            child,
            pgid,
            text: String::new(),
            begun: 0,
            done: false,
            stderr: Some(stderr),
        });
    }
    drop(tx);
    // The second waits for its first turn.
    turns[1].signal(libc::SIGSTOP);
    let mut running = 0;
    let deadline = Instant::now() + timeout;
    let mut turn_ends = Instant::now() + slice;
    let result = loop {
        if turns.iter().all(|t| t.done) {
            break Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            break Err(format!("the guests did not finish within {timeout:?}"));
        }
        let event = rx.recv_timeout(turn_ends.min(deadline).saturating_duration_since(now));
        let mut switch = Instant::now() >= turn_ends;
        match event {
            Ok((i, Some(line))) => {
                let t = &mut turns[i];
                t.text.push_str(&line);
                t.text.push('\n');
                if line.starts_with("KBENCH begin ") {
                    t.begun += 1;
                } else if line.starts_with("KTEST-DONE") {
                    t.done = true;
                    t.signal(libc::SIGKILL);
                    switch = true;
                }
            }
            // Its output ended without KTEST-DONE: it died.
            Ok((i, None)) if !turns[i].done => {
                break Err(format!(
                    "{}: exited before the guest finished",
                    turns[i].who
                ));
            }
            Ok((_, None)) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break Ok(()),
        }
        // One that has begun more kinds than the other (still running) waits for it.
        let ahead = |a: &Turn, b: &Turn| !b.done && a.begun > b.begun;
        let other = 1 - running;
        let may_run = |i: usize| !turns[i].done && !ahead(&turns[i], &turns[1 - i]);
        if !may_run(running) {
            switch = true;
        }
        if switch {
            let next = if may_run(other) { other } else { running };
            if next != running {
                if !turns[running].done {
                    turns[running].signal(libc::SIGSTOP);
                }
                turns[next].signal(libc::SIGCONT);
                running = next;
            }
            turn_ends = Instant::now() + slice;
        }
    };
    // Both end before anything is reported, whatever happened.
    for t in &turns {
        t.signal(libc::SIGKILL);
        t.signal(libc::SIGCONT);
    }
    let mut stderrs = Vec::new();
    for t in &mut turns {
        let _ = t.child.wait();
        stderrs.push(
            t.stderr
                .take()
                .and_then(|h| h.join().ok())
                .unwrap_or_default(),
        );
    }
    if let Err(why) = result {
        let detail: String = turns
            .iter()
            .zip(&stderrs)
            .map(|(t, e)| format!("--- {}:\n{}{e}", t.who, t.text))
            .collect();
        return Err(format!("{why}\n{detail}"));
    }
    for (t, e) in turns.iter().zip(&stderrs) {
        if let Some(fail) = failed_scenario(&t.text) {
            return Err(format!("{}: {fail}\n{e}", t.who));
        }
    }
    let mut outs = turns.into_iter().map(|t| t.text);
    match (outs.next(), outs.next()) {
        (Some(a), Some(b)) => Ok([a, b]),
        _ => Err("two outputs expected".into()),
    }
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

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    /// The time on the line starting with `T ` (ns since the epoch).
    fn stamp(out: &str) -> u128 {
        out.lines()
            .find_map(|l| l.strip_prefix("T "))
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or_else(|| panic!("no T line in {out:?}"))
    }

    #[test]
    fn interleaved_guests_are_lined_up_by_kind() {
        // `a` begins its kind at once, `b` two seconds later: `a` must wait for `b` (stopped,
        // so its short sleep only ends after `b` has begun).
        let a = sh("echo 'KBENCH begin kind=x'; sleep 0.5; echo T $(date +%s%N); echo KTEST-DONE; sleep 30");
        let b = sh("sleep 2; echo T $(date +%s%N); echo 'KBENCH begin kind=x'; echo KTEST-DONE");
        let t = Instant::now();
        let [oa, ob] = run_interleaved(
            [a, b],
            ["a", "b"],
            Duration::from_millis(10),
            Duration::from_secs(20),
        )
        .unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "must not wait for the VMMs to exit"
        );
        assert!(
            oa.contains("KTEST-DONE") && ob.contains("KBENCH begin kind=x"),
            "{oa}\n{ob}"
        );
        assert!(
            stamp(&oa) >= stamp(&ob),
            "a ran on before b began the kind: a at {}, b at {}",
            stamp(&oa),
            stamp(&ob)
        );
    }

    #[test]
    fn interleaved_runs_report_failures_deaths_and_timeouts() {
        let ok = || sh("echo KTEST-DONE pass=1 fail=0");
        let bad = sh("echo KTEST x FAIL why; echo KTEST-DONE pass=0 fail=1");
        let e = run_interleaved(
            [ok(), bad],
            ["a", "b"],
            Duration::from_millis(5),
            Duration::from_secs(20),
        )
        .unwrap_err();
        assert!(e.contains("b: KTEST x FAIL why"), "{e}");
        let dies = sh("echo partial; exit 3");
        let e = run_interleaved(
            [dies, ok()],
            ["a", "b"],
            Duration::from_millis(5),
            Duration::from_secs(20),
        )
        .unwrap_err();
        assert!(e.contains("a: exited before the guest finished"), "{e}");
        let hangs = sh("sleep 30");
        let t = Instant::now();
        let e = run_interleaved(
            [ok(), hangs],
            ["a", "b"],
            Duration::from_millis(5),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(e.contains("did not finish"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
