//! `cargo xtask bench-net [--runs N] [--frames N] [--size BYTES] [--rx-ms MS]`: network
//! throughput of
//! the conformance guest under `kiln`, and under QEMU microvm with the same guest when
//! `qemu-system-x86_64` is installed.
//!
//! Each run gets a fresh network namespace with a tap (`kt0`, 10.201.0.1/30) and a UDP sink
//! bound in it (a thread of this process that `setns`es into the namespace). The guest's
//! `net-bench` scenario sends `--frames` UDP datagrams of `--size` bytes as fast as the
//! transmit queue takes them and reports frames/s and MiB/s measured with kvmclock; the
//! sink counts what arrived. The receive section floods the guest's port from a host
//! socket (a static neighbour entry for the guest's MAC, which both VMMs are given) while the
//! guest (`kiln.netbench.dir=rx`) counts what it receives for `--rx-ms`. Both VMMs get 1 vCPU, 256 MiB and a tap with a virtio-net
//! header and no vhost (QEMU `vhost=off`): the comparison is of the device model and its
//! notification path. Runs alternate between the VMMs so host noise hits both alike; the
//! tables show medians.
//!
//! The command is a list of sections ([`SECTIONS`]), each a measurement with its own table;
//! a new transport (vsock) adds a section.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::{cargo, have, testguest, workspace_root};

const HOST_IP: &str = "10.201.0.1";
const GUEST_IP: &str = "10.201.0.2";
const TAP: &str = "kt0";
const PORT: u16 = 5555;
/// The guest's MAC in both VMMs, so the host can have a static neighbour entry (the guest
/// answers no ARP requests).
const GUEST_MAC: &str = "02:4b:4c:00:00:02";

/// Options of the whole command.
pub struct Opts {
    runs: usize,
    frames: u64,
    size: u64,
    rx_ms: u64,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        runs: 3,
        frames: 200_000,
        size: 1472,
        rx_ms: 2000,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = |what: &str| -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .filter(|n| *n > 0)
                .ok_or(format!("{what} needs a positive number"))
        };
        match a.as_str() {
            "--runs" => o.runs = num("--runs")? as usize,
            "--frames" => o.frames = num("--frames")?,
            "--rx-ms" => o.rx_ms = num("--rx-ms")?.min(60_000),
            "--size" => {
                o.size = num("--size")?;
                if o.size > 1472 {
                    return Err("--size: at most 1472 (one 1500-byte IP packet)".into());
                }
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

/// What every section gets: the binaries and the options.
pub struct Ctx {
    kiln: PathBuf,
    elf: PathBuf,
    qemu: bool,
    opts: Opts,
}

/// One row of a section's table: a metric for kiln and (if measured) QEMU.
struct Row {
    name: &'static str,
    kiln: f64,
    qemu: Option<f64>,
}

/// A measurement: its title and how to get its rows.
struct Section {
    title: fn(&Ctx) -> String,
    run: fn(&Ctx) -> Result<Vec<Row>, String>,
}

/// The sections, in print order.
const SECTIONS: &[Section] = &[
    Section {
        title: udp_tx_title,
        run: udp_tx,
    },
    Section {
        title: udp_rx_title,
        run: udp_rx,
    },
    Section {
        title: vsock_title,
        run: vsock,
    },
];

/// MiB each way per vsock run.
const VSOCK_MIB: u64 = 64;

fn vsock_title(c: &Ctx) -> String {
    format!(
        "vsock-bench in the conformance guest: 1 vCPU, {VSOCK_MIB} MiB each way on one connection to a host Unix socket, median of {} runs (QEMU's vsock is vhost-vsock only: /dev/vhost-vsock and an AF_VSOCK peer, not compared)",
        c.opts.runs
    )
}

/// Guest-to-host and host-to-guest vsock throughput (crate::bench_vsock).
fn vsock(c: &Ctx) -> Result<Vec<Row>, String> {
    let rates = crate::bench_vsock::measure(
        &c.kiln,
        &workspace_root().join("target/bench-vsock"),
        c.opts.runs,
        VSOCK_MIB,
    )?;
    let med = |f: fn(&crate::bench_vsock::VsockRate) -> f64| median(rates.iter().map(f).collect());
    Ok(vec![
        Row {
            name: "g2h MiB/s",
            kiln: med(|r| r.g2h),
            qemu: None,
        },
        Row {
            name: "h2g MiB/s",
            kiln: med(|r| r.h2g),
            qemu: None,
        },
    ])
}

/// A network namespace with the tap at `HOST_IP/30`, deleted on drop.
struct Netns {
    name: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    fn new() -> Result<Netns, String> {
        let name = format!("kiln-bench-net-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        let n = ns.name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        ip(&["-n", n, "tuntap", "add", "dev", TAP, "mode", "tap"])?;
        ip(&["-n", n, "addr", "add", &format!("{HOST_IP}/30"), "dev", TAP])?;
        ip(&["-n", n, "link", "set", TAP, "up"])?;
        ip(&[
            "-n",
            n,
            "neigh",
            "replace",
            GUEST_IP,
            "lladdr",
            GUEST_MAC,
            "dev",
            TAP,
            "nud",
            "permanent",
        ])?;
        Ok(ns)
    }

    /// `cmd` run inside the namespace.
    fn wrap(&self, cmd: &Command) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A UDP socket at `HOST_IP:PORT` in the namespace, counting datagrams on its own thread.
struct Sink {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<(u64, u64), String>>,
}

/// A UDP socket bound to `addr` by a thread that `setns`es into `ns`; the thread then runs
/// `body(socket, stop)` and returns what it returns.
fn ns_thread(
    ns: &Netns,
    addr: (&'static str, u16),
    body: fn(UdpSocket, &AtomicBool) -> (u64, u64),
) -> Result<Sink, String> {
    let path = Path::new("/var/run/netns").join(&ns.name);
    let nsf = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let s = stop.clone();
    let thread = std::thread::spawn(move || -> Result<(u64, u64), String> {
        // SAFETY: setns takes an fd we own; CLONE_NEWNET moves only this thread.
        if unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let e = format!("setns: {}", std::io::Error::last_os_error());
            let _ = ready_tx.send(Err(e.clone()));
            return Err(e);
        }
        let sock = match UdpSocket::bind(addr) {
            Ok(s) => s,
            Err(e) => {
                let e = format!("bind {}:{}: {e}", addr.0, addr.1);
                let _ = ready_tx.send(Err(e.clone()));
                return Err(e);
            }
        };
        let _ = ready_tx.send(Ok(()));
        Ok(body(sock, &s))
    });
    ready_rx
        .recv()
        .map_err(|_| "network thread died".to_string())??;
    Ok(Sink { stop, thread })
}

/// Floods the guest's port with full-size datagrams until stopped; returns (sent, 0).
/// Bursts of 32 with a 100 µs sleep between (at most ~300k datagrams/s, far above what a
/// guest takes): the sender must not hog a core the VMM's threads need.
fn flood(sock: UdpSocket, stop: &AtomicBool) -> (u64, u64) {
    let buf = [0x6bu8; 1472];
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..32 {
            // ENOBUFS when the tap's queue is full: the guest isn't keeping up, which is
            // what is measured.
            if sock.send_to(&buf, (GUEST_IP, PORT + 1)).is_ok() {
                sent += 1;
            }
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    (sent, 0)
}

impl Sink {
    fn start(ns: &Netns) -> Result<Sink, String> {
        ns_thread(ns, (HOST_IP, PORT), |sock, s| {
            // A big receive buffer so the sink, not its socket, is what counts.
            let size: libc::c_int = 16 << 20;
            // SAFETY: SO_RCVBUF(FORCE) reads one int from the pointer.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
            let (mut n, mut bytes) = (0u64, 0u64);
            let mut buf = [0u8; 2048];
            loop {
                match sock.recv(&mut buf) {
                    Ok(len) => {
                        n += 1;
                        bytes += len as u64;
                    }
                    Err(_) if s.load(Ordering::SeqCst) => return (n, bytes),
                    Err(_) => {}
                }
            }
        })
    }

    /// Datagrams and bytes received.
    fn finish(self) -> Result<(u64, u64), String> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .join()
            .map_err(|_| "sink thread panicked".to_string())?
    }
}

/// Guest-measured frames/s and MiB/s from `KBENCH net`, and the sink's count.
struct Sample {
    fps: f64,
    mibs: f64,
    delivered: u64,
}

fn bench_once(ns: &Netns, cmd: Command, who: &str, rx: bool) -> Result<Sample, String> {
    let sink = if rx {
        ns_thread(ns, (HOST_IP, 0), flood)?
    } else {
        Sink::start(ns)?
    };
    let out = ns
        .wrap(&cmd)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("{who}: {e}"))?;
    // Stragglers still in the tap's queue.
    std::thread::sleep(Duration::from_millis(200));
    let (delivered, _) = sink.finish()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let fail = || {
        format!(
            "{who}: no passing net-bench:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    };
    if !text.contains("KTEST net-bench PASS") {
        return Err(fail());
    }
    let prefix = if rx { "KBENCH net-rx " } else { "KBENCH net " };
    let line = text
        .lines()
        .find(|l| l.starts_with(prefix))
        .ok_or_else(fail)?;
    let get = |key: &str| -> Result<f64, String> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|x| x.parse().ok())
            .ok_or_else(|| format!("{who}: {key} missing in {line}"))
    };
    Ok(Sample {
        fps: get("fps")?,
        mibs: get("mibs")?,
        delivered,
    })
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Runs the guest with `guest` as its command line under kiln (and QEMU), `runs` times each,
/// alternating, each run in a fresh namespace.
fn measure(c: &Ctx, guest: &str, rx: bool) -> Result<(Vec<Sample>, Vec<Sample>), String> {
    let kiln_cmd = || {
        let mut cmd = Command::new(&c.kiln);
        cmd.args(["--memory", "256M", "--cpus", "1", "--rng", "off"])
            .arg("--net")
            .arg(format!("tap={TAP},mac={GUEST_MAC}"))
            .arg("--cmdline")
            .arg(guest);
        cmd
    };
    let qemu_cmd = || {
        let mut cmd = testguest::qemu_microvm("256M");
        cmd.arg("-kernel")
            .arg(&c.elf)
            .arg("-append")
            .arg(format!("{guest} kiln.verify=0"))
            .arg("-netdev")
            .arg(format!(
                "tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off"
            ))
            .arg("-device")
            .arg(format!("virtio-net-device,netdev=n0,mac={GUEST_MAC}"));
        cmd
    };
    let mut k = Vec::new();
    let mut q = Vec::new();
    for i in 0..c.opts.runs {
        println!(
            "== net-bench {} run {}/{}",
            if rx { "rx" } else { "tx" },
            i + 1,
            c.opts.runs
        );
        let ns = Netns::new()?;
        k.push(bench_once(&ns, kiln_cmd(), "kiln", rx)?);
        if c.qemu {
            q.push(bench_once(&ns, qemu_cmd(), "QEMU microvm", rx)?);
        }
    }
    Ok((k, q))
}

fn udp_rx_title(c: &Ctx) -> String {
    format!(
        "net-bench rx, host UDP flood → guest over a tap: 1472-byte datagrams for {} ms, 1 vCPU, median of {} runs (what the guest counted)",
        c.opts.rx_ms, c.opts.runs
    )
}

/// Host-to-guest UDP throughput: the host floods, the guest counts for `rx_ms`.
fn udp_rx(c: &Ctx) -> Result<Vec<Row>, String> {
    let guest = format!(
        "console=ttyS0 kiln.test=net-bench kiln.net={GUEST_IP}/{HOST_IP} \
         kiln.netbench.dir=rx kiln.netbench.ms={}",
        c.opts.rx_ms
    );
    let (k, q) = measure(c, &guest, true)?;
    let med = |s: &[Sample], f: fn(&Sample) -> f64| median(s.iter().map(f).collect());
    let row = |name, f: fn(&Sample) -> f64| Row {
        name,
        kiln: med(&k, f),
        qemu: c.qemu.then(|| med(&q, f)),
    };
    Ok(vec![row("frames/s", |s| s.fps), row("MiB/s", |s| s.mibs)])
}

fn udp_tx_title(c: &Ctx) -> String {
    format!(
        "net-bench, guest → host UDP sink over a tap: {} datagrams of {} bytes, 1 vCPU, median of {} runs",
        c.opts.frames, c.opts.size, c.opts.runs
    )
}

/// Guest-to-host UDP throughput.
fn udp_tx(c: &Ctx) -> Result<Vec<Row>, String> {
    let guest = format!(
        "console=ttyS0 kiln.test=net-bench kiln.net={GUEST_IP}/{HOST_IP} \
         kiln.netbench.frames={} kiln.netbench.size={} kiln.netbench.port={PORT}",
        c.opts.frames, c.opts.size
    );
    let (k, q) = measure(c, &guest, false)?;
    let med = |s: &[Sample], f: fn(&Sample) -> f64| median(s.iter().map(f).collect());
    let pct = |s: &Sample| 100.0 * s.delivered as f64 / c.opts.frames as f64;
    let row = |name, f: fn(&Sample) -> f64| Row {
        name,
        kiln: med(&k, f),
        qemu: c.qemu.then(|| med(&q, f)),
    };
    Ok(vec![
        row("frames/s", |s| s.fps),
        row("MiB/s", |s| s.mibs),
        Row {
            name: "delivered %",
            kiln: median(k.iter().map(pct).collect()),
            qemu: c.qemu.then(|| median(q.iter().map(pct).collect())),
        },
    ])
}

pub fn run(args: &[String]) -> Result<(), String> {
    let opts = parse(args)?;
    if !have("ip") || !Path::new("/dev/net/tun").exists() {
        return Err(
            "needs iproute2's `ip`, /dev/net/tun and root (it makes a netns and a tap)".into(),
        );
    }
    cargo(&["build", "--release", "--locked", "-p", "kiln"])?;
    let root = workspace_root();
    let images = kiln_testguest_builder::build(&root, &root.join("target/testguest"))
        .map_err(|e| e.to_string())?;
    let ctx = Ctx {
        kiln: root.join("target/release/kiln"),
        elf: images.elf,
        qemu: have("qemu-system-x86_64"),
        opts,
    };
    let mut tables = Vec::new();
    for s in SECTIONS {
        tables.push(((s.title)(&ctx), (s.run)(&ctx)?));
    }
    for (title, rows) in tables {
        println!("\n{title}");
        println!(
            "{:<16} {:>14} {:>14} {:>10}",
            "metric", "kiln", "QEMU microvm", "kiln/QEMU"
        );
        for r in rows {
            match r.qemu {
                Some(qv) => println!(
                    "{:<16} {:>14.1} {qv:>14.1} {:>10.2}",
                    r.name,
                    r.kiln,
                    r.kiln / qv
                ),
                None => println!("{:<16} {:>14.1} {:>14} {:>10}", r.name, r.kiln, "-", "-"),
            }
        }
    }
    if !ctx.qemu {
        println!("QEMU microvm: not measured (qemu-system-x86_64 not installed)");
    }
    Ok(())
}
