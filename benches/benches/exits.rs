//! VM-exit round trips on KVM: a guest loop of PIO (or MMIO) writes, run through kiln-vcpu's
//! exit dispatch and kiln-bus, against a raw kvm-ioctls loop running the same guest code in
//! the same run (the floor). After criterion's numbers, prints the kiln/floor ratio of wall
//! time and the user CPU per exit of each, measured with RUSAGE_THREAD, and the user-space
//! time per exit measured with two clock reads around the dispatch (as `kiln --exit-bench`
//! does), in interleaved rounds of the same VM.
//!
//! Target: the kiln path adds at most 2% over the floor.
//!
//! Without /dev/kvm this benchmark fails, unless KILN_SKIP_KVM=1, when it says it skipped.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use kiln_benches::{thread_cpu_us, ExitKind, ExitVm};

fn skip() -> bool {
    if std::env::var_os("KILN_SKIP_KVM").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED exit benchmarks: KILN_SKIP_KVM=1");
        return true;
    }
    false
}

fn vm(kind: ExitKind) -> ExitVm {
    ExitVm::new(kind)
        .unwrap_or_else(|e| panic!("exit benchmark needs KVM: {e} (KILN_SKIP_KVM=1 skips)"))
}

fn exits(c: &mut Criterion) {
    let mut g = c.benchmark_group("exit_round_trip");
    g.measurement_time(Duration::from_secs(3));
    g.sample_size(20);
    for kind in [ExitKind::Pio, ExitKind::Mmio] {
        let mut v = vm(kind);
        g.bench_function(BenchmarkId::new("floor", kind.name()), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                v.run_raw(iters);
                t.elapsed()
            })
        });
        g.bench_function(BenchmarkId::new("kiln", kind.name()), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                v.run_kiln(iters);
                t.elapsed()
            })
        });
    }
    g.finish();
}

/// Interleaved rounds of both loops; medians of per-exit wall time and user CPU.
fn ratio_report(rounds: usize, per_round: u64) {
    println!("\nexit round trip, {rounds} interleaved rounds of {per_round} exits (medians):");
    println!(
        "{:<6} {:>14} {:>14} {:>8} {:>16} {:>16} {:>14} {:>14} {:>8}",
        "kind",
        "floor ns/exit",
        "kiln ns/exit",
        "ratio",
        "floor user ns",
        "kiln user ns",
        "floor vmm ns",
        "kiln vmm ns",
        "ratio"
    );
    for kind in [ExitKind::Pio, ExitKind::Mmio] {
        let mut v = vm(kind);
        v.run_raw(per_round / 10); // warm-up
        let (mut floor, mut kiln, mut floor_u, mut kiln_u) = (vec![], vec![], vec![], vec![]);
        // The user-space part of each exit, timed like kiln's --exit-bench, in short rounds
        // of their own (the two clock reads per exit would skew the wall times below) that
        // alternate often, so drift in the host's load hits both loops alike.
        let (mut floor_v, mut kiln_v) = (vec![], vec![]);
        let short = (per_round / 4).max(100);
        for _ in 0..rounds * 4 {
            for (vmm, raw) in [(&mut floor_v, true), (&mut kiln_v, false)] {
                let ns = if raw {
                    v.run_raw_timed(short)
                } else {
                    v.run_kiln_timed(short)
                };
                vmm.push(ns as f64 / short as f64);
            }
        }
        for _ in 0..rounds {
            for (wall, user, raw) in [
                (&mut floor, &mut floor_u, true),
                (&mut kiln, &mut kiln_u, false),
            ] {
                let (u0, _) = thread_cpu_us();
                let t = Instant::now();
                if raw {
                    v.run_raw(per_round);
                } else {
                    v.run_kiln(per_round);
                }
                let ns = t.elapsed().as_nanos() as f64 / per_round as f64;
                let (u1, _) = thread_cpu_us();
                wall.push(ns);
                user.push((u1 - u0) as f64 * 1000.0 / per_round as f64);
            }
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (f, k) = (med(&mut floor), med(&mut kiln));
        let (fv, kv) = (med(&mut floor_v), med(&mut kiln_v));
        println!(
            "{:<6} {:>14.0} {:>14.0} {:>8.3} {:>16.0} {:>16.0} {:>14.1} {:>14.1} {:>8.3}",
            kind.name(),
            f,
            k,
            k / f,
            med(&mut floor_u),
            med(&mut kiln_u),
            fv,
            kv,
            kv / fv
        );
        let counted = match kind {
            ExitKind::Pio => v.device.pio_writes(),
            ExitKind::Mmio => v.device.mmio_writes(),
        };
        assert!(
            counted > 0,
            "the exit-test device saw no {} exits",
            kind.name()
        );
    }
}

fn main() {
    if skip() {
        return;
    }
    // `cargo bench` passes --bench; `cargo test --benches` does not: then only check that
    // both loops work, quickly.
    // `cargo bench -- --test` (CI) passes both: check quickly then too.
    let benching =
        std::env::args().any(|a| a == "--bench") && !std::env::args().any(|a| a == "--test");
    let mut c = Criterion::default().configure_from_args();
    exits(&mut c);
    c.final_summary();
    if benching {
        ratio_report(15, 20_000);
    } else {
        ratio_report(3, 500);
    }
}
