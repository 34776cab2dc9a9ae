//! Bad input: each error names the flag at fault, and nothing the jailer created is left
//! behind (no chroot directories, no cgroups), whichever step failed.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(30);

/// A jailer command line: the usual flags, any of which a case may replace.
struct Args {
    id: String,
    exec: String,
    uid: String,
    base: String,
    parent: String,
    extra: Vec<String>,
}

impl Args {
    fn new(s: &Scratch, exec: &Path) -> Self {
        Args {
            id: s.id(),
            exec: exec.display().to_string(),
            uid: "10123".into(),
            base: s.base.display().to_string(),
            parent: s.parent_cgroup.clone(),
            extra: Vec::new(),
        }
    }
    fn id(mut self, v: &str) -> Self {
        self.id = v.into();
        self
    }
    fn uid(mut self, v: &str) -> Self {
        self.uid = v.into();
        self
    }
    fn base(mut self, v: &str) -> Self {
        self.base = v.into();
        self
    }
    fn parent(mut self, v: &str) -> Self {
        self.parent = v.into();
        self
    }
    fn with(mut self, extra: &[&str]) -> Self {
        self.extra.extend(extra.iter().map(|a| a.to_string()));
        self
    }
    fn to_vec(&self) -> Vec<String> {
        let mut v: Vec<String> = [
            "--id",
            &self.id,
            "--exec-file",
            &self.exec,
            "--uid",
            &self.uid,
            "--gid",
            "10456",
            "--chroot-base-dir",
            &self.base,
            "--parent-cgroup",
            &self.parent,
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        v.extend(self.extra.iter().cloned());
        v
    }
}

/// Runs the jailer with `args` and checks it fails with status `code`, `flag` in its
/// message, and leaves `s` as it found it.
fn fails(s: &Scratch, args: Args, code: i32, flag: &str) {
    let all = args.to_vec();
    let before = s.contents();
    let v2_on = v2_mount().map(|m| read(&m.join("cgroup.subtree_control")));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let out = run(&refs, LIMIT);
    let ctx = format!("args {all:?}\n{}", out.ctx());
    assert_eq!(out.code, Some(code), "{ctx}");
    assert!(
        out.stderr.contains(flag),
        "expected {flag:?} in the message\n{ctx}"
    );
    assert!(!out.stderr.contains("could not remove"), "{ctx}");
    assert_eq!(s.contents(), before, "files left behind\n{ctx}");
    assert!(
        s.cgroup_dirs().is_empty(),
        "cgroups left behind: {:?}\n{ctx}",
        s.cgroup_dirs()
    );
    let v2_after = v2_mount().map(|m| read(&m.join("cgroup.subtree_control")));
    assert_eq!(v2_on, v2_after, "v2 controllers left enabled\n{ctx}");
}

#[test]
fn bad_flags_are_named_and_nothing_is_left_behind() {
    let name = "bad_flags_are_named_and_nothing_is_left_behind";
    if skip_unless_root_and_kvm(name) {
        return;
    }
    let bins = static_bins();
    let s = Scratch::new("errors");
    let probe = bins.probe.as_path();
    let dynamic = Path::new(env!("CARGO_BIN_EXE_kiln-jail-probe"));
    let long_id = "x".repeat(65);
    let missing_base = s.base.join("missing");
    let missing_base = missing_base.to_str().expect("utf-8");
    let nr_open: u64 = read(Path::new("/proc/sys/fs/nr_open"))
        .parse()
        .unwrap_or(1 << 20);
    let too_many = format!("no-file={}", nr_open + 1);

    let a = || Args::new(&s, probe);
    // Validation: nothing is created at all.
    fails(&s, a().id("bad_id"), 1, "--id \"bad_id\"");
    fails(&s, a().id(""), 1, "--id \"\"");
    fails(&s, a().id(&long_id), 1, "--id");
    fails(&s, a().base(missing_base), 1, "--chroot-base-dir");
    let missing_exec = Args::new(&s, Path::new("/nonexistent/kiln"));
    fails(&s, missing_exec, 1, "--exec-file /nonexistent/kiln");
    fails(&s, Args::new(&s, dynamic), 1, "dynamically linked");
    fails(
        &s,
        a().with(&["--cgroup", "nosuch.max=1"]),
        1,
        "--cgroup nosuch.max",
    );
    fails(
        &s,
        a().with(&["--cgroup", "pids.max"]),
        1,
        "--cgroup pids.max",
    );
    let v2 = ["--cgroup-version", "2", "--cgroup", "nosuch.max=1"];
    fails(&s, a().with(&v2), 1, "--cgroup nosuch.max");
    let rl = ["--resource-limit", "cpu=1"];
    fails(&s, a().with(&rl), 1, "--resource-limit cpu=1");
    let ns = ["--netns", "/etc/hostname"];
    fails(&s, a().with(&ns), 1, "--netns /etc/hostname");
    fails(&s, a().parent("../up"), 1, "--parent-cgroup");
    fails(&s, a().uid("4294967295"), 1, "--uid");
    fails(&s, a().uid("-5"), 2, "--uid");
    fails(
        &s,
        a().with(&["--cgroup-version", "3"]),
        2,
        "--cgroup-version",
    );

    // The cgroup step: the chroot and the first hierarchy's cgroup exist already.
    let unknown_file = ["--cgroup", "pids.max=10", "--cgroup", "cpu.nosuch=1"];
    fails(&s, a().with(&unknown_file), 1, "--cgroup cpu.nosuch");
    let bad_value = ["--cgroup", "pids.max=10", "--cgroup", "pids.max=lots"];
    fails(&s, a().with(&bad_value), 1, "--cgroup pids.max=lots");
    // v2: the controller was enabled in the root's subtree_control on the way down.
    let v2_controller = v2_mount()
        .map(|m| read(&m.join("cgroup.controllers")))
        .and_then(|c| c.split_whitespace().next().map(String::from));
    if let Some(c) = v2_controller {
        let key = format!("{c}.nosuch");
        let set = format!("{key}=1");
        let v2 = ["--cgroup-version", "2", "--cgroup", &set];
        fails(&s, a().with(&v2), 1, &format!("--cgroup {key}"));
    }
    // After pivot_root (and as pid 1 of a new PID namespace): cleanup through the handles
    // taken before, including moving back out of the new cgroups.
    let late = ["--cgroup", "pids.max=10", "--resource-limit", &too_many];
    fails(&s, a().with(&late), 1, "--resource-limit no-file");
    fails(
        &s,
        a().with(&late).with(&["--new-pid-ns"]),
        1,
        "--resource-limit no-file",
    );
}

#[test]
fn a_failed_run_keeps_the_callers_files() {
    let name = "a_failed_run_keeps_the_callers_files";
    if skip_unless_root_and_kvm(name) {
        return;
    }
    let bins = static_bins();
    let s = Scratch::new("keep");
    let id = s.id();
    let root = s.chroot("kiln-jail-probe", &id);
    std::fs::create_dir_all(&root).expect("chroot");
    std::fs::write(root.join("vmlinux"), b"the caller's").expect("caller file");
    let base = s.base.display().to_string();
    let probe = bins.probe.display().to_string();
    let out = run(
        &[
            "--id",
            &id,
            "--exec-file",
            &probe,
            "--uid",
            "1",
            "--gid",
            "1",
            "--chroot-base-dir",
            &base,
            "--parent-cgroup",
            &s.parent_cgroup,
            "--cgroup",
            "pids.max=10",
            "--cgroup",
            "cpu.nosuch=1",
        ],
        LIMIT,
    );
    assert_eq!(out.code, Some(1), "{}", out.ctx());
    assert!(out.stderr.contains("--cgroup cpu.nosuch"), "{}", out.ctx());
    // Only what the jailer made is gone: the copy and /dev; the caller's chroot stays.
    let left = s.contents();
    let want: Vec<String> = [
        "kiln-jail-probe",
        &format!("kiln-jail-probe/{id}"),
        &format!("kiln-jail-probe/{id}/root"),
        &format!("kiln-jail-probe/{id}/root/vmlinux"),
    ]
    .iter()
    .map(|p| p.to_string())
    .collect();
    assert_eq!(left, want, "{}", out.ctx());
    assert!(s.cgroup_dirs().is_empty(), "{:?}", s.cgroup_dirs());
}

#[test]
fn a_non_root_caller_gets_a_clear_error() {
    let s = Scratch::new("nonroot");
    let probe = env!("CARGO_BIN_EXE_kiln-jail-probe");
    let id = s.id();
    let mut cmd = jailer();
    cmd.args([
        "--id",
        &id,
        "--exec-file",
        probe,
        "--uid",
        "1",
        "--gid",
        "1",
    ])
    .arg("--chroot-base-dir")
    .arg(&s.base)
    .args([
        "--cgroup",
        "pids.max=10",
        "--parent-cgroup",
        &s.parent_cgroup,
    ]);
    if is_root() {
        // The caller drops to nobody before exec: the jailer runs unprivileged.
        as_user(&mut cmd, 65534, 65534);
    }
    let out = spawn(cmd).finish(LIMIT);
    assert_eq!(out.code, Some(1), "{}", out.ctx());
    assert!(
        out.stderr.contains("--uid/--gid") && out.stderr.contains("needs root"),
        "{}",
        out.ctx()
    );
    assert!(s.contents().is_empty(), "{:?}", s.contents());
    assert!(s.cgroup_dirs().is_empty(), "{:?}", s.cgroup_dirs());
}
