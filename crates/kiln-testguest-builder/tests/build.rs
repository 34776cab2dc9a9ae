//! Builds the real guest and loads both images with linux-loader, as the VMM will.

use std::io::Cursor;
use std::path::PathBuf;

use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn real_guest_images_load_with_linux_loader() {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("testguest-images");
    let images = kiln_testguest_builder::build(&workspace_root(), &out).expect("guest build");
    let elf = std::fs::read(&images.elf).unwrap();
    let bz = std::fs::read(&images.bzimage).unwrap();
    let flat = kiln_testguest_builder::flatten(&elf).unwrap();
    assert!(images.sources.iter().any(|p| p.ends_with("linker.ld")));
    assert!(images.sources.iter().any(|p| p.ends_with("src/main.rs")));

    // bzImage: the protected-mode part lands at code32_start = 1 MiB; the VMM enters at +0x200.
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
    let r = BzImage::load(
        &mem,
        None,
        &mut Cursor::new(&bz),
        Some(GuestAddress(0x10_0000)),
    )
    .expect("linux-loader accepts the bzImage");
    assert_eq!(r.kernel_load, GuestAddress(0x10_0000));
    let hdr = r.setup_header.expect("setup header");
    assert_eq!({ hdr.code32_start }, 0x10_0000);
    assert_eq!({ hdr.xloadflags } & 1, 1);
    let mut entry = [0u8; 64];
    mem.read_slice(&mut entry, GuestAddress(0x10_0200)).unwrap();
    assert_eq!(&entry[..], &flat.bytes[0x200..0x240]);
    // _start64 begins with `cld` (0xfc): the bytes really are the 64-bit entry.
    assert_eq!(entry[0], 0xfc);

    // ELF: PVH entry from the note, e_entry = 0x100200.
    let mem2: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
    let r = Elf::load(
        &mem2,
        None,
        &mut Cursor::new(&elf),
        Some(GuestAddress(0x10_0000)),
    )
    .expect("linux-loader accepts the ELF");
    assert_eq!(r.kernel_load, GuestAddress(0x10_0200));
    let pvh = flat.pvh_entry.expect("PVH note");
    assert_eq!(
        r.pvh_boot_cap,
        PvhBootCapability::PvhEntryPresent(GuestAddress(u64::from(pvh)))
    );
    assert!(r.kernel_end >= flat.mem_end);
    let mut a = vec![0u8; flat.bytes.len()];
    mem2.read_slice(&mut a, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(a, flat.bytes, "ELF and bzImage load the same bytes");
}

/// The guest must not contain SSE instructions (see README "Why no SSE"). Uses objdump when
/// it is installed; skipped otherwise.
#[test]
fn real_guest_has_no_sse() {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("testguest-images-sse");
    let images = kiln_testguest_builder::build(&workspace_root(), &out).expect("guest build");
    let dis = match std::process::Command::new("objdump")
        .arg("-d")
        .arg(&images.elf)
        .output()
    {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => {
            eprintln!("objdump not available: skipping");
            return;
        }
    };
    let sse: Vec<&str> = dis.lines().filter(|l| l.contains("%xmm")).collect();
    assert!(sse.is_empty(), "SSE in the guest:\n{}", sse.join("\n"));
    assert!(dis.contains("<_start64>:"));
}
