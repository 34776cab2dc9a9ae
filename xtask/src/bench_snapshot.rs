//! `cargo xtask bench-snapshot [--runs N] [--sizes MIB,MIB]`: snapshot create and restore
//! times of the conformance guest's `counter` scenario after it has written (nearly) all of
//! its RAM once, for guests of 256 MiB and 1 GiB by default.
//!
//! - create: kiln's own report for `snapshot STATE MEM` on a paused VM (vCPU, device and
//!   VM state captured, the sparse memory file and the state file written and fsync'd);
//! - restore: kiln's `restored ... in X ms` line (state read and checked, memory file mapped,
//!   VM rebuilt, vCPU threads started: the next thing they do is `KVM_RUN`), and the wall time
//!   from spawning `kiln --restore` to the guest's first line after it.
//!
//! Files go to a directory under `target/` (page cache warm, as for a restore right after a
//! snapshot on one host).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::{cargo, workspace_root};

const LIMIT: Duration = Duration::from_secs(300);

/// Lines of a child's stdout and stderr, as they come.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
    }
    if let Some(err) = child.stderr.take() {
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
    }
    rx
}

fn wait_line(
    rx: &mpsc::Receiver<String>,
    what: &str,
    f: impl Fn(&str) -> bool,
) -> Result<String, String> {
    let start = Instant::now();
    while start.elapsed() < LIMIT {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(l) if f(&l) => return Ok(l),
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(format!("kiln ended before {what}"))
            }
        }
    }
    Err(format!("no {what} within {LIMIT:?}"))
}

fn ctl(sock: &Path, cmd: &str) -> Result<String, String> {
    let start = Instant::now();
    let s = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(format!("{}: {e}", sock.display())),
        }
    };
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    writeln!(w, "{cmd}").map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if line.starts_with("ok") {
        Ok(line.trim().to_string())
    } else {
        Err(format!("{cmd}: {}", line.trim()))
    }
}

/// The number after `key` in `text` (`... in 12.3 ms` → 12.3 for key "in ").
fn number_after(text: &str, key: &str) -> Option<f64> {
    let rest = &text[text.find(key)? + key.len()..];
    rest.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()?
        .parse()
        .ok()
}

struct Sample {
    create_ms: f64,
    data_mib: f64,
    restore_ms: f64,
    first_line_ms: f64,
}

fn one(kiln: &Path, dir: &Path, mib: u64) -> Result<Sample, String> {
    let sock = dir.join("ctl");
    let _ = std::fs::remove_file(&sock);
    // All free RAM above the guest's 17 MiB image, rewritten as fast as the vCPU goes.
    let touched = mib.saturating_sub(24);
    let cmdline = format!(
        "console=ttyS0 kiln.test=counter kiln.counter.mib={touched} kiln.counter.rate=0 \
         kiln.counter.period_ms=100 kiln.counter.secs=0"
    );
    let mut child = Command::new(kiln)
        .args([
            "--memory",
            &format!("{mib}M"),
            "--rng",
            "off",
            "--cmdline",
            &cmdline,
        ])
        .arg("--control-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn kiln: {e}"))?;
    let rx = lines(&mut child);
    let result = (|| {
        // Pass 2 runs once every page has been written.
        wait_line(&rx, "counter pass=2", |l| l.contains("pass=2"))?;
        ctl(&sock, "pause")?;
        let report = ctl(
            &sock,
            &format!(
                "snapshot {} {}",
                dir.join("state").display(),
                dir.join("memory").display()
            ),
        )?;
        let create_ms = number_after(&report, " in ").ok_or(format!("report: {report}"))?;
        let data_mib = number_after(&report, "memory, ").unwrap_or(0.0) / 1024.0;
        Ok::<_, String>((create_ms, data_mib))
    })();
    let _ = child.kill();
    let _ = child.wait();
    let (create_ms, data_mib) = result?;

    let start = Instant::now();
    let mut child = Command::new(kiln)
        .arg("--restore")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn kiln --restore: {e}"))?;
    let rx = lines(&mut child);
    let result = (|| {
        let restored = wait_line(&rx, "the restore line", |l| l.starts_with("kiln: restored"))?;
        let restore_ms =
            number_after(&restored, " in ").ok_or(format!("restore line: {restored}"))?;
        wait_line(&rx, "a counter line", |l| l.starts_with("counter seq="))?;
        Ok::<_, String>((restore_ms, start.elapsed().as_secs_f64() * 1e3))
    })();
    let _ = child.kill();
    let _ = child.wait();
    let (restore_ms, first_line_ms) = result?;
    Ok(Sample {
        create_ms,
        data_mib,
        restore_ms,
        first_line_ms,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(args: &[String]) -> Result<(), String> {
    let mut runs = 3usize;
    let mut sizes = vec![256u64, 1024];
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
            "--sizes" => {
                sizes = it
                    .next()
                    .ok_or("--sizes needs MIB[,MIB...]")?
                    .split(',')
                    .map(|s| s.parse().ok().filter(|&m: &u64| m >= 64))
                    .collect::<Option<_>>()
                    .ok_or("--sizes: sizes in MiB, at least 64")?;
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    cargo(&["build", "--release", "--locked", "-p", "kiln"])?;
    let root = workspace_root();
    let kiln = root.join("target/release/kiln");
    let dir: PathBuf = root.join("target/bench-snapshot");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    println!("\nsnapshot of the counter guest after it wrote all its free RAM, 1 vCPU, {runs} runs (median):");
    println!(
        "{:>8} {:>12} {:>14} {:>14} {:>18}",
        "guest", "create ms", "written MiB", "restore ms", "to 1st line ms"
    );
    for mib in sizes {
        let samples = (0..runs)
            .map(|_| one(&kiln, &dir, mib))
            .collect::<Result<Vec<_>, _>>()?;
        println!(
            "{:>5} MiB {:>12.1} {:>14.1} {:>14.1} {:>18.1}",
            mib,
            median(samples.iter().map(|s| s.create_ms).collect()),
            median(samples.iter().map(|s| s.data_mib).collect()),
            median(samples.iter().map(|s| s.restore_ms).collect()),
            median(samples.iter().map(|s| s.first_line_ms).collect()),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "restore ms: state read and checked, memory file mapped (pages load lazily), VM rebuilt, \
         vCPU threads started (their next step is KVM_RUN)"
    );
    Ok(())
}
