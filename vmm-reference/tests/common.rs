//! Helpers shared by kiln's integration tests: run the `kiln` binary with a deadline and
//! read the conformance guest's `KTEST` lines.
#![allow(dead_code)]

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// True when KVM tests should be skipped: `KILN_SKIP_KVM=1` (prints why). Without it, a
/// missing /dev/kvm fails the calling test: KVM tests never pass quietly without KVM.
pub fn skip_kvm(test: &str) -> bool {
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

/// What one `kiln` run produced.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl Run {
    /// All `KTEST <name> <verdict> ...` lines as (name, verdict, rest).
    pub fn ktests(&self) -> Vec<(String, String, String)> {
        self.stdout
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix("KTEST "))
            .filter_map(|l| {
                let mut it = l.splitn(3, ' ');
                Some((
                    it.next()?.to_string(),
                    it.next()?.to_string(),
                    it.next().unwrap_or("").to_string(),
                ))
            })
            .collect()
    }

    /// Panics unless kiln exited 0, every listed scenario printed PASS, no scenario printed
    /// FAIL, and the guest's `KTEST-DONE ... fail=0` summary is there.
    pub fn assert_passed(&self, scenarios: &[&str]) {
        let ctx = || format!("stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        assert!(!self.timed_out, "kiln timed out\n{}", ctx());
        let k = self.ktests();
        for (name, verdict, rest) in &k {
            assert_eq!(verdict, "PASS", "scenario {name} failed: {rest}\n{}", ctx());
        }
        for s in scenarios {
            assert!(
                k.iter().any(|(n, _, _)| n == s),
                "scenario {s} missing\n{}",
                ctx()
            );
        }
        assert!(
            self.stdout
                .lines()
                .any(|l| l.starts_with("KTEST-DONE") && l.contains("fail=0")),
            "no KTEST-DONE fail=0 line\n{}",
            ctx()
        );
        assert_eq!(self.code, Some(0), "kiln exit status\n{}", ctx());
    }
}

pub fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

/// Starts kiln with `args` and `--cmdline cmdline`, stdin, stdout and stderr piped, for tests
/// that talk to the guest or watch the process while it runs.
pub fn spawn_piped(args: &[&str], cmdline: &str) -> std::process::Child {
    kiln()
        .args(args)
        .args(["--cmdline", cmdline])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln")
}

/// Runs `cmd` with stdin from `input`, killing it after `limit`.
pub fn run_with(mut cmd: Command, input: Option<&[u8]>, limit: Duration) -> Run {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().expect("spawn kiln");
    if let Some(bytes) = input {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        let bytes = bytes.to_vec();
        std::thread::spawn(move || {
            // Give the guest time to reach its read loop; the FIFO holds the rest anyway.
            let _ = stdin.write_all(&bytes);
            std::thread::sleep(Duration::from_secs(30));
        });
    }
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > limit {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait after kill");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Run {
        code: status.code(),
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
        timed_out,
    }
}

pub fn run(args: &[&str]) -> Run {
    let mut cmd = kiln();
    cmd.args(args);
    run_with(cmd, None, Duration::from_secs(60))
}

/// A scratch directory unique to this test process and `name`, removed with everything in it
/// when dropped (at the end of the test, pass or fail).
pub fn scratch(name: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("kiln-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).expect("scratch dir");
    Scratch(d)
}

/// See [`scratch`]; derefs to its path.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<std::path::Path> for Scratch {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// FNV-1a 64, as the guest computes it over the initrd.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Writes the bundled guest images to files for `--kernel`.
pub fn guest_files(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let elf = dir.join("kiln-testguest.elf");
    let bz = dir.join("kiln-testguest.bzImage");
    std::fs::write(&elf, kiln::guest::ELF).expect("write elf");
    std::fs::write(&bz, kiln::guest::BZIMAGE).expect("write bzImage");
    (elf, bz)
}

pub const MARKER: &str = "Kiln-cmdline_0123456789~!@#%^&*()";

/// Sends one line to a `--control-sock` (retrying the connect for up to 20 s while kiln
/// starts) and returns its answer line.
pub fn ctl(sock: &std::path::Path, cmd: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let start = Instant::now();
    let s = loop {
        match std::os::unix::net::UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("connect {}: {e}", sock.display()),
        }
    };
    let mut w = s.try_clone().expect("clone");
    writeln!(w, "{cmd}").expect("write command");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("answer");
    line.trim().to_string()
}

/// The `counter` scenario's command line: 8 MiB dirtied at 20 MiB/s, a line every
/// `period_ms`, for `secs` seconds.
pub fn counter_cmdline(period_ms: u64, secs: u32) -> String {
    format!(
        "console=ttyS0 kiln.test=counter kiln.counter.mib=8 kiln.counter.rate=20 \
         kiln.counter.period_ms={period_ms} kiln.counter.secs={secs}"
    )
}

/// A zeroed 16 MiB disk image in `dir` the counter can stamp (it wants at least 32768
/// sectors).
pub fn counter_disk(dir: &std::path::Path) -> PathBuf {
    let p = dir.join("disk.img");
    let f = std::fs::File::create(&p).expect("create disk");
    f.set_len(16 << 20).expect("size disk");
    p
}
