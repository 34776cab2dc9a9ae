//! Seccomp: every kiln thread runs filtered, a forbidden call on any thread kind ends kiln
//! with status 148 and names the thread and the call, custom filters load, and
//! `--no-seccomp` turns it all off. (The rest of the suite runs with the built-in filters on,
//! which is what shows the allow-lists are complete.)

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{kiln, run, scratch, skip_kvm};

/// Every kind of thread kiln starts (with `--exit-bench`, `--disk`, 2 vCPUs, console on
/// stdio).
const THREADS: [&str; 6] = [
    "kiln",
    "kiln-vcpu0",
    "kiln-vcpu1",
    "kiln-virtio",
    "kiln-stdin",
    "kiln-bench",
];

/// Starts kiln with a guest that waits for console input (so every thread is alive), returns
/// each thread's (name, Seccomp mode) and stops kiln.
fn thread_modes(extra: &[&str], disk: &std::path::Path, filtered: bool) -> Vec<(String, String)> {
    let mut cmd: Command = kiln();
    cmd.args(["--cpus", "2", "--cmdline", "console=ttyS0 kiln.test=serial"])
        .arg("--disk")
        .arg(format!("path={}", disk.display()))
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("spawn kiln");
    let pid = child.id();
    // Wait until all four kinds of thread exist (vCPUs, device loop, stdin reader, main).
    let deadline = Instant::now() + Duration::from_secs(30);
    let modes = loop {
        let mut modes = Vec::new();
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
                let mode = status
                    .lines()
                    .find_map(|l| l.strip_prefix("Seccomp:"))
                    .unwrap_or("?")
                    .trim()
                    .to_string();
                modes.push((comm.trim().to_string(), mode));
            }
        }
        let has = |n: &str| modes.iter().any(|(c, _)| c == n);
        if THREADS.iter().all(|n| has(n))
            // The main thread installs its filter last.
            && (!filtered || modes.iter().any(|(c, m)| c == "kiln" && m != "0"))
            || Instant::now() > deadline
        {
            break modes;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    modes
}

#[test]
fn every_thread_runs_with_a_filter() {
    if skip_kvm("every_thread_runs_with_a_filter") {
        return;
    }
    let dir = scratch("seccomp-threads");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    let modes = thread_modes(&["--exit-bench"], &disk, true);
    for name in THREADS {
        assert!(
            modes.iter().any(|(c, _)| c == name),
            "no {name} thread: {modes:?}"
        );
    }
    for (comm, mode) in &modes {
        assert_eq!(mode, "2", "thread {comm} is not filtered: {modes:?}");
    }
    let modes = thread_modes(&["--no-seccomp", "--exit-bench"], &disk, false);
    assert!(
        modes.iter().all(|(_, m)| m == "0"),
        "--no-seccomp must leave threads unfiltered: {modes:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs kiln with `--seccomp-selftest kind` and a guest that waits for input.
fn selftest(kind: &str, extra: &[&str], disk: &std::path::Path) -> common::Run {
    let mut cmd = kiln();
    cmd.args(["--seccomp-selftest", kind, "--disk"])
        .arg(format!("path={}", disk.display()))
        .args(["--cmdline", "console=ttyS0 kiln.test=boot"])
        .args(extra);
    common::run_with(cmd, Some(b""), Duration::from_secs(60))
}

#[test]
fn a_forbidden_call_on_any_thread_kind_exits_148() {
    if skip_kvm("a_forbidden_call_on_any_thread_kind_exits_148") {
        return;
    }
    let dir = scratch("seccomp-selftest");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    for kind in ["vmm", "vcpu", "device", "stdin", "bench"] {
        // The bench thread exists only with --exit-bench.
        let r = selftest(kind, &["--exit-bench"], &disk);
        assert_eq!(r.code, Some(148), "{kind}: {r:?}");
        assert!(
            r.stderr.contains(&format!(
                "the {kind} thread made a forbidden system call 110 (getppid)"
            )),
            "{kind}: {}",
            r.stderr
        );
        // Without filters the same call is harmless.
        let r = selftest(kind, &["--no-seccomp", "--exit-bench"], &disk);
        r.assert_passed(&["boot"]);
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn custom_filter_files_load_and_apply() {
    if skip_kvm("custom_filter_files_load_and_apply") {
        return;
    }
    let dir = scratch("seccomp-custom");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    // A deny-list in seccompiler's format: everything but getppid.
    let deny = |k: &str| {
        format!(
            r#""{k}": {{"mismatch_action": "allow", "match_action": "trap", "filter": [{{"syscall": "getppid"}}]}}"#
        )
    };
    let json = format!(
        "{{{}}}",
        ["vmm", "vcpu", "device", "stdin"]
            .iter()
            .map(|k| deny(k))
            .collect::<Vec<_>>()
            .join(",")
    );
    let path = dir.join("filters.json");
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(json.as_bytes()))
        .unwrap();
    let flag = ["--seccomp-filter", path.to_str().unwrap()];
    let r = selftest("device", &flag, &disk);
    assert_eq!(r.code, Some(148), "{r:?}");
    let mut cmd = kiln();
    cmd.args(flag)
        .args(["--cmdline", "console=ttyS0 kiln.test=boot"]);
    common::run_with(cmd, None, Duration::from_secs(60)).assert_passed(&["boot"]);

    // A broken file is an error naming the flag, before any VM exists.
    std::fs::write(&path, b"{\"vmm\": 3}").unwrap();
    let r = run(&["--seccomp-filter", path.to_str().unwrap()]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("--seccomp-filter"), "{}", r.stderr);
    let r = run(&["--seccomp-filter", "/nonexistent/filters.json"]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(
        r.stderr
            .contains("--seccomp-filter /nonexistent/filters.json"),
        "{}",
        r.stderr
    );
    let _ = std::fs::remove_dir_all(dir);
}
