//! Helpers for the jailer's integration tests: root/KVM gating, statically linked `kiln` and
//! probe binaries, scratch jails and cgroups that are removed afterwards, and running the
//! jailer with a deadline.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The jailed binaries' target: the jail has no dynamic loader, so they are built with a
/// static C runtime for the host triple.
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

pub fn is_root() -> bool {
    // SAFETY: geteuid has no failure modes or memory effects.
    unsafe { libc::geteuid() == 0 }
}

/// True (after printing why) when `test` can't run: it needs root.
pub fn skip_unless_root(test: &str) -> bool {
    if !is_root() {
        eprintln!("SKIPPED {test}: needs root");
        return true;
    }
    false
}

/// True when a test that runs a VMM should skip: not root, or `KILN_SKIP_KVM=1` (the
/// workspace's switch). Without that switch, a missing /dev/kvm fails the test.
pub fn skip_unless_root_and_kvm(test: &str) -> bool {
    if skip_unless_root(test) {
        return true;
    }
    if std::env::var_os("KILN_SKIP_KVM").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED {test}: KILN_SKIP_KVM=1");
        return true;
    }
    assert!(
        Path::new("/dev/kvm").exists(),
        "{test} needs /dev/kvm; set KILN_SKIP_KVM=1 to skip KVM tests"
    );
    false
}

/// The jailer under test (built by cargo for this test).
pub fn jailer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln-jailer"))
}

/// Statically linked `kiln` and `kiln-jail-probe`.
#[derive(Debug)]
pub struct StaticBins {
    pub kiln: PathBuf,
    pub probe: PathBuf,
}

/// Builds [`StaticBins`] once per test process with a nested `cargo build` into
/// `<target>/jail-static` (its own target directory, so the outer build's lock and
/// artifacts are left alone). The first build compiles kiln's dependencies again (a minute
/// or two); later ones only what changed.
pub fn static_bins() -> &'static StaticBins {
    static BINS: OnceLock<StaticBins> = OnceLock::new();
    BINS.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let target_dir = target_dir().join("jail-static");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(&root)
            .args(["build", "-p", "kiln", "-p", "kiln-jailer"])
            .args(["--bin", "kiln", "--bin", "kiln-jail-probe"])
            .args(["--target", STATIC_TARGET, "--target-dir"])
            .arg(&target_dir)
            // With --target these flags reach only the target's crates, not build scripts.
            .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_BUILD_RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET");
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("running {cargo:?} build for the static binaries: {e}"));
        assert!(
            out.status.success(),
            "building statically linked kiln and kiln-jail-probe failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = target_dir.join(STATIC_TARGET).join("debug");
        StaticBins {
            kiln: dir.join("kiln"),
            probe: dir.join("kiln-jail-probe"),
        }
    })
}

/// The cargo target directory this test runs from (`<target>/debug/deps/<test>`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .expect("test executable inside a cargo target directory")
}

/// A scratch chroot base directory and a cgroup parent name of this test only; both are
/// removed (cgroups in every hierarchy) when dropped.
pub struct Scratch {
    pub base: PathBuf,
    pub parent_cgroup: String,
    name: String,
    /// Extra cleanup, e.g. unmounting a namespace file.
    pub on_drop: Vec<Box<dyn FnOnce() + Send>>,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let tag = format!("kjt-{}-{name}", std::process::id());
        // Under the target directory rather than /tmp, which is often a nodev tmpfs (where
        // the jail's device nodes couldn't be opened, so the jailer refuses it).
        let mut base = target_dir().join("jail-tests").join(&tag);
        let _ = std::fs::remove_dir_all(&base);
        if std::fs::create_dir_all(&base).is_err() {
            // Not ours to write (a non-root run of a root-built tree): the temp dir will do
            // for the tests that can run then.
            base = std::env::temp_dir().join(&tag);
            let _ = std::fs::remove_dir_all(&base);
            std::fs::create_dir_all(&base).expect("scratch base dir");
        }
        Scratch {
            base,
            parent_cgroup: tag,
            name: name.to_string(),
            on_drop: Vec::new(),
        }
    }

    /// A fresh, valid `--id`.
    pub fn id(&self) -> String {
        format!("{}-{}", self.name, SEQ.fetch_add(1, Ordering::Relaxed))
    }

    /// `<base>/<exec name>/<id>/root`.
    pub fn chroot(&self, exec_name: &str, id: &str) -> PathBuf {
        self.base.join(exec_name).join(id).join("root")
    }

    /// Everything under the base directory (relative paths), sorted.
    pub fn contents(&self) -> Vec<String> {
        let mut out = Vec::new();
        walk(&self.base, &self.base, &mut out);
        out.sort();
        out
    }

    /// This test's parent cgroup in every mounted hierarchy that has one.
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        cgroup_mounts()
            .into_iter()
            .map(|m| m.join(&self.parent_cgroup))
            .filter(|p| p.exists())
            .collect()
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        out.push(p.strip_prefix(root).unwrap_or(&p).display().to_string());
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(root, &p, out);
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Cgroups first: a controller can't be turned off in a parent's subtree_control
        // (an on_drop hook) while a child cgroup still uses it.
        for dir in self.cgroup_dirs() {
            remove_cgroup_tree(&dir);
        }
        for f in self.on_drop.drain(..) {
            f();
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// Removes a cgroup and its children (rmdir only; retried while exiting processes leave).
pub fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let start = Instant::now();
    while let Err(e) = std::fs::remove_dir(dir) {
        if e.kind() == std::io::ErrorKind::NotFound || start.elapsed() > Duration::from_secs(5) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("warning: could not remove cgroup {}: {e}", dir.display());
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Mount points of every cgroup hierarchy (v1 and v2), from /proc/self/mountinfo.
pub fn cgroup_mounts() -> Vec<PathBuf> {
    mountinfo()
        .into_iter()
        .filter(|(fstype, _, _)| fstype == "cgroup" || fstype == "cgroup2")
        .map(|(_, point, _)| point)
        .collect()
}

/// The v1 mount that holds `controller`.
pub fn v1_mount(controller: &str) -> Option<PathBuf> {
    mountinfo()
        .into_iter()
        .find(|(fstype, _, opts)| fstype == "cgroup" && opts.split(',').any(|o| o == controller))
        .map(|(_, point, _)| point)
}

/// The v2 mount.
pub fn v2_mount() -> Option<PathBuf> {
    mountinfo()
        .into_iter()
        .find(|(fstype, _, _)| fstype == "cgroup2")
        .map(|(_, point, _)| point)
}

/// (fstype, mount point, super options) for each mount.
fn mountinfo() -> Vec<(String, PathBuf, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split(' ').nth(4)?.replace("\\040", " ");
            let mut r = right.split(' ');
            let fstype = r.next()?.to_string();
            let opts = r.nth(1)?.to_string();
            Some((fstype, PathBuf::from(point), opts))
        })
        .collect()
}

/// What one jailer run produced.
#[derive(Debug)]
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl Outcome {
    pub fn ctx(&self) -> String {
        format!(
            "status {:?}{}\nstdout:\n{}\nstderr:\n{}",
            self.code,
            if self.timed_out { " (timed out)" } else { "" },
            self.stdout,
            self.stderr
        )
    }

    /// The probe's `key=value` lines.
    pub fn probe(&self) -> BTreeMap<String, String> {
        parse_report(&self.stdout)
    }
}

/// `key=value` lines of a probe report.
pub fn parse_report(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A running jailer whose stdout lines can be waited for.
pub struct Running {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    stdout: std::sync::Arc<Mutex<String>>,
    out_thread: Option<std::thread::JoinHandle<()>>,
    err_thread: Option<std::thread::JoinHandle<String>>,
}

/// Starts `cmd` with stdin on /dev/null and stdout/stderr captured.
pub fn spawn(mut cmd: Command) -> Running {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn kiln-jailer");
    let out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let (tx, lines) = mpsc::channel();
    let stdout = std::sync::Arc::new(Mutex::new(String::new()));
    let acc = stdout.clone();
    let out_thread = std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Ok(mut s) = acc.lock() {
                s.push_str(&line);
                s.push('\n');
            }
            let _ = tx.send(line);
        }
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    Running {
        child,
        lines,
        stdout,
        out_thread: Some(out_thread),
        err_thread: Some(err_thread),
    }
}

impl Running {
    /// Waits for a stdout line equal to `want`; false on timeout or end of output.
    pub fn wait_line(&self, want: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l == want => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    }

    /// Waits for the process to exit (killing it after `limit`) and collects its output.
    pub fn finish(mut self, limit: Duration) -> Outcome {
        let start = Instant::now();
        let mut timed_out = false;
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                break st;
            }
            if start.elapsed() > limit {
                timed_out = true;
                let _ = self.child.kill();
                break self.child.wait().expect("wait after kill");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // Output ends when every holder of the pipes exits (with --new-pid-ns that is the
        // jailed process, not the jailer): don't wait for it past the limit.
        let join_deadline = start + limit + Duration::from_secs(5);
        let done = |r: &Self| {
            r.out_thread.as_ref().is_none_or(|t| t.is_finished())
                && r.err_thread.as_ref().is_none_or(|t| t.is_finished())
        };
        while !done(&self) && Instant::now() < join_deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.out_thread.as_ref().is_some_and(|t| t.is_finished()) {
            let _ = self.out_thread.take().map(|t| t.join());
        }
        let stderr = match self.err_thread.take() {
            Some(t) if t.is_finished() => t.join().unwrap_or_default(),
            _ => "<stderr still open after the deadline>".to_string(),
        };
        let stdout = self.stdout.lock().map(|s| s.clone()).unwrap_or_default();
        Outcome {
            code: status.code(),
            stdout,
            stderr,
            timed_out,
        }
    }
}

/// Runs the jailer with `args` to completion.
pub fn run(args: &[&str], limit: Duration) -> Outcome {
    let mut cmd = jailer();
    cmd.args(args);
    spawn(cmd).finish(limit)
}

/// Makes the child run as `uid:gid` with no supplementary groups (before it execs).
pub fn as_user(cmd: &mut Command, uid: u32, gid: u32) {
    // SAFETY: only async-signal-safe calls (setgroups, setresgid, setresuid) between fork
    // and exec, and no allocation.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Reads a whole file as a trimmed string ("" if it can't be read).
pub fn read(p: &Path) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `Uid:`/`Gid:` lines of /proc/<pid>/status, e.g. "10123\t10123\t10123\t10123".
pub fn proc_status(pid: u32, key: &str) -> String {
    read(&PathBuf::from(format!("/proc/{pid}/status")))
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}
