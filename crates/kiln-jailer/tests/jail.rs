//! The jailer against the real host (as root): a jailed `kiln` boots the conformance guest,
//! and a jailed probe reports what it can see while the test checks it from outside.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const UID: u32 = 10123;
const GID: u32 = 10456;
const LIMIT: Duration = Duration::from_secs(60);

fn ids() -> [String; 4] {
    [
        "--uid".into(),
        UID.to_string(),
        "--gid".into(),
        GID.to_string(),
    ]
}

/// What `/dev` in the jail must hold: the VMM's devices with the host's numbers, owned by
/// the jail's uid/gid, mode 0600 (the probe's `dev=` format).
fn expected_dev() -> String {
    let mut v = Vec::new();
    for (name, dir) in [
        ("kvm", None),
        ("net/tun", Some("net/")),
        ("urandom", None),
        ("userfaultfd", None),
    ] {
        let Ok(m) = std::fs::metadata(Path::new("/dev").join(name)) else {
            continue;
        };
        if let Some(d) = dir {
            v.push(d.to_string());
        }
        let (maj, min) = (libc::major(m.rdev()), libc::minor(m.rdev()));
        v.push(format!("{name}:c{maj}:{min}:{UID}:{GID}:600"));
    }
    v.join(",")
}

/// The host side of a finished jail: the copied VMM is a copy and the device nodes carry the
/// host's numbers.
fn check_layout(root: &Path, exec: &Path, exec_name: &str) {
    let copy = std::fs::metadata(root.join(exec_name)).expect("the VMM copy");
    let orig = std::fs::metadata(exec).expect("the VMM");
    assert_ne!(copy.ino(), orig.ino(), "a copy, not a hard link");
    assert_eq!(copy.nlink(), 1, "a copy, not a hard link");
    assert_eq!(copy.len(), orig.len());
    assert_eq!(copy.permissions().mode() & 0o777, 0o755);
    let r = std::fs::metadata(root).expect("root");
    assert_eq!(
        (r.uid(), r.gid()),
        (UID, GID),
        "the jail's root belongs to the VMM"
    );
    for name in ["kvm", "net/tun", "urandom"] {
        let host = std::fs::metadata(Path::new("/dev").join(name)).expect("host device");
        let jail = std::fs::metadata(root.join("dev").join(name)).expect("jail device");
        assert!(jail.file_type().is_char_device(), "{name}");
        assert_eq!(jail.rdev(), host.rdev(), "{name}");
        assert_eq!((jail.uid(), jail.gid()), (UID, GID), "{name}");
    }
}

/// The conformance guest's summary: every scenario passed, at least the six that existed
/// when this test was written (boot, cpuid, exits, acpi, smp, clock); later guests add more.
fn assert_guest_passed(out: &Outcome) {
    let done = out
        .stdout
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("KTEST-DONE "))
        .unwrap_or_else(|| panic!("no KTEST-DONE line\n{}", out.ctx()));
    let field = |k: &str| -> u32 {
        done.split_whitespace()
            .find_map(|f| f.strip_prefix(k)?.parse().ok())
            .unwrap_or_else(|| panic!("KTEST-DONE without {k}\n{}", out.ctx()))
    };
    assert_eq!(field("fail="), 0, "{}", out.ctx());
    assert!(field("pass=") >= 6, "{}", out.ctx());
    assert!(
        !out.stdout
            .lines()
            .any(|l| l.starts_with("KTEST ") && l.contains(" FAIL")),
        "{}",
        out.ctx()
    );
}

#[test]
fn jailed_kiln_boots_the_bundled_guest() {
    if skip_unless_root_and_kvm("jailed_kiln_boots_the_bundled_guest") {
        return;
    }
    let bins = static_bins();
    let s = Scratch::new("bundled");
    let id = s.id();
    let mut cmd = jailer();
    cmd.args(["--id", &id, "--exec-file"])
        .arg(&bins.kiln)
        .args(ids())
        .arg("--chroot-base-dir")
        .arg(&s.base)
        .args([
            "--cgroup",
            "pids.max=256",
            "--parent-cgroup",
            &s.parent_cgroup,
        ]);
    let out = spawn(cmd).finish(LIMIT);
    assert_guest_passed(&out);
    assert_eq!(out.code, Some(0), "{}", out.ctx());
    check_layout(&s.chroot("kiln", &id), &bins.kiln, "kiln");
}

#[test]
fn jailed_kiln_boots_a_kernel_placed_in_the_jail() {
    if skip_unless_root_and_kvm("jailed_kiln_boots_a_kernel_placed_in_the_jail") {
        return;
    }
    let bins = static_bins();
    let s = Scratch::new("kernel");
    let id = s.id();
    // As with Firecracker, the caller puts the VMM's files into the chroot first.
    let root = s.chroot("kiln", &id);
    std::fs::create_dir_all(&root).expect("chroot");
    std::fs::write(root.join("guest.elf"), kiln::guest::ELF).expect("guest.elf");
    let mut cmd = jailer();
    cmd.args(["--id", &id, "--exec-file"])
        .arg(&bins.kiln)
        .args(ids())
        .arg("--chroot-base-dir")
        .arg(&s.base)
        .args([
            "--",
            "--kernel",
            "/guest.elf",
            "--cmdline",
            "console=ttyS0 kiln.test=all kiln.layout=kiln kiln.mem=134217728 kiln.cpus=1",
        ]);
    let out = spawn(cmd).finish(LIMIT);
    assert_guest_passed(&out);
    assert!(out.stdout.contains("protocol="), "{}", out.ctx());
    assert_eq!(out.code, Some(0), "{}", out.ctx());
    assert_eq!(
        std::fs::read(root.join("guest.elf")).expect("still there"),
        kiln::guest::ELF
    );
    check_layout(&root, &bins.kiln, "kiln");

    // A host path is not reachable from the jail: kiln reports the flag.
    let id = s.id();
    let mut cmd = jailer();
    cmd.args(["--id", &id, "--exec-file"])
        .arg(&bins.kiln)
        .args(ids())
        .arg("--chroot-base-dir")
        .arg(&s.base)
        .arg("--")
        .arg("--kernel")
        .arg(s.chroot("kiln", &id).join("guest.elf"));
    let out = spawn(cmd).finish(LIMIT);
    assert_eq!(out.code, Some(1), "{}", out.ctx());
    assert!(out.stderr.contains("--kernel"), "{}", out.ctx());
}

#[test]
fn probe_sees_only_the_jail_as_the_given_ids_in_cgroups_v1() {
    let name = "probe_sees_only_the_jail_as_the_given_ids_in_cgroups_v1";
    if skip_unless_root_and_kvm(name) {
        return;
    }
    let bins = static_bins();
    let s = Scratch::new("probe");
    let id = s.id();
    let mut settings = vec![("pids", "pids.max", "64")];
    for (c, k, v) in [
        ("cpu", "cpu.cfs_quota_us", "50000"),
        ("cpuset", "cpuset.cpus", "0"),
    ] {
        if v1_mount(c).is_some() {
            settings.push((c, k, v));
        }
    }
    assert!(
        v1_mount("pids").is_some(),
        "{name} needs the v1 pids controller"
    );
    let mut cmd = jailer();
    cmd.args(["--id", &id, "--exec-file"])
        .arg(&bins.probe)
        .args(ids())
        .arg("--chroot-base-dir")
        .arg(&s.base)
        .args(["--parent-cgroup", &s.parent_cgroup])
        .args([
            "--resource-limit",
            "fsize=1048576",
            "--resource-limit",
            "no-file=256",
        ]);
    for (_, k, v) in &settings {
        cmd.arg("--cgroup").arg(format!("{k}={v}"));
    }
    cmd.args(["--", "--wait-file", "/go"]);
    // Leak a descriptor without close-on-exec into the jailer: it must not reach the VMM.
    let leak = std::fs::File::open("/etc/hostname").expect("a file to leak");
    let leak_fd = std::os::fd::AsRawFd::as_raw_fd(&leak);
    // SAFETY: dup2 is async-signal-safe; fd 9 is free in the child, and dup2 clears
    // close-on-exec on it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(leak_fd, 9) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let run = spawn(cmd);
    let pid = run.child.id();
    let ready = run.wait_line("ready", LIMIT);

    // From the host, while the probe waits: its cgroups, limits and credentials.
    let mut host_view = Vec::new();
    if ready {
        for (c, k, v) in &settings {
            let dir = v1_mount(c)
                .expect("mounted")
                .join(&s.parent_cgroup)
                .join(&id);
            let tasks = read(&dir.join("tasks"));
            host_view.push((
                format!("{c} tasks has the probe"),
                tasks.lines().any(|l| l == pid.to_string()),
            ));
            host_view.push((format!("{k} = {v}"), read(&dir.join(k)) == *v));
        }
        let cg = read(&PathBuf::from(format!("/proc/{pid}/cgroup")));
        host_view.push((
            format!("/proc/{pid}/cgroup names the pids cgroup"),
            cg.lines()
                .any(|l| l.ends_with(&format!(":pids:/{}/{id}", s.parent_cgroup))),
        ));
        let want_uid = format!("{UID}\t{UID}\t{UID}\t{UID}");
        host_view.push(("Uid".into(), proc_status(pid, "Uid") == want_uid));
        let want_gid = format!("{GID}\t{GID}\t{GID}\t{GID}");
        host_view.push(("Gid".into(), proc_status(pid, "Gid") == want_gid));
    }
    let _ = std::fs::write(s.chroot("kiln-jail-probe", &id).join("go"), b"");
    let out = run.finish(LIMIT);
    drop(leak);
    assert!(ready, "the probe never got ready\n{}", out.ctx());
    for (what, ok) in &host_view {
        assert!(ok, "host view: {what}\n{}", out.ctx());
    }
    assert_eq!(out.code, Some(0), "{}", out.ctx());
    let p = out.probe();
    let get = |k: &str| p.get(k).map(String::as_str).unwrap_or("<missing>");
    assert_eq!(
        get("pid"),
        pid.to_string(),
        "no PID namespace: the jailer became the probe"
    );
    assert_eq!(get("uid"), format!("{UID},{UID},{UID}"), "{}", out.ctx());
    assert_eq!(get("gid"), format!("{GID},{GID},{GID}"), "{}", out.ctx());
    assert_eq!(get("groups"), "", "supplementary groups dropped");
    assert_eq!(get("rlimit_fsize"), "1048576,1048576");
    assert_eq!(get("rlimit_nofile"), "256,256");
    assert_eq!(get("env"), "0", "the environment is cleared");
    assert_eq!(get("root"), "dev,kiln-jail-probe", "{}", out.ctx());
    assert_eq!(get("dev"), expected_dev(), "{}", out.ctx());
    assert_eq!(
        get("fds"),
        "0,1,2",
        "inherited fd 9 must be closed\n{}",
        out.ctx()
    );
    for path in [
        "/etc/passwd",
        "/work",
        "/proc/self/status",
        "/sys/fs/cgroup",
        "/../../etc/passwd",
        "/tmp",
    ] {
        assert_eq!(
            get(&format!("open {path}")),
            "ENOENT",
            "{path}\n{}",
            out.ctx()
        );
    }
    assert_eq!(get("root_writable"), "true");
    check_layout(
        &s.chroot("kiln-jail-probe", &id),
        &bins.probe,
        "kiln-jail-probe",
    );
}

#[test]
fn probe_in_cgroup_v2() {
    let name = "probe_in_cgroup_v2";
    if skip_unless_root_and_kvm(name) {
        return;
    }
    let Some(v2) = v2_mount() else {
        eprintln!("SKIPPED {name}: no cgroup v2 hierarchy mounted");
        return;
    };
    let available = read(&v2.join("cgroup.controllers"));
    let huge_2m = Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB").exists();
    let Some((controller, key, value)) = [
        ("pids", "pids.max", "64"),
        ("cpu", "cpu.max", "50000 100000"),
        ("memory", "memory.max", "268435456"),
        ("hugetlb", "hugetlb.2MB.max", "4194304"),
    ]
    .into_iter()
    .filter(|(c, _, _)| *c != "hugetlb" || huge_2m)
    .find(|(c, _, _)| available.split_whitespace().any(|a| a == *c)) else {
        eprintln!("SKIPPED {name}: no usable controller in the v2 hierarchy ({available:?})");
        return;
    };
    let bins = static_bins();
    let mut s = Scratch::new("v2");
    // Enabling the controller in the root's subtree_control is the jailer's job; undo it
    // afterwards if this test turned it on.
    let root_ctl = v2.join("cgroup.subtree_control");
    if !read(&root_ctl).split_whitespace().any(|c| c == controller) {
        let f = root_ctl.clone();
        s.on_drop.push(Box::new(move || {
            let _ = std::fs::write(&f, format!("-{controller}"));
        }));
    }
    let id = s.id();
    let mut cmd = jailer();
    cmd.args(["--id", &id, "--exec-file"])
        .arg(&bins.probe)
        .args(ids())
        .arg("--chroot-base-dir")
        .arg(&s.base)
        .args(["--parent-cgroup", &s.parent_cgroup, "--cgroup-version", "2"])
        .arg("--cgroup")
        .arg(format!("{key}={value}"))
        .args(["--", "--wait-file", "/go"]);
    let run = spawn(cmd);
    let pid = run.child.id();
    let ready = run.wait_line("ready", LIMIT);
    let parent = v2.join(&s.parent_cgroup);
    let leaf = parent.join(&id);
    let procs = read(&leaf.join("cgroup.procs"));
    let val = read(&leaf.join(key));
    let sub = read(&parent.join("cgroup.subtree_control"));
    let cg = read(&PathBuf::from(format!("/proc/{pid}/cgroup")));
    let _ = std::fs::write(s.chroot("kiln-jail-probe", &id).join("go"), b"");
    let out = run.finish(LIMIT);
    assert!(ready, "{}", out.ctx());
    assert!(
        procs.lines().any(|l| l == pid.to_string()),
        "cgroup.procs: {procs:?}"
    );
    assert_eq!(val, value, "{key}");
    assert!(
        sub.split_whitespace().any(|c| c == controller),
        "subtree_control: {sub:?}"
    );
    assert!(
        cg.lines()
            .any(|l| l == format!("0::/{}/{id}", s.parent_cgroup)),
        "/proc/{pid}/cgroup: {cg}"
    );
    assert_eq!(out.code, Some(0), "{}", out.ctx());
}

#[test]
fn probe_in_new_pid_and_net_namespaces_daemonized() {
    let name = "probe_in_new_pid_and_net_namespaces_daemonized";
    if skip_unless_root_and_kvm(name) {
        return;
    }
    let bins = static_bins();
    let mut s = Scratch::new("pidns");
    // A persistent network namespace, bind-mounted on a file (what `ip netns add` does).
    let ns = s.base.join("netns");
    std::fs::write(&ns, b"").expect("netns file");
    let made = Command::new("unshare")
        .arg(format!("--net={}", ns.display()))
        .arg("true")
        .status();
    if !made.is_ok_and(|st| st.success()) {
        eprintln!("SKIPPED {name}: `unshare --net=FILE` (util-linux) is not available");
        return;
    }
    let ns_c = std::ffi::CString::new(ns.as_os_str().as_encoded_bytes()).expect("path");
    s.on_drop.push(Box::new(move || {
        // SAFETY: a valid C string; umount2 has no memory effects.
        unsafe { libc::umount2(ns_c.as_ptr(), libc::MNT_DETACH) };
    }));
    let ns_ino = std::fs::metadata(&ns).expect("netns").ino();

    let id = s.id();
    let mut cmd = jailer();
    cmd.args(["--id", &id, "--exec-file"])
        .arg(&bins.probe)
        .args(ids())
        .arg("--chroot-base-dir")
        .arg(&s.base)
        .arg("--netns")
        .arg(&ns)
        .args(["--new-pid-ns", "--daemonize"])
        .args([
            "--cgroup",
            "pids.max=32",
            "--parent-cgroup",
            &s.parent_cgroup,
        ])
        .args(["--", "--out", "/report", "--wait-file", "/go"]);
    let jail = spawn(cmd).finish(LIMIT);
    // The jailer exits once the pid file is written; the probe lives on, detached.
    assert_eq!(jail.code, Some(0), "{}", jail.ctx());
    assert_eq!(jail.stdout, "", "daemonized: nothing on stdout");
    let root = s.chroot("kiln-jail-probe", &id);
    let pid_text = read(&root.join("kiln-jail-probe.pid"));
    let pid: u32 = pid_text
        .parse()
        .expect("a pid in <chroot>/kiln-jail-probe.pid");
    let report = root.join("report");
    let start = Instant::now();
    while !read(&report).lines().any(|l| l == "ready") && start.elapsed() < LIMIT {
        std::thread::sleep(Duration::from_millis(10));
    }
    let nspid = proc_status(pid, "NSpid");
    let net = std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let cg = read(&PathBuf::from(format!("/proc/{pid}/cgroup")));
    std::fs::write(root.join("go"), b"").expect("go");
    while !read(&report).lines().any(|l| l == "end") && start.elapsed() < LIMIT {
        std::thread::sleep(Duration::from_millis(10));
    }
    let text = read(&report);
    let p = parse_report(&text);
    let get = |k: &str| p.get(k).map(String::as_str).unwrap_or("<missing>");
    assert_eq!(nspid, format!("{pid}\t1"), "pid 1 of a new PID namespace");
    assert_eq!(net, format!("net:[{ns_ino}]"), "in the --netns namespace");
    assert!(
        cg.lines()
            .any(|l| l.ends_with(&format!(":pids:/{}/{id}", s.parent_cgroup))),
        "{cg}"
    );
    assert_eq!(get("pid"), "1", "{text}");
    assert_eq!(get("ppid"), "0", "{text}");
    assert_eq!(
        get("sid"),
        "0",
        "its session leader (the jailer) is outside the namespace"
    );
    for fd in ["fd0", "fd1", "fd2"] {
        assert_eq!(get(fd), "chr:1:3", "{fd} on /dev/null\n{text}");
    }
    assert_eq!(get("fds"), "0,1,2", "{text}");
    assert_eq!(
        get("ifaces"),
        "lo",
        "only the new namespace's loopback\n{text}"
    );
    assert_eq!(get("uid"), format!("{UID},{UID},{UID}"));
    assert_eq!(get("rlimit_nofile"), "2048,2048", "Firecracker's default");
    assert_eq!(
        get("root"),
        "dev,kiln-jail-probe,kiln-jail-probe.pid",
        "{text}"
    );
    // Wait for the probe to go before the cgroup is removed.
    while proc_status(pid, "State").starts_with(|c| c != 'Z') && start.elapsed() < LIMIT {
        std::thread::sleep(Duration::from_millis(10));
    }
}
