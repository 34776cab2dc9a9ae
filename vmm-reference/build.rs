//! Builds the conformance guest (crates/kiln-testguest) with the host toolchain and leaves
//! `kiln-testguest.elf` and `kiln-testguest.bzImage` in OUT_DIR for `src/guest.rs` to embed.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let (Some(out), Some(manifest)) = (
        std::env::var_os("OUT_DIR"),
        std::env::var_os("CARGO_MANIFEST_DIR"),
    ) else {
        eprintln!("build.rs must run under cargo (OUT_DIR/CARGO_MANIFEST_DIR unset)");
        return ExitCode::FAILURE;
    };
    let root = PathBuf::from(manifest).join("..");
    match kiln_testguest_builder::build(&root, &PathBuf::from(out)) {
        Ok(images) => {
            for src in images.sources {
                println!("cargo:rerun-if-changed={}", src.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("building the conformance guest: {e}");
            ExitCode::FAILURE
        }
    }
}
