//! The API's error paths, its robustness against hostile clients, and property tests
//! generated from the Firecracker OpenAPI spec (tests/data/firecracker.yaml).
//!
//! Requests here name arbitrary host paths (`/logger`, `/metrics`, `/serial`, drives...), so
//! the kiln under test runs confined: its own mount and network namespaces, every mount
//! read-only except its scratch directory (see `api_util::confined`).

mod api_util;
mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api_util::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};

fn confined_kiln(dir: &Scratch, extra: &[&str]) -> Kiln {
    let sock = dir.path("api.sock");
    let mut args = vec!["--api-sock".to_string(), sock.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let launch = Launch {
        program: PathBuf::from(env!("CARGO_BIN_EXE_kiln")),
        args,
        confine_to: Some(&dir.0),
        stdin: false,
    };
    Kiln::start(launch, &sock)
}

/// Every endpoint's error paths before boot: phase, body, ids, and what kiln doesn't do.
#[test]
fn error_paths_before_boot() {
    let dir = Scratch::new("errors");
    let k = confined_kiln(&dir, &[]);
    let cases: &[(&str, &str, Option<&str>, &str)] = &[
        (
            "GET",
            "/nope",
            None,
            "Invalid request method and/or path: GET /nope.",
        ),
        (
            "DELETE",
            "/machine-config",
            None,
            "Invalid request method and/or path",
        ),
        (
            "POST",
            "/actions",
            Some("{}"),
            "Invalid request method and/or path",
        ),
        (
            "PUT",
            "/drives",
            Some("{}"),
            "Invalid request method and/or path",
        ),
        (
            "PUT",
            "/drives/a/b",
            Some("{}"),
            "Invalid request method and/or path",
        ),
        ("PUT", "/machine-config", None, "Empty PUT request."),
        ("PATCH", "/machine-config", None, "Empty PATCH request."),
        (
            "PATCH",
            "/machine-config",
            Some("{}"),
            "Empty PATCH request.",
        ),
        (
            "PUT",
            "/machine-config",
            Some("{"),
            "deserializing the json body",
        ),
        (
            "PUT",
            "/machine-config",
            Some("[]"),
            "deserializing the json body",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": "two", "mem_size_mib": 128}"#),
            "invalid type",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2, "mem_size_mib": 128, "x": 1}"#),
            "unknown field `x`",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2}"#),
            "missing field `mem_size_mib`",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 300, "mem_size_mib": 128}"#),
            "invalid value",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 33, "mem_size_mib": 128}"#),
            "vCPU number is invalid",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 0}"#),
            "memory size (MiB) is invalid",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2, "mem_size_mib": 128, "smt": true}"#),
            "smt",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2, "mem_size_mib": 128, "cpu_template": "T2"}"#),
            "cpu_template",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2, "mem_size_mib": 128, "huge_pages": "1G"}"#),
            "unknown variant `1G`",
        ),
        (
            "PUT",
            "/boot-source",
            Some(r#"{"boot_args": "x"}"#),
            "kernel_image_path",
        ),
        (
            "PUT",
            "/drives/a",
            Some(r#"{"drive_id": "b", "is_root_device": false, "path_on_host": "/x"}"#),
            "does not match the id from the body",
        ),
        (
            "PUT",
            "/drives/a.b",
            Some(r#"{"drive_id": "a.b", "is_root_device": false, "path_on_host": "/x"}"#),
            "Invalid ID",
        ),
        (
            "PUT",
            "/drives/a",
            Some(r#"{"drive_id": "a", "is_root_device": false}"#),
            "path_on_host is required",
        ),
        (
            "PUT",
            "/drives/a",
            Some(r#"{"drive_id": "a", "is_root_device": false, "socket": "/s"}"#),
            "vhost-user",
        ),
        (
            "PUT",
            "/drives/a",
            Some(
                r#"{"drive_id": "a", "is_root_device": false, "path_on_host": "/x",
                    "io_engine": "Async"}"#,
            ),
            "io_engine",
        ),
        (
            "PUT",
            "/drives/a",
            Some(
                r#"{"drive_id": "a", "is_root_device": false, "path_on_host": "/x", "cache_type": "Bogus"}"#,
            ),
            "unknown variant",
        ),
        ("PATCH", "/drives/a", Some(r#"{"drive_id": "a"}"#), PRE_BOOT),
        (
            "PUT",
            "/network-interfaces/eth0",
            Some(
                r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "01:02:03:04:05:06"}"#,
            ),
            "network-interfaces[eth0].guest_mac: mac=01:02:03:04:05:06: a multicast address",
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "52:54:00:12:34"}"#),
            "network-interfaces[eth0].guest_mac: mac=52:54:00:12:34: expected six hex bytes",
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id": "eth0"}"#),
            "missing field `host_dev_name`",
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id": "eth0", "host_dev_name": ""}"#),
            "network-interfaces[eth0].host_dev_name: tap=: an interface name of 1 to",
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id": "eth0", "host_dev_name": "tap0", "mtu": 1}"#),
            "network-interfaces[eth0].mtu: 1 is not between",
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            Some(
                r#"{"iface_id": "eth0", "host_dev_name": "tap0", "rx_rate_limiter": {"ops": {"size": 1}}}"#,
            ),
            "missing field `refill_time`",
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id": "eth1", "host_dev_name": "tap0"}"#),
            "does not match",
        ),
        (
            "PATCH",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id": "eth0"}"#),
            PRE_BOOT,
        ),
        (
            "PUT",
            "/vsock",
            Some(r#"{"guest_cid": 2, "uds_path": "/v"}"#),
            "reserved",
        ),
        (
            "PUT",
            "/vsock",
            Some(r#"{"vsock_id": "old", "guest_cid": 3, "uds_path": "/no-such-dir/v"}"#),
            "the directory /no-such-dir does not exist",
        ),
        (
            "PUT",
            "/entropy",
            Some(r#"{"rate_limiter": {"ops": {"size": 1}}}"#),
            "refill_time",
        ),
        (
            "PUT",
            "/serial",
            Some(r#"{"rate_limiter": {"size": 1, "refill_time": 1}}"#),
            "serial rate_limiter",
        ),
        (
            "PUT",
            "/logger",
            Some(r#"{"level": "Loud"}"#),
            "unknown variant",
        ),
        (
            "PUT",
            "/metrics",
            Some("{}"),
            "missing field `metrics_path`",
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type": "Reboot"}"#),
            "unknown variant",
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type": "SendCtrlAltDel"}"#),
            PRE_BOOT,
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type": "FlushMetrics"}"#),
            "metrics system is not initialized",
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#),
            "without kernel configuration",
        ),
        ("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), PRE_BOOT),
        (
            "PATCH",
            "/vm",
            Some(r#"{"state": "Stopped"}"#),
            "unknown variant",
        ),
        (
            "PUT",
            "/snapshot/create",
            Some(r#"{"snapshot_path": "s", "mem_file_path": "m"}"#),
            PRE_BOOT,
        ),
        (
            "PUT",
            "/snapshot/load",
            Some(r#"{"snapshot_path": "s", "x": 1}"#),
            "unknown field",
        ),
        (
            "PUT",
            "/snapshot/load",
            Some(r#"{"snapshot_path": "s"}"#),
            "mem_backend (or the deprecated mem_file_path) is required",
        ),
        (
            "PUT",
            "/snapshot/load",
            Some(
                r#"{"snapshot_path": "s", "mem_file_path": "m", "mem_backend": {"backend_type": "File", "backend_path": "m"}}"#,
            ),
            "not both",
        ),
        (
            "PUT",
            "/snapshot/load",
            Some(
                r#"{"snapshot_path": "s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"}}"#,
            ),
            "mem_backend.backend_type Uffd is not supported by kiln",
        ),
        (
            "PUT",
            "/snapshot/load",
            Some(
                r#"{"snapshot_path": "s", "mem_file_path": "m", "network_overrides": [{"iface_id": "e", "host_dev_name": "t"}]}"#,
            ),
            "network_overrides is not supported by kiln",
        ),
        (
            "PUT",
            "/snapshot/load",
            Some(r#"{"snapshot_path": "/no-such-snapshot", "mem_file_path": "m"}"#),
            "Load snapshot error: ",
        ),
        ("GET", "/balloon", None, "balloon device is not configured"),
        ("PATCH", "/balloon", Some(r#"{"amount_mib": 1}"#), PRE_BOOT),
        ("GET", "/balloon/statistics", None, PRE_BOOT),
        (
            "PUT",
            "/balloon",
            Some(r#"{"amount_mib": 1, "deflate_on_oom": false, "free_page_hinting": true}"#),
            "free_page_hinting",
        ),
        ("PATCH", "/mmds", Some(r#"{"a": 1}"#), "not initialized"),
        ("PUT", "/mmds", Some("[1]"), "JSON object"),
        (
            "PUT",
            "/mmds/config",
            Some(r#"{"network_interfaces": []}"#),
            "is empty",
        ),
        (
            "PUT",
            "/mmds/config",
            Some(r#"{"network_interfaces": ["eth0"]}"#),
            "does not correspond to any existing network interface",
        ),
        (
            "PUT",
            "/mmds/config",
            Some(r#"{"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}"#),
            "link-local",
        ),
        ("PUT", "/cpu-config", Some("{}"), "not supported by kiln"),
        ("PUT", "/pmem/p", Some("{}"), "virtio-pmem"),
        ("GET", "/hotplug/memory", None, "memory hotplug"),
        ("PATCH", "/balloon/hinting/start", Some("{}"), "hinting"),
    ];
    for (method, path, body, want) in cases {
        let m = k.fault(method, path, *body);
        assert!(
            m.contains(want),
            "{method} {path} {body:?}: {m:?} lacks {want:?}"
        );
    }
    // Rejected requests changed nothing.
    let cfg = k.get("/vm/config");
    assert_eq!(cfg["machine-config"]["vcpu_count"], 1);
    assert_eq!(cfg["drives"], json!([]));
    assert!(cfg["boot-source"].is_null(), "{cfg}");
    // A second root device is refused; the same id replaces.
    k.ok(
        "PUT",
        "/drives/r1",
        r#"{"drive_id": "r1", "is_root_device": true, "path_on_host": "/x"}"#,
    );
    k.ok(
        "PUT",
        "/drives/r1",
        r#"{"drive_id": "r1", "is_root_device": true, "path_on_host": "/y"}"#,
    );
    let m = k.fault(
        "PUT",
        "/drives/r2",
        Some(r#"{"drive_id": "r2", "is_root_device": true, "path_on_host": "/x"}"#),
    );
    assert!(m.contains("root block device already exists"), "{m}");
    assert_eq!(k.get("/vm/config")["drives"][0]["path_on_host"], "/y");
    // PATCH merges into the machine configuration.
    k.ok("PATCH", "/machine-config", r#"{"mem_size_mib": 256}"#);
    let m = k.get("/machine-config");
    assert_eq!(
        (m["vcpu_count"].as_u64(), m["mem_size_mib"].as_u64()),
        (Some(1), Some(256))
    );
    // Starting with a kernel that isn't there fails with the path, and the VM can still be
    // configured and started afterwards.
    k.ok(
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#,
    );
    k.ok(
        "PUT",
        "/drives/r1",
        &format!(
            r#"{{"drive_id": "r1", "is_root_device": true, "path_on_host": "{}"}}"#,
            dir.path("api.sock").display()
        ),
    );
    let m = k.fault(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert!(m.contains("/nonexistent/vmlinux"), "{m}");
    assert_eq!(k.get("/")["state"], "Not started");
}

/// Wrong-phase calls after boot, with the guest waiting on its keyboard.
#[test]
fn error_paths_after_boot() {
    if common::skip_kvm("error_paths_after_boot") {
        return;
    }
    let dir = Scratch::new("errors-post");
    let guest = guest(&dir.0);
    let mut k = confined_kiln(&dir, &[]);
    k.ok(
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "{}"}}"#,
            guest.display(),
            guest_args("ctrl-alt-del", 1, 128)
        ),
    );
    k.ok(
        "PUT",
        "/balloon",
        r#"{"amount_mib": 0, "deflate_on_oom": true}"#,
    );
    // A tap (created in the confined network namespace) and a vsock listener.
    k.ok(
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "host_dev_name": "kilntap0", "guest_mac": "52:54:00:12:34:56",
            "tx_rate_limiter": {"bandwidth": {"size": 1000000, "refill_time": 100}}}"#,
    );
    let m = k.fault(
        "PUT",
        "/network-interfaces/eth1",
        Some(r#"{"iface_id": "eth1", "host_dev_name": "kilntap0"}"#),
    );
    assert!(m.contains("already in use"), "{m}");
    let uds = dir.path("v.sock");
    k.ok(
        "PUT",
        "/vsock",
        &format!(
            r#"{{"vsock_id": "old", "guest_cid": 7, "uds_path": "{}"}}"#,
            uds.display()
        ),
    );
    k.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    assert!(
        k.wait_stdout("KTEST-KBD-READY", Duration::from_secs(60)),
        "{}",
        k.output()
    );
    // The VM has them: the tap is open and the vsock listener exists.
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", k.child.id()))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert!(fds.iter().any(|p| p == "/dev/net/tun"), "{fds:?}");
    assert!(uds.exists(), "no vsock listener at {}", uds.display());
    let cfg = k.get("/vm/config");
    assert_eq!(cfg["network-interfaces"][0]["host_dev_name"], "kilntap0");
    assert_eq!(
        cfg["network-interfaces"][0]["guest_mac"],
        "52:54:00:12:34:56"
    );
    assert_eq!(cfg["vsock"]["guest_cid"], 7);
    let m = k.fault(
        "PATCH",
        "/network-interfaces/eth9",
        Some(r#"{"iface_id": "eth9"}"#),
    );
    assert!(m.contains("Invalid network interface ID"), "{m}");
    let m = k.fault(
        "PATCH",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 1, "refill_time": 1}}}"#),
    );
    assert!(m.contains("not supported by kiln"), "{m}");
    let drive = r#"{"drive_id": "a", "is_root_device": false, "path_on_host": "/x"}"#;
    for (method, path, body) in [
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
        ),
        ("PATCH", "/machine-config", r#"{"vcpu_count": 1}"#),
        ("PUT", "/boot-source", r#"{"kernel_image_path": "/k"}"#),
        ("PUT", "/drives/a", drive),
        (
            "PUT",
            "/network-interfaces/e",
            r#"{"iface_id": "e", "host_dev_name": "t"}"#,
        ),
        ("PUT", "/vsock", r#"{"guest_cid": 3, "uds_path": "/v"}"#),
        ("PUT", "/entropy", "{}"),
        ("PUT", "/serial", "{}"),
        ("PUT", "/logger", "{}"),
        ("PUT", "/metrics", r#"{"metrics_path": "/m"}"#),
        (
            "PUT",
            "/balloon",
            r#"{"amount_mib": 1, "deflate_on_oom": true}"#,
        ),
        ("PUT", "/mmds/config", r#"{"network_interfaces": ["e"]}"#),
        ("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
        (
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "s", "mem_file_path": "m"}"#,
        ),
    ] {
        assert_eq!(
            k.fault(method, path, Some(body)),
            POST_BOOT,
            "{method} {path}"
        );
    }
    // Snapshots need a paused VM.
    let m = k.fault(
        "PUT",
        "/snapshot/create",
        Some(r#"{"snapshot_path": "s", "mem_file_path": "m"}"#),
    );
    assert!(m.contains("must be paused"), "{m}");
    let m = k.fault("PATCH", "/drives/a", Some(r#"{"drive_id": "a"}"#));
    assert!(m.contains("Invalid block device ID"), "{m}");
    // The balloon answers through the VM's main thread.
    let m = k.fault("PATCH", "/balloon", Some(r#"{"amount_mib": 100000}"#));
    assert!(m.contains("too large"), "{m}");
    k.ok("PATCH", "/balloon", r#"{"amount_mib": 1}"#);
    assert_eq!(k.get("/balloon")["amount_mib"], 1);
    let m = k.fault("GET", "/balloon/statistics", None);
    assert!(m.contains("not enabled"), "{m}");
    // Pausing twice and resuming twice both succeed.
    for s in ["Paused", "Paused", "Resumed", "Resumed"] {
        k.ok("PATCH", "/vm", &format!(r#"{{"state": "{s}"}}"#));
    }
    k.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let st = k
        .wait_exit(Duration::from_secs(60))
        .expect("exits after Ctrl+Alt+Del");
    assert_eq!(st.code(), Some(0), "{}", k.output());
    assert!(
        k.stdout().contains("KTEST ctrl-alt-del PASS"),
        "{}",
        k.output()
    );
}

/// Oversized bodies, garbage, half-open connections and 50 concurrent clients: every
/// request is answered, nothing wedges the server.
#[test]
fn hostile_clients_never_wedge_the_server() {
    let dir = Scratch::new("hostile");
    let mut k = confined_kiln(
        &dir,
        &[
            "--http-api-max-payload-size",
            "1000",
            "--mmds-size-limit",
            "100000",
        ],
    );
    let connect = || {
        let s = UnixStream::connect(&k.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    };

    // A body over the limit is refused before it is read, and the connection closed.
    let big = format!(r#"{{"x": "{}"}}"#, "a".repeat(2000));
    let mut s = connect();
    send(&mut s, "PUT", "/mmds", Some(&big));
    let (code, text) = read_response(&mut s).unwrap();
    assert_eq!(code, 400);
    assert!(
        fault_message(&text).contains("larger than the limit of 1000"),
        "{text}"
    );
    // Under the limit is fine.
    k.ok(
        "PUT",
        "/mmds",
        &format!(r#"{{"x": "{}"}}"#, "a".repeat(900)),
    );

    // Garbage and protocol errors: 400, then closed.
    for raw in [
        &b"\x00\xff\xfe garbage\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
        b"PUT /mmds HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
    ] {
        let mut s = connect();
        s.write_all(raw).unwrap();
        let (code, _) = read_response(&mut s).unwrap_or_else(|| panic!("no answer to {raw:?}"));
        assert_eq!(code, 400, "{raw:?}");
        let mut rest = Vec::new();
        assert_eq!(
            s.read_to_end(&mut rest).unwrap_or(0),
            0,
            "closed after {raw:?}"
        );
    }
    // Headers that never end are cut off.
    let mut s = connect();
    let _ = s.write_all(format!("GET / HTTP/1.1\r\nX: {}", "y".repeat(64 * 1024)).as_bytes());
    let (code, _) = read_response(&mut s).expect("answer to endless headers");
    assert_eq!(code, 400);

    // Half-open connections: a request cut short, and connections that say nothing.
    let mut stalled = Vec::new();
    for i in 0..20 {
        let mut s = connect();
        if i % 2 == 0 {
            s.write_all(b"PUT /mmds HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"a\"")
                .unwrap();
        } else {
            s.write_all(b"GET / HTTP/1.1\r\nHost: x").unwrap();
        }
        stalled.push(s);
    }
    // 50 concurrent keep-alive clients, 20 requests each, while those hang.
    let sock = k.sock.clone();
    let t0 = Instant::now();
    let clients: Vec<_> = (0..50)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&sock).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                for j in 0..20 {
                    if j % 2 == 0 {
                        send(&mut s, "GET", "/", None);
                        let (code, body) = read_response(&mut s).expect("response");
                        assert_eq!(code, 200, "{body}");
                    } else {
                        let body = format!(r#"{{"c{i}": {j}}}"#);
                        send(&mut s, "PATCH", "/mmds", Some(&body));
                        let (code, body) = read_response(&mut s).expect("response");
                        assert_eq!(code, 204, "{body}");
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client");
    }
    let mmds = k.get("/mmds");
    for i in 0..50 {
        assert_eq!(mmds[format!("c{i}")], 19, "{mmds}");
    }
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "slow: {:?}",
        t0.elapsed()
    );
    // The stalled connections are dropped by the server's request timeout.
    for mut s in stalled {
        let mut rest = Vec::new();
        let t = Instant::now();
        let _ = s.read_to_end(&mut rest);
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "a half-open connection lingered"
        );
    }
    assert!(k.alive(), "{}", k.output());
    assert_eq!(k.get("/")["state"], "Not started");
}

/// Confinement works: a path outside the scratch directory can't be written, one inside can.
#[test]
fn confined_kiln_writes_only_its_scratch_dir() {
    let dir = Scratch::new("confined");
    let k = confined_kiln(&dir, &[]);
    let outside = std::env::temp_dir().join(format!("kiln-api-escape-{}", std::process::id()));
    let m = k.fault(
        "PUT",
        "/logger",
        Some(&format!(r#"{{"log_path": "{}"}}"#, outside.display())),
    );
    assert!(m.contains("Read-only file system"), "{m}");
    assert!(!outside.exists());
    let inside = dir.path("metrics.json");
    k.ok(
        "PUT",
        "/metrics",
        &format!(r#"{{"metrics_path": "{}"}}"#, inside.display()),
    );
    k.ok("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
    let text = std::fs::read_to_string(&inside).unwrap();
    let v: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(v["put_api_requests"]["metrics_count"], 1, "{v}");
    assert_eq!(v["put_api_requests"]["logger_fails"], 1, "{v}");
}

/// Metrics and the log go to named pipes too, without blocking kiln on a missing reader.
#[test]
fn metrics_and_log_to_named_pipes() {
    let dir = Scratch::new("fifo");
    let metrics = dir.path("metrics.fifo");
    let log = dir.path("log.fifo");
    for p in [&metrics, &log] {
        let c = std::ffi::CString::new(p.display().to_string()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }
    let k = confined_kiln(
        &dir,
        &[
            "--metrics-path",
            &metrics.display().to_string(),
            "--log-path",
            &log.display().to_string(),
            "--level",
            "Debug",
        ],
    );
    // Nobody reads yet: requests still complete.
    assert_eq!(k.get("/")["state"], "Not started");
    k.ok("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
    let read_line = |p: &Path| {
        let f = std::fs::File::open(p).unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(f), &mut line).unwrap();
        line
    };
    let m: Value = serde_json::from_str(&read_line(&metrics)).unwrap();
    assert_eq!(m["get_api_requests"]["instance_info_count"], 1, "{m}");
    let l = read_line(&log);
    assert!(
        l.contains("[anonymous-instance:fc_api_conn]") && l.contains("API GET /"),
        "{l}"
    );
}

// ---- Property tests generated from the spec ----

/// One operation of the spec.
#[derive(Debug, Clone)]
struct Op {
    method: String,
    path: String,
    /// The body schema, `$ref`s unresolved.
    body: Option<Value>,
}

fn spec_file() -> PathBuf {
    // A copy of the shared spec kept in the repository (tests/data/README.md).
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/firecracker.yaml")
}

fn load_spec() -> (Vec<Op>, Value) {
    let path = spec_file();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (the Firecracker spec in tests/data/)",
            path.display()
        )
    });
    let spec: Value = serde_yaml::from_str(&text).expect("spec parses");
    let mut ops = Vec::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            if !["get", "put", "patch"].contains(&method.as_str()) {
                continue;
            }
            let body = op["parameters"].as_array().and_then(|ps| {
                ps.iter()
                    .find(|p| p["in"] == "body")
                    .map(|p| p["schema"].clone())
            });
            ops.push(Op {
                method: method.to_uppercase(),
                path: path.clone(),
                body,
            });
        }
    }
    (ops, spec["definitions"].clone())
}

fn resolve<'a>(schema: &'a Value, defs: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => &defs[r.trim_start_matches("#/definitions/")],
        None => schema,
    }
}

/// A small deterministic generator over proptest-drawn bytes, so shrinking still works.
struct Draw<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Draw<'_> {
    fn next(&mut self) -> u8 {
        let b = self.bytes.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }
    fn chance(&mut self, pct: u8) -> bool {
        u16::from(self.next()) * 100 / 256 < u16::from(pct)
    }
    fn pick<'s>(&mut self, from: &[&'s str]) -> &'s str {
        from[usize::from(self.next()) % from.len()]
    }
    fn string(&mut self, field: &str, scratch: &Path) -> String {
        let len = usize::from(self.next() % 12);
        let s: String = (0..len)
            .map(|_| (b'a' + self.next() % 26) as char)
            .collect();
        if field.contains("path") || field.contains("socket") {
            // Sometimes inside the (writable) scratch dir, sometimes anywhere.
            match self.next() % 4 {
                0 => scratch.join(&s).display().to_string(),
                1 => format!("/{s}"),
                2 => format!("/tmp/{s}"),
                _ => s,
            }
        } else {
            s
        }
    }
    fn number(&mut self) -> Value {
        match self.next() % 6 {
            0 => json!(0),
            1 => json!(1),
            2 => json!(u64::from(self.next()) * 7),
            3 => json!(u64::MAX),
            4 => json!(-1),
            _ => json!(u32::from(self.next()) << 12),
        }
    }
}

/// A value for `schema`: valid unless `fuzz` makes it otherwise.
fn value(
    schema: &Value,
    defs: &Value,
    d: &mut Draw,
    name: &str,
    scratch: &Path,
    depth: u32,
) -> Value {
    let schema = resolve(schema, defs);
    if depth > 4 {
        return Value::Null;
    }
    if let Some(e) = schema["enum"].as_array() {
        let i = usize::from(d.next()) % e.len().max(1);
        return e.get(i).cloned().unwrap_or(Value::Null);
    }
    match schema["type"].as_str() {
        Some("object") | None if schema["properties"].is_object() => {
            let required: Vec<&str> = schema["required"]
                .as_array()
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut o = serde_json::Map::new();
            for (k, s) in schema["properties"].as_object().into_iter().flatten() {
                if required.contains(&k.as_str()) || d.chance(50) {
                    o.insert(k.clone(), value(s, defs, d, k, scratch, depth + 1));
                }
            }
            Value::Object(o)
        }
        Some("object") => {
            // Free-form (MMDS contents).
            let mut o = serde_json::Map::new();
            for _ in 0..d.next() % 4 {
                let k = d.string("k", scratch);
                let v = value(
                    &json!({"type": d.pick(&["string", "integer", "object"])}),
                    defs,
                    d,
                    "v",
                    scratch,
                    depth + 1,
                );
                o.insert(k, v);
            }
            Value::Object(o)
        }
        Some("string") => json!(d.string(name, scratch)),
        Some("integer") | Some("number") => d.number(),
        Some("boolean") => json!(d.chance(50)),
        Some("array") => {
            let n = d.next() % 3;
            Value::Array(
                (0..n)
                    .map(|_| value(&schema["items"], defs, d, name, scratch, depth + 1))
                    .collect(),
            )
        }
        _ => Value::Null,
    }
}

/// Breaks a valid body one way or another.
fn mutate(v: Value, d: &mut Draw) -> String {
    match d.next() % 9 {
        // Valid, as generated (most of the time).
        0..=3 => v.to_string(),
        4 => {
            // Drop a field.
            let mut v = v;
            if let Some(o) = v.as_object_mut() {
                if let Some(k) = o.keys().next().cloned() {
                    o.remove(&k);
                }
            }
            v.to_string()
        }
        5 => {
            let mut v = v;
            if let Some(o) = v.as_object_mut() {
                o.insert("zz_unknown".into(), json!(1));
            }
            v.to_string()
        }
        6 => {
            // A field of the wrong type.
            let mut v = v;
            if let Some(o) = v.as_object_mut() {
                for (_, x) in o.iter_mut().take(1) {
                    *x = match x {
                        Value::String(_) => json!(12),
                        _ => json!("wrong"),
                    };
                }
            }
            v.to_string()
        }
        7 => {
            // Truncated JSON.
            let s = v.to_string();
            let cut = usize::from(d.next()) % s.len().max(1);
            s[..cut].to_string()
        }
        _ => {
            // Noise.
            let n = usize::from(d.next() % 40);
            (0..n).map(|_| (d.next() % 95 + 32) as char).collect()
        }
    }
}

fn fill_path(template: &str, d: &mut Draw) -> String {
    template
        .split('/')
        .map(|seg| {
            if seg.starts_with('{') {
                let len = usize::from(d.next() % 9);
                let chars = b"abcXYZ019_-.~%";
                (0..len)
                    .map(|_| chars[usize::from(d.next()) % chars.len()] as char)
                    .collect::<String>()
            } else {
                seg.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Random valid and invalid requests for every operation of the spec, against one confined
/// kiln: every answer is 200 with JSON, 204 with no body, or 400 with a fault message;
/// nothing crashes or hangs.
#[test]
fn spec_driven_requests_never_crash_or_hang() {
    let (ops, defs) = load_spec();
    assert!(ops.len() >= 35, "only {} operations in the spec", ops.len());
    let dir = Scratch::new("spec-fuzz");
    let mut k = confined_kiln(&dir, &[]);
    let scratch = dir.0.clone();
    let mut runner = TestRunner::new(Config {
        cases: 256,
        failure_persistence: None,
        ..Config::default()
    });
    let seen = std::cell::RefCell::new(std::collections::BTreeMap::<u16, usize>::new());
    let strategy = proptest::collection::vec(
        (0..ops.len(), proptest::collection::vec(any::<u8>(), 64)),
        1..6,
    );
    let result = runner.run(&strategy, |reqs| {
        for (i, bytes) in reqs {
            let op = &ops[i];
            let mut d = Draw {
                bytes: &bytes,
                at: 0,
            };
            let path = fill_path(&op.path, &mut d);
            let body = op.body.as_ref().map(|s| {
                let v = value(s, &defs, &mut d, "", &scratch, 0);
                mutate(v, &mut d)
            });
            let mut s = UnixStream::connect(&k.sock)
                .map_err(|e| TestCaseError::fail(format!("connect: {e}")))?;
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            send(&mut s, &op.method, &path, body.as_deref());
            let Some((code, text)) = read_response(&mut s) else {
                return Err(TestCaseError::fail(format!(
                    "no answer to {} {path} {body:?}",
                    op.method
                )));
            };
            *seen.borrow_mut().entry(code).or_default() += 1;
            match code {
                200 => {
                    serde_json::from_str::<Value>(&text)
                        .map_err(|e| TestCaseError::fail(format!("200 not JSON: {e}")))?;
                }
                204 => prop_assert!(text.is_empty()),
                400 => {
                    let v: Value = serde_json::from_str(&text)
                        .map_err(|e| TestCaseError::fail(format!("400 not JSON: {e}")))?;
                    prop_assert!(v["fault_message"].is_string(), "{}", text);
                }
                other => {
                    return Err(TestCaseError::fail(format!(
                        "{other} for {} {path} {body:?}: {text}",
                        op.method
                    )))
                }
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}\n{}", k.output());
    }
    assert!(k.alive(), "kiln died\n{}", k.output());
    let seen = seen.into_inner();
    // The generator reaches both the success and the error paths.
    assert!(seen.get(&204).copied().unwrap_or(0) > 10, "{seen:?}");
    assert!(seen.get(&400).copied().unwrap_or(0) > 10, "{seen:?}");
    assert!(seen.get(&200).copied().unwrap_or(0) > 5, "{seen:?}");
    eprintln!("status counts: {seen:?}");
}
