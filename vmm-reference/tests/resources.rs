//! CPU and memory knobs, checked by their effect on the running kiln as the host kernel
//! reports it: `/proc/PID/smaps` for hugepages and THP, KSM's counters for `mergeable`, the
//! backing file's contents for `file=`, and `/proc/PID/task/TID/{status,stat}` for
//! `--cpu-affinity` and `--vcpu-priority`. Plus every rejection.
//!
//! A VM under observation runs the `serial` scenario (it waits for console input) and is
//! stopped with SIGSTOP as soon as the guest is up: the scenario polls the UART, and a
//! spinning vCPU would otherwise hold one of the host's few cores (a SCHED_FIFO one nearly
//! all of it) while the test reads /proc.
//!
//! These tests change host-wide settings (`vm.nr_hugepages`, KSM) and restore them on the
//! way out, panics included; they take one host-wide lock so they don't overlap each other,
//! in this process or another.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command};
use std::time::{Duration, Instant};

use common::{kiln, run, run_with, scratch, skip_kvm, Run};

/// Held while a test changes host-wide settings or runs VMs it measures. An `flock` on a
/// fixed path, not a mutex: another test process (someone else's `cargo xtask test`) must
/// not restore `ksm/run` under our feet, nor we under theirs.
struct HostLock {
    _file: std::fs::File,
}

fn host_lock() -> HostLock {
    use std::os::fd::AsRawFd;
    let path = "/tmp/kiln-tests-host-settings.lock";
    let f = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: flock takes no pointers; the fd is valid while `f` lives, and closing it
    // releases the lock.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock {path}: {}", std::io::Error::last_os_error());
    HostLock { _file: f }
}

/// A procfs/sysfs setting changed for one test and put back on drop, even after a panic.
struct Knob {
    path: PathBuf,
    old: String,
}

impl Knob {
    fn set(path: &str, value: &str) -> Knob {
        let old = read(path);
        std::fs::write(path, value).unwrap_or_else(|e| panic!("writing {value} to {path}: {e}"));
        Knob {
            path: path.into(),
            old,
        }
    }
}

impl Drop for Knob {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.path, &self.old) {
            eprintln!(
                "could not restore {} to {}: {e}",
                self.path.display(),
                self.old
            );
        }
    }
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

fn read_u64(path: impl AsRef<Path>) -> u64 {
    let text = read(&path);
    text.parse()
        .unwrap_or_else(|_| panic!("{}: {text:?}", path.as_ref().display()))
}

const SERIAL: &str = "console=ttyS0 kiln.test=serial";
const BOOT: &str = "console=ttyS0 kiln.test=boot";

/// A kiln whose guest is up and waiting for console input, stopped with SIGSTOP. Killed on
/// drop.
struct StoppedVm {
    child: Child,
    pid: u32,
    // Held open so the guest never sees end-of-input.
    _stdin: ChildStdin,
}

impl StoppedVm {
    /// Starts kiln with `args` and `cmdline` (which must select the `serial` scenario),
    /// waits for the guest's ready line and for `settled(pid)`, then stops it.
    fn start(args: &[&str], cmdline: &str, settled: impl Fn(u32) -> bool) -> StoppedVm {
        let mut child = common::spawn_piped(args, cmdline);
        let pid = child.id();
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("KTEST-SERIAL-READY") {
                    let _ = tx.send(());
                }
            }
        });
        let mut vm = StoppedVm {
            child,
            pid,
            _stdin: stdin,
        };
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = vm.child.kill();
            let mut err = String::new();
            if let Some(mut e) = vm.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("kiln {args:?}: the guest never got ready; stderr:\n{err}");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !settled(pid) {
            assert!(Instant::now() < deadline, "kiln {args:?} did not settle");
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: kill takes no pointers; `pid` is our child, not yet reaped.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
        vm
    }

    fn start_ready(args: &[&str]) -> StoppedVm {
        Self::start(args, SERIAL, |_| true)
    }
}

impl Drop for StoppedVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One mapping of `/proc/PID/smaps`.
#[derive(Debug)]
struct Mapping {
    header: String,
    fields: Vec<(String, String)>,
}

impl Mapping {
    fn kb(&self, name: &str) -> u64 {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing: {self:#?}"))
    }

    fn flags(&self) -> Vec<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == "VmFlags")
            .map(|(_, v)| v.split_whitespace().collect())
            .unwrap_or_default()
    }

    /// The lines a person would quote.
    fn summary(&self) -> String {
        let mut s = self.header.clone();
        for (k, v) in &self.fields {
            if [
                "Size",
                "KernelPageSize",
                "Rss",
                "AnonHugePages",
                "Shared_Hugetlb",
                "Private_Hugetlb",
                "KSM",
                "VmFlags",
            ]
            .contains(&k.as_str())
            {
                s.push_str(&format!("\n  {k}: {v}"));
            }
        }
        s
    }
}

fn smaps(pid: u32) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in read(format!("/proc/{pid}/smaps")).lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        match (first.ends_with(':'), out.last_mut()) {
            (true, Some(m)) => m.fields.push((
                first.trim_end_matches(':').to_string(),
                line[first.len()..].trim().to_string(),
            )),
            _ => out.push(Mapping {
                header: line.to_string(),
                fields: Vec::new(),
            }),
        }
    }
    out
}

/// The mapping of guest RAM (one region below 3 GiB): its size and kiln's names for it
/// (`/memfd:kiln-guest-ram`; private hugetlb memory shows as `/anon_hugepage`; anonymous
/// memory as `[anon:kiln-guest-ram]` where the kernel has CONFIG_ANON_VMA_NAME, else
/// unnamed, and then it's the anonymous mapping excluded from core dumps, `dd`).
fn guest_ram(pid: u32, size_mib: u64) -> Mapping {
    let mut found: Vec<Mapping> = smaps(pid)
        .into_iter()
        .filter(|m| {
            let unnamed = m.header.split_whitespace().count() == 5;
            m.kb("Size") == size_mib << 10
                && (m.header.contains("kiln-guest-ram")
                    || m.header.contains("anon_hugepage")
                    || unnamed && m.flags().contains(&"dd"))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "guest RAM mappings of {size_mib} MiB: {found:#?}"
    );
    found.remove(0)
}

/// A hugepage pool of the default size raised by `extra` pages for the test.
fn raise_hugepages(extra: u64) -> Knob {
    let old = read_u64("/proc/sys/vm/nr_hugepages");
    let knob = Knob::set("/proc/sys/vm/nr_hugepages", &(old + extra).to_string());
    let got = read_u64("/proc/sys/vm/nr_hugepages");
    assert!(
        got >= old + extra,
        "the host could only grow the 2 MiB pool to {got} of {} pages (fragmented memory?)",
        old + extra
    );
    knob
}

const POOL_2M: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

fn available_2m_pages() -> u64 {
    read_u64(format!("{POOL_2M}/free_hugepages"))
        .saturating_sub(read_u64(format!("{POOL_2M}/resv_hugepages")))
}

#[test]
fn hugepages_back_guest_ram() {
    if skip_kvm("hugepages_back_guest_ram") {
        return;
    }
    let _host = host_lock();
    // 72 MiB: a size no other mapping of kiln has (glibc arenas are 64 MiB).
    let _pool = raise_hugepages(36);

    // Private hugetlb, prefaulted: every page of guest RAM is a 2 MiB hugetlb page.
    let vm = StoppedVm::start_ready(&["--memory", "size=72M,hugepages=on,prefault=on"]);
    let m = guest_ram(vm.pid, 72);
    eprintln!("hugepages=on,prefault=on:\n{}", m.summary());
    assert_eq!(m.kb("KernelPageSize"), 2048, "{m:#?}");
    assert_eq!(
        m.kb("Private_Hugetlb") + m.kb("Shared_Hugetlb"),
        72 << 10,
        "{m:#?}"
    );
    assert!(m.flags().contains(&"ht"), "{m:#?}");
    assert!(m.flags().contains(&"dd"), "{m:#?}");
    drop(vm);

    // Shared (memfd) hugetlb without prefault: only what the guest and kiln touched.
    let vm = StoppedVm::start_ready(&["--memory", "size=72M,hugepages=on,shared=on"]);
    let m = guest_ram(vm.pid, 72);
    eprintln!("hugepages=on,shared=on:\n{}", m.summary());
    assert!(m.header.contains("/memfd:kiln-guest-ram"), "{m:#?}");
    assert_eq!(m.kb("KernelPageSize"), 2048, "{m:#?}");
    let touched = m.kb("Private_Hugetlb") + m.kb("Shared_Hugetlb");
    assert!(touched > 0 && touched < 72 << 10, "{m:#?}");
    assert_eq!(touched % 2048, 0, "{m:#?}");
    drop(vm);

    // The same VM without hugepages: 4 KiB pages, no hugetlb memory.
    let vm = StoppedVm::start_ready(&["--memory", "size=72M,prefault=on"]);
    let m = guest_ram(vm.pid, 72);
    eprintln!("size=72M,prefault=on (control):\n{}", m.summary());
    assert_eq!(m.kb("KernelPageSize"), 4, "{m:#?}");
    assert_eq!(
        m.kb("Private_Hugetlb") + m.kb("Shared_Hugetlb"),
        0,
        "{m:#?}"
    );
    assert_eq!(m.kb("Rss"), 72 << 10, "{m:#?}");
    drop(vm);

    // One page more than the pool has: refused up front, with the numbers.
    let need = (available_2m_pages() + 1).max(8);
    let r = run(&[
        "--memory",
        &format!("size={}M,hugepages=on", need * 2),
        "--cmdline",
        BOOT,
    ]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(
        r.stderr.contains("--memory size=")
            && r.stderr.contains(&format!("needs {need} 2 MiB hugepages")),
        "{}",
        r.stderr
    );
}

fn thp_setting() -> String {
    let s = read("/sys/kernel/mm/transparent_hugepage/enabled");
    s.split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
        .unwrap_or("")
        .to_string()
}

#[test]
fn transparent_hugepages_back_guest_ram() {
    if skip_kvm("transparent_hugepages_back_guest_ram") {
        return;
    }
    let _host = host_lock();
    let setting = thp_setting();
    if setting == "never" {
        // Then the knob must be refused rather than silently do nothing.
        let r = run(&["--memory", "size=72M,thp=on", "--cmdline", BOOT]);
        assert_eq!(r.code, Some(1), "{r:?}");
        assert!(r.stderr.contains("transparent hugepages are off"), "{r:?}");
        return;
    }
    let vm = StoppedVm::start_ready(&["--memory", "size=72M,thp=on,prefault=on"]);
    let m = guest_ram(vm.pid, 72);
    eprintln!("thp=on,prefault=on:\n{}", m.summary());
    assert!(m.flags().contains(&"hg"), "{m:#?}");
    // Prefaulting after MADV_HUGEPAGE allocates huge pages wherever a 2 MiB-aligned 2 MiB
    // fits and memory isn't too fragmented to find one: most of the mapping.
    assert!(m.kb("AnonHugePages") >= 36 << 10, "{m:#?}");
    drop(vm);
    if setting == "madvise" {
        // Without the advice the same memory gets none.
        let vm = StoppedVm::start_ready(&["--memory", "size=72M,prefault=on"]);
        let m = guest_ram(vm.pid, 72);
        eprintln!("size=72M,prefault=on (control):\n{}", m.summary());
        assert!(!m.flags().contains(&"hg"), "{m:#?}");
        assert_eq!(m.kb("AnonHugePages"), 0, "{m:#?}");
    }
}

const KSM: &str = "/sys/kernel/mm/ksm";

fn ksm(name: &str) -> u64 {
    read_u64(format!("{KSM}/{name}"))
}

/// `ksm_merging_pages` of one process (Linux 5.19+), from `/proc/PID/ksm_merging_pages`.
fn merging_pages(pid: u32) -> u64 {
    read_u64(format!("/proc/{pid}/ksm_merging_pages"))
}

/// (Rss, Pss) of a process in kB, from smaps_rollup.
fn rss_pss(pid: u32) -> (u64, u64) {
    let text = read(format!("/proc/{pid}/smaps_rollup"));
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in smaps_rollup:\n{text}"))
    };
    (field("Rss"), field("Pss"))
}

#[test]
fn ksm_merges_identical_guests() {
    if skip_kvm("ksm_merges_identical_guests") {
        return;
    }
    if !Path::new(KSM).exists() {
        // The knob is then refused by the kernel (MADV_MERGEABLE fails with EINVAL).
        let r = run(&["--memory", "size=64M,mergeable=on", "--cmdline", BOOT]);
        assert_eq!(r.code, Some(1), "{r:?}");
        assert!(r.stderr.contains("MADV_MERGEABLE"), "{r:?}");
        return;
    }
    let _host = host_lock();
    // Scan fast for the test. Zero pages would otherwise be counted apart (ksm_zero_pages)
    // with use_zero_pages=1, and a prefaulted guest is mostly zero pages.
    let _knobs = [
        Knob::set(&format!("{KSM}/pages_to_scan"), "5000"),
        Knob::set(&format!("{KSM}/sleep_millisecs"), "10"),
        Knob::set(&format!("{KSM}/use_zero_pages"), "0"),
    ];
    let sharing_before = ksm("pages_sharing");
    // Declared after the knobs so the VMs die before KSM is put back.
    let _run = Knob::set(&format!("{KSM}/run"), "1");
    let args = ["--memory", "size=64M,mergeable=on,prefault=on"];
    let a = StoppedVm::start_ready(&args);
    let b = StoppedVm::start_ready(&args);
    let control = StoppedVm::start_ready(&["--memory", "size=64M,prefault=on"]);
    let (rss_a0, pss_a0) = rss_pss(a.pid);
    let guest_pages = (64 << 20) / 4096;
    let start = Instant::now();
    let merged = loop {
        let (ma, mb) = (merging_pages(a.pid), merging_pages(b.pid));
        let sharing = ksm("pages_sharing");
        // Most of each guest is identical (zero pages, the same kernel): expect at least
        // half of its pages to be merged.
        if ma >= guest_pages / 2 && mb >= guest_pages / 2 && sharing >= sharing_before + guest_pages
        {
            break Some((ma, mb, sharing));
        }
        if start.elapsed() > Duration::from_secs(60) {
            eprintln!(
                "after 60 s: merging a={ma} b={mb}, pages_sharing {sharing_before} -> {sharing}"
            );
            break None;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let (rss_a1, pss_a1) = rss_pss(a.pid);
    let control_merged = merging_pages(control.pid);
    eprintln!(
        "KSM: pages_sharing {sharing_before} -> {} after {:.1} s (pages_shared {}, full_scans {}); \
         ksm_merging_pages a={} b={} control={control_merged}; VM a Rss {rss_a0} -> {rss_a1} kB, \
         Pss {pss_a0} -> {pss_a1} kB",
        ksm("pages_sharing"),
        start.elapsed().as_secs_f64(),
        ksm("pages_shared"),
        ksm("full_scans"),
        merging_pages(a.pid),
        merging_pages(b.pid),
    );
    assert!(merged.is_some(), "KSM did not merge the two guests' memory");
    // The guest without mergeable=on is scanned by nobody.
    assert_eq!(control_merged, 0);
    // Sharing shows in the proportional set size: each VM now pays for less of its RAM.
    assert!(pss_a1 < pss_a0, "Pss {pss_a0} -> {pss_a1}");
}

#[test]
fn file_backed_memory_outlives_kiln() {
    if skip_kvm("file_backed_memory_outlives_kiln") {
        return;
    }
    let _host = host_lock();
    let dir = scratch("ram-file");
    let path = dir.join("guest.ram");
    // A page the guest never touches keeps what was in the file.
    let sentinel = 48u64 << 20;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&path).expect("create");
        f.write_all_at(b"kiln sentinel", sentinel).expect("write");
    }
    let cmdline = format!("{SERIAL} kiln.marker={}", common::MARKER);
    let memory = format!("size=64M,file={}", path.display());
    let vm = StoppedVm::start(&["--memory", &memory], &cmdline, |_| true);
    // No clean exit (SIGKILL): what the guest could see is in the file anyway.
    drop(vm);
    let bytes = std::fs::read(&path).expect("read");
    assert_eq!(bytes.len(), 64 << 20, "extended to the RAM size");
    let at = 0x20000;
    let end = at + bytes[at..].iter().position(|&b| b == 0).expect("NUL");
    let in_ram = String::from_utf8_lossy(&bytes[at..end]);
    eprintln!("file offset 0x20000: {in_ram:?}");
    assert!(in_ram.starts_with(&cmdline), "{in_ram:?}");
    assert!(in_ram.contains("kiln.mem=67108864"), "{in_ram:?}");
    let s = sentinel as usize;
    assert_eq!(&bytes[s..s + 13], b"kiln sentinel");
    // A second, clean run maps the same file: its command line replaces the first one and
    // the sentinel is still there.
    let r = run(&["--memory", &memory, "--cmdline", BOOT]);
    r.assert_passed(&["boot"]);
    let bytes = std::fs::read(&path).expect("read");
    assert_eq!(&bytes[s..s + 13], b"kiln sentinel");
    assert!(bytes[at..].starts_with(BOOT.as_bytes()));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Allowed host CPUs of the test process (the same as kiln's).
fn allowed_cpus() -> Vec<usize> {
    let list = read("/proc/self/status")
        .lines()
        .find_map(|l| {
            l.strip_prefix("Cpus_allowed_list:")
                .map(|v| v.trim().to_string())
        })
        .expect("Cpus_allowed_list");
    kiln::config::parse_cpu_list(&list).expect("cpu list")
}

#[derive(Debug)]
struct Task {
    comm: String,
    cpus: String,
    rt_priority: u32,
    policy: u32,
}

fn tasks(pid: u32) -> Vec<Task> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
    {
        let (Ok(status), Ok(stat)) = (
            std::fs::read_to_string(t.path().join("status")),
            std::fs::read_to_string(t.path().join("stat")),
        ) else {
            continue;
        };
        let comm = read(t.path().join("comm"));
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or("")
            .trim()
            .to_string();
        // Fields after the command name, which is in parentheses and may hold spaces:
        // field 3 (state) is index 0, so field N is index N - 3.
        let rest: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| rest.get(n - 3).and_then(|v| v.parse().ok()).unwrap_or(999);
        out.push(Task {
            comm,
            cpus,
            rt_priority: field(40),
            policy: field(41),
        });
    }
    out
}

fn task<'a>(tasks: &'a [Task], comm: &str) -> &'a Task {
    tasks
        .iter()
        .find(|t| t.comm == comm)
        .unwrap_or_else(|| panic!("no thread {comm}: {tasks:#?}"))
}

#[test]
fn threads_run_on_the_cpus_asked_for() {
    if skip_kvm("threads_run_on_the_cpus_asked_for") {
        return;
    }
    let allowed = allowed_cpus();
    assert!(
        allowed.len() >= 2,
        "this test needs two host CPUs to tell placements apart, kiln may use {allowed:?}"
    );
    let (first, last) = (
        allowed[0].to_string(),
        allowed[allowed.len() - 1].to_string(),
    );
    let all = kiln::config::format_cpu_list(&allowed);
    let _host = host_lock();
    let vm = StoppedVm::start(
        &[
            "--cpus",
            "2",
            "--cpu-affinity",
            &format!("0={last}"),
            "--cpu-affinity",
            &format!("1={first}"),
            "--cpu-affinity",
            &format!("vmm={first}"),
        ],
        SERIAL,
        // The main thread pins itself once the vCPUs run.
        |pid| {
            tasks(pid)
                .iter()
                .any(|t| t.comm == "kiln" && t.cpus == first)
        },
    );
    let t = tasks(vm.pid);
    eprintln!("threads: {t:?}");
    assert_eq!(task(&t, "kiln-vcpu0").cpus, last);
    assert_eq!(task(&t, "kiln-vcpu1").cpus, first);
    for vmm in ["kiln", "kiln-virtio", "kiln-stdin"] {
        assert_eq!(task(&t, vmm).cpus, first, "{vmm}");
    }
    drop(vm);

    // Control: without the flag every thread may run anywhere kiln may.
    let names = [
        "kiln",
        "kiln-vcpu0",
        "kiln-vcpu1",
        "kiln-virtio",
        "kiln-stdin",
    ];
    // The guest can be up before vCPU 1's thread has named itself.
    let vm = StoppedVm::start(&["--cpus", "2"], SERIAL, |pid| {
        let t = tasks(pid);
        names.iter().all(|n| t.iter().any(|t| t.comm == *n))
    });
    let t = tasks(vm.pid);
    for name in names {
        assert_eq!(task(&t, name).cpus, all, "{name}");
    }
}

#[test]
fn vcpu_threads_run_sched_fifo() {
    if skip_kvm("vcpu_threads_run_sched_fifo") {
        return;
    }
    let allowed = allowed_cpus();
    // Keep the real-time vCPU off the first CPU so the test (and the host) keep one.
    let pin = format!("0={}", allowed[allowed.len() - 1]);
    let _host = host_lock();
    let vm = StoppedVm::start_ready(&["--vcpu-priority", "fifo:10", "--cpu-affinity", &pin]);
    let t = tasks(vm.pid);
    eprintln!("threads: {t:?}");
    let vcpu = task(&t, "kiln-vcpu0");
    assert_eq!(
        (vcpu.policy, vcpu.rt_priority),
        (1, 10),
        "SCHED_FIFO 10: {vcpu:?}"
    );
    for vmm in ["kiln", "kiln-virtio", "kiln-stdin"] {
        let v = task(&t, vmm);
        assert_eq!((v.policy, v.rt_priority), (0, 0), "SCHED_OTHER: {v:?}");
    }
    drop(vm);
    // And a whole (short) guest run under it.
    let r = run(&[
        "--vcpu-priority",
        "fifo:10",
        "--cpu-affinity",
        &pin,
        "--cmdline",
        BOOT,
    ]);
    r.assert_passed(&["boot"]);
}

#[test]
fn vcpu_priority_refused_without_permission() {
    if skip_kvm("vcpu_priority_refused_without_permission") {
        return;
    }
    let kiln_bin = env!("CARGO_BIN_EXE_kiln");
    let args = ["--vcpu-priority", "fifo:10", "--cmdline", BOOT];
    // SAFETY: geteuid has no preconditions.
    let mut cmd = if unsafe { libc::geteuid() } != 0 {
        // Without privileges (and RLIMIT_RTPRIO 0, set below) SCHED_FIFO is refused anyway.
        Command::new(kiln_bin)
    } else if let Some(setpriv) = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    {
        // Root without CAP_SYS_NICE: kiln's permitted set is the bounding set.
        let mut c = Command::new(setpriv);
        c.args([
            "--inh-caps",
            "-sys_nice",
            "--bounding-set",
            "-sys_nice",
            kiln_bin,
        ]);
        c
    } else if let Some(capsh) = ["/usr/sbin/capsh", "/sbin/capsh", "/usr/bin/capsh"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    {
        let mut c = Command::new(capsh);
        c.args([
            "--drop=cap_sys_nice",
            "--",
            "-c",
            "exec \"$0\" \"$@\"",
            kiln_bin,
        ]);
        c
    } else {
        panic!("running as root with neither setpriv nor capsh: can't drop CAP_SYS_NICE");
    };
    cmd.args(args);
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // setrlimit, which is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            let zero = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::setrlimit(libc::RLIMIT_RTPRIO, &zero) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let r = run_with(cmd, None, Duration::from_secs(60));
    eprintln!("{}", r.stderr);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(
        r.stderr.contains("--vcpu-priority fifo:10")
            && r.stderr.contains("does not permit SCHED_FIFO")
            && r.stderr.contains("CAP_SYS_NICE"),
        "{}",
        r.stderr
    );
    assert!(!r.stdout.contains("KTEST"), "the guest must not run: {r:?}");
}

fn assert_rejected(r: &Run, status: i32, flag: &str, why: &str) {
    assert!(!r.timed_out, "{r:?}");
    assert_eq!(r.code, Some(status), "{flag} / {why}: {r:?}");
    assert!(r.stderr.contains(flag), "must name {flag}: {}", r.stderr);
    assert!(r.stderr.contains(why), "must say {why:?}: {}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn memory_options_that_make_no_sense_are_refused() {
    // All found before /dev/kvm is opened.
    for (value, why) in [
        ("size=64M,hugepages=on,file=/tmp/x", "don't go together"),
        ("size=64M,file=/tmp/x,shared=off", "always MAP_SHARED"),
        (
            "size=64M,hugepage-size=2M",
            "hugepage-size= needs hugepages=on",
        ),
        (
            "size=64M,hugepages=on,hugepage-size=3M",
            "expected 2M or 1G",
        ),
        (
            "size=17M,hugepages=on",
            "not a multiple of the 2 MiB hugepage size",
        ),
        (
            "size=1536M,hugepages=on,hugepage-size=1G",
            "1 GiB hugepage size",
        ),
        (
            "size=64M,hugepages=on,thp=on",
            "hugetlb pages are already huge",
        ),
        (
            "size=64M,file=/tmp/x,thp=on",
            "not to writable file mappings",
        ),
        ("size=64M,shared=on,mergeable=on", "KSM only merges"),
        ("size=64M,hugepages=on,mergeable=on", "KSM only merges"),
        ("size=64M,file=/tmp/x,mergeable=on", "KSM only merges"),
        ("size=64M,file=/tmp/x,host-numa-node=0", "ignores mbind"),
        (
            "size=64M,host-numa-node=4095",
            "host NUMA node 4095 does not exist",
        ),
        ("size=64M,host-numa-node=x", "expected a node number"),
        ("size=64M,prefault=yes", "prefault=yes: expected on or off"),
        ("size=64M,ballooon=on", "unknown option \"ballooon\""),
        ("size=12Q", "size=12Q: unknown unit"),
        ("size=8M", "below the minimum"),
        ("size=64M,file=", "path is empty"),
    ] {
        let r = run(&["--memory", value, "--cmdline", BOOT]);
        assert_rejected(&r, 1, "--memory", why);
        assert!(r.stderr.contains(value), "must quote {value}: {}", r.stderr);
    }
    // The plain form still works as before.
    let r = run(&["--memory", "12X"]);
    assert_rejected(&r, 1, "--memory", "unknown unit");
}

#[test]
fn hugepage_pools_that_are_too_small_are_refused() {
    // 1 GiB pages: unless the host has one free, the pool check refuses before any mapping.
    let pool = "/sys/kernel/mm/hugepages/hugepages-1048576kB";
    let free = std::fs::read_to_string(format!("{pool}/free_hugepages"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    if free.is_some_and(|f| f >= 1) {
        eprintln!("the host has free 1 GiB hugepages; nothing to refuse");
        return;
    }
    let r = run(&[
        "--memory",
        "size=1G,hugepages=on,hugepage-size=1G",
        "--cmdline",
        BOOT,
    ]);
    let why = if free.is_some() {
        "needs 1 1 GiB hugepages but only 0 are available"
    } else {
        "the host has no 1 GiB hugepage pool"
    };
    assert_rejected(&r, 1, "--memory size=1G,hugepages=on,hugepage-size=1G", why);
}

#[test]
fn cpu_options_that_make_no_sense_are_refused() {
    let allowed = allowed_cpus();
    for (args, status, why) in [
        (
            vec!["--cpu-affinity", "2=0"],
            1,
            "vCPU 2 does not exist with --cpus 2",
        ),
        (
            vec!["--cpu-affinity", "0=1000"],
            1,
            "host CPU 1000 does not exist",
        ),
        (
            vec!["--cpu-affinity", "0=0", "--cpu-affinity", "0=0"],
            1,
            "vCPU 0 is already pinned",
        ),
        (
            vec!["--cpu-affinity", "vmm=0", "--cpu-affinity", "vmm=0"],
            1,
            "vmm is already pinned",
        ),
        (
            vec!["--cpu-affinity", "0=1-0"],
            2,
            "range 1-0 runs backwards",
        ),
        (vec!["--cpu-affinity", "0="], 2, "empty CPU list"),
        (
            vec!["--cpu-affinity", "0=a"],
            2,
            "\"a\" is not a CPU number",
        ),
        (
            vec!["--cpu-affinity", "x=0"],
            2,
            "neither a vCPU index nor vmm",
        ),
        (vec!["--cpu-affinity", "0"], 2, "expected VCPU=HOSTCPUS"),
        (
            vec!["--cpu-affinity", "0=99999"],
            2,
            "beyond the 1024 kiln supports",
        ),
        (vec!["--vcpu-priority", "fifo:0"], 2, "from 1 to 99"),
        (vec!["--vcpu-priority", "fifo:100"], 2, "from 1 to 99"),
        (vec!["--vcpu-priority", "rr:5"], 2, "expected fifo:N"),
    ] {
        let mut full = vec!["--cpus", "2", "--cmdline", BOOT];
        full.extend(&args);
        let r = run(&full);
        let flag = if args[0] == "--vcpu-priority" {
            "--vcpu-priority"
        } else {
            "--cpu-affinity"
        };
        assert_rejected(&r, status, flag, why);
    }
    // A CPU that exists but is not one kiln may use: start kiln confined to the first.
    assert!(
        allowed.len() >= 2,
        "needs two host CPUs, kiln may use {allowed:?}"
    );
    let (first, other) = (allowed[0], allowed[1]);
    let mut cmd = kiln();
    cmd.args(["--cpu-affinity", &format!("0={other}"), "--cmdline", BOOT]);
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // sched_setaffinity on a local set, which is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(first, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let r = run_with(cmd, None, Duration::from_secs(60));
    assert_rejected(
        &r,
        1,
        &format!("--cpu-affinity \"0={other}\""),
        &format!("host CPU {other} is not one kiln may run on ({first};"),
    );
}
