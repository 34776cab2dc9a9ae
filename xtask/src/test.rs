//! `cargo xtask test`: every test in the workspace.
//!
//! 1. `cargo test --workspace --all-targets`: unit tests, KVM integration tests, examples,
//!    and the criterion benches in test mode (each benchmark runs once, so they keep
//!    working);
//! 2. `cargo test --workspace --doc`;
//! 3. the conformance guest under QEMU microvm (`xtask testguest --qemu`) when
//!    `qemu-system-x86_64` and /dev/kvm are there — otherwise it says why it skipped.

use crate::{cargo, have, testguest};

pub fn run(args: &[String]) -> Result<(), String> {
    if let Some(a) = args.first() {
        return Err(format!("unknown argument {a}"));
    }
    cargo(&["test", "--workspace", "--all-targets", "--locked"])?;
    cargo(&["test", "--workspace", "--doc", "--locked"])?;
    let skip_kvm = std::env::var_os("KILN_SKIP_KVM").is_some_and(|v| v == "1");
    if skip_kvm {
        println!("SKIPPED QEMU cross-check: KILN_SKIP_KVM=1");
    } else if !have("qemu-system-x86_64") {
        println!("SKIPPED QEMU cross-check: qemu-system-x86_64 not installed (apt-get install qemu-system-x86)");
    } else {
        println!("== conformance guest under QEMU microvm");
        testguest::testguest(&["--qemu".to_string()])?;
    }
    Ok(())
}
