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

/// Each thread of `pid` now: (name, `Seccomp:` mode from its status, "?" if unreadable).
fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
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
    modes
}

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
        let modes = seccomp_modes(pid);
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

/// A stopped and continued kiln (a debugger, job control, an orchestrator freezing it with
/// `SIGSTOP`) goes on as before: resuming an interrupted sleep is a `restart_syscall`, which
/// every filter must allow (it was missing, and kiln died with 148 on `SIGCONT`).
#[test]
fn stop_and_continue_under_seccomp() {
    if skip_kvm("stop_and_continue_under_seccomp") {
        return;
    }
    let mut child = kiln()
        .args(["--cpus", "2", "--cmdline", "console=ttyS0 kiln.test=serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln");
    let pid = child.id();
    // Every thread filtered (the main thread installs its filter last) and asleep.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seccomp_modes(pid)
        .iter()
        .any(|(c, m)| c == "kiln" && m == "2")
    {
        assert!(
            Instant::now() < deadline,
            "kiln never installed its filters"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        for sig in [libc::SIGSTOP, libc::SIGCONT] {
            // SAFETY: plain kill(2) on our own child's pid.
            assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
            std::thread::sleep(Duration::from_millis(60));
        }
    }
    assert!(
        child.try_wait().expect("wait").is_none(),
        "kiln ended after SIGSTOP/SIGCONT"
    );
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(b"still here\n")
        .expect("write to the guest");
    let out = child.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("KTEST-ECHO still here"),
        "{:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
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

/// Seccomp modes of `pid`'s threads named `names`, once they all exist.
fn modes_of(pid: u32, names: &[&str]) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let modes = seccomp_modes(pid);
        if names.iter().all(|n| modes.iter().any(|(c, _)| c == n)) || Instant::now() > deadline {
            return modes;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The API server's threads (`--api-sock`): the accepting thread and each connection's
/// thread run under the `api` filter from the start, before any VM exists; a forbidden call
/// there ends kiln with 148 naming the `api` thread; `--no-seccomp` leaves them unfiltered.
#[test]
fn api_threads_run_filtered() {
    let dir = scratch("seccomp-api");
    for (extra, want) in [(&[][..], "2"), (&["--no-seccomp"][..], "0")] {
        let sock = dir.join("api.sock");
        let _ = std::fs::remove_file(&sock);
        let mut child = kiln()
            .arg("--api-sock")
            .arg(&sock)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kiln");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut conn = loop {
            match std::os::unix::net::UnixStream::connect(&sock) {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => panic!("connect: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        // A keep-alive request, answered, so its connection thread is there to look at.
        conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 512];
        let n = std::io::Read::read(&mut conn, &mut buf).unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        let modes = modes_of(child.id(), &["fc_api", "fc_api_conn"]);
        let _ = child.kill();
        let _ = child.wait();
        for name in ["fc_api", "fc_api_conn"] {
            let m = modes.iter().find(|(c, _)| c == name);
            assert_eq!(
                m.map(|(_, m)| m.as_str()),
                Some(want),
                "{name} with {extra:?}: {modes:?}"
            );
        }
    }
    let sock = dir.join("api.sock");
    let _ = std::fs::remove_file(&sock);
    let r = run(&[
        "--api-sock",
        sock.to_str().unwrap(),
        "--seccomp-selftest",
        "api",
    ]);
    assert_eq!(r.code, Some(148), "{r:?}");
    assert!(
        r.stderr
            .contains("the api thread made a forbidden system call 110 (getppid)"),
        "{}",
        r.stderr
    );
}
