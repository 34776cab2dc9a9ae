//! The bundled conformance guest (crates/kiln-testguest), built by `build.rs` and embedded so
//! `kiln` with no `--kernel` boots something that checks the VM.

/// The guest as an ELF with both a Linux 64-bit entry and a PVH note.
pub static ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kiln-testguest.elf"));

/// The same guest in bzImage format.
pub static BZIMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kiln-testguest.bzImage"));
