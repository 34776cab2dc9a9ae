//! `cargo xtask linux-guest [--out DIR]`: a stock Debian cloud kernel and a busybox
//! initramfs, for checking that a real Linux reads kiln's boot structures.
//!
//! 1. `apt-get download` the package behind the `linux-image-cloud-amd64` metapackage and
//!    `busybox-static`, unpack them with `dpkg-deb -x`;
//! 2. `OUT/vmlinuz` is the package's bzImage; `OUT/vmlinux` is the uncompressed ELF (with
//!    its PVH note), cut out of the bzImage at the setup header's `payload_offset` /
//!    `payload_length` and decompressed with the matching tool (lz4, xz, zstd, gzip);
//! 3. `OUT/initramfs.cpio.gz`: busybox, the virtio modules with a `modules.dep`, and an
//!    `/init` that mounts proc/sys/devtmpfs, `modprobe`s them, prints `KILN-LINUX-INIT-OK`
//!    and powers off.
//!
//! Idempotent: downloads, unpacked packages and the kernel images are kept once there; the
//! initramfs is rebuilt every time (it is deterministic and takes a second).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::workspace_root;

/// Printed by the initramfs once user space runs.
pub const INIT_MARKER: &str = "KILN-LINUX-INIT-OK";

/// Modules `/init` asks `modprobe` for (Debian's cloud kernel builds virtio as modules:
/// `CONFIG_VIRTIO_MMIO=m`); their dependencies come along through `modules.dep`.
const MODULES: &[&str] = &["virtio_mmio", "virtio_blk", "virtio_net", "virtio_rng"];

/// Busybox applets linked into `/bin` (`/init` uses these).
const APPLETS: &[&str] = &[
    "sh", "mount", "modprobe", "insmod", "poweroff", "echo", "cat", "ls", "uname", "dmesg",
];

/// Xen ELF note type of the PVH 32-bit entry point (`XEN_ELFNOTE_PHYS32_ENTRY`).
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// What `build` produced.
pub struct Artifacts {
    /// Uncompressed ELF kernel.
    pub vmlinux: PathBuf,
    /// The package's bzImage.
    pub vmlinuz: PathBuf,
    /// gzip'd newc initramfs.
    pub initramfs: PathBuf,
    /// The bzImage's version string (`uname -r`, builder, `uname -v`).
    pub version: String,
    /// The PVH entry point from the ELF's Xen note, if it has one.
    pub pvh_entry: Option<u32>,
}

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

fn apt_update() -> Result<(), String> {
    run(Command::new("apt-get").args(["update", "-qq"])).map(|_| ())
}

/// The real image package behind the `linux-image-cloud-amd64` metapackage.
fn kernel_package() -> Result<String, String> {
    let deps = run(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]))?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_string)
        .ok_or_else(|| "apt-cache knows no linux-image-cloud-amd64".to_string())
}

fn find_deb(pkg: &str, dir: &Path) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
        })
}

fn download(pkg: &str, dir: &Path) -> Result<PathBuf, String> {
    if let Some(p) = find_deb(pkg, dir) {
        return Ok(p);
    }
    run(Command::new("apt-get")
        .arg("download")
        .arg(pkg)
        .current_dir(dir))?;
    find_deb(pkg, dir).ok_or_else(|| format!("apt-get download {pkg} left no .deb"))
}

/// Downloads and unpacks the kernel package into `root` unless it is already there.
fn unpack_kernel(out: &Path, root: &Path) -> Result<(), String> {
    if root.join("boot").is_dir() {
        return Ok(());
    }
    let deb = match kernel_package().and_then(|p| download(&p, out)) {
        Ok(deb) => deb,
        // No package lists yet (a fresh machine), or stale ones naming a version the
        // archive no longer has.
        Err(first) => {
            apt_update().map_err(|e| format!("{first}; then {e}"))?;
            download(&kernel_package()?, out)?
        }
    };
    unpack(&deb, root)
}

fn unpack_busybox(out: &Path, root: &Path) -> Result<(), String> {
    if root.join("bin/busybox").is_file() {
        return Ok(());
    }
    let deb = match download("busybox-static", out) {
        Ok(deb) => deb,
        Err(first) => {
            apt_update().map_err(|e| format!("{first}; then {e}"))?;
            download("busybox-static", out)?
        }
    };
    unpack(&deb, root)
}

/// `dpkg-deb -x` into a scratch directory renamed into place, so an interrupted run never
/// leaves a half-unpacked tree that looks finished.
fn unpack(deb: &Path, root: &Path) -> Result<(), String> {
    let tmp = root.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    let _ = fs::remove_dir_all(root);
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp))?;
    fs::rename(&tmp, root).map_err(|e| format!("{}: {e}", root.display()))
}

fn u16_at(b: &[u8], o: usize) -> Option<usize> {
    Some(usize::from(u16::from_le_bytes(
        b.get(o..o + 2)?.try_into().ok()?,
    )))
}

fn u32_at(b: &[u8], o: usize) -> Option<usize> {
    usize::try_from(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?)).ok()
}

fn u64_at(b: &[u8], o: usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?)).ok()
}

/// Checks the setup header's magic and returns the protected-mode code's file offset.
fn protected_mode_offset(bzimage: &[u8]) -> Result<usize, String> {
    if bzimage.get(0x202..0x206) != Some(b"HdrS") {
        return Err("not a bzImage (no HdrS)".into());
    }
    // setup_sects 0 means 4 (boot.rst); the boot sector itself is one more.
    let setup_sects = match bzimage.get(0x1f1) {
        Some(0) => 4,
        Some(&n) => usize::from(n),
        None => return Err("bzImage too short".into()),
    };
    Ok((setup_sects + 1) * 512)
}

/// The bzImage's `kernel_version` string (boot.rst: offset 0x20e, relative to 0x200).
fn bzimage_version(bzimage: &[u8]) -> Option<String> {
    let start = u16_at(bzimage, 0x20e)? + 0x200;
    let s = bzimage.get(start..)?;
    let end = s.iter().position(|&c| c == 0)?;
    Some(String::from_utf8_lossy(&s[..end.min(200)]).into_owned())
}

/// Cuts the compressed kernel out of a bzImage and decompresses it.
fn extract_vmlinux(bzimage: &[u8], out: &Path) -> Result<(), String> {
    let pm = protected_mode_offset(bzimage)?;
    let (off, len) = u32_at(bzimage, 0x248)
        .zip(u32_at(bzimage, 0x24c))
        .ok_or("bzImage too short")?;
    let start = pm + off;
    let payload = bzimage
        .get(start..start + len)
        .ok_or("payload outside the bzImage")?;
    let tool: &[&str] = match payload {
        [0x02, 0x21, 0x4c, 0x18, ..] => &["lz4", "-dc"],
        [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => &["xz", "-dc"],
        [0x28, 0xb5, 0x2f, 0xfd, ..] => &["zstd", "-dc"],
        [0x1f, 0x8b, ..] => &["gzip", "-dc"],
        _ => return Err("unknown kernel compression".into()),
    };
    let elf = decompress(tool, payload, &out.with_extension("payload"))?;
    if !elf.starts_with(b"\x7fELF") {
        return Err(format!("{} produced no ELF", tool[0]));
    }
    let tmp = out.with_extension("tmp");
    fs::write(&tmp, &elf).map_err(|e| format!("{}: {e}", tmp.display()))?;
    fs::rename(&tmp, out).map_err(|e| format!("{}: {e}", out.display()))
}

/// Runs `tool` on `data` (through the scratch file `scratch`) and returns its stdout.
fn decompress(tool: &[&str], data: &[u8], scratch: &Path) -> Result<Vec<u8>, String> {
    fs::write(scratch, data).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let result = Command::new(tool[0]).args(&tool[1..]).arg(scratch).output();
    let _ = fs::remove_file(scratch);
    let result = result.map_err(|e| {
        let pkg = if tool[0] == "xz" { "xz-utils" } else { tool[0] };
        format!("{} (apt-get install {pkg}): {e}", tool[0])
    })?;
    // lz4 warns about the kernel's trailing size field but decompresses everything, so
    // the caller checks the output rather than the exit status.
    if result.stdout.is_empty() {
        return Err(format!(
            "{} produced nothing: {}",
            tool[0],
            String::from_utf8_lossy(&result.stderr).trim()
        ));
    }
    Ok(result.stdout)
}

/// The PVH entry (`XEN_ELFNOTE_PHYS32_ENTRY`) from an ELF64's PT_NOTE segments.
fn pvh_entry(elf: &[u8]) -> Option<u32> {
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        return None;
    }
    let phoff = u64_at(elf, 0x20)?;
    let phentsize = u16_at(elf, 0x36)?;
    let phnum = u16_at(elf, 0x38)?;
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(elf, ph)? != 4 {
            continue; // not PT_NOTE
        }
        let (off, size) = (u64_at(elf, ph + 8)?, u64_at(elf, ph + 32)?);
        let mut o = off;
        while o + 12 <= off.checked_add(size)? {
            let (namesz, descsz, ty) = (u32_at(elf, o)?, u32_at(elf, o + 4)?, u32_at(elf, o + 8)?);
            let name = elf.get(o + 12..o + 12 + namesz)?;
            let desc_at = o + 12 + namesz.next_multiple_of(4);
            if name == b"Xen\0" && ty == XEN_ELFNOTE_PHYS32_ENTRY as usize {
                return u32_at(elf, desc_at).and_then(|v| u32::try_from(v).ok());
            }
            o = desc_at + descsz.next_multiple_of(4);
        }
    }
    None
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
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
        // rdevmajor, rdevminor, namesize, check.
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            nlink,
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

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, target.as_bytes());
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

fn init_script() -> String {
    format!(
        "#!/bin/sh\n\
         export PATH=/bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         modprobe -a {} || echo 'kiln-init: modprobe failed'\n\
         echo -n \"kiln-init: $(uname -r), modules:\"\n\
         while read m _; do echo -n \" $m\"; done < /proc/modules\n\
         echo\n\
         echo -n 'kiln-init: virtio devices:'\n\
         for d in /sys/bus/virtio/devices/*; do [ -e \"$d\" ] && echo -n \" ${{d##*/}}\"; done\n\
         echo\n\
         echo {INIT_MARKER}\n\
         poweroff -f\n",
        MODULES.join(" ")
    )
}

/// `depends=` from a module's `.modinfo` strings (comma-separated module names).
fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    ko.windows(key.len() + 1)
        .position(|w| w[0] == 0 && &w[1..] == key)
        .map(|i| &ko[i + 1 + key.len()..])
        .and_then(|rest| rest.split(|&c| c == 0).next())
        .map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// `foo-bar.ko.xz` → `foo_bar` (module names use `_`; file names may use `-`).
fn module_name(file: &str) -> Option<String> {
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

/// Every module file under `dir`, as (name, path).
fn index_modules(dir: &Path, found: &mut Vec<(String, PathBuf)>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            index_modules(&p, found);
        } else if let Some(n) = p.file_name().and_then(|n| n.to_str()).and_then(module_name) {
            found.push((n, p));
        }
    }
}

/// A module bound for the initramfs: its path under `lib/modules/<ver>` (always `.ko`,
/// decompressed if the package compresses modules), contents and dependencies.
struct Module {
    rel: String,
    data: Vec<u8>,
    deps: Vec<String>,
}

/// `wanted` and everything it depends on, each after its dependencies.
fn module_closure(modroot: &Path, wanted: &[&str]) -> Result<Vec<(String, Module)>, String> {
    let mut index = Vec::new();
    index_modules(&modroot.join("kernel"), &mut index);
    fn visit(
        name: &str,
        modroot: &Path,
        index: &[(String, PathBuf)],
        done: &mut Vec<(String, Module)>,
        depth: usize,
    ) -> Result<(), String> {
        if done.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        if depth > 32 {
            return Err(format!("module dependency loop at {name}"));
        }
        let path = &index
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| format!("module {name} not in the kernel package"))?
            .1;
        let raw = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let tool: Option<&[&str]> = match path.extension().and_then(|e| e.to_str()) {
            Some("xz") => Some(&["xz", "-dc"]),
            Some("zst") => Some(&["zstd", "-dc"]),
            Some("gz") => Some(&["gzip", "-dc"]),
            _ => None,
        };
        let data = match tool {
            Some(t) => decompress(t, &raw, &std::env::temp_dir().join(format!("{name}.kmod")))?,
            None => raw,
        };
        let rel = path
            .strip_prefix(modroot)
            .map_err(|_| format!("{} outside {}", path.display(), modroot.display()))?
            .to_string_lossy()
            .into_owned();
        let rel = match rel.find(".ko") {
            Some(i) => format!("{}.ko", &rel[..i]),
            None => rel,
        };
        let deps = module_depends(&data);
        for d in &deps {
            visit(d, modroot, index, done, depth + 1)?;
        }
        done.push((name.to_string(), Module { rel, data, deps }));
        Ok(())
    }
    let mut done = Vec::new();
    for w in wanted {
        visit(w, modroot, &index, &mut done, 0)?;
    }
    Ok(done)
}

/// `modules.dep` as depmod writes it: each module's full dependency list in reverse load
/// order (modprobe loads the list back to front). `mods` is in load order already.
fn modules_dep(mods: &[(String, Module)]) -> String {
    let mut s = String::new();
    for (i, (_, m)) in mods.iter().enumerate() {
        // Transitive dependencies, as indices into `mods`.
        let mut all: Vec<usize> = Vec::new();
        let mut stack: Vec<&String> = m.deps.iter().collect();
        while let Some(d) = stack.pop() {
            if let Some(j) = mods.iter().position(|(n, _)| n == d) {
                if !all.contains(&j) {
                    all.push(j);
                    stack.extend(mods[j].1.deps.iter());
                }
            }
        }
        all.sort_unstable_by(|a, b| b.cmp(a));
        let list: Vec<&str> = all
            .iter()
            .filter(|&&j| j != i)
            .map(|&j| mods[j].1.rel.as_str())
            .collect();
        s.push_str(&format!("{}: {}\n", m.rel, list.join(" ")));
    }
    s
}

fn build_initramfs(kernel_root: &Path, busybox: &[u8], out: &Path) -> Result<(), String> {
    let modules_dir = kernel_root.join("lib/modules");
    let version = fs::read_dir(&modules_dir)
        .map_err(|e| format!("{}: {e}", modules_dir.display()))?
        .flatten()
        .find_map(|e| e.file_name().into_string().ok())
        .ok_or("no lib/modules/<version> in the kernel package")?;
    let modroot = modules_dir.join(&version);
    let mods = module_closure(&modroot, MODULES)?;
    let mut c = Cpio::new();
    for d in ["bin", "dev", "proc", "sys", "lib", "lib/modules"] {
        c.dir(d);
    }
    c.entry("bin/busybox", 0o100755, busybox);
    for a in APPLETS {
        c.symlink(&format!("bin/{a}"), "busybox");
    }
    c.entry("init", 0o100755, init_script().as_bytes());
    // Every directory on the way to every module, parents first.
    let base = format!("lib/modules/{version}");
    let mut dirs = vec![base.clone()];
    for (_, m) in &mods {
        let mut acc = base.clone();
        for part in Path::new(&m.rel)
            .parent()
            .into_iter()
            .flat_map(|p| p.iter())
        {
            acc = format!("{acc}/{}", part.to_string_lossy());
            if !dirs.contains(&acc) {
                dirs.push(acc.clone());
            }
        }
    }
    for d in &dirs {
        c.dir(d);
    }
    for (_, m) in &mods {
        c.entry(&format!("{base}/{}", m.rel), 0o100644, &m.data);
    }
    c.entry(
        &format!("{base}/modules.dep"),
        0o100644,
        modules_dep(&mods).as_bytes(),
    );
    let cpio = out.with_extension("");
    fs::write(&cpio, c.finish()).map_err(|e| format!("{}: {e}", cpio.display()))?;
    run(Command::new("gzip").args(["-9", "-n", "-f"]).arg(&cpio))
        .map(|_| ())
        .map_err(|e| format!("gzip: {e}"))
}

/// Builds the artifacts into `out` (default `target/linux-guest`).
pub fn build(out: &Path) -> Result<Artifacts, String> {
    fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let vmlinux = out.join("vmlinux");
    let vmlinuz = out.join("vmlinuz");
    let initramfs = out.join("initramfs.cpio.gz");
    let kroot = out.join("kernel-pkg");
    let broot = out.join("busybox-pkg");
    unpack_kernel(out, &kroot)?;
    unpack_busybox(out, &broot)?;
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
    if !vmlinux.exists() {
        extract_vmlinux(&bzimage, &vmlinux)?;
    }
    if fs::read(&vmlinuz).ok().as_deref() != Some(&bzimage[..]) {
        fs::write(&vmlinuz, &bzimage).map_err(|e| format!("{}: {e}", vmlinuz.display()))?;
    }
    let elf = fs::read(&vmlinux).map_err(|e| format!("{}: {e}", vmlinux.display()))?;
    if !elf.starts_with(b"\x7fELF") {
        return Err(format!("{} is not an ELF", vmlinux.display()));
    }
    let busybox = fs::read(broot.join("bin/busybox")).map_err(|e| format!("busybox: {e}"))?;
    build_initramfs(&kroot, &busybox, &initramfs)?;
    Ok(Artifacts {
        vmlinux,
        vmlinuz,
        initramfs,
        version: bzimage_version(&bzimage).unwrap_or_else(|| "unknown".into()),
        pvh_entry: pvh_entry(&elf),
    })
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
    let a = build(&out)?;
    println!("kernel: {}", a.version);
    match a.pvh_entry {
        Some(e) => println!("vmlinux: {} (PVH entry {e:#x})", a.vmlinux.display()),
        None => println!("vmlinux: {} (no PVH note)", a.vmlinux.display()),
    }
    println!("vmlinuz: {}", a.vmlinuz.display());
    println!("initramfs: {}", a.initramfs.display());
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
        // filesize field (8th) is 10.
        assert_eq!(&b[54..62], b"0000000a");
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
        // A payload running past the end of the file is refused, not sliced.
        fake[0x24c..0x250].copy_from_slice(&0x10000u32.to_le_bytes());
        assert_eq!(
            extract_vmlinux(&fake, &dir.join("v")).unwrap_err(),
            "payload outside the bzImage"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn payload_offset_counts_from_the_protected_mode_code() {
        let mut fake = vec![0u8; 8192];
        fake[0x202..0x206].copy_from_slice(b"HdrS");
        fake[0x1f1] = 0; // means 4
        assert_eq!(protected_mode_offset(&fake), Ok(5 * 512));
        fake[0x1f1] = 27;
        assert_eq!(protected_mode_offset(&fake), Ok(28 * 512));
        fake[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        fake[0x300..0x306].copy_from_slice(b"6.1.0\0");
        assert_eq!(bzimage_version(&fake).as_deref(), Some("6.1.0"));
    }

    fn elf_with_notes(notes: &[(&[u8], u32, &[u8])]) -> Vec<u8> {
        let mut n = Vec::new();
        for (name, ty, desc) in notes {
            n.extend_from_slice(&(name.len() as u32).to_le_bytes());
            n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            n.extend_from_slice(&ty.to_le_bytes());
            n.extend_from_slice(name);
            n.resize(n.len().next_multiple_of(4), 0);
            n.extend_from_slice(desc);
            n.resize(n.len().next_multiple_of(4), 0);
        }
        let mut e = vec![0u8; 0x40 + 56];
        e[..6].copy_from_slice(b"\x7fELF\x02\x01");
        e[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        e[0x40..0x44].copy_from_slice(&4u32.to_le_bytes());
        e[0x48..0x50].copy_from_slice(&(0x78u64).to_le_bytes());
        e[0x60..0x68].copy_from_slice(&(n.len() as u64).to_le_bytes());
        e.extend_from_slice(&n);
        e
    }

    #[test]
    fn finds_the_pvh_note_among_others() {
        let elf = elf_with_notes(&[
            (b"Xen\0", 6, b"linux\0"),
            (b"GNU\0", 3, &[1, 2, 3, 4, 5]),
            (b"Xen\0", 18, &0x0100_0850u32.to_le_bytes()),
        ]);
        assert_eq!(pvh_entry(&elf), Some(0x0100_0850));
        let none = elf_with_notes(&[(b"Xen\0", 6, b"linux\0")]);
        assert_eq!(pvh_entry(&none), None);
        // A note segment claiming more than the file holds ends the search.
        let mut bad = elf.clone();
        bad[0x60..0x68].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(pvh_entry(&bad[..0x90]), None);
        assert_eq!(pvh_entry(b"\x7fELF\x01\x01"), None);
    }

    #[test]
    fn modinfo_depends_and_names() {
        let ko = b"\x7fELF...\0license=GPL\0depends=virtio,virtio_ring\0name=virtio_mmio\0";
        assert_eq!(module_depends(ko), ["virtio", "virtio_ring"]);
        assert!(module_depends(b"\0depends=\0name=virtio\0").is_empty());
        assert_eq!(module_name("virtio-rng.ko").as_deref(), Some("virtio_rng"));
        assert_eq!(
            module_name("virtio_blk.ko.xz").as_deref(),
            Some("virtio_blk")
        );
        assert_eq!(module_name("modules.dep"), None);
    }

    #[test]
    fn modules_dep_lists_every_dependency_deepest_last() {
        let m = |rel: &str, deps: &[&str]| Module {
            rel: rel.into(),
            data: Vec::new(),
            deps: deps.iter().map(|s| s.to_string()).collect(),
        };
        let mods = vec![
            (
                "failover".to_string(),
                m("kernel/net/core/failover.ko", &[]),
            ),
            (
                "net_failover".to_string(),
                m("kernel/drivers/net/net_failover.ko", &["failover"]),
            ),
            ("virtio_ring".to_string(), m("kernel/virtio_ring.ko", &[])),
            (
                "virtio".to_string(),
                m("kernel/virtio.ko", &["virtio_ring"]),
            ),
            (
                "virtio_net".to_string(),
                m(
                    "kernel/drivers/net/virtio_net.ko",
                    &["net_failover", "virtio_ring", "virtio"],
                ),
            ),
        ];
        let dep = modules_dep(&mods);
        assert!(dep.contains("kernel/net/core/failover.ko: \n"));
        assert!(dep.contains(
            "kernel/drivers/net/virtio_net.ko: kernel/virtio.ko kernel/virtio_ring.ko \
             kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko\n"
        ));
    }
}
