//! Workspace tasks.
//!
//! - `cargo xtask test`: the whole test suite (the README's test command).
//! - `cargo xtask testguest [--qemu]`: build the conformance guest; cross-check it under QEMU.
//! - `cargo xtask bench-startup`: whole-process boot-to-poweroff time and peak RSS of kiln,
//!   and of QEMU microvm on the same guest image when it is installed.
//! - `cargo xtask bench-blk`: the guest's block IOPS / MiB/s under kiln and QEMU microvm on the
//!   same image.
//! - `cargo xtask bench-migrate`: live migration of the `counter` guest between two kilns on
//!   this host at several dirty rates: total time, downtime, rounds, bytes.
//! - `cargo xtask bench-snapshot`: snapshot create and restore times for 256 MiB and 1 GiB
//!   guests.
//! - `cargo xtask bench-net`: the guest's UDP transmit and receive frames/s and MiB/s over a
//!   tap, under kiln and QEMU microvm (makes a network namespace; needs root).
//! - `cargo xtask bench-vsock`: the guest's vsock MiB/s each way under kiln (QEMU has only
//!   vhost-vsock, which needs /dev/vhost-vsock: not compared).
//! - `cargo xtask linux-guest`: a stock Debian kernel (vmlinux, vmlinuz) and a busybox
//!   initramfs in `target/linux-guest/`.

mod bench_blk;
mod bench_migrate;
mod bench_net;
mod bench_snapshot;
mod bench_startup;
mod bench_vsock;
mod linux_guest;
mod test;
mod testguest;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "usage: cargo xtask <test | testguest [--qemu] [--out DIR] [--timeout SECS] | bench-startup [--runs N] | bench-blk [--runs N] [--ms MS] [--qd N] [--image-mib N] | bench-net [--runs N] [--frames N] [--size BYTES] [--rx-ms MS] | bench-vsock [--runs N] [--mib N] | bench-migrate [--runs N] [--mib N] [--rates R,R] [--transport tcp|unix] [--max-downtime-ms N] [--memory SIZE] [--cpus N] | bench-snapshot [--runs N] [--sizes MIB,MIB] | linux-guest [--out DIR]>";

fn workspace_root() -> PathBuf {
    // xtask/ sits directly under the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (name, result) = match args.first().map(String::as_str) {
        Some("test") => ("test", test::run(&args[1..])),
        Some("testguest") => ("testguest", testguest::testguest(&args[1..])),
        Some("bench-startup") => ("bench-startup", bench_startup::run(&args[1..])),
        Some("bench-blk") => ("bench-blk", bench_blk::run(&args[1..])),
        Some("bench-migrate") => ("bench-migrate", bench_migrate::run(&args[1..])),
        Some("bench-snapshot") => ("bench-snapshot", bench_snapshot::run(&args[1..])),
        Some("bench-net") => ("bench-net", bench_net::run(&args[1..])),
        Some("bench-vsock") => ("bench-vsock", bench_vsock::run(&args[1..])),
        Some("linux-guest") => ("linux-guest", linux_guest::run_task(&args[1..])),
        _ => {
            eprintln!("{USAGE}\n{}", testguest::USAGE);
            return ExitCode::FAILURE;
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `cargo ARGS` in the workspace root, failing on a non-zero exit.
fn cargo(args: &[&str]) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    println!("== cargo {}", args.join(" "));
    let status = std::process::Command::new(cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .map_err(|e| format!("running cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("cargo {} failed ({status})", args.join(" ")))
    }
}

/// True if `prog` is on PATH.
fn have(prog: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
}
