//! virtio-balloon end to end: the conformance guest's `memory-stress` touches all of its
//! free RAM, then `balloon` gives the device's target back; kiln's RSS (and, for
//! `shared=on`, its shared-memory RSS) is read from `/proc/PID/status` at the guest's two
//! hold points (`kiln.stress.hold=1`, `kiln.balloon.hold=1`, each answered with a newline on
//! the console). Plus the flag's rejection, the features' paths and a guest that never
//! drives the balloon.
//!
//! The KVM tests here take one lock: they measure memory on a small shared host.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{kiln, run, run_with, skip_kvm, Run};

const MIB: u64 = 1 << 20;

static VMS: Mutex<()> = Mutex::new(());

/// One VM at a time.
fn vm_lock() -> MutexGuard<'static, ()> {
    VMS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Memory counters of a process, in bytes.
#[derive(Clone, Copy, Debug, Default)]
struct Mem {
    rss: u64,
    anon: u64,
    shmem: u64,
}

impl std::fmt::Display for Mem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VmRSS {} KiB (RssAnon {} KiB, RssShmem {} KiB)",
            self.rss / 1024,
            self.anon / 1024,
            self.shmem / 1024
        )
    }
}

fn mem_of(pid: u32) -> Mem {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib = |key: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"));
        let v: u64 = line[key.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{line:?}"));
        v * 1024
    };
    Mem {
        rss: kib("VmRSS:"),
        anon: kib("RssAnon:"),
        shmem: kib("RssShmem:"),
    }
}

/// What a held run saw.
struct Held {
    run: Run,
    touched_pages: u64,
    inflated_pages: u64,
    at_touched: Mem,
    at_inflated: Mem,
}

/// The number after `key` in `line`.
fn field(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Runs kiln with `args` and `memory-stress,balloon` with both holds; reads the memory
/// counters at each hold point, then lets the guest go on.
fn run_held(args: &[&str]) -> Held {
    let cmdline = "console=ttyS0 kiln.test=memory-stress,balloon kiln.stress.hold=1 \
                   kiln.balloon.hold=1";
    let mut child = common::spawn_piped(args, cmdline);
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut out = String::new();
    let (mut touched_pages, mut inflated_pages) = (0, 0);
    let (mut at_touched, mut at_inflated) = (Mem::default(), Mem::default());
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(line) => {
                out.push_str(&line);
                out.push('\n');
                let answer = if line.starts_with("KTEST-INFO memory-stress touched") {
                    touched_pages = field(&line, "pages=").expect("touched pages");
                    at_touched = mem_of(pid);
                    true
                } else if line.starts_with("KTEST-INFO balloon inflated") {
                    inflated_pages = field(&line, "pages=").expect("inflated pages");
                    at_inflated = mem_of(pid);
                    true
                } else {
                    false
                };
                if answer {
                    stdin.write_all(b"\n").expect("answer the guest");
                    stdin.flush().expect("flush");
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait().expect("wait");
    drop(stdin);
    let run = Run {
        code: status.code(),
        stdout: out,
        stderr: err_thread.join().unwrap_or_default(),
        timed_out,
    };
    Held {
        run,
        touched_pages,
        inflated_pages,
        at_touched,
        at_inflated,
    }
}

/// The detail of scenario `name`'s result line.
fn detail(run: &Run, name: &str) -> String {
    run.ktests()
        .into_iter()
        .find(|(n, _, _)| n == name)
        .map(|(_, _, rest)| rest)
        .unwrap_or_else(|| panic!("no {name} line:\n{}", run.stdout))
}

/// The checks both backings share; returns (the drop in VmRSS, the held run).
fn inflate_64m(label: &str, args: &[&str]) -> (u64, Held) {
    let h = run_held(args);
    h.run.assert_passed(&["memory-stress", "balloon"]);
    let ctx = format!("{label}: stdout:\n{}", h.run.stdout);
    let touched = h.touched_pages * 4096;
    eprintln!(
        "{label}: memory-stress touched {} pages ({} KiB), then: {}; balloon inflated {} \
         pages, then: {}",
        h.touched_pages,
        touched / 1024,
        h.at_touched,
        h.inflated_pages,
        h.at_inflated
    );
    // memory-stress: every touched page is resident, and little else is (kiln itself, the
    // guest's image and driver memory take under 16 MiB), so RSS grew by what was touched.
    assert!(touched >= 200 * MIB, "touched only {touched} bytes\n{ctx}");
    assert!(
        h.at_touched.rss >= touched && h.at_touched.rss <= touched + 32 * MIB,
        "RSS {} after touching {} MiB\n{ctx}",
        h.at_touched,
        touched / MIB
    );
    assert_eq!(h.inflated_pages, 16384, "{ctx}");
    let drop = h.at_touched.rss.saturating_sub(h.at_inflated.rss);
    eprintln!(
        "{label}: inflating 64 MiB lowered VmRSS by {} KiB ({} -> {} KiB)",
        drop / 1024,
        h.at_touched.rss / 1024,
        h.at_inflated.rss / 1024
    );
    assert!(
        drop >= 56 * MIB,
        "VmRSS fell by only {} KiB: {} -> {}\n{ctx}",
        drop / 1024,
        h.at_touched,
        h.at_inflated
    );
    let d = detail(&h.run, "balloon");
    for want in [
        "target=16384 inflated=16384",
        "deflated=16384 zero_after_deflate=16384/16384",
        "stats_round_trips=1",
    ] {
        assert!(d.contains(want), "{want} missing: {d}");
    }
    (drop, h)
}

#[test]
fn inflating_64m_lowers_rss_by_at_least_56m() {
    if skip_kvm("inflating_64m_lowers_rss_by_at_least_56m") {
        return;
    }
    let _vm = vm_lock();
    let (_, h) = inflate_64m(
        "private anonymous (MADV_DONTNEED)",
        &["--memory", "256M", "--balloon", "size=64M"],
    );
    // Private memory counts as anonymous.
    assert!(
        h.at_touched.anon >= h.touched_pages * 4096,
        "{}",
        h.at_touched
    );
}

#[test]
fn inflating_64m_of_shared_memory_punches_holes() {
    if skip_kvm("inflating_64m_of_shared_memory_punches_holes") {
        return;
    }
    let _vm = vm_lock();
    let (_, h) = inflate_64m(
        "shared memfd (MADV_REMOVE)",
        &["--memory", "size=256M,shared=on", "--balloon", "size=64M"],
    );
    // memfd pages count as shared memory, and the hole punched in the memfd shows there.
    assert!(
        h.at_touched.shmem >= h.touched_pages * 4096,
        "{}",
        h.at_touched
    );
    let drop = h.at_touched.shmem.saturating_sub(h.at_inflated.shmem);
    assert!(
        drop >= 56 * MIB,
        "RssShmem fell by only {} KiB: {} -> {}",
        drop / 1024,
        h.at_touched,
        h.at_inflated
    );
}

#[test]
fn every_feature_on_and_statistics_off() {
    if skip_kvm("every_feature_on_and_statistics_off") {
        return;
    }
    let _vm = vm_lock();
    let go = |balloon: &str| {
        let mut cmd = kiln();
        cmd.args([
            "--memory",
            "128M",
            "--balloon",
            balloon,
            "--cmdline",
            "console=ttyS0 kiln.test=balloon",
        ]);
        let r = run_with(cmd, None, Duration::from_secs(120));
        r.assert_passed(&["balloon"]);
        detail(&r, "balloon")
    };
    let d = go("size=16M,deflate-on-oom=on,free-page-reporting=on,stats-interval=1");
    for want in [
        "features=version_1,stats_vq,deflate_on_oom,reporting",
        "inflated=4096",
        "zero_after_deflate=4096/4096",
        "stats_round_trips=1",
        // kiln drops the reported pages too.
        "reporting=done(pages=1024,zeroed=1024)",
    ] {
        assert!(d.contains(want), "{want} missing: {d}");
    }
    let d = go("size=4M,stats-interval=0");
    for want in [
        "features=version_1 ",
        "inflated=1024",
        "stats_round_trips=n/a reporting=n/a",
    ] {
        assert!(d.contains(want), "{want} missing: {d}");
    }
}

#[test]
fn a_balloon_larger_than_memory_is_refused() {
    let r = run(&["--memory", "128M", "--balloon", "size=256M"]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(
        r.stderr.contains("--balloon") && r.stderr.contains("more than the guest's memory"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty(), "no guest may run: {}", r.stdout);
}

#[test]
fn a_guest_that_ignores_the_balloon_runs_as_usual() {
    if skip_kvm("a_guest_that_ignores_the_balloon_runs_as_usual") {
        return;
    }
    let _vm = vm_lock();
    let r = run(&[
        "--memory",
        "128M",
        "--balloon",
        "size=64M",
        "--cmdline",
        "console=ttyS0 kiln.test=boot,virtio-rng",
    ]);
    r.assert_passed(&["boot", "virtio-rng"]);
    // The balloon is there (last), just never driven.
    assert!(
        r.stdout.contains("KTEST-INFO virtio devices=2 "),
        "{}",
        r.stdout
    );
}
