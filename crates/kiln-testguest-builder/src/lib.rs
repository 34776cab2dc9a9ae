//! Builds the Kiln conformance guest (`crates/kiln-testguest`) into an ELF (PVH note + Linux
//! 64-bit entry) and a bzImage-format image, with nothing but the stable host toolchain.
//!
//! The guest is compiled for the ordinary `x86_64-unknown-linux-gnu` target by a nested
//! `cargo build` with a static relocation model, no red zone, `panic=abort`, no libc and the
//! guest's linker script; its own `--target-dir` keeps it off the outer build's lock. It is
//! meant to be called from a build script or an xtask:
//!
//! ```no_run
//! // build.rs
//! use std::path::PathBuf;
//! let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
//! let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
//! let images = kiln_testguest_builder::build(&root, &out).unwrap();
//! for p in &images.sources {
//!     println!("cargo:rerun-if-changed={}", p.display());
//! }
//! println!("cargo:rustc-env=KILN_TESTGUEST_ELF={}", images.elf.display());
//! ```
#![warn(missing_docs)]

mod image;

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

pub use image::{bzimage, flatten, FlatImage, ENTRY64_OFFSET, LOAD_ADDR, SETUP_BYTES};

/// File name of the ELF written to `out_dir`.
pub const ELF_NAME: &str = "kiln-testguest.elf";
/// File name of the bzImage written to `out_dir`.
pub const BZIMAGE_NAME: &str = "kiln-testguest.bzImage";
/// Where the guest crate lives, relative to the workspace root.
pub const GUEST_CRATE_DIR: &str = "crates/kiln-testguest";
/// The nested build's target directory, relative to the workspace root.
pub const GUEST_TARGET_DIR: &str = "target/testguest-build";
/// The target triple the guest is compiled for: the stable host target, not a bare-metal one.
pub const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Errors of the guest build.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Reading or writing a file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Which file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The nested cargo could not be started.
    #[error("cannot run {cargo:?}: {source}")]
    Spawn {
        /// The cargo executable tried.
        cargo: OsString,
        /// The OS error.
        source: std::io::Error,
    },
    /// The nested cargo build failed.
    #[error("nested guest build failed ({status}); command: {command}\n{stderr}")]
    Cargo {
        /// Exit status.
        status: std::process::ExitStatus,
        /// The command line, for reproducing by hand.
        command: String,
        /// The last part of cargo's stderr.
        stderr: String,
    },
    /// The linked guest is not the ELF the contract needs.
    #[error("guest ELF is unusable: {reason}")]
    BadElf {
        /// What is wrong.
        reason: &'static str,
    },
}

/// What [`build`] produced.
#[derive(Debug, Clone)]
pub struct GuestImages {
    /// The ELF (PVH note, `e_entry` = Linux 64-bit entry at 0x100200).
    pub elf: PathBuf,
    /// The bzImage-format image (setup header + flat image loaded at 0x100000).
    pub bzimage: PathBuf,
    /// Files the images depend on, for `cargo:rerun-if-changed`.
    pub sources: Vec<PathBuf>,
}

/// Environment variables of an enclosing cargo/clippy/coverage run that must not leak into the
/// nested build (they would re-target it, wrap rustc, or replace the guest's flags).
const SCRUBBED_VARS: &[&str] = &[
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTC_WRAPPER",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    "CARGO_LLVM_COV",
    "LLVM_PROFILE_FILE",
];

/// Prefixes of variables scrubbed as well (profile and per-target overrides).
const SCRUBBED_PREFIXES: &[&str] = &["CARGO_PROFILE_", "CARGO_TARGET_X86_64"];

/// The rustc flags the guest binary needs; `linker_script` must be absolute.
///
/// `-sse,-sse2` keeps SSE out of the guest's own code: some hypervisors (kvm-pvm) run guest
/// ring-0 code through KVM's instruction emulator, which cannot execute most SSE
/// instructions. rustc warns that disabling `sse2` on this target is being phased out; the
/// guest passes no floats, so the ABI difference it warns about does not arise.
pub fn guest_rustflags(linker_script: &Path) -> Vec<String> {
    vec![
        "-Ctarget-feature=-sse,-sse2".into(),
        "-Crelocation-model=static".into(),
        "-Cno-redzone=yes".into(),
        "-Cpanic=abort".into(),
        "-Cforce-unwind-tables=no".into(),
        "-Clink-arg=-nostdlib".into(),
        "-Clink-arg=-static".into(),
        "-Clink-arg=-no-pie".into(),
        format!("-Clink-arg=-Wl,-T,{}", linker_script.display()),
        "-Clink-arg=-Wl,--build-id=none".into(),
    ]
}

/// Every file under `dir`, recursively, sorted.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), BuildError> {
    let rd = fs::read_dir(dir).map_err(|source| BuildError::Io {
        op: "listing",
        path: dir.to_path_buf(),
        source,
    })?;
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files_under(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// Files whose change must rebuild the guest.
pub fn guest_sources(workspace_root: &Path) -> Result<Vec<PathBuf>, BuildError> {
    let guest = workspace_root.join(GUEST_CRATE_DIR);
    let mut v = vec![
        guest.join("Cargo.toml"),
        guest.join("linker.ld"),
        guest.join("build.rs"),
        workspace_root.join("Cargo.toml"),
    ];
    files_under(&guest.join("src"), &mut v)?;
    Ok(v)
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    // Leave unchanged files alone so that mtime-based rebuilds downstream stay quiet.
    if fs::read(path).map(|old| old == bytes).unwrap_or(false) {
        return Ok(());
    }
    // Write a new file and rename it over the old one: a target directory seeded with hard
    // links (`cp -al`) shares the old inode with other trees, which must not change under them.
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes)
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|source| BuildError::Io {
            op: "writing",
            path: path.to_path_buf(),
            source,
        })
}

/// Builds the guest and writes `out_dir/kiln-testguest.elf` and `out_dir/kiln-testguest.bzImage`.
///
/// `workspace_root` is the Kiln workspace (the directory holding the root `Cargo.toml`).
/// Works from inside another cargo build's build script: the nested cargo gets its own target
/// directory (`target/testguest-build`) and a scrubbed environment.
pub fn build(workspace_root: &Path, out_dir: &Path) -> Result<GuestImages, BuildError> {
    let root = fs::canonicalize(workspace_root).map_err(|source| BuildError::Io {
        op: "resolving",
        path: workspace_root.to_path_buf(),
        source,
    })?;
    let script = root.join(GUEST_CRATE_DIR).join("linker.ld");
    let target_dir = root.join(GUEST_TARGET_DIR);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());

    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&root).args([
        "build",
        "--release",
        "--package",
        "kiln-testguest",
        "--bin",
        "kiln-testguest",
        "--features",
        "guest",
        // Naming the (host) target explicitly keeps the guest's rustflags off build scripts,
        // which are host programs. No extra rustup target is involved.
        "--target",
        GUEST_TARGET,
        "--target-dir",
    ]);
    cmd.arg(&target_dir);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if SCRUBBED_VARS.contains(&k.as_ref()) || SCRUBBED_PREFIXES.iter().any(|p| k.starts_with(p))
        {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        guest_rustflags(&script).join("\x1f"),
    );
    let command = format!("{cmd:?}");
    let output = cmd.output().map_err(|source| BuildError::Spawn {
        cargo: cargo.clone(),
        source,
    })?;
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = err.lines().collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        return Err(BuildError::Cargo {
            status: output.status,
            command,
            stderr: tail,
        });
    }

    let built = target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join("kiln-testguest");
    let elf = fs::read(&built).map_err(|source| BuildError::Io {
        op: "reading",
        path: built.clone(),
        source,
    })?;
    let flat = flatten(&elf)?;
    if flat.pvh_entry.is_none() {
        return Err(BuildError::BadElf {
            reason: "no XEN_ELFNOTE_PHYS32_ENTRY note",
        });
    }
    let bz = bzimage(&flat)?;

    fs::create_dir_all(out_dir).map_err(|source| BuildError::Io {
        op: "creating",
        path: out_dir.to_path_buf(),
        source,
    })?;
    let elf_path = out_dir.join(ELF_NAME);
    let bz_path = out_dir.join(BZIMAGE_NAME);
    write(&elf_path, &elf)?;
    write(&bz_path, &bz)?;
    Ok(GuestImages {
        elf: elf_path,
        bzimage: bz_path,
        sources: guest_sources(&root)?,
    })
}

/// A QEMU microvm command line that runs the conformance guest the way Kiln's tools compare
/// against it: KVM, `-cpu host,-arch-capabilities` (this project's nested KVM needs it), COM1
/// on stdio, no reboot, `isa-debug-exit` at 0xf4 (the guest's power-off ends QEMU with
/// status 1), and virtio-mmio devices in their virtio 1.x form (QEMU's default is legacy,
/// which the guest doesn't drive). Add `-kernel`, `-append`, `-smp` and devices.
pub fn qemu_microvm(qemu: &Path, memory: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(qemu);
    cmd.args([
        "-M",
        "microvm",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        memory,
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-global",
        "virtio-mmio.force-legacy=false",
    ]);
    cmd
}
