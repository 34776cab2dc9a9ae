//! The Firecracker-compatible API and command line, driven as an orchestrator would: a real
//! process, over its socket, with no native kiln flags.

mod api_util;
mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use api_util::*;

/// Configure, start, pause, snapshot, resume and Ctrl+Alt+Del the conformance guest
/// through the API of a `firecracker`-named kiln; the process then exits 0.
#[test]
fn lifecycle_through_the_api_only() {
    if common::skip_kvm("lifecycle_through_the_api_only") {
        return;
    }
    let dir = Scratch::new("lifecycle");
    let guest = guest(&dir.0);
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path("api.sock");
    let log = dir.path("fc.log");
    let metrics = dir.path("metrics.json");
    let launch = Launch {
        program: firecracker_link(&dir.0),
        args: vec![
            "--api-sock".into(),
            sock.display().to_string(),
            "--id".into(),
            "vm_lifecycle".into(),
        ],
        confine_to: None,
        stdin: false,
    };
    let mut fc = Kiln::start(launch, &sock);

    let info = fc.get("/");
    assert_eq!(info["app_name"], "Firecracker");
    assert_eq!(info["id"], "vm_lifecycle");
    assert_eq!(info["state"], "Not started");
    assert_eq!(fc.get("/version")["firecracker_version"], "1.16.1");

    fc.ok(
        "PUT",
        "/logger",
        &format!(
            r#"{{"log_path": "{}", "level": "Debug", "show_level": true}}"#,
            log.display()
        ),
    );
    fc.ok(
        "PUT",
        "/metrics",
        &format!(r#"{{"metrics_path": "{}"}}"#, metrics.display()),
    );
    fc.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 128}"#,
    );
    fc.ok(
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "{}"}}"#,
            guest.display(),
            guest_args("boot,smp,ctrl-alt-del", 2, 128)
        ),
    );
    fc.ok(
        "PUT",
        "/drives/rootfs",
        &format!(
            r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true,
                 "is_read_only": false}}"#,
            disk.display()
        ),
    );
    fc.ok("PUT", "/entropy", "{}");
    fc.ok(
        "PUT",
        "/mmds",
        r#"{"latest": {"meta-data": {"id": "i-1"}}}"#,
    );

    let cfg = fc.get("/vm/config");
    assert_eq!(cfg["machine-config"]["vcpu_count"], 2);
    assert_eq!(cfg["drives"][0]["drive_id"], "rootfs");
    assert_eq!(
        cfg["boot-source"]["kernel_image_path"],
        guest.display().to_string()
    );
    assert!(cfg["vsock"].is_null());

    // Post-boot-only calls are refused before the start.
    assert_eq!(
        fc.fault("PATCH", "/vm", Some(r#"{"state": "Paused"}"#)),
        PRE_BOOT
    );

    fc.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    assert_eq!(fc.get("/")["state"], "Running");
    assert!(
        fc.wait_stdout("KTEST-KBD-READY", Duration::from_secs(60)),
        "guest never armed its keyboard\n{}",
        fc.output()
    );

    // Firecracker's vCPU thread names.
    let pid = fc.child.id();
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect();
    names.sort();
    assert!(
        names.contains(&"fc_vcpu 0".to_string()) && names.contains(&"fc_vcpu 1".to_string()),
        "{names:?}"
    );

    // Pre-boot-only calls are refused after it.
    let m = fc.fault(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/x"}"#),
    );
    assert_eq!(m, POST_BOOT);
    assert_eq!(
        fc.fault(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#)
        ),
        POST_BOOT
    );

    fc.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert_eq!(fc.get("/")["state"], "Paused");
    // A paused VM snapshots (restoring it is snapshot_create_and_load_through_the_api).
    fc.ok(
        "PUT",
        "/snapshot/create",
        &format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            dir.path("vm.snap").display(),
            dir.path("vm.mem").display()
        ),
    );
    assert!(dir.path("vm.snap").exists() && dir.path("vm.mem").exists());
    fc.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    assert_eq!(fc.get("/")["state"], "Running");
    // MMDS stays readable and writable after boot.
    fc.ok(
        "PATCH",
        "/mmds",
        r#"{"latest": {"meta-data": {"id": null, "az": "a"}}}"#,
    );
    assert_eq!(
        fc.get("/mmds"),
        serde_json::json!({"latest": {"meta-data": {"az": "a"}}})
    );

    fc.ok("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
    let text = std::fs::read_to_string(&metrics).unwrap();
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a metrics line")).unwrap();
    assert!(
        last["put_api_requests"]["actions_count"].as_u64().unwrap() >= 1,
        "{last}"
    );
    assert!(
        last["latencies_us"]["pause_vm"].as_u64().unwrap() > 0,
        "{last}"
    );
    // The guest printed to COM1 and read the i8042 status: port exits were counted.
    assert!(
        last["vcpu"]["exit_io_out"].as_u64().unwrap() > 100,
        "{last}"
    );
    assert!(last["vcpu"]["exit_io_in"].as_u64().unwrap() > 0, "{last}");
    assert!(last["vcpu"]["kvm"].is_object(), "{last}");

    fc.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let st = fc
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("still running after Ctrl+Alt+Del\n{}", fc.output()));
    let out = fc.stdout();
    assert!(out.contains("KTEST ctrl-alt-del PASS"), "{}", fc.output());
    assert!(out.contains("KTEST boot PASS"), "{}", fc.output());
    assert!(out.contains("KTEST smp PASS"), "{}", fc.output());
    assert!(!out.contains(" FAIL"), "{}", fc.output());
    assert_eq!(st.code(), Some(0), "{}", fc.output());
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("[vm_lifecycle:"), "{log_text}");
    assert!(log_text.contains("Debug API PUT /actions"), "{log_text}");
}

/// `counter seq=N ...` lines → N.
fn counter_seqs(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| {
            l.strip_prefix("counter seq=")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Snapshot a paused VM through `PUT /snapshot/create`, kill the process, and
/// `PUT /snapshot/load` it (with `resume_vm`) in a fresh one: the `counter` guest carries on
/// from the line after the last one it printed, with no memory, disk or clock errors.
#[test]
fn snapshot_create_and_load_through_the_api() {
    if common::skip_kvm("snapshot_create_and_load_through_the_api") {
        return;
    }
    let dir = Scratch::new("snapshot");
    let guest = guest(&dir.0);
    let disk = dir.path("disk.img");
    // The counter stamps a ring of at least 32768 sectors.
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(16 << 20))
        .unwrap();
    let (state, mem) = (dir.path("vm.snap"), dir.path("vm.mem"));
    let snap_body = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        state.display(),
        mem.display()
    );
    let sock = dir.path("api1.sock");
    let launch = |sock: &std::path::Path| Launch {
        program: firecracker_link(&dir.0),
        args: vec!["--api-sock".into(), sock.display().to_string()],
        confine_to: None,
        stdin: false,
    };
    let mut fc = Kiln::start(launch(&sock), &sock);
    fc.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
    );
    fc.ok(
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 kiln.test=counter kiln.counter.mib=8 kiln.counter.rate=20 kiln.counter.period_ms=50 kiln.counter.secs=4"}}"#,
            guest.display()
        ),
    );
    fc.ok(
        "PUT",
        "/drives/data",
        &format!(
            r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false}}"#,
            disk.display()
        ),
    );
    // Loading needs a fresh process: not after boot-specific configuration.
    let m = fc.fault(
        "PUT",
        "/snapshot/load",
        Some(&format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            state.display(),
            mem.display()
        )),
    );
    assert!(m.contains("boot-specific"), "{m}");
    fc.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    assert!(
        fc.wait_stdout("counter seq=8", Duration::from_secs(60)),
        "{}",
        fc.output()
    );
    // Firecracker snapshots paused VMs only.
    let m = fc.fault("PUT", "/snapshot/create", Some(&snap_body));
    assert!(m.contains("must be paused"), "{m}");
    assert!(!state.exists());
    fc.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    fc.ok("PUT", "/snapshot/create", &snap_body);
    assert!(state.exists() && mem.exists());
    std::thread::sleep(Duration::from_millis(200));
    let _ = fc.child.kill();
    let _ = fc.child.wait();
    let before = fc.stdout();
    let last = *counter_seqs(&before).last().expect("counter lines");
    assert!(!before.contains("errors=1"), "{before}");
    drop(fc);

    // A fresh process: bad load bodies are refused, then the snapshot loads and runs on.
    let sock2 = dir.path("api2.sock");
    let mut fc2 = Kiln::start(launch(&sock2), &sock2);
    let m = fc2.fault(
        "PUT",
        "/snapshot/load",
        Some(&format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "Uffd", "backend_path": "/x"}}}}"#,
            state.display()
        )),
    );
    assert!(m.contains("Uffd") && m.contains("not supported"), "{m}");
    let m = fc2.fault(
        "PUT",
        "/snapshot/load",
        Some(&format!(r#"{{"snapshot_path": "{}"}}"#, state.display())),
    );
    assert!(m.contains("mem_backend"), "{m}");
    let m = fc2.fault(
        "PUT",
        "/snapshot/load",
        Some(&format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}}}"#,
            dir.path("nope").display(),
            mem.display()
        )),
    );
    assert!(
        m.starts_with("Load snapshot error") && m.contains("nope"),
        "{m}"
    );
    assert_eq!(fc2.get("/")["state"], "Not started");
    fc2.ok(
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}},
                 "enable_diff_snapshots": false, "resume_vm": true}}"#,
            state.display(),
            mem.display()
        ),
    );
    assert_eq!(fc2.get("/")["state"], "Running");
    let st = fc2
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the restored guest never finished\n{}", fc2.output()));
    let after = fc2.stdout();
    assert_eq!(st.code(), Some(0), "{}", fc2.output());
    assert!(after.contains("KTEST counter PASS"), "{}", fc2.output());
    assert!(after.contains("errors=0 (mem=0 blk=0 clock=0)"), "{after}");
    let seqs = counter_seqs(&after);
    assert_eq!(
        seqs.first().copied(),
        Some(last + 1),
        "the sequence goes on where it stopped\nbefore:\n{before}\nafter:\n{after}"
    );
    for w in seqs.windows(2) {
        assert_eq!(w[1], w[0] + 1, "a gap in the sequence\n{after}");
    }
}

/// `--config-file` with `--no-api` boots the conformance guest without any socket.
#[test]
fn config_file_without_api_boots_the_guest() {
    if common::skip_kvm("config_file_without_api_boots_the_guest") {
        return;
    }
    let dir = Scratch::new("config-file");
    let guest = guest(&dir.0);
    let cfg = dir.path("vm.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "{}"}},
                 "drives": [],
                 "machine-config": {{"vcpu_count": 2, "mem_size_mib": 64}},
                 "entropy": {{}}}}"#,
            guest.display(),
            guest_args("boot,smp,virtio-rng", 2, 64)
        ),
    )
    .unwrap();
    let mut cmd = common::kiln();
    cmd.args(["--config-file", &cfg.display().to_string(), "--no-api"]);
    let run = common::run_with(cmd, None, Duration::from_secs(60));
    run.assert_passed(&["boot", "smp", "virtio-rng"]);
}

/// Configuration and argument errors exit as Firecracker's do: 152 and 153.
#[test]
fn bad_configuration_and_arguments_exit_152_and_153() {
    let dir = Scratch::new("exit-codes");
    let fc = firecracker_link(&dir.0);
    let run = |args: &[&str]| {
        let mut c = std::process::Command::new(&fc);
        c.args(args);
        common::run_with(c, None, Duration::from_secs(30))
    };
    let cfg = dir.path("bad.json");
    for (text, why) in [
        (r#"{"drives": []}"#, "boot-source"),
        (r#"{"boot-source": {"kernel_image_path": "/k"}}"#, "drives"),
        (
            r#"{"boot-source": {"kernel_image_path": "/k"}, "drives": [], "bogus": 1}"#,
            "unknown field",
        ),
        ("{not json", "key must be a string"),
        (
            r#"{"boot-source": {"kernel_image_path": "/nonexistent/kernel"}, "drives": []}"#,
            "/nonexistent/kernel",
        ),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let r = run(&["--no-api", "--config-file", &cfg.display().to_string()]);
        assert_eq!(r.code, Some(152), "{text}: {}", r.stderr);
        assert!(r.stderr.contains(why), "{text}: {}", r.stderr);
    }
    let r = run(&["--no-api"]);
    assert_eq!(r.code, Some(153), "{}", r.stderr);
    assert!(r.stderr.contains("--config-file"), "{}", r.stderr);
    let r = run(&["--api-sock"]);
    assert_eq!(r.code, Some(153), "{}", r.stderr);
    let r = run(&["--level", "Loud"]);
    assert_eq!(r.code, Some(153), "{}", r.stderr);
    // The native binary name keeps clap's status for a bad command line.
    let r = common::run(&["--no-api"]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
}

/// `firecracker --version`: the first line is what the SDKs parse.
#[test]
fn firecracker_version_line() {
    let dir = Scratch::new("version");
    let out = std::process::Command::new(firecracker_link(&dir.0))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let first = text.lines().next().unwrap();
    assert_eq!(first, "Firecracker v1.16.1");
    // As Kata parses it: the second field, less its "v", is a semver.
    let v = first.split(' ').nth(1).unwrap().trim_start_matches('v');
    assert_eq!(v.split('.').filter(|p| p.parse::<u32>().is_ok()).count(), 3);
}

/// SIGTERM ends `firecracker` by the signal, before and after boot, as Firecracker (which
/// does not handle it) ends.
#[test]
fn sigterm_ends_firecracker_by_the_signal() {
    if common::skip_kvm("sigterm_ends_firecracker_by_the_signal") {
        return;
    }
    let dir = Scratch::new("sigterm");
    let guest = guest(&dir.0);
    let sock = dir.path("api.sock");
    for boot in [false, true] {
        let _ = std::fs::remove_file(&sock);
        let launch = Launch {
            program: firecracker_link(&dir.0),
            args: vec!["--api-sock".into(), sock.display().to_string()],
            confine_to: None,
            stdin: false,
        };
        let mut fc = Kiln::start(launch, &sock);
        if boot {
            fc.ok(
                "PUT",
                "/boot-source",
                &format!(
                    r#"{{"kernel_image_path": "{}", "boot_args": "{}"}}"#,
                    guest.display(),
                    guest_args("ctrl-alt-del", 1, 128)
                ),
            );
            fc.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
            assert!(fc.wait_stdout("KTEST-KBD-READY", Duration::from_secs(60)));
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(fc.child.id() as i32, libc::SIGTERM) };
        let st = fc.wait_exit(Duration::from_secs(20)).expect("exits");
        assert_eq!(st.signal(), Some(libc::SIGTERM), "boot={boot}: {st}");
    }
}

/// A socket path that is already served is refused (exit 1), as Firecracker refuses it.
#[test]
fn api_socket_in_use_is_an_error() {
    let dir = Scratch::new("in-use");
    let sock = dir.path("api.sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let mut c = std::process::Command::new(firecracker_link(&dir.0));
    c.args(["--api-sock", &sock.display().to_string()]);
    let r = common::run_with(c, None, Duration::from_secs(20));
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("API socket"), "{}", r.stderr);
}

/// A native kiln with `--api-sock` serves the same API; its native flags stay in force.
#[test]
fn kiln_with_api_sock_keeps_native_flags() {
    if common::skip_kvm("kiln_with_api_sock_keeps_native_flags") {
        return;
    }
    let dir = Scratch::new("native");
    let guest = guest(&dir.0);
    let sock = dir.path("api.sock");
    let serial = dir.path("serial.txt");
    let launch = Launch::kiln(&[
        "--api-sock",
        &sock.display().to_string(),
        "--serial",
        &format!("file:{}", serial.display()),
    ]);
    let mut k = Kiln::start(launch, &sock);
    k.ok(
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "{}"}}"#,
            guest.display(),
            guest_args("boot,poweroff", 1, 128)
        ),
    );
    k.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    let st = k
        .wait_exit(Duration::from_secs(60))
        .expect("guest powers off");
    assert_eq!(st.code(), Some(0), "{}", k.output());
    let out = std::fs::read_to_string(&serial).unwrap();
    assert!(out.contains("KTEST boot PASS"), "{out}");
    assert!(out.contains("KTEST poweroff PASS"), "{out}");
}

/// The balloon through the API: configured before boot, its target changed and its
/// statistics read after, while the guest holds its inflated balloon.
#[test]
fn balloon_through_the_api() {
    if common::skip_kvm("balloon_through_the_api") {
        return;
    }
    let dir = Scratch::new("balloon");
    let guest = guest(&dir.0);
    let sock = dir.path("api.sock");
    let launch = Launch {
        program: firecracker_link(&dir.0),
        args: vec!["--api-sock".into(), sock.display().to_string()],
        confine_to: None,
        stdin: true,
    };
    let mut fc = Kiln::start(launch, &sock);
    fc.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
    );
    fc.ok(
        "PUT",
        "/balloon",
        r#"{"amount_mib": 16, "deflate_on_oom": true, "stats_polling_interval_s": 1}"#,
    );
    assert_eq!(fc.get("/balloon")["amount_mib"], 16);
    fc.ok(
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "{} kiln.balloon.hold=1"}}"#,
            guest.display(),
            guest_args("balloon", 1, 128)
        ),
    );
    fc.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    assert!(
        fc.wait_stdout("KTEST-INFO balloon inflated", Duration::from_secs(60)),
        "{}",
        fc.output()
    );
    let stats = fc.get("/balloon/statistics");
    assert_eq!(stats["target_pages"], 4096, "{stats}");
    assert_eq!(stats["target_mib"], 16, "{stats}");
    assert_eq!(stats["actual_pages"], 4096, "{stats}");
    assert_eq!(stats["actual_mib"], 16, "{stats}");
    // The guest's first statistics buffer (free and total memory) has been read.
    assert!(stats["total_memory"].as_u64().unwrap_or(0) > 0, "{stats}");
    assert!(stats["free_memory"].as_u64().unwrap_or(0) > 0, "{stats}");
    // A new target reaches the device (and the guest, by config interrupt).
    fc.ok("PATCH", "/balloon", r#"{"amount_mib": 8}"#);
    assert_eq!(fc.get("/balloon")["amount_mib"], 8);
    assert_eq!(fc.get("/balloon/statistics")["target_mib"], 8);
    fc.ok("PATCH", "/balloon", r#"{"amount_mib": 16}"#);
    std::io::Write::write_all(fc.stdin.as_mut().expect("stdin"), b"\n").unwrap();
    let st = fc.wait_exit(Duration::from_secs(60)).expect("guest ends");
    assert!(
        fc.stdout().contains("KTEST balloon PASS"),
        "{}",
        fc.output()
    );
    assert_eq!(st.code(), Some(0), "{}", fc.output());
}

/// `--config-file` with `--api-sock`: the VM starts at once and the API serves it post-boot;
/// the file's `serial` section sends the console to a file.
#[test]
fn config_file_with_api_serves_the_running_vm() {
    if common::skip_kvm("config_file_with_api_serves_the_running_vm") {
        return;
    }
    let dir = Scratch::new("config-api");
    let guest = guest(&dir.0);
    let console = dir.path("console.txt");
    let cfg = dir.path("vm.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "{}"}},
                 "drives": [],
                 "serial": {{"serial_out_path": "{}"}}}}"#,
            guest.display(),
            guest_args("ctrl-alt-del", 1, 128),
            console.display()
        ),
    )
    .unwrap();
    let sock = dir.path("api.sock");
    let launch = Launch {
        program: firecracker_link(&dir.0),
        args: vec![
            "--api-sock".into(),
            sock.display().to_string(),
            "--config-file".into(),
            cfg.display().to_string(),
        ],
        confine_to: None,
        stdin: false,
    };
    let mut fc = Kiln::start(launch, &sock);
    assert_eq!(fc.get("/")["state"], "Running");
    assert_eq!(
        fc.get("/vm/config")["boot-source"]["kernel_image_path"],
        guest.display().to_string()
    );
    assert_eq!(
        fc.fault(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#)
        ),
        POST_BOOT
    );
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("KTEST-KBD-READY")
    {
        assert!(t0.elapsed() < Duration::from_secs(60), "{}", fc.output());
        std::thread::sleep(Duration::from_millis(20));
    }
    fc.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let st = fc.wait_exit(Duration::from_secs(60)).expect("exits");
    assert_eq!(st.code(), Some(0), "{}", fc.output());
    let out = std::fs::read_to_string(&console).unwrap();
    assert!(out.contains("KTEST ctrl-alt-del PASS"), "{out}");
    assert!(
        !fc.stdout().contains("KTEST"),
        "console went to the file only"
    );
}
