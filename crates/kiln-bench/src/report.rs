//! Reading the guest's `bench-exits` output and summarising it.

use std::collections::BTreeMap;

use kiln_testguest::hist::Histogram;

/// Every exit kind the guest knows, in table order, with what it measures.
pub const KINDS: [(&str, &str); 12] = [
    ("pio-out", "out to a user-space device port (0x700)"),
    ("pio-in", "in from a user-space device port (0x700)"),
    (
        "mmio-out",
        "MMIO write to a user-space device (0xC000_0000)",
    ),
    (
        "mmio-in",
        "MMIO read from a user-space device (0xC000_0000)",
    ),
    (
        "mmio-ioeventfd",
        "MMIO write to an ioeventfd-backed address (stays in the kernel)",
    ),
    ("serial-scr", "write to the 16550 scratch register (0x3ff)"),
    ("cpuid", "CPUID (handled in the kernel)"),
    ("rdmsr", "RDMSR of an in-kernel MSR (IA32_APIC_BASE)"),
    (
        "msr-user",
        "RDMSR forwarded to user space (KVM user-space MSR exit)",
    ),
    (
        "hlt-timer",
        "HLT woken by the LAPIC timer: deadline to handler",
    ),
    (
        "ipi",
        "fixed IPI from vCPU 0 to vCPU 1: send to handler entry",
    ),
    (
        "irqfd",
        "irqfd from a host thread: host stamp to guest handler",
    ),
];

/// Kinds that leave the kernel, so a raw kvm-ioctls loop (the floor) can run them.
pub const FLOOR_KINDS: [&str; 4] = ["pio-out", "pio-in", "mmio-out", "mmio-in"];

/// One kind's result from one VMM.
#[derive(Debug, Clone)]
pub struct KindResult {
    /// Latency histogram (ns).
    pub hist: Histogram,
    /// CPU time of the measuring vCPU thread during the run, if the VMM reported it:
    /// (user µs, system µs).
    pub cpu_us: Option<(u64, u64)>,
    /// Nanoseconds the vCPU thread spent in user space handling these exits (between
    /// `KVM_RUN` returning and the next `KVM_RUN`), if the VMM measured it.
    pub vmm_ns: Option<u64>,
    /// Per round: `vmm_ns` over the round's exit count.
    pub vmm_rounds: Vec<f64>,
    /// Per round: the typical user-space ns per exit (mean of the uninterrupted exits'
    /// times), if the VMM measured it.
    pub vmm_typical_rounds: Vec<f64>,
}

impl KindResult {
    /// User-space ns per exit spent handling it in the VMM: the median over rounds of each
    /// round's mean. A round is a few ms of user time in total, so one preemption of the
    /// vCPU thread between two clock reads (a time slice is ms) can double that round's
    /// mean; the median keeps such a round from moving the result.
    pub fn vmm_per_exit_ns(&self) -> Option<f64> {
        self.vmm_ns?;
        median(&self.vmm_rounds)
    }

    /// The typical user-space ns per exit: the median over rounds of each round's mean of
    /// its uninterrupted exits (under 0.5 µs; `kiln_vcpu::ExitTimes`). Unlike the plain
    /// mean, a preemption between two clock reads moves neither.
    pub fn vmm_typical_ns(&self) -> Option<f64> {
        median(&self.vmm_typical_rounds)
    }

    /// (user ns, system ns) per exit.
    pub fn cpu_per_exit_ns(&self) -> Option<(f64, f64)> {
        let (u, s) = self.cpu_us?;
        let n = self.hist.count().max(1) as f64;
        Some((u as f64 * 1e3 / n, s as f64 * 1e3 / n))
    }
}

/// The median of `v` (the mean of the middle two for an even count); `None` if empty.
pub fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => v.get(n / 2).copied(),
        _ => Some((v.get(n / 2 - 1)? + v.get(n / 2)?) / 2.0),
    }
}

/// `a` over `b` where the host's load drifts: the median of the per-round ratios
/// `a[i] / b[i]` when both have one value per round (round `i` of each VMM ran right after
/// the other's, so each pair saw about the same host), else the ratio of the medians.
/// `None` without values or with a zero in the denominator.
pub fn paired_ratio(a: &[f64], b: &[f64]) -> Option<f64> {
    if !a.is_empty() && a.len() == b.len() && b.iter().all(|&y| y > 0.0) {
        let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
        return median(&r);
    }
    match (median(a), median(b)) {
        (Some(x), Some(y)) if y > 0.0 => Some(x / y),
        _ => None,
    }
}

/// What one VMM run produced.
#[derive(Debug, Clone, Default)]
pub struct RunResult {
    /// Results by kind.
    pub kinds: BTreeMap<String, KindResult>,
    /// Kinds the guest skipped, with its reason.
    pub skipped: BTreeMap<String, String>,
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn num(line: &str, key: &str) -> Option<u64> {
    field(line, key)?.parse().ok()
}

/// Parses the guest's serial output. Lines that aren't benchmark lines are ignored; a
/// summary without bucket lines (or the reverse) is an error.
pub fn parse(output: &str) -> Result<RunResult, String> {
    let mut hists: BTreeMap<String, Histogram> = BTreeMap::new();
    let mut out = RunResult::default();
    for raw in output.lines() {
        let line = raw.trim_end_matches('\r');
        if line.starts_with("KBENCH-H ") {
            let kind = line.split(' ').nth(1).unwrap_or_default().to_string();
            let h = hists.entry(kind).or_default();
            if h.parse_bucket_line(line).is_none() {
                return Err(format!("malformed histogram line: {line}"));
            }
        } else if let Some(rest) = line.strip_prefix("KBENCH exits ") {
            let kind = field(rest, "kind")
                .ok_or_else(|| format!("no kind in: {line}"))?
                .to_string();
            if let Some(why) = rest.split_once("skipped=").map(|(_, w)| w) {
                out.skipped.insert(kind, why.to_string());
                continue;
            }
            let n = num(rest, "n").ok_or_else(|| format!("no n in: {line}"))?;
            let mut h = hists
                .remove(&kind)
                .ok_or_else(|| format!("{kind}: summary without histogram lines"))?;
            if h.count() != n {
                return Err(format!(
                    "{kind}: histogram holds {} samples, summary says {n}",
                    h.count()
                ));
            }
            h.set_summary(
                num(rest, "min").unwrap_or(0),
                num(rest, "max").unwrap_or(0),
                num(rest, "sum").unwrap_or(0),
            );
            let cpu_us = match (num(rest, "host_user_us"), num(rest, "host_sys_us")) {
                // The bench device reads all-ones where it doesn't exist (other VMMs).
                (Some(u), Some(s)) if u != u64::from(u32::MAX) && s != u64::from(u32::MAX) => {
                    Some((u, s))
                }
                _ => None,
            };
            // 0: the VMM doesn't time its exits (kiln without --exit-bench); all-ones: no
            // bench device.
            let vmm_ns = num(rest, "host_vmm_ns").filter(|&v| v != 0 && v != u64::from(u32::MAX));
            let vmm_rounds = vmm_ns
                .map(|v| v as f64 / h.count().max(1) as f64)
                .into_iter()
                .collect();
            let vmm_typical_rounds = num(rest, "host_vmm_typ_cns")
                .filter(|&v| v != 0 && v != u64::from(u32::MAX))
                .map(|v| v as f64 / 100.0)
                .into_iter()
                .collect();
            out.kinds.insert(
                kind,
                KindResult {
                    hist: h,
                    cpu_us,
                    vmm_ns,
                    vmm_rounds,
                    vmm_typical_rounds,
                },
            );
        }
    }
    if let Some(kind) = hists.keys().next() {
        return Err(format!("{kind}: histogram lines without a summary"));
    }
    Ok(out)
}

impl RunResult {
    /// Adds another run of the same VMM (histograms and CPU time summed per kind).
    pub fn merge(&mut self, other: RunResult) {
        for (kind, k) in other.kinds {
            match self.kinds.get_mut(&kind) {
                Some(mine) => {
                    mine.hist.merge(&k.hist);
                    mine.cpu_us = match (mine.cpu_us, k.cpu_us) {
                        (Some((u1, s1)), Some((u2, s2))) => Some((u1 + u2, s1 + s2)),
                        _ => None,
                    };
                    mine.vmm_ns = match (mine.vmm_ns, k.vmm_ns) {
                        (Some(a), Some(b)) => Some(a + b),
                        _ => None,
                    };
                    mine.vmm_rounds.extend(k.vmm_rounds);
                    mine.vmm_typical_rounds.extend(k.vmm_typical_rounds);
                }
                None => {
                    self.kinds.insert(kind, k);
                }
            }
        }
        for (kind, why) in other.skipped {
            self.skipped.entry(kind).or_insert(why);
        }
    }
}

/// The percentiles the table and JSON report, in thousandths of a percent.
pub const PERCENTILES: [(&str, u32); 4] = [
    ("p50", 50_000),
    ("p90", 90_000),
    ("p99", 99_000),
    ("p99.9", 99_900),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_ratio_pairs_rounds_and_falls_back_to_medians() {
        // The host got busier in round 2: both sides slowed, the pairs say "equal".
        let kiln = [30.0, 60.0, 31.0];
        let floor = [30.0, 60.0, 31.0];
        assert_eq!(paired_ratio(&kiln, &floor), Some(1.0));
        // Per-round ratios 1.1, 0.5, 1.2: their median is 1.1.
        let r = paired_ratio(&[33.0, 30.0, 36.0], &[30.0, 60.0, 30.0]).unwrap();
        assert!((r - 1.1).abs() < 1e-9, "{r}");
        // Unpaired (different round counts): ratio of the medians.
        assert_eq!(paired_ratio(&[40.0, 20.0, 30.0], &[10.0, 20.0]), Some(2.0));
        assert_eq!(paired_ratio(&[], &[1.0]), None);
        assert_eq!(paired_ratio(&[1.0], &[0.0]), None);
    }

    fn emit(kind: &str, values: &[u64], extra: &str) -> String {
        let mut h = Histogram::new();
        for v in values {
            h.record(*v);
        }
        let mut s = String::new();
        h.emit_buckets(kind, 3, |l| {
            s.push_str(l.as_str());
            s.push('\n');
        });
        let mut l = kiln_testguest::line::LineBuf::new();
        h.summary_line(kind, &mut l);
        s.push_str(l.as_str());
        s.push_str(extra);
        s.push('\n');
        s
    }

    #[test]
    fn parses_kinds_cpu_and_skips() {
        let out = format!(
            "KTEST boot PASS\n{}{}KBENCH exits kind=msr-user skipped=no user-space MSR exits\n",
            emit(
                "pio-out",
                &[8000, 8100, 8200, 9000],
                " host_user_us=3 host_sys_us=30"
            ),
            emit(
                "cpuid",
                &[300, 310],
                " host_user_us=4294967295 host_sys_us=4294967295"
            ),
        );
        let r = parse(&out).unwrap();
        assert_eq!(r.kinds.len(), 2);
        let pio = &r.kinds["pio-out"];
        assert_eq!(pio.hist.count(), 4);
        assert_eq!(pio.cpu_us, Some((3, 30)));
        let (u, s) = pio.cpu_per_exit_ns().unwrap();
        assert!((u - 750.0).abs() < 1e-9 && (s - 7500.0).abs() < 1e-9);
        assert_eq!(r.kinds["cpuid"].cpu_us, None);
        assert_eq!(r.skipped["msr-user"], "no user-space MSR exits");
    }

    #[test]
    fn runs_merge_per_kind() {
        let one = emit("pio-out", &[100, 200], " host_user_us=1 host_sys_us=10");
        let mut a = parse(&one).unwrap();
        let b = parse(&format!(
            "{one}{}",
            emit(
                "cpuid",
                &[50],
                " host_user_us=4294967295 host_sys_us=4294967295"
            )
        ))
        .unwrap();
        a.merge(b);
        assert_eq!(a.kinds["pio-out"].hist.count(), 4);
        assert_eq!(a.kinds["pio-out"].cpu_us, Some((2, 20)));
        assert_eq!(a.kinds["pio-out"].vmm_per_exit_ns(), None, "no host_vmm_ns");
        assert_eq!(a.kinds["cpuid"].hist.count(), 1);
    }

    #[test]
    fn vmm_time_is_the_median_of_round_means() {
        let round = |vmm_ns: u64| {
            parse(&emit(
                "pio-out",
                &[100, 200, 300, 400],
                &format!(" host_user_us=1 host_sys_us=10 host_vmm_ns={vmm_ns}"),
            ))
            .unwrap()
        };
        let mut a = round(400);
        assert_eq!(a.kinds["pio-out"].vmm_per_exit_ns(), Some(100.0));
        // A round with a preemption inside the timed window (4 ms over 4 exits) and a
        // normal one: the median of three ignores the outlier, the sum would not.
        a.merge(round(4_000_000));
        a.merge(round(480));
        let k = &a.kinds["pio-out"];
        assert_eq!(k.vmm_rounds, vec![100.0, 1_000_000.0, 120.0]);
        assert_eq!(k.vmm_per_exit_ns(), Some(120.0));
        assert_eq!(k.vmm_ns, Some(4_000_880));
        assert_eq!(median(&[3.0, 1.0]), Some(2.0));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn inconsistent_output_is_an_error() {
        let mut bad = emit("pio-out", &[1, 2, 3], "");
        bad = bad.replace("n=3", "n=4");
        assert!(parse(&bad).unwrap_err().contains("summary says 4"));
        let orphan = "KBENCH-H pio-out 1:1\n";
        assert!(parse(orphan).unwrap_err().contains("without a summary"));
        let lonely = "KBENCH exits kind=x n=1 min=1 max=1 sum=1\n";
        assert!(parse(lonely).unwrap_err().contains("without histogram"));
        assert!(parse("KBENCH-H pio-out 1:x\n").is_err());
    }
}
