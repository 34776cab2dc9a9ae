//! `cargo xtask linux-guest [--out DIR]`: a stock Debian cloud kernel and a busybox
//! initramfs, for checking that a real Linux reads kiln's boot structures.
//!
//! 1. `apt-get download` the package behind `linux-image-cloud-amd64` and `busybox-static`,
//!    unpack them with `dpkg-deb -x`;
//! 2. `OUT/vmlinuz` is the package's bzImage; `OUT/vmlinux` is the uncompressed ELF (with
//!    its PVH note), cut out of the bzImage at the setup header's `payload_offset` /
//!    `payload_length` and decompressed with the matching tool (lz4, xz, zstd, gzip);
//! 3. `OUT/initramfs.cpio.gz`: busybox, the virtio modules, and an `/init` that loads them,
//!    prints `KILN-LINUX-INIT-OK` and powers off.
//!
//! Idempotent: finished artifacts are kept.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::workspace_root;

/// Printed by the initramfs once user space runs.
pub const INIT_MARKER: &str = "KILN-LINUX-INIT-OK";

/// Modules `/init` loads, in dependency order (paths under `lib/modules/<version>/kernel`).
const MODULES: &[&str] = &[
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio_mmio.ko",
    "drivers/block/virtio_blk.ko",
    "drivers/char/hw_random/virtio-rng.ko",
];

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The real image package behind the `linux-image-cloud-amd64` metapackage.
fn kernel_package() -> Result<String, String> {
    let find = || -> Result<Option<String>, String> {
        let deps = run(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]))?;
        Ok(deps
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with("linux-image-"))
            .map(str::to_string))
    };
    if let Ok(Some(p)) = find() {
        return Ok(p);
    }
    // A fresh machine has no package lists yet.
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    find()?.ok_or_else(|| "apt-cache knows no linux-image-cloud-amd64".to_string())
}

fn download(pkg: &str, dir: &Path) -> Result<PathBuf, String> {
    let existing = |dir: &Path| -> Option<PathBuf> {
        fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
            })
    };
    if let Some(p) = existing(dir) {
        return Ok(p);
    }
    run(Command::new("apt-get")
        .arg("download")
        .arg(pkg)
        .current_dir(dir))?;
    existing(dir).ok_or_else(|| format!("apt-get download {pkg} left no .deb"))
}

/// Cuts the compressed kernel out of a bzImage and decompresses it.
fn extract_vmlinux(bzimage: &[u8], out: &Path) -> Result<(), String> {
    let u32_at = |o: usize| -> Result<usize, String> {
        bzimage
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| "bzImage too short".to_string())
    };
    let setup_sects = match bzimage.get(0x1f1) {
        Some(0) => 4,
        Some(&n) => usize::from(n),
        None => return Err("bzImage too short".into()),
    };
    if bzimage.get(0x202..0x206) != Some(b"HdrS") {
        return Err("not a bzImage (no HdrS)".into());
    }
    let start = (setup_sects + 1) * 512 + u32_at(0x248)?;
    let payload = bzimage
        .get(start..start + u32_at(0x24c)?)
        .ok_or("payload outside the bzImage")?;
    let tool: &[&str] = match payload {
        [0x02, 0x21, 0x4c, 0x18, ..] => &["lz4", "-dc"],
        [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => &["xz", "-dc"],
        [0x28, 0xb5, 0x2f, 0xfd, ..] => &["zstd", "-dc"],
        [0x1f, 0x8b, ..] => &["gzip", "-dc"],
        _ => return Err("unknown kernel compression".into()),
    };
    let packed = out.with_extension("payload");
    fs::write(&packed, payload).map_err(|e| format!("{}: {e}", packed.display()))?;
    let result = Command::new(tool[0])
        .args(&tool[1..])
        .arg(&packed)
        .output()
        .map_err(|e| format!("{} (install it: apt-get install {}): {e}", tool[0], tool[0]))?;
    let _ = fs::remove_file(&packed);
    // lz4 warns about the kernel's trailing size field but decompresses everything.
    if !result.stdout.starts_with(b"\x7fELF") {
        return Err(format!(
            "{} produced no ELF: {}",
            tool[0],
            String::from_utf8_lossy(&result.stderr)
        ));
    }
    fs::write(out, &result.stdout).map_err(|e| format!("{}: {e}", out.display()))
}

/// A newc cpio archive, written by hand (the format is 110-byte ASCII headers).
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn new() -> Self {
        Cpio {
            buf: Vec::new(),
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.ino += 1;
        self.buf.extend_from_slice(header.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.buf
    }
}

fn init_script(version: &str) -> String {
    let mut s = String::from(
        "#!/bin/sh\n\
         /bin/busybox mount -t proc proc /proc\n\
         /bin/busybox mount -t sysfs sys /sys\n\
         /bin/busybox mount -t devtmpfs dev /dev\n",
    );
    for m in MODULES {
        s.push_str(&format!(
            "/bin/busybox insmod /lib/modules/{version}/kernel/{m} 2>/dev/null\n"
        ));
    }
    s.push_str(&format!(
        "echo {INIT_MARKER}\n/bin/busybox ls /sys/bus/virtio/devices\n/bin/busybox poweroff -f\n"
    ));
    s
}

fn build_initramfs(kernel_root: &Path, busybox: &[u8], out: &Path) -> Result<(), String> {
    let modules_dir = kernel_root.join("lib/modules");
    let version = fs::read_dir(&modules_dir)
        .map_err(|e| format!("{}: {e}", modules_dir.display()))?
        .flatten()
        .find_map(|e| e.file_name().into_string().ok())
        .ok_or("no lib/modules/<version> in the kernel package")?;
    let mut c = Cpio::new();
    for d in ["bin", "dev", "proc", "sys", "lib", "lib/modules"] {
        c.entry(d, 0o040755, &[]);
    }
    c.entry("bin/busybox", 0o100755, busybox);
    c.entry("bin/sh", 0o120777, b"busybox");
    c.entry("init", 0o100755, init_script(&version).as_bytes());
    let mut files = Vec::new();
    for m in MODULES {
        let rel = format!("lib/modules/{version}/kernel/{m}");
        let data = fs::read(kernel_root.join(&rel)).map_err(|e| format!("{rel}: {e}"))?;
        files.push((rel, data));
    }
    // Every parent directory of every module, shortest first.
    let mut all_dirs: Vec<String> = Vec::new();
    for (rel, _) in &files {
        let mut acc = String::new();
        for part in Path::new(rel).parent().into_iter().flat_map(|p| p.iter()) {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(&part.to_string_lossy());
            if acc != "lib" && acc != "lib/modules" && !all_dirs.contains(&acc) {
                all_dirs.push(acc.clone());
            }
        }
    }
    for d in all_dirs {
        c.entry(&d, 0o040755, &[]);
    }
    for (rel, data) in &files {
        c.entry(rel, 0o100644, data);
    }
    let cpio = out.with_extension("");
    fs::write(&cpio, c.finish()).map_err(|e| format!("{}: {e}", cpio.display()))?;
    let gz = run(Command::new("gzip").args(["-9", "-n", "-f"]).arg(&cpio))
        .map_err(|e| format!("gzip: {e}"));
    gz.map(|_| ())
}

/// Builds the artifacts into `out` (default `target/linux-guest`); returns (vmlinux,
/// vmlinuz, initramfs).
pub fn build(out: &Path) -> Result<(PathBuf, PathBuf, PathBuf), String> {
    fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let vmlinux = out.join("vmlinux");
    let vmlinuz = out.join("vmlinuz");
    let initramfs = out.join("initramfs.cpio.gz");
    if vmlinux.exists() && vmlinuz.exists() && initramfs.exists() {
        return Ok((vmlinux, vmlinuz, initramfs));
    }
    let pkg = kernel_package()?;
    let kdeb = download(&pkg, out)?;
    let bdeb = download("busybox-static", out)?;
    let kroot = out.join("kernel-pkg");
    let broot = out.join("busybox-pkg");
    for (deb, root) in [(&kdeb, &kroot), (&bdeb, &broot)] {
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root))?;
    }
    let boot = kroot.join("boot");
    let bz = fs::read_dir(&boot)
        .map_err(|e| format!("{}: {e}", boot.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .ok_or("no boot/vmlinuz-* in the kernel package")?;
    let bzimage = fs::read(&bz).map_err(|e| format!("{}: {e}", bz.display()))?;
    extract_vmlinux(&bzimage, &vmlinux)?;
    fs::write(&vmlinuz, &bzimage).map_err(|e| format!("{}: {e}", vmlinuz.display()))?;
    let busybox = fs::read(broot.join("bin/busybox")).map_err(|e| format!("busybox: {e}"))?;
    build_initramfs(&kroot, &busybox, &initramfs)?;
    println!("kernel package: {pkg}");
    Ok((vmlinux, vmlinuz, initramfs))
}

pub fn run_task(args: &[String]) -> Result<(), String> {
    let mut out = workspace_root().join("target/linux-guest");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = PathBuf::from(it.next().ok_or("--out needs a directory")?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let (vmlinux, vmlinuz, initramfs) = build(&out)?;
    for p in [vmlinux, vmlinuz, initramfs] {
        println!("{}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut c = Cpio::new();
        c.entry("init", 0o100755, b"#!/bin/sh\n");
        let b = c.finish();
        assert!(b.starts_with(b"070701"));
        assert_eq!(b.len() % 4, 0);
        assert!(b.windows(10).any(|w| w == b"TRAILER!!!"));
        // Header: 110 bytes, then "init\0" padded to 4, then the data.
        assert_eq!(&b[110..115], b"init\0");
        assert_eq!(&b[116..126], b"#!/bin/sh\n");
    }

    #[test]
    fn payload_detection_rejects_non_bzimages() {
        let dir = std::env::temp_dir().join(format!("xtask-lg-{}", std::process::id()));
        let _ = fs::create_dir_all(&dir);
        assert!(extract_vmlinux(&[0u8; 4096], &dir.join("v")).is_err());
        let mut fake = vec![0u8; 4096];
        fake[0x202..0x206].copy_from_slice(b"HdrS");
        fake[0x1f1] = 1;
        fake[0x248..0x24c].copy_from_slice(&0u32.to_le_bytes());
        fake[0x24c..0x250].copy_from_slice(&16u32.to_le_bytes());
        assert_eq!(
            extract_vmlinux(&fake, &dir.join("v")).unwrap_err(),
            "unknown kernel compression"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
