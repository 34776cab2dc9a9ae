//! Snapshots end to end: the conformance guest's `counter` scenario (a kvmclock-stamped
//! sequence, a memory pattern it keeps rewriting and checking, and disk sectors it stamps and
//! re-reads) is paused and snapshotted through `--control-sock`, the process is killed, and
//! `kiln --restore` in a new process must carry on: the next sequence number, no error, no
//! clock jump longer than the pause. Plus diff snapshots, refusals (running VM, no base) and
//! corrupted, truncated or foreign snapshot files rejected with a clear error.
//!
//! One VM at a time (a small shared host).

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{kiln, run_with, scratch, skip_kvm};

static VMS: Mutex<()> = Mutex::new(());

fn vm_lock() -> MutexGuard<'static, ()> {
    VMS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A kiln process whose stdout lines are collected as they come.
struct Vm {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    sock: PathBuf,
}

impl Vm {
    fn spawn(args: &[&str], sock: &Path) -> Vm {
        let _ = std::fs::remove_file(sock);
        let mut child = kiln()
            .args(args)
            .arg("--control-sock")
            .arg(sock)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kiln");
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let out = child.stdout.take().expect("stdout");
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().expect("lines").push(line);
            }
        });
        let err = child.stderr.take().expect("stderr");
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                l.lock().expect("lines").push(format!("STDERR {line}"));
            }
        });
        Vm {
            child,
            lines,
            sock: sock.to_path_buf(),
        }
    }

    fn output(&self) -> String {
        self.lines.lock().expect("lines").join("\n")
    }

    /// Waits until some line satisfies `f`; returns its value.
    fn wait_for<T>(&mut self, what: &str, limit: Duration, f: impl Fn(&str) -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = self.lines.lock().expect("lines").iter().find_map(|l| f(l)) {
                return v;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                panic!("kiln exited ({st}) before {what}\n{}", self.output());
            }
            assert!(
                start.elapsed() < limit,
                "no {what} within {limit:?}\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends one control command, returns the answer line.
    fn ctl(&self, cmd: &str) -> String {
        common::ctl(&self.sock, cmd)
    }

    fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(50));
        self.output()
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                std::thread::sleep(Duration::from_millis(50));
                return st.code();
            }
            assert!(
                start.elapsed() < limit,
                "kiln still running after {limit:?}\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// `counter seq=N ...` → N.
fn seq(line: &str) -> Option<u64> {
    line.strip_prefix("counter seq=")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn seqs(out: &str) -> Vec<u64> {
    out.lines().filter_map(seq).collect()
}

/// `counter jump=Dns seq=N` → D.
fn jumps(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| {
            l.strip_prefix("counter jump=")?
                .split("ns")
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

fn restore_run(args: &[&str]) -> common::Run {
    let mut cmd = kiln();
    cmd.args(args);
    run_with(cmd, None, Duration::from_secs(60))
}

#[test]
fn snapshot_restore_in_a_new_process_continues_the_guest() {
    if skip_kvm("snapshot_restore_in_a_new_process_continues_the_guest") {
        return;
    }
    let _l = vm_lock();
    let dir = scratch("snap-full");
    let img = common::counter_disk(&dir);
    let snap = dir.join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let disk_arg = format!("path={}", img.display());
    let cmdline = common::counter_cmdline(50, 4);
    let mut vm = Vm::spawn(
        &["--disk", &disk_arg, "--cmdline", &cmdline],
        &dir.join("ctl1"),
    );
    vm.wait_for("counter seq=8", Duration::from_secs(60), |l| {
        seq(l).filter(|&n| n >= 8)
    });
    // A running VM is not snapshotted.
    let state = snap.join("state");
    let mem = snap.join("memory");
    let cmd = format!("snapshot {} {}", state.display(), mem.display());
    let refused = vm.ctl(&cmd);
    assert!(
        refused.starts_with("error") && refused.contains("pause it first"),
        "{refused}"
    );
    assert!(!state.exists() && !mem.exists());
    // Nor is a diff taken without a full snapshot to be relative to.
    assert_eq!(vm.ctl("pause"), "ok");
    let paused_at = Instant::now();
    let diff = vm.ctl(&format!("{cmd} diff"));
    assert!(diff.starts_with("error diff snapshot"), "{diff}");
    let ok = vm.ctl(&cmd);
    assert!(ok.starts_with("ok full snapshot"), "{ok}");
    std::thread::sleep(Duration::from_millis(200));
    let before = vm.kill();
    let before_seqs = seqs(&before);
    let last = *before_seqs.last().expect("lines before the snapshot");
    assert!(!before.contains("errors=1"), "{before}");

    // The memory file is sparse: 128 MiB long, far less of it on disk.
    let m = std::fs::metadata(&mem).unwrap();
    assert_eq!(m.len(), (128 << 20) + kiln_snapshot::memory::TRAILER_LEN);
    assert!(
        m.blocks() * 512 < 64 << 20,
        "{} bytes allocated",
        m.blocks() * 512
    );

    // Restore in a new process; the guest finishes its 4 s and powers off.
    let mut vm2 = Vm::spawn(&["--restore", snap.to_str().unwrap()], &dir.join("ctl2"));
    let first_after = vm2.wait_for("a line after the restore", Duration::from_secs(30), seq);
    let pause_len = paused_at.elapsed();
    let code = vm2.wait_exit(Duration::from_secs(60));
    let after = vm2.output();
    assert_eq!(code, Some(0), "{after}");
    assert!(after.contains("STDERR kiln: restored"), "{after}");
    assert!(after.contains("KTEST counter PASS"), "{after}");
    assert!(after.contains("errors=0 (mem=0 blk=0 clock=0)"), "{after}");
    assert_eq!(
        first_after,
        last + 1,
        "the sequence goes on where it stopped\nbefore:\n{before}\nafter:\n{after}"
    );
    let after_seqs = seqs(&after);
    for w in after_seqs.windows(2) {
        assert_eq!(w[1], w[0] + 1, "a gap in the sequence\n{after}");
    }
    // kvmclock was restored as saved: a jump, if any, is no longer than the pause.
    for j in jumps(&after) {
        assert!(
            u128::from(j) <= pause_len.as_nanos(),
            "clock jump {j} ns after a pause of {pause_len:?}\n{after}"
        );
    }

    // Broken files: refused with the file named and exit status 1; nothing runs.
    let bad = dir.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let good = std::fs::read(&state).unwrap();
    std::fs::copy(&mem, bad.join("memory")).unwrap();
    let bad_state = bad.join("state");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "corrupt",
            {
                let mut b = good.clone();
                let mid = b.len() / 2;
                b[mid] ^= 0x10;
                b
            },
            "checksum mismatch",
        ),
        ("truncated", good[..good.len() - 100].to_vec(), "truncated"),
        (
            "foreign version",
            {
                let mut b = good.clone();
                b[8..12].copy_from_slice(&99u32.to_le_bytes());
                b
            },
            "format version 99",
        ),
        (
            "not a snapshot",
            b"hello, world, this is not a snapshot".to_vec(),
            "not a kiln snapshot",
        ),
    ];
    for (what, bytes, expect) in cases {
        std::fs::write(&bad_state, &bytes).unwrap();
        let r = restore_run(&["--restore", bad.to_str().unwrap()]);
        assert_eq!(r.code, Some(1), "{what}: {}", r.stderr);
        assert!(
            r.stderr.contains(expect) && r.stderr.contains(bad_state.to_str().unwrap()),
            "{what}: {}",
            r.stderr
        );
        assert!(r.stdout.is_empty(), "{what}: the guest ran: {}", r.stdout);
        assert_eq!(
            std::fs::read(&bad_state).unwrap(),
            bytes,
            "{what}: file changed"
        );
    }
    // Another snapshot's memory file beside this state.
    std::fs::write(&bad_state, &good).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(bad.join("memory"))
        .unwrap();
    let trailer_at = f.metadata().unwrap().len() - 8;
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 8], trailer_at).unwrap();
    let r = restore_run(&["--restore", bad.to_str().unwrap()]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("belongs to another snapshot"),
        "{}",
        r.stderr
    );
    // A memory file that doesn't match.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(bad.join("memory"))
        .unwrap();
    f.set_len(64 << 20).unwrap();
    let r = restore_run(&["--restore", bad.to_str().unwrap()]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("memory file"), "{}", r.stderr);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn diff_snapshot_restores_over_the_full_one() {
    if skip_kvm("diff_snapshot_restores_over_the_full_one") {
        return;
    }
    let _l = vm_lock();
    let dir = scratch("snap-diff");
    let (full, diff) = (dir.join("full"), dir.join("diff"));
    std::fs::create_dir_all(&full).unwrap();
    std::fs::create_dir_all(&diff).unwrap();
    // Longer: the in-process pause around the first snapshot counts as guest time (kvmclock
    // runs on while a VM is paused in place).
    let cmdline = common::counter_cmdline(50, 8);
    // With a disk: the guest reads sectors back into its memory, writes KVM's dirty log
    // doesn't see (the diff finds them by fingerprint).
    let img = common::counter_disk(&dir);
    let disk_arg = format!("path={}", img.display());
    let mut vm = Vm::spawn(
        &["--disk", &disk_arg, "--cmdline", &cmdline],
        &dir.join("ctl1"),
    );
    vm.wait_for("counter seq=5", Duration::from_secs(60), |l| {
        seq(l).filter(|&n| n >= 5)
    });
    assert_eq!(vm.ctl("pause"), "ok");
    let ok = vm.ctl(&format!(
        "snapshot {} {}",
        full.join("state").display(),
        full.join("memory").display()
    ));
    assert!(ok.starts_with("ok full snapshot"), "{ok}");
    assert_eq!(vm.ctl("resume"), "ok");
    // The guest rewrites its 8 MiB pattern at 20 MiB/s: let it dirty some.
    vm.wait_for("counter seq=20", Duration::from_secs(60), |l| {
        seq(l).filter(|&n| n >= 20)
    });
    assert_eq!(vm.ctl("pause"), "ok");
    let paused_at = Instant::now();
    let ok = vm.ctl(&format!(
        "snapshot {} {} diff",
        diff.join("state").display(),
        diff.join("memory").display()
    ));
    assert!(ok.starts_with("ok diff snapshot"), "{ok}");
    // A full snapshot of the same paused moment: full + diff must equal it, page for page.
    let check = dir.join("check");
    std::fs::create_dir_all(&check).unwrap();
    let ok = vm.ctl(&format!(
        "snapshot {} {}",
        check.join("state").display(),
        check.join("memory").display()
    ));
    assert!(ok.starts_with("ok full snapshot"), "{ok}");
    let before = vm.kill();
    let mut merged = std::fs::read(full.join("memory")).unwrap();
    let h = kiln_snapshot::read_header(&diff.join("state")).unwrap();
    assert!(h.memory.diff);
    {
        let (low, high) = merged.split_at_mut(h.memory.regions[0].len as usize);
        let mut ram: Vec<(u64, &mut [u8])> = vec![(0, low)];
        if let Some(r) = h.memory.regions.get(1) {
            ram.push((r.guest_addr, high));
        }
        kiln_snapshot::memory::read_memory(&diff.join("memory"), &h.memory, &mut ram).unwrap();
    }
    let mut expected = std::fs::read(check.join("memory")).unwrap();
    // Their trailers hold different ids; compare the memory.
    let len = h.memory.file_len() as usize;
    merged.truncate(len);
    expected.truncate(len);
    let differing: Vec<usize> = merged
        .chunks(4096)
        .zip(expected.chunks(4096))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    assert!(differing.is_empty(), "pages the diff missed: {differing:?}");
    let last = *seqs(&before).last().unwrap();
    // Only what the guest dirtied: its 8 MiB pattern plus a little stack and data, not
    // the 128 MiB of RAM.
    let diff_bytes = std::fs::metadata(diff.join("memory")).unwrap().blocks() * 512;
    assert!(
        diff_bytes > 0 && diff_bytes <= 10 << 20,
        "diff holds {diff_bytes} bytes"
    );

    // The diff's state alone is refused without the base memory.
    let r = restore_run(&["--restore", diff.to_str().unwrap()]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("diff snapshot"), "{}", r.stderr);

    let spec = format!(
        "state={},mem={},diff-mem={}",
        diff.join("state").display(),
        full.join("memory").display(),
        diff.join("memory").display()
    );
    let mut vm2 = Vm::spawn(&["--restore", &spec], &dir.join("ctl2"));
    let first = vm2.wait_for("a line after the restore", Duration::from_secs(30), seq);
    let pause_len = paused_at.elapsed();
    let code = vm2.wait_exit(Duration::from_secs(60));
    let after = vm2.output();
    assert_eq!(code, Some(0), "{after}");
    assert_eq!(first, last + 1, "before:\n{before}\nafter:\n{after}");
    // The pattern check would count every page the diff missed.
    assert!(after.contains("KTEST counter PASS"), "{after}");
    assert!(after.contains("errors=0"), "{after}");
    for j in jumps(&after) {
        assert!(
            u128::from(j) <= pause_len.as_nanos(),
            "jump {j} ns\n{after}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn restore_paused_waits_for_resume() {
    if skip_kvm("restore_paused_waits_for_resume") {
        return;
    }
    let _l = vm_lock();
    let dir = scratch("snap-paused");
    let snap = dir.join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    // Two vCPUs (the AP started by `smp`, idle) and an active balloon with its statistics
    // buffer held by the device.
    let cmdline = common::counter_cmdline(50, 0)
        .replace("kiln.test=counter", "kiln.test=smp,balloon,counter");
    let mut vm = Vm::spawn(
        &["--cpus", "2", "--balloon", "size=4M", "--cmdline", &cmdline],
        &dir.join("ctl1"),
    );
    vm.wait_for("counter seq=3", Duration::from_secs(60), |l| {
        seq(l).filter(|&n| n >= 3)
    });
    assert_eq!(vm.ctl("pause"), "ok");
    let ok = vm.ctl(&format!(
        "snapshot {} {}",
        snap.join("state").display(),
        snap.join("memory").display()
    ));
    assert!(ok.starts_with("ok full"), "{ok}");
    let before = vm.kill();
    let last = *seqs(&before).last().unwrap();
    let mut vm2 = Vm::spawn(
        &["--restore", snap.to_str().unwrap(), "--restore-paused"],
        &dir.join("ctl2"),
    );
    vm2.wait_for("the restore", Duration::from_secs(30), |l| {
        l.contains("kiln: restored").then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        seqs(&vm2.output()).is_empty(),
        "ran while paused\n{}",
        vm2.output()
    );
    // Paused: a snapshot of the restored VM works at once.
    let again = vm2.ctl(&format!(
        "snapshot {} {}",
        dir.join("state2").display(),
        dir.join("memory2").display()
    ));
    assert!(again.starts_with("ok full"), "{again}");
    assert_eq!(vm2.ctl("resume"), "ok");
    let first = vm2.wait_for("a line after resume", Duration::from_secs(30), seq);
    assert_eq!(first, last + 1, "{}", vm2.output());
    assert!(
        before.contains("KTEST smp PASS") && before.contains("KTEST balloon PASS"),
        "{before}"
    );
    vm2.wait_for("more lines", Duration::from_secs(30), |l| {
        seq(l).filter(|&n| n >= last + 5)
    });
    assert!(!vm2.output().contains("errors=1"), "{}", vm2.output());
    drop(vm2.kill());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn restore_flag_conflicts_and_bad_specs_are_refused() {
    for (args, expect) in [
        (
            vec!["--restore", "/nonexistent-kiln-snap"],
            "/nonexistent-kiln-snap/state",
        ),
        (vec!["--restore", "state=/a"], "mem=PATH is required"),
        (
            vec!["--restore", "/x", "--cpus", "2"],
            "cannot be used with",
        ),
        (vec!["--restore-paused"], "--restore"),
    ] {
        let r = restore_run(&args);
        assert_ne!(r.code, Some(0), "{args:?}");
        assert!(r.stderr.contains(expect), "{args:?}: {}", r.stderr);
    }
}
