//! `kiln-bench exits`: VM-exit latency, measured by the conformance guest with its TSC
//! (through kvmclock) for each kind of exit, as histograms; with the VMM's own CPU time per
//! exit (user and system time of the vCPU thread, `RUSAGE_THREAD`), a raw kvm-ioctls floor
//! running the identical guest code for the kinds that leave the kernel, and optionally the
//! same guest under other VMMs (`--compare qemu=PATH`, `--compare firecracker=PATH`).
//!
//! Output: a table (kind, VMM, p50/p90/p99/p99.9 in ns, user and system ns per exit, VMM
//! share, ratio to the floor), `--json FILE` with host metadata, `--histogram FILE.svg` or
//! `FILE.png` histograms.
#![warn(missing_docs)]

mod floor;
mod meta;
mod plot;
mod report;
mod vmms;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use kiln_testguest::hist::{bucket_high, bucket_low, BUCKETS};
use report::{RunResult, FLOOR_KINDS, KINDS, PERCENTILES};

/// Kiln's VM-exit latency benchmark suite.
#[derive(Debug, Parser)]
#[command(name = "kiln-bench", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure every kind of VM exit (see --list).
    Exits(ExitsArgs),
    /// Run the raw kvm-ioctls floor once and print the guest's serial output (what `exits`
    /// starts in a fresh process for each round, as it does kiln).
    #[command(hide = true)]
    Floor(FloorArgs),
}

#[derive(Debug, clap::Args)]
struct FloorArgs {
    /// The guest command line.
    #[arg(long)]
    cmdline: String,
    /// Time limit in seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

#[derive(Debug, clap::Args)]
struct ExitsArgs {
    /// Comma-separated kinds to run (default: all; --list shows them).
    #[arg(long, value_delimiter = ',')]
    kinds: Vec<String>,
    /// Timed round trips per kind and round.
    #[arg(long, default_value_t = 5_000)]
    n: u32,
    /// Untimed round trips before each kind.
    #[arg(long, default_value_t = 500)]
    warmup: u32,
    /// The kiln binary (default: `kiln` next to this binary).
    #[arg(long, value_name = "PATH")]
    kiln: Option<PathBuf>,
    /// Skip the raw kvm-ioctls floor.
    #[arg(long)]
    no_floor: bool,
    /// Pin each VMM (all its threads) and the floor to this host CPU.
    #[arg(long, value_name = "CPU")]
    pin: Option<usize>,
    /// Also run under another VMM: `qemu=PATH` or `firecracker=PATH` (repeatable).
    #[arg(long, value_name = "NAME=PATH")]
    compare: Vec<String>,
    /// Write all results with host metadata as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw the histograms into an image file: SVG or PNG, chosen by the extension
    /// (`.svg`, `.png`).
    #[arg(long, value_name = "FILE")]
    histogram: Option<PathBuf>,
    /// Draw the histograms into an SVG file (the same as `--histogram FILE.svg`).
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Rounds: each round runs every VMM once, alternating, so host noise hits all alike;
    /// the histograms of all rounds are merged.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Run kiln and the floor at the same time, taking turns on the CPU every MS
    /// milliseconds (default 10) and lined up kind by kind, so changes in the host's load hit
    /// both alike: for comparing the VMM's own time per exit with the floor's. Each turn's
    /// pause shows up in the guest's round-trip histograms as one long round trip (one per
    /// slice: raise MS or --n to keep them past p99.9), and in the VMM's mean time per exit
    /// (vmm ns/x, mean/fl) when it lands in user space; the typical time (vmm typ, vmm/fl)
    /// leaves such exits out.
    #[arg(long, value_name = "MS", num_args = 0..=1, default_missing_value = "10")]
    interleave: Option<u64>,
    /// Per-VMM time limit in seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// List the kinds and what they measure, then exit.
    #[arg(long)]
    list: bool,
}

/// The guest command line for `kinds`.
fn guest_cmdline(kinds: &[&str], a: &ExitsArgs) -> String {
    format!(
        "console=ttyS0 kiln.test=bench-exits kiln.bench.kinds={} kiln.bench.n={} kiln.bench.warmup={}",
        kinds.join(","),
        a.n,
        a.warmup
    )
}

fn fmt_ns(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn print_table(runs: &[(String, RunResult)], kinds: &[&str]) {
    println!(
        "{:<15} {:<12} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8} {:>8} {:>6} {:>6} {:>7} {:>7}",
        "kind",
        "vmm",
        "p50 ns",
        "p90 ns",
        "p99 ns",
        "p99.9 ns",
        "user ns/x",
        "sys ns/x",
        "vmm ns/x",
        "vmm typ",
        "vmm%",
        "/floor",
        "vmm/fl",
        "mean/fl"
    );
    for kind in kinds {
        let floor = runs
            .iter()
            .find(|(n, _)| n == "floor")
            .and_then(|(_, r)| r.kinds.get(*kind));
        let floor_p50 = floor.map(|k| k.hist.percentile(50_000) as f64);
        let floor_vmm = floor.and_then(|k| k.vmm_per_exit_ns());
        let floor_typ_rounds = floor.map(|k| k.vmm_typical_rounds.as_slice());
        for (name, r) in runs {
            let Some(k) = r.kinds.get(*kind) else {
                if let Some(why) = r.skipped.get(*kind) {
                    println!("{kind:<15} {name:<12} skipped: {why}");
                }
                continue;
            };
            let p: Vec<String> = PERCENTILES
                .iter()
                .map(|(_, p)| k.hist.percentile(*p).to_string())
                .collect();
            let (user, sys) = match k.cpu_per_exit_ns() {
                Some((u, s)) => (fmt_ns(u), fmt_ns(s)),
                None => ("-".into(), "-".into()),
            };
            let vmm = k.vmm_per_exit_ns();
            let typ = k.vmm_typical_ns();
            let p50 = k.hist.percentile(50_000) as f64;
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.3}", a / b),
                _ => "-".into(),
            };
            println!(
                "{kind:<15} {name:<12} {:>8} {:>8} {:>8} {:>9} {user:>9} {sys:>9} {:>8} {:>8} {:>6} {:>6} {:>7} {:>7}",
                p[0],
                p[1],
                p[2],
                p[3],
                vmm.map_or("-".into(), fmt_ns),
                typ.map_or("-".into(), |v| format!("{v:.1}")),
                // The VMM's typical share of the round trip the guest saw.
                typ.filter(|_| p50 > 0.0)
                    .map_or("-".into(), |v| format!("{:.1}", v / p50 * 100.0)),
                ratio(Some(p50), floor_p50),
                floor_typ_rounds
                    .and_then(|f| report::paired_ratio(&k.vmm_typical_rounds, f))
                    .map_or("-".into(), |v| format!("{v:.3}")),
                ratio(vmm, floor_vmm),
            );
        }
    }
}

fn run_json(r: &RunResult) -> Value {
    let kinds: serde_json::Map<String, Value> = r
        .kinds
        .iter()
        .map(|(kind, k)| {
            let h = &k.hist;
            let mut o = json!({
                "n": h.count(),
                "min_ns": h.min(),
                "max_ns": h.max(),
                "mean_ns": h.sum() as f64 / h.count().max(1) as f64,
                "buckets": (0..BUCKETS)
                    .filter(|&i| h.bucket(i) > 0)
                    .map(|i| json!([bucket_low(i), bucket_high(i), h.bucket(i)]))
                    .collect::<Vec<_>>(),
            });
            for (name, p) in PERCENTILES {
                o[format!("{name}_ns")] = json!(h.percentile(p));
            }
            if let Some((u, s)) = k.cpu_per_exit_ns() {
                o["user_ns_per_exit"] = json!(u);
                o["sys_ns_per_exit"] = json!(s);
            }
            if let Some(v) = k.vmm_per_exit_ns() {
                o["vmm_ns_per_exit"] = json!(v);
                o["vmm_ns_per_exit_rounds"] = json!(k.vmm_rounds);
            }
            if let Some(v) = k.vmm_typical_ns() {
                o["vmm_typical_ns_per_exit"] = json!(v);
                o["vmm_typical_ns_per_exit_rounds"] = json!(k.vmm_typical_rounds);
            }
            (kind.clone(), o)
        })
        .collect();
    json!({ "kinds": kinds, "skipped": r.skipped })
}

/// Kinds that need a second vCPU.
const TWO_VCPU_KINDS: [&str; 1] = ["ipi"];

/// Splits `kinds` into runs by vCPU count: the kinds that need a second vCPU run on two,
/// all others on one, as the floor does. A second vCPU that sits waiting for its SIPI (this
/// host's KVM answers such an AP's `KVM_RUN` with EAGAIN, so the VMM polls it) made the
/// first vCPU's user-space time per exit larger and less steady, so measuring it there would
/// compare a two-vCPU VM with a one-vCPU floor.
fn vcpu_groups<'a>(kinds: &[&'a str]) -> Vec<(u32, Vec<&'a str>)> {
    let (two, one): (Vec<&str>, Vec<&str>) = kinds.iter().partition(|k| TWO_VCPU_KINDS.contains(k));
    [(1, one), (2, two)]
        .into_iter()
        .filter(|(_, g)| !g.is_empty())
        .collect()
}

fn exits(a: ExitsArgs) -> Result<(), String> {
    if a.list {
        for (k, what) in KINDS {
            println!("{k:<15} {what}");
        }
        return Ok(());
    }
    let kinds: Vec<&str> = if a.kinds.is_empty() {
        KINDS.iter().map(|(k, _)| *k).collect()
    } else {
        for k in &a.kinds {
            if !KINDS.iter().any(|(known, _)| known == k) {
                return Err(format!("--kinds: unknown kind {k:?} (see --list)"));
            }
        }
        a.kinds.iter().map(String::as_str).collect()
    };
    if a.n == 0 {
        return Err("--n must be at least 1".into());
    }
    if a.interleave == Some(0) {
        return Err("--interleave must be at least 1 ms".into());
    }
    // Check the image names before the minute of measuring, not after.
    let mut images = Vec::new();
    if let Some(p) = &a.histogram {
        images.push((
            "--histogram",
            p,
            plot::Format::from_path(p).map_err(|e| format!("--histogram {e}"))?,
        ));
    }
    if let Some(p) = &a.svg {
        images.push(("--svg", p, plot::Format::Svg));
    }
    let others = a
        .compare
        .iter()
        .map(|c| vmms::Other::parse(c))
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = Duration::from_secs(a.timeout);
    let host = meta::host();
    println!("host: {}", meta::summary(&host));
    let kiln = match &a.kiln {
        Some(p) => p.clone(),
        None => vmms::default_kiln()?,
    };
    let floor_kinds: Vec<&str> = kinds
        .iter()
        .copied()
        .filter(|k| FLOOR_KINDS.contains(k) && !a.no_floor)
        .collect();
    let mut runs: Vec<(String, RunResult)> = vec![("kiln".into(), RunResult::default())];
    if !floor_kinds.is_empty() {
        runs.push(("floor".into(), RunResult::default()));
    }
    for o in &others {
        runs.push((o.name().to_string(), RunResult::default()));
    }
    // Kinds kiln runs by turns with the floor, not on its own.
    let paired: Vec<&str> = match a.interleave {
        Some(_) => floor_kinds.clone(),
        None => Vec::new(),
    };
    let rounds = a.rounds.max(1);
    for round in 1..=rounds {
        for (cpus, group) in vcpu_groups(&kinds) {
            let group: Vec<&str> = group.into_iter().filter(|k| !paired.contains(k)).collect();
            if group.is_empty() {
                continue;
            }
            eprintln!(
                "== round {round}/{rounds}: kiln ({}), {cpus} vCPU(s): {}",
                kiln.display(),
                group.join(",")
            );
            let out = vmms::run_kiln(&kiln, &guest_cmdline(&group, &a), cpus, a.pin, timeout)?;
            let r = report::parse(&out).map_err(|e| format!("kiln: {e}"))?;
            runs[0].1.merge(r);
        }
        let mut slot = 1;
        if !floor_kinds.is_empty() {
            let cmdline = guest_cmdline(&floor_kinds, &a);
            let floor_out = match a.interleave {
                Some(ms) => {
                    eprintln!(
                        "== round {round}/{rounds}: kiln and the floor by turns ({ms} ms), 1 vCPU: {}",
                        floor_kinds.join(",")
                    );
                    let (k, f) = vmms::run_kiln_and_floor_interleaved(
                        &kiln,
                        &cmdline,
                        a.pin,
                        Duration::from_millis(ms),
                        timeout,
                    )?;
                    runs[0]
                        .1
                        .merge(report::parse(&k).map_err(|e| format!("kiln: {e}"))?);
                    f
                }
                None => {
                    eprintln!("== round {round}/{rounds}: floor (raw kvm-ioctls loop), 1 vCPU");
                    vmms::run_floor(&cmdline, a.pin, timeout)?
                }
            };
            runs[slot]
                .1
                .merge(report::parse(&floor_out).map_err(|e| format!("floor: {e}"))?);
            slot += 1;
        }
        for o in &others {
            let ok: Vec<&str> = kinds.iter().copied().filter(|k| o.supports(k)).collect();
            let mut r = RunResult::default();
            for (cpus, group) in vcpu_groups(&ok) {
                eprintln!(
                    "== round {round}/{rounds}: {} ({}), {cpus} vCPU(s): {}",
                    o.name(),
                    o.path.display(),
                    group.join(",")
                );
                let out = o.run(&guest_cmdline(&group, &a), cpus, a.pin, timeout)?;
                r.merge(report::parse(&out).map_err(|e| format!("{}: {e}", o.name()))?);
            }
            for k in kinds.iter().filter(|k| !ok.contains(k)) {
                r.skipped
                    .insert((*k).to_string(), format!("{} can't run it", o.name()));
            }
            runs[slot].1.merge(r);
            slot += 1;
        }
    }

    println!(
        "\nexit round trips measured in the guest (kvmclock), {} per kind per round after {} warm-up, {} rounds:",
        a.n, a.warmup, rounds
    );
    print_table(&runs, &kinds);
    if let Some(ms) = a.interleave {
        println!(
            "kiln and the floor ran by turns ({ms} ms slices, lined up by kind) for {}",
            floor_kinds.join(", ")
        );
    }
    let clock = kiln_vcpu::ExitClock::get();
    println!(
        "VMM-side per-exit times (vmm ns/x, vmm typ) on the {} clock{}",
        clock.name(),
        clock
            .tsc_ghz()
            .map_or(String::new(), |g| format!(" ({g:.4} GHz, calibrated)"))
    );
    if let Some(p) = &a.json {
        let doc = json!({
            "tool": "kiln-bench exits",
            "version": env!("CARGO_PKG_VERSION"),
            "host": host,
            "config": { "kinds": kinds, "n": a.n, "warmup": a.warmup, "rounds": rounds, "pin": a.pin, "interleave_ms": a.interleave },
            "vmms": runs.iter().map(|(n, r)| (n.clone(), run_json(r))).collect::<serde_json::Map<_, _>>(),
        });
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        std::fs::write(p, text).map_err(|e| format!("--json {}: {e}", p.display()))?;
        println!("JSON: {}", p.display());
    }
    for (flag, p, format) in images {
        plot::histograms(p, format, &runs, &kinds)
            .map_err(|e| format!("{flag} {}: {e}", p.display()))?;
        println!("histograms ({format:?}): {}", p.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Exits(a) => exits(a),
        // The floor streams the guest's output to stdout itself.
        Command::Floor(a) => floor::run(&a.cmdline, Duration::from_secs(a.timeout)).map(drop),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::vcpu_groups;

    #[test]
    fn only_the_ipi_kind_gets_a_second_vcpu() {
        assert_eq!(
            vcpu_groups(&["pio-out", "ipi", "cpuid"]),
            vec![(1, vec!["pio-out", "cpuid"]), (2, vec!["ipi"])]
        );
        assert_eq!(vcpu_groups(&["ipi"]), vec![(2, vec!["ipi"])]);
        assert_eq!(vcpu_groups(&["mmio-in"]), vec![(1, vec!["mmio-in"])]);
        assert!(vcpu_groups(&[]).is_empty());
    }
}
