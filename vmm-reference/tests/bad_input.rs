//! Bad input gets a clear error naming the flag at fault and a non-zero exit, never a panic.

mod common;

use common::*;

fn assert_error(r: &Run, flag: &str) {
    assert_error_status(r, flag, 1);
}

/// Status 1 for errors found while building the VM, 2 for a command line that doesn't parse.
fn assert_error_status(r: &Run, flag: &str, status: i32) {
    assert!(!r.timed_out, "{r:?}");
    assert_eq!(r.code, Some(status), "exit status for {flag}: {r:?}");
    assert!(
        r.stderr.contains(flag),
        "error must name {flag}: {}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn missing_kernel() {
    let r = run(&["--kernel", "/nonexistent/vmlinux"]);
    assert_error(&r, "--kernel /nonexistent/vmlinux");
}

#[test]
fn kernel_that_is_a_directory() {
    let dir = scratch("kernel-dir");
    let r = run(&["--kernel", dir.to_str().expect("path")]);
    assert_error(&r, "--kernel");
}

#[test]
fn file_that_is_no_kernel() {
    if skip_kvm("file_that_is_no_kernel") {
        return;
    }
    let dir = scratch("not-kernel");
    let p = dir.join("notes.txt");
    std::fs::write(&p, b"this is not a kernel\n".repeat(100)).expect("write");
    let r = run(&["--kernel", p.to_str().expect("path")]);
    assert_error(&r, "--kernel");
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").expect("write");
    assert_error(
        &run(&["--kernel", empty.to_str().expect("path")]),
        "--kernel",
    );
}

#[test]
fn missing_initrd() {
    if skip_kvm("missing_initrd") {
        return;
    }
    let r = run(&["--initrd", "/nonexistent/initrd"]);
    assert_error(&r, "--initrd");
}

#[test]
fn initrd_that_does_not_fit() {
    if skip_kvm("initrd_that_does_not_fit") {
        return;
    }
    let dir = scratch("big-initrd");
    let p = dir.join("initrd");
    let f = std::fs::File::create(&p).expect("create");
    f.set_len(64 << 20).expect("sparse file");
    let r = run(&["--memory", "32M", "--initrd", p.to_str().expect("path")]);
    assert_error(&r, "--initrd");
}

#[test]
fn cpus_out_of_range() {
    if skip_kvm("cpus_out_of_range") {
        return;
    }
    assert_error(&run(&["--cpus", "0"]), "--cpus");
    assert_error(&run(&["--cpus", "100000"]), "--cpus");
}

#[test]
fn memory_out_of_range() {
    if skip_kvm("memory_out_of_range") {
        return;
    }
    assert_error(&run(&["--memory", "1M"]), "--memory");
    assert_error(&run(&["--memory", "1048576G"]), "--memory");
    assert_error(&run(&["--memory", "12Q"]), "--memory");
    assert_error(&run(&["--memory", "4095K"]), "--memory");
}

#[test]
fn cmdline_too_long() {
    if skip_kvm("cmdline_too_long") {
        return;
    }
    let long = "x".repeat(5000);
    assert_error(&run(&["--cmdline", &long]), "--cmdline");
}

#[test]
fn bad_serial() {
    assert_error_status(&run(&["--serial", "tty"]), "--serial", 2);
    assert_error_status(&run(&["--cpus", "many"]), "--cpus", 2);
    assert_error(&run(&["--serial", "file:/nonexistent/dir/log"]), "--serial");
}

#[test]
fn no_kvm_device() {
    let mut cmd = kiln();
    cmd.env("KILN_KVM_DEVICE", "/nonexistent/kvm");
    let r = run_with(cmd, None, std::time::Duration::from_secs(30));
    assert_error(&r, "/nonexistent/kvm");
}

#[test]
fn kvm_device_without_permission() {
    // /dev/null opens but is no KVM device; a file without permission gives EACCES unless
    // we are root, so use a path that exists and refuses the KVM ioctl.
    let mut cmd = kiln();
    cmd.env("KILN_KVM_DEVICE", "/dev/null");
    let r = run_with(cmd, None, std::time::Duration::from_secs(30));
    assert_error(&r, "/dev/null");
}
