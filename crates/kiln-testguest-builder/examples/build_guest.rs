//! Builds the guest images into a directory: `cargo run -p kiln-testguest-builder --example
//! build_guest -- <out_dir>` (defaults to `target/testguest`).

use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/testguest"));
    match kiln_testguest_builder::build(&root, &out) {
        Ok(images) => {
            println!("{}", images.elf.display());
            println!("{}", images.bzimage.display());
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
