//! virtio-vsock end to end: the conformance guest's `vsock`, `vsock-evil` scenarios against
//! host Unix sockets this test serves (docs/guest-contract.md, "virtio-vsock"), and
//! `--vsock` option errors.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{kiln, scratch, skip_kvm, Run};

/// Word `k` of the contract's test stream with `seed` (little-endian on the wire).
fn word(seed: u8, k: u64) -> u64 {
    (k ^ (u64::from(seed) * 0x0101_0101_0101_0101)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}
const SEED_G2H: u8 = 0x47;
const SEED_H2G: u8 = 0x48;

/// The first `len` bytes (a multiple of 8) of the stream.
fn stream(seed: u8, len: usize) -> Vec<u8> {
    (0..len as u64 / 8)
        .flat_map(|k| word(seed, k).to_le_bytes())
        .collect()
}

/// The contract's checksum of the first `len` bytes of the stream.
fn checksum(seed: u8, len: usize) -> u64 {
    (0..len as u64 / 8).fold(0xcbf2_9ce4_8422_2325, |h, k| {
        (h ^ word(seed, k))
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(29)
    })
}

fn port_path(uds: &Path, port: u32) -> PathBuf {
    PathBuf::from(format!("{}_{port}", uds.display()))
}

/// A kiln run whose stdout lines the test sees as they come.
struct Live {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    out: thread::JoinHandle<String>,
    err: thread::JoinHandle<String>,
}

impl Live {
    fn spawn(args: &[&str], cmdline: &str) -> Live {
        let mut child = kiln()
            .args(args)
            .args(["--cmdline", cmdline])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn kiln");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        let out = thread::spawn(move || {
            let mut all = String::new();
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                all.push_str(&l);
                all.push('\n');
                let _ = tx.send(l);
            }
            all
        });
        let mut stderr = child.stderr.take().expect("stderr");
        let err = thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Live {
            child,
            lines,
            out,
            err,
        }
    }

    /// Waits for a stdout line containing `what` (None on timeout or exit).
    fn wait_line(&self, what: &str, limit: Duration) -> Option<String> {
        let end = Instant::now() + limit;
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(what) => return Some(l),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Waits for kiln to end (killing it after `limit`).
    fn finish(mut self, limit: Duration) -> Run {
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
            thread::sleep(Duration::from_millis(10));
        };
        Run {
            code: status.code(),
            stdout: self.out.join().unwrap_or_default(),
            stderr: self.err.join().unwrap_or_default(),
            timed_out,
        }
    }
}

/// Connects to kiln's listener and asks for guest `port`; returns the stream and the local
/// port kiln reports.
fn host_connect(uds: &Path, port: u32) -> Result<(UnixStream, u32), String> {
    let mut s = UnixStream::connect(uds).map_err(|e| format!("connect {}: {e}", uds.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 32 {
        match s.read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) => line.push(b[0]),
            Ok(_) => return Err(format!("EOF after {:?}", String::from_utf8_lossy(&line))),
            Err(e) => return Err(format!("reading the OK line: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&line).to_string();
    let local = line
        .strip_prefix("OK ")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("expected OK <port>, got {line:?}"))?;
    Ok((s, local))
}

#[test]
fn vsock_scenario_both_directions_and_concurrent_host_connections() {
    if skip_kvm("vsock_scenario_both_directions_and_concurrent_host_connections") {
        return;
    }
    let dir = scratch("vsock");
    let uds = dir.join("v.sock");
    let _ = std::fs::remove_file(&uds);
    const SIZE: usize = 1 << 20;
    const CONNS: usize = 6;
    // Guest-initiated: read the guest's stream to EOF (its SHUTDOWN), answer with ours.
    let l = UnixListener::bind(port_path(&uds, 1234)).expect("bind");
    let server = thread::spawn(move || -> Result<usize, String> {
        let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        s.read_to_end(&mut got).map_err(|e| format!("read: {e}"))?;
        if got != stream(SEED_G2H, SIZE) {
            return Err(format!("guest stream differs ({} bytes)", got.len()));
        }
        s.write_all(&stream(SEED_H2G, SIZE))
            .map_err(|e| format!("write: {e}"))?;
        Ok(got.len())
    });
    let cmdline = format!(
        "console=ttyS0 kiln.test=vsock,virtio-rng kiln.vsock.port=1234 kiln.vsock.listen=5000 \
         kiln.vsock.conns={CONNS}"
    );
    let vsock = format!("cid=3,uds={}", uds.display());
    let live = Live::spawn(&["--vsock", &vsock], &cmdline);
    let listening = live.wait_line("KTEST-INFO vsock listening 5000", Duration::from_secs(60));
    let mut clients = Vec::new();
    if listening.is_some() {
        for k in 0..CONNS {
            let uds = uds.clone();
            clients.push(thread::spawn(move || -> Result<u32, String> {
                let (mut s, local) = host_connect(&uds, 5000)?;
                let len = 64 << 10;
                s.write_all(&stream(SEED_H2G, len))
                    .map_err(|e| format!("write: {e}"))?;
                s.shutdown(std::net::Shutdown::Write)
                    .map_err(|e| e.to_string())?;
                // The guest answers with what it received and its checksum, then EOF.
                let mut back = Vec::new();
                s.read_to_end(&mut back).map_err(|e| format!("read: {e}"))?;
                let mut want = (len as u64).to_le_bytes().to_vec();
                want.extend(checksum(SEED_H2G, len).to_le_bytes());
                if back != want {
                    return Err(format!("connection {k}: guest answered {back:02x?}"));
                }
                Ok(local)
            }));
        }
    }
    let run = live.finish(Duration::from_secs(120));
    let ctx = format!("stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(listening.is_some(), "the guest never listened\n{ctx}");
    run.assert_passed(&["vsock", "virtio-rng"]);
    assert_eq!(server.join().unwrap(), Ok(SIZE), "{ctx}");
    let mut locals = Vec::new();
    for c in clients {
        locals.push(c.join().unwrap().unwrap_or_else(|e| panic!("{e}\n{ctx}")));
    }
    locals.sort();
    locals.dedup();
    assert_eq!(locals.len(), CONNS, "local ports must differ: {locals:?}");
    assert!(locals.iter().all(|&p| p >= 1 << 30));
    // The guest's checksums are the host's.
    let line = run
        .ktests()
        .into_iter()
        .find(|k| k.0 == "vsock")
        .expect("vsock line")
        .2;
    let g2h = format!("g2h_sum={:#x}", checksum(SEED_G2H, SIZE));
    let h2g = format!("h2g_sum={:#x}", checksum(SEED_H2G, SIZE));
    assert!(line.contains(&g2h) && line.contains(&h2g), "{line}");
    assert!(line.contains("refused=rst"), "{line}");
    assert!(!uds.exists(), "kiln left its listener behind");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vsock_evil_leaves_the_device_and_others_working() {
    if skip_kvm("vsock_evil_leaves_the_device_and_others_working") {
        return;
    }
    let dir = scratch("vsock-evil");
    let uds = dir.join("v.sock");
    let _ = std::fs::remove_file(&uds);
    let l = UnixListener::bind(port_path(&uds, 1234)).expect("bind");
    // First connection: never read (the guest overruns its credit). Second: 4 KiB each
    // way.
    let server = thread::spawn(move || -> Result<usize, String> {
        let (held, _) = l.accept().map_err(|e| e.to_string())?;
        let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        s.read_to_end(&mut got).map_err(|e| format!("read: {e}"))?;
        if got != stream(SEED_G2H, 4096) {
            return Err(format!("guest stream differs ({} bytes)", got.len()));
        }
        s.write_all(&stream(SEED_H2G, 4096))
            .map_err(|e| format!("write: {e}"))?;
        drop(held);
        Ok(got.len())
    });
    let vsock = format!("cid=77,uds={}", uds.display());
    let live = Live::spawn(
        &["--vsock", &vsock],
        "console=ttyS0 kiln.test=vsock-evil,virtio-rng kiln.vsock.port=1234",
    );
    let run = live.finish(Duration::from_secs(120));
    run.assert_passed(&["vsock-evil", "virtio-rng"]);
    assert_eq!(server.join().unwrap(), Ok(4096));
    let line = run
        .ktests()
        .into_iter()
        .find(|k| k.0 == "vsock-evil")
        .expect("vsock-evil line")
        .2;
    assert!(
        line.contains("bad-packets=ok") && line.contains("after=ok"),
        "{line}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_vsock_options_name_the_flag() {
    let dir = scratch("vsock-bad");
    let taken = dir.join("taken.sock");
    let _l = UnixListener::bind(&taken).expect("bind");
    let missing = dir.join("no/such/dir/v.sock");
    let ok_path = dir.join("v.sock");
    for (arg, why) in [
        (format!("cid=2,uds={}", ok_path.display()), "reserved"),
        (format!("cid=1,uds={}", ok_path.display()), "reserved"),
        (format!("cid=3,uds={}", missing.display()), "does not exist"),
        (format!("cid=3,uds={}", taken.display()), "already exists"),
        ("cid=3".to_string(), "uds= is required"),
        (format!("uds={}", ok_path.display()), "cid= is required"),
        (
            format!("cid=3,uds={},mtu=5", ok_path.display()),
            "unknown option",
        ),
    ] {
        let mut cmd = kiln();
        cmd.args(["--vsock", &arg]);
        let r = common::run_with(cmd, None, Duration::from_secs(30));
        assert_ne!(r.code, Some(0), "{arg}: accepted");
        assert!(
            r.stderr.contains("--vsock") && r.stderr.contains(why),
            "{arg}: {}",
            r.stderr
        );
    }
    assert!(!ok_path.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
