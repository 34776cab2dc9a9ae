//! `cargo xtask bench-migrate [--runs N] [--mib N] [--rates R,R] [--transport tcp|unix]
//! [--max-downtime-ms N] [--memory SIZE] [--cpus N]`: live migration of the conformance
//! guest's `counter` scenario (each of `--cpus` vCPUs, default 1, dirtying its own `--mib`
//! MiB; the rate in MiB/s is the guest's total, split among them) from one kiln to another on this
//! host: total time, downtime (source pause → destination running), dirty rounds and bytes,
//! median over `--runs`. The guest's own view is checked on every run: its sequence goes on
//! on the destination with no gap and no errors.
//!
//! The output is in sections (`== migration`); other sections (snapshot create/restore) can
//! be added beside it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::{cargo, workspace_root};

struct Opts {
    runs: usize,
    mib: u64,
    rates: Vec<u64>,
    unix: bool,
    max_downtime_ms: u64,
    memory: String,
    /// vCPUs; with more than one every AP dirties too and the rate is split among them.
    cpus: u32,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        runs: 3,
        mib: 32,
        rates: vec![10, 100],
        unix: false,
        max_downtime_ms: 300,
        memory: "256M".into(),
        cpus: 1,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |what: &str| it.next().cloned().ok_or(format!("{what} needs a value"));
        let num = |what: &str, v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{what}: not a number: {v}"))
        };
        match a.as_str() {
            "--runs" => o.runs = num("--runs", val("--runs")?)?.max(1) as usize,
            "--mib" => o.mib = num("--mib", val("--mib")?)?,
            "--rates" => {
                o.rates = val("--rates")?
                    .split(',')
                    .map(|r| num("--rates", r.to_string()))
                    .collect::<Result<_, _>>()?
            }
            "--transport" => {
                o.unix = match val("--transport")?.as_str() {
                    "tcp" => false,
                    "unix" => true,
                    t => return Err(format!("--transport {t}: tcp or unix")),
                }
            }
            "--max-downtime-ms" => {
                o.max_downtime_ms = num("--max-downtime-ms", val("--max-downtime-ms")?)?
            }
            "--memory" => o.memory = val("--memory")?,
            "--cpus" => o.cpus = num("--cpus", val("--cpus")?)?.clamp(1, 16) as u32,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

/// A kiln whose stdout lines arrive on a channel.
pub struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    /// Raw serial output: a migration may cut a line in two.
    raw: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Running {
    fn spawn(mut cmd: Command) -> Result<Running, String> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting kiln: {e}"))?;
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().ok_or("no stdout")?;
        let err = child.stderr.take().ok_or("no stderr")?;
        let tx2 = tx.clone();
        let raw = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let r = raw.clone();
        std::thread::spawn(move || {
            let mut rd = BufReader::new(out);
            let mut line = Vec::new();
            while rd.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                r.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&line);
                let _ = tx.send(String::from_utf8_lossy(&line).trim_end().to_string());
                line.clear();
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(format!("stderr: {l}"));
            }
        });
        Ok(Running {
            child,
            lines: rx,
            seen: Vec::new(),
            raw,
        })
    }

    /// Waits for a line containing `what`; returns it.
    fn wait_for(&mut self, what: &str, timeout: Duration) -> Result<String, String> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(what) {
                        return Ok(l);
                    }
                }
                Err(_) => {
                    return Err(format!(
                        "no '{what}' within {timeout:?}; output:\n{}",
                        self.tail()
                    ))
                }
            }
        }
    }

    fn tail(&self) -> String {
        let n = self.seen.len().saturating_sub(30);
        self.seen[n..].join("\n")
    }

    /// Ends the process; returns its serial output.
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(50));
        let raw = self.raw.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&raw).into_owned()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one control-socket command and returns the answer line.
fn control(sock: &Path, cmd: &str, timeout: Duration) -> Result<String, String> {
    let mut s = UnixStream::connect(sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    writeln!(s, "{cmd}").map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("reading the answer to '{cmd}': {e}"))?;
    Ok(line.trim_end().to_string())
}

/// `key=value` from a report line.
fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.trim_end_matches("(limit)").parse().ok())
}

/// `counter seq=N` numbers in `lines`.
fn seqs(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("counter seq="))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect()
}

/// One migration's numbers.
struct Sample {
    total_ms: f64,
    downtime_ms: f64,
    iterations: f64,
    mib_sent: f64,
    /// MiB/s the guest really dirtied on the source (from its own `dirtied_kib`).
    dirtied_mibs: f64,
    /// Largest gap between two guest lines, by the guest's clock.
    guest_gap_ms: f64,
}

/// (t_ns, dirtied_kib) of each `counter seq=` line.
fn progress(lines: &[String]) -> Vec<(f64, f64)> {
    lines
        .iter()
        .filter(|l| l.starts_with("counter seq="))
        .filter_map(|l| Some((field(l, "t_ns")?, field(l, "dirtied_kib")?)))
        .collect()
}

fn one(kiln: &Path, dir: &Path, o: &Opts, rate: u64, run: usize) -> Result<Sample, String> {
    let tag = format!("{rate}-{run}-{}", std::process::id());
    let sock = dir.join(format!("ctl-{tag}.sock"));
    let addr = if o.unix {
        format!("unix:{}", dir.join(format!("mig-{tag}.sock")).display())
    } else {
        // A port from the kernel: bind, read, let go (a tiny race with other users).
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let p = l.local_addr().map_err(|e| e.to_string())?.port();
        format!("tcp:127.0.0.1:{p}")
    };
    let mut dst = Command::new(kiln);
    dst.args(["--migrate-listen", &addr, "--memory", &o.memory]);
    let mut dst = Running::spawn(dst)?;
    dst.wait_for("waiting for an incoming VM", Duration::from_secs(20))?;
    let mut src = Command::new(kiln);
    let per_cpu = if rate == 0 {
        0
    } else {
        ((rate + u64::from(o.cpus) / 2) / u64::from(o.cpus)).max(1)
    };
    let cpus = o.cpus.to_string();
    src.args(["--memory", &o.memory, "--cpus", &cpus, "--control-sock"])
        .arg(&sock)
        .args([
            "--cmdline",
            &format!(
                "console=ttyS0 kiln.test=counter kiln.counter.secs=0 kiln.counter.mib={} \
                 kiln.counter.rate={per_cpu} kiln.counter.period_ms=10 kiln.counter.aps={}",
                o.mib,
                u32::from(o.cpus > 1)
            ),
        ]);
    let mut src = Running::spawn(src)?;
    // A second of dirtying first.
    src.wait_for("counter seq=100 ", Duration::from_secs(120))?;
    let answer = control(
        &sock,
        &format!("migrate {addr} {}", o.max_downtime_ms),
        Duration::from_secs(300),
    )?;
    if !answer.starts_with("ok") {
        return Err(format!("migrate: {answer}\n{}", src.tail()));
    }
    // The guest goes on over there.
    let first = dst.wait_for("counter seq=", Duration::from_secs(20))?;
    dst.wait_for("counter seq=", Duration::from_secs(20))?;
    let src_out = src.stop();
    // One serial stream: the destination goes on where the source stopped, mid-line or not.
    let stream = format!("{src_out}{}", dst.stop());
    let src_lines: Vec<String> = src_out.lines().map(str::to_string).collect();
    let all_lines: Vec<String> = stream.lines().map(str::to_string).collect();
    let all = seqs(&all_lines);
    if let Some(w) = all.windows(2).find(|w| w[1] != w[0] + 1) {
        return Err(format!(
            "sequence gap: {} then {} (first on the destination: {first})",
            w[0], w[1]
        ));
    }
    if all.len() <= seqs(&src_lines).len() {
        return Err("the destination printed no counter line".into());
    }
    if let Some(e) = all_lines.iter().find(|l| l.starts_with("counter error")) {
        return Err(format!("guest error: {e}"));
    }
    let p = progress(&src_lines);
    let dirtied_mibs = match (p.first(), p.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => (b.1 - a.1) / 1024.0 / ((b.0 - a.0) / 1e9),
        _ => f64::NAN,
    };
    let guest_gap_ms = progress(&all_lines)
        .windows(2)
        .map(|w| (w[1].0 - w[0].0) / 1e6)
        .fold(0.0, f64::max);
    Ok(Sample {
        dirtied_mibs,
        guest_gap_ms,
        total_ms: field(&answer, "total_ms").unwrap_or(f64::NAN),
        downtime_ms: field(&answer, "downtime_ms").unwrap_or(f64::NAN),
        iterations: field(&answer, "iterations").unwrap_or(f64::NAN),
        mib_sent: field(&answer, "bytes").unwrap_or(f64::NAN) / (1 << 20) as f64,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The `migration` section.
fn migration(kiln: &Path, dir: &Path, o: &Opts) -> Result<(), String> {
    println!("== migration");
    println!(
        "counter guest, {} vCPU(s) dirtying {} MiB each, {} memory, {}, max downtime {} ms, median of {} runs",
        o.cpus,
        o.mib,
        o.memory,
        if o.unix {
            "unix socket"
        } else {
            "loopback TCP"
        },
        o.max_downtime_ms,
        o.runs
    );
    println!(
        "| counter rate | dirtied (guest) | total ms | downtime ms | largest guest gap ms | dirty rounds | MiB sent |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &rate in &o.rates {
        let mut s = Vec::new();
        for run in 0..o.runs {
            s.push(one(kiln, dir, o, rate, run)?);
        }
        println!(
            "| {} | {:.1} MiB/s | {:.0} | {:.1} | {:.1} | {:.0} | {:.0} |",
            if rate == 0 {
                "max".to_string()
            } else {
                format!("{rate} MiB/s")
            },
            median(s.iter().map(|x| x.dirtied_mibs).collect()),
            median(s.iter().map(|x| x.total_ms).collect()),
            median(s.iter().map(|x| x.downtime_ms).collect()),
            median(s.iter().map(|x| x.guest_gap_ms).collect()),
            median(s.iter().map(|x| x.iterations).collect()),
            median(s.iter().map(|x| x.mib_sent).collect()),
        );
    }
    Ok(())
}

/// Runs the benchmark.
pub fn run(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    cargo(&["build", "--release", "--locked", "-p", "kiln"])?;
    let root = workspace_root();
    let kiln = root.join("target/release/kiln");
    let dir: PathBuf = root.join("target/bench-migrate");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    migration(&kiln, &dir, &o)
}
