//! vsock throughput: the conformance guest's `vsock-bench` scenario under `kiln --vsock`,
//! against a host Unix listener this task serves (`<uds>_1234`: read the guest's stream to
//! EOF, then send as many bytes back and close). The guest times both directions with
//! kvmclock and prints `KBENCH vsock g2h_mib_s=.. h2g_mib_s=..`.
//!
//! [`run`] is `cargo xtask bench-vsock [--runs N] [--mib N]`; [`measure`] is what a combined
//! network benchmark (`bench-net`) calls.
//!
//! QEMU is not compared: its only vsock device is vhost-vsock, which needs the host's
//! `/dev/vhost-vsock` and an `AF_VSOCK` peer, not a Unix socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use crate::{cargo, workspace_root};

/// The guest port the scenario connects to.
const PORT: u32 = 1234;

/// Throughput of one run, MiB/s.
#[derive(Debug, Clone, Copy)]
pub struct VsockRate {
    /// Guest to host.
    pub g2h: f64,
    /// Host to guest.
    pub h2g: f64,
}

/// Serves one bench connection: counts the guest's bytes to EOF, then sends as many back.
fn serve(l: UnixListener) -> Result<u64, String> {
    let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n as u64,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let mut left = got;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n]).map_err(|e| format!("write: {e}"))?;
        left -= n as u64;
    }
    Ok(got)
}

fn once(kiln: &Path, dir: &Path, mib: u64) -> Result<VsockRate, String> {
    let uds = dir.join("bench.sock");
    let port = dir.join(format!("bench.sock_{PORT}"));
    for p in [&uds, &port] {
        let _ = std::fs::remove_file(p);
    }
    let l = UnixListener::bind(&port).map_err(|e| format!("{}: {e}", port.display()))?;
    let server = thread::spawn(move || serve(l));
    let out = Command::new(kiln)
        .args(["--memory", "256M", "--cpus", "1", "--rng", "off"])
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", uds.display()))
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 kiln.test=vsock-bench kiln.vsock.port={PORT} kiln.vsock.mib={mib}"
        ))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("kiln: {e}"))?;
    let _ = std::fs::remove_file(&port);
    let text = String::from_utf8_lossy(&out.stdout);
    let fail = || {
        format!(
            "kiln: no passing vsock-bench:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    };
    if !text.contains("KTEST vsock-bench PASS") {
        return Err(fail());
    }
    server
        .join()
        .map_err(|_| "the host side panicked".to_string())??;
    let line = text
        .lines()
        .find(|l| l.starts_with("KBENCH vsock "))
        .ok_or_else(fail)?;
    let get = |key: &str| -> Result<f64, String> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .ok_or_else(fail)
    };
    Ok(VsockRate {
        g2h: get("g2h_mib_s")?,
        h2g: get("h2g_mib_s")?,
    })
}

/// Runs `vsock-bench` `runs` times with `mib` MiB each way under the `kiln` binary at
/// `kiln`; scratch files go in `dir`.
pub fn measure(kiln: &Path, dir: &Path, runs: usize, mib: u64) -> Result<Vec<VsockRate>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    (0..runs)
        .map(|i| {
            println!("== vsock run {}/{runs}", i + 1);
            once(kiln, dir, mib)
        })
        .collect()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Prints the median of `rates` (and why QEMU is absent).
pub fn report(rates: &[VsockRate], mib: u64) {
    if rates.is_empty() {
        return;
    }
    println!(
        "\nvsock-bench in the conformance guest: 1 vCPU, {mib} MiB each way, one connection, \
         median of {} runs",
        rates.len()
    );
    println!("{:<16} {:>14} {:>14}", "metric", "kiln", "QEMU microvm");
    let g = median(rates.iter().map(|r| r.g2h).collect());
    let h = median(rates.iter().map(|r| r.h2g).collect());
    println!("{:<16} {g:>14.1} {:>14}", "g2h_mib_s", "-");
    println!("{:<16} {h:>14.1} {:>14}", "h2g_mib_s", "-");
    let vhost = Path::new("/dev/vhost-vsock").exists();
    println!(
        "QEMU microvm: not measured (its vsock device is vhost-vsock only: it needs \
         /dev/vhost-vsock, {} here, and an AF_VSOCK host peer instead of a Unix socket)",
        if vhost { "present" } else { "absent" }
    );
}

/// `cargo xtask bench-vsock [--runs N] [--mib N]`.
pub fn run(args: &[String]) -> Result<(), String> {
    let (mut runs, mut mib) = (3usize, 64u64);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = |what: &str| -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .filter(|n| *n > 0)
                .ok_or(format!("{what} needs a positive number"))
        };
        match a.as_str() {
            "--runs" => runs = num("--runs")? as usize,
            "--mib" => mib = num("--mib")?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    cargo(&["build", "--release", "--locked", "-p", "kiln"])?;
    let root = workspace_root();
    let rates = measure(
        &root.join("target/release/kiln"),
        &root.join("target/bench-vsock"),
        runs,
        mib,
    )?;
    report(&rates, mib);
    Ok(())
}
