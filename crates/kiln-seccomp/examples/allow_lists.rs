//! Prints each thread kind's built-in allow-list (`*` marks calls whose arguments are
//! checked too) and installs one on this thread to show a forbidden call being reported.
//!
//! `cargo run -p kiln-seccomp --example allow_lists`

use kiln_seccomp::{allowed_syscalls, Filters, ThreadKind};

fn main() -> Result<(), kiln_seccomp::Error> {
    for kind in ThreadKind::ALL {
        let calls = allowed_syscalls(kind);
        let names: Vec<String> = calls
            .iter()
            .map(|(n, checked)| format!("{n}{}", if *checked { "*" } else { "" }))
            .collect();
        println!("{kind} ({}): {}", calls.len(), names.join(" "));
    }
    kiln_seccomp::install_sigsys_handler()?;
    Filters::builtin()?.install(ThreadKind::Stdin)?;
    println!("stdin filter installed; now calling getppid, which it forbids:");
    kiln_seccomp::forbidden_call_for_tests();
    unreachable!("the SIGSYS handler exits with 148");
}
