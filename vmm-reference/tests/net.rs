//! virtio-net under kiln against a real host stack: each test makes its own network
//! namespace with a tap in a private /30, runs kiln inside it with `--net`, and checks the
//! conformance guest's `virtio-net` / `net-evil` / `net-bench` scenarios; plus `--net`
//! input errors. The namespace is deleted on the way out, also when the test fails.

mod common;

use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{run_with, skip_kvm};

const HOST_IP: &str = "10.200.0.1";
const GUEST_IP: &str = "10.200.0.2";

/// True when the network tests can't run: like [`skip_kvm`], a missing `ip` or
/// /dev/net/tun fails the test unless `KILN_SKIP_KVM=1` says to skip.
fn skip_net(test: &str) -> bool {
    if skip_kvm(test) {
        return true;
    }
    let have_ip = Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        have_ip && std::path::Path::new("/dev/net/tun").exists(),
        "{test} needs iproute2's `ip` and /dev/net/tun (and root); set KILN_SKIP_KVM=1 to skip"
    );
    false
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with a tap at `HOST_IP/30`; deleted (tap included) on drop.
struct Netns {
    name: String,
    tap: String,
}

impl Netns {
    fn new(test: &str) -> Netns {
        let name = format!("kiln-t-{}-{test}", std::process::id());
        ip(&["netns", "add", &name]);
        // From here on Drop cleans up, whatever fails next.
        let ns = Netns {
            name,
            tap: "kt0".into(),
        };
        let n = ns.name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"]);
        ip(&["-n", n, "tuntap", "add", "dev", &ns.tap, "mode", "tap"]);
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("{HOST_IP}/30"),
            "dev",
            &ns.tap,
        ]);
        ip(&["-n", n, "link", "set", &ns.tap, "up"]);
        ns
    }

    /// kiln inside the namespace.
    fn kiln(&self) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, env!("CARGO_BIN_EXE_kiln")]);
        c
    }

    /// RX packet count of the tap (what the host received from the guest).
    fn tap_rx_packets(&self) -> u64 {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-s", "link", "show", "dev", &self.tap])
            .output()
            .expect("ip -s link");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        while let Some(l) = lines.next() {
            if l.trim_start().starts_with("RX:") {
                if let Some(v) = lines.next().and_then(|n| n.split_whitespace().nth(1)) {
                    return v.parse().unwrap_or(0);
                }
            }
        }
        panic!("no RX statistics in:\n{text}");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn cmdline(scenario: &str, extra: &str) -> String {
    format!("console=ttyS0 kiln.test={scenario} kiln.net={GUEST_IP}/{HOST_IP} {extra}")
}

#[test]
fn guest_pings_the_host_through_a_tap() {
    if skip_net("guest_pings_the_host_through_a_tap") {
        return;
    }
    let ns = Netns::new("ping");
    let mut cmd = ns.kiln();
    cmd.args([
        "--net",
        &format!("tap={},mac=02:4b:4c:00:00:01,mtu=1500", ns.tap),
        "--cmdline",
        &cmdline("virtio-net", ""),
    ]);
    let r = run_with(cmd, None, Duration::from_secs(120));
    r.assert_passed(&["virtio-net"]);
    let k = r.ktests();
    let detail = &k.iter().find(|(n, _, _)| n == "virtio-net").unwrap().2;
    assert!(
        detail.contains("mac=02:4b:4c:00:00:01") && detail.contains("mtu=1500"),
        "{detail}"
    );
    assert!(detail.contains("pings=3"), "{detail}");
}

#[test]
fn hostile_chains_leave_the_device_working() {
    if skip_net("hostile_chains_leave_the_device_working") {
        return;
    }
    let ns = Netns::new("evil");
    let mut cmd = ns.kiln();
    cmd.args([
        "--net",
        &format!("tap={}", ns.tap),
        "--cmdline",
        &cmdline("net-evil", ""),
    ]);
    let r = run_with(cmd, None, Duration::from_secs(120));
    r.assert_passed(&["net-evil"]);
    let k = r.ktests();
    let detail = &k.iter().find(|(n, _, _)| n == "net-evil").unwrap().2;
    assert!(detail.contains("tx_cases=11 rx_cases=3"), "{detail}");
    // kiln said why it dropped them (rate-limited warnings).
    assert!(r.stderr.contains("transmit frame dropped"), "{}", r.stderr);
}

#[test]
fn bench_frames_reach_the_host() {
    if skip_net("bench_frames_reach_the_host") {
        return;
    }
    let ns = Netns::new("bench");
    let before = ns.tap_rx_packets();
    let mut cmd = ns.kiln();
    cmd.args([
        "--net",
        &format!("tap={}", ns.tap),
        "--cmdline",
        &cmdline(
            "net-bench",
            "kiln.netbench.frames=3000 kiln.netbench.size=512",
        ),
    ]);
    let r = run_with(cmd, None, Duration::from_secs(120));
    r.assert_passed(&["net-bench"]);
    assert!(
        r.stdout
            .contains("KBENCH net tx_frames=3000 frame_bytes=554"),
        "{}",
        r.stdout
    );
    let got = ns.tap_rx_packets() - before;
    assert!(got >= 3000, "the host saw {got} packets of 3000 (+ ARP)");
}

/// Floods `GUEST_IP:port` with UDP datagrams from inside `ns` until `stop`; returns how
/// many were sent.
fn flood(ns: &Netns, port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let nsf = std::fs::File::open(format!("/var/run/netns/{}", ns.name)).expect("netns file");
    std::thread::spawn(move || {
        // SAFETY: setns takes an fd we own; CLONE_NEWNET moves only this thread.
        let rc = unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let sock = std::net::UdpSocket::bind((HOST_IP, 0)).expect("bind in the netns");
        let buf = [0x6bu8; 1000];
        let mut sent = 0;
        while !stop.load(Ordering::Relaxed) {
            if sock.send_to(&buf, (GUEST_IP, port)).is_ok() {
                sent += 1;
            }
            // Paced a little: the point is that frames arrive, not how many.
            if sent % 64 == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        sent
    })
}

#[test]
fn host_frames_reach_the_guest() {
    if skip_net("host_frames_reach_the_guest") {
        return;
    }
    let ns = Netns::new("rx");
    // The guest answers no ARP: the host gets its MAC statically.
    ip(&[
        "-n",
        &ns.name,
        "neigh",
        "replace",
        GUEST_IP,
        "lladdr",
        "02:4b:4c:00:00:02",
        "dev",
        &ns.tap,
        "nud",
        "permanent",
    ]);
    let stop = Arc::new(AtomicBool::new(false));
    let sender = flood(&ns, 5556, stop.clone());
    let mut cmd = ns.kiln();
    cmd.args([
        "--net",
        &format!("tap={},mac=02:4b:4c:00:00:02", ns.tap),
        "--cmdline",
        &cmdline("net-bench", "kiln.netbench.dir=rx kiln.netbench.ms=500"),
    ]);
    let r = run_with(cmd, None, Duration::from_secs(120));
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().expect("sender thread");
    r.assert_passed(&["net-bench"]);
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("KBENCH net-rx "))
        .unwrap_or_else(|| panic!("no KBENCH net-rx line:\n{}", r.stdout));
    let frames: u64 = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("rx_frames="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(frames > 0 && frames <= sent, "{line} (host sent {sent})");
}

#[test]
fn throttled_tx_still_passes() {
    if skip_net("throttled_tx_still_passes") {
        return;
    }
    // 100 frames/s with no burst: 500 frames take ~5 s however fast the host is.
    let ns = Netns::new("ratelimit");
    let start = std::time::Instant::now();
    let mut cmd = ns.kiln();
    cmd.args([
        "--net",
        &format!("tap={},tx_ops_size=10,tx_ops_refill_time=100", ns.tap),
        "--cmdline",
        &cmdline(
            "net-bench",
            "kiln.netbench.frames=300 kiln.netbench.size=64",
        ),
    ]);
    let r = run_with(cmd, None, Duration::from_secs(120));
    r.assert_passed(&["net-bench"]);
    assert!(
        start.elapsed() >= Duration::from_millis(2500),
        "tx rate limit not applied: {:?}",
        start.elapsed()
    );
}

#[test]
fn bad_net_options_name_the_flag() {
    // Parsing only: no KVM, no tap.
    for (arg, why) in [
        ("mac=02:00:00:00:00:01", "tap=NAME is required"),
        ("tap=kt0,mac=02:00:00:00:00", "six hex bytes"),
        ("tap=kt0,mac=03:00:00:00:00:01", "multicast"),
        ("tap=kt0,mtu=20", "mtu=20"),
        ("tap=kt0,mtu=65536", "mtu=65536"),
        ("tap=kt0,speed=fast", "unknown option \"speed\""),
    ] {
        let r = common::run(&["--net", arg]);
        assert_ne!(r.code, Some(0), "{arg}: {r:?}");
        assert!(
            r.stderr.contains("--net") && r.stderr.contains(why),
            "{arg}: {}",
            r.stderr
        );
    }
}

#[test]
fn a_tap_that_cannot_be_created_is_an_error_naming_the_flag() {
    if skip_net("a_tap_that_cannot_be_created_is_an_error_naming_the_flag") {
        return;
    }
    // Without CAP_NET_ADMIN a tap that doesn't exist can't be created. Inside a namespace,
    // so nothing on the host changes even if it could.
    let ns = Netns::new("noperm");
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &ns.name,
        "setpriv",
        "--inh-caps=-all",
        "--bounding-set=-net_admin",
        env!("CARGO_BIN_EXE_kiln"),
        "--net",
        "tap=kt-missing",
    ]);
    let r = run_with(cmd, None, Duration::from_secs(60));
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(
        r.stderr.contains("--net tap=kt-missing") && r.stderr.contains("CAP_NET_ADMIN"),
        "{}",
        r.stderr
    );
    // And no guest ran.
    assert!(!r.stdout.contains("KTEST"), "{}", r.stdout);
}
