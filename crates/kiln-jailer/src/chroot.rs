//! The jail's files: `<base>/<exec name>/<id>/root`, the copied VMM, and the device nodes.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::sys::{cstr, cvt};
use crate::undo::Undo;
use crate::{Error, Result};

/// A device node the jail gets, with the host's numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Path under `/dev`, e.g. `net/tun`.
    pub name: &'static str,
    /// The host's `st_rdev`.
    pub rdev: u64,
}

/// The devices a VMM needs, and whether the jail can do without one the host lacks.
pub const DEVICES: [(&str, bool); 4] = [
    ("kvm", true),
    ("net/tun", true),
    ("urandom", true),
    ("userfaultfd", false),
];

/// Looks up [`DEVICES`] on the host (`/dev/<name>`).
pub fn host_devices() -> Result<Vec<Device>> {
    host_devices_in(Path::new("/dev"))
}

/// [`host_devices`] with another `/dev` (for tests).
pub fn host_devices_in(dev: &Path) -> Result<Vec<Device>> {
    let mut out = Vec::new();
    for (name, required) in DEVICES {
        let path = dev.join(name);
        match std::fs::metadata(&path) {
            Ok(m) if m.file_type().is_char_device() => out.push(Device {
                name,
                rdev: m.rdev(),
            }),
            Ok(_) => {
                return Err(Error::Io {
                    what: "the VMM needs the character device",
                    path,
                    source: io::Error::new(io::ErrorKind::InvalidInput, "not a character device"),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && !required => {}
            Err(e) => {
                return Err(Error::Io {
                    what: "the VMM needs the host device",
                    path,
                    source: e,
                })
            }
        }
    }
    Ok(out)
}

/// Checks `--exec-file`: a regular, executable, 64-bit little-endian ELF file. Returns its
/// program interpreter (`PT_INTERP`) when it is dynamically linked.
pub fn check_exec_file(path: &Path) -> Result<Option<PathBuf>> {
    let flag = || format!("--exec-file {}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| Error::flag(flag(), e.to_string()))?;
    if !meta.is_file() {
        return Err(Error::flag(flag(), "not a regular file"));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(Error::flag(flag(), "not executable"));
    }
    let mut f = File::open(path).map_err(|e| Error::flag(flag(), e.to_string()))?;
    elf_interpreter(&mut f).map_err(|why| Error::flag(flag(), why))
}

/// The `PT_INTERP` of a 64-bit little-endian ELF executable, or why it isn't one.
pub fn elf_interpreter<R: Read + Seek>(f: &mut R) -> std::result::Result<Option<PathBuf>, String> {
    let mut h = [0u8; 64];
    f.read_exact(&mut h)
        .map_err(|_| "not an ELF executable (too short)".to_string())?;
    if h[..4] != *b"\x7fELF" {
        return Err(
            "not an ELF executable (a script needs an interpreter the jail doesn't have)".into(),
        );
    }
    if h[4] != 2 || h[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a)
    };
    if !matches!(u16_at(16), 2 | 3) {
        return Err("an ELF file, but not an executable".into());
    }
    let phoff = u64_at(&h, 32);
    let phentsize = u64::from(u16_at(54));
    let phnum = u64::from(u16_at(56));
    if phentsize < 56 {
        return Err("malformed ELF program headers".into());
    }
    let io = |e: io::Error| format!("reading the ELF program headers: {e}");
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        f.seek(SeekFrom::Start(phoff + i * phentsize)).map_err(io)?;
        f.read_exact(&mut ph).map_err(io)?;
        const PT_INTERP: u32 = 3;
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_INTERP {
            let (off, size) = (u64_at(&ph, 8), u64_at(&ph, 32));
            if size == 0 || size > 4096 {
                return Err("malformed PT_INTERP".into());
            }
            let mut buf = vec![0u8; usize::try_from(size).map_err(|_| "malformed PT_INTERP")?];
            f.seek(SeekFrom::Start(off)).map_err(io)?;
            f.read_exact(&mut buf).map_err(io)?;
            let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
            let s = String::from_utf8_lossy(&buf[..end]).into_owned();
            return Ok(Some(PathBuf::from(s)));
        }
    }
    Ok(None)
}

/// Builds the jail's files on the host: the directories down to `chroot` (logging the ones it
/// creates), the copy of `exec_file` as `<chroot>/<exec_name>`, and the device nodes, owned
/// by `uid:gid`, as is the jail's root (so the VMM can create its files there).
pub fn build(
    chroot: &Path,
    exec_file: &Path,
    exec_name: &str,
    devices: &[Device],
    (uid, gid): (u32, u32),
    undo: &mut Undo,
) -> Result<()> {
    mkdirs(chroot, undo)?;
    let target = chroot.join(exec_name);
    let copy = |p: &Path| -> io::Result<()> {
        // A copy, not a link: the jailed process must not share an inode with the host's
        // binary (it could otherwise be written through, or its mode changed).
        std::fs::copy(exec_file, p)?;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))
    };
    let io_err = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { what, path, source }
    };
    if target.exists() {
        // Firecracker overwrites a copy left by an earlier run with the same id.
        copy(&target).map_err(io_err("copying --exec-file to", &target))?;
    } else {
        undo.create_file(&target, copy)
            .map_err(io_err("copying --exec-file to", &target))?;
    }
    for d in devices {
        let path = chroot.join("dev").join(d.name);
        if let Some(parent) = path.parent() {
            mkdirs(parent, undo)?;
        }
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_char_device() && m.rdev() == d.rdev => {}
            Ok(_) => {
                return Err(Error::Io {
                    what: "creating the device node",
                    path,
                    source: io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "something else is already there",
                    ),
                })
            }
            Err(_) => undo
                .create_file(&path, |p| mknod(p, d.rdev))
                .map_err(io_err("creating the device node", &path))?,
        }
        std::os::unix::fs::chown(&path, Some(uid), Some(gid))
            .map_err(io_err("changing the owner of", &path))?;
    }
    std::os::unix::fs::chown(chroot, Some(uid), Some(gid))
        .map_err(io_err("changing the owner of", chroot))
}

/// Creates `path` and its missing ancestors, logging each one it creates.
fn mkdirs(path: &Path, undo: &mut Undo) -> Result<()> {
    let mut missing = Vec::new();
    let mut p = path;
    while std::fs::symlink_metadata(p).is_err() {
        missing.push(p);
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    for dir in missing.into_iter().rev() {
        undo.create_dir(dir, 0o755).map_err(|e| Error::Io {
            what: "creating the directory",
            path: dir.to_path_buf(),
            source: e,
        })?;
    }
    if !path.is_dir() {
        return Err(Error::Io {
            what: "creating the directory",
            path: path.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a directory",
            ),
        });
    }
    Ok(())
}

/// A character device node readable and writable by its owner only.
fn mknod(path: &Path, rdev: u64) -> io::Result<()> {
    let c = cstr(path)?;
    // SAFETY: `c` is a valid C string; mknod only reads it.
    cvt(unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, rdev) }).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A minimal ELF64 header with `phnum` program headers, the first a PT_INTERP if `interp`.
    fn elf(interp: Option<&str>) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[16] = 3; // ET_DYN
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ptype: u32 = if interp.is_some() { 3 } else { 1 };
        b[64..68].copy_from_slice(&ptype.to_le_bytes());
        if let Some(i) = interp {
            let off = b.len() as u64;
            b[64 + 8..64 + 16].copy_from_slice(&off.to_le_bytes());
            b[64 + 32..64 + 40].copy_from_slice(&(i.len() as u64 + 1).to_le_bytes());
            b.extend_from_slice(i.as_bytes());
            b.push(0);
        }
        b
    }

    #[test]
    fn interpreters() {
        assert_eq!(elf_interpreter(&mut Cursor::new(elf(None))), Ok(None));
        assert_eq!(
            elf_interpreter(&mut Cursor::new(elf(Some("/lib64/ld-linux-x86-64.so.2")))),
            Ok(Some(PathBuf::from("/lib64/ld-linux-x86-64.so.2")))
        );
        let e = elf_interpreter(&mut Cursor::new(b"#!/bin/sh\necho hi\n".to_vec()))
            .expect_err("script");
        assert!(e.contains("not an ELF"), "{e}");
        let mut b32 = elf(None);
        b32[4] = 1;
        assert!(elf_interpreter(&mut Cursor::new(b32)).is_err());
    }

    #[test]
    fn this_test_binary_is_an_elf() {
        let exe = std::env::current_exe().expect("exe");
        // Dynamically linked or static-pie: either way it parses.
        check_exec_file(&exe).expect("an ELF executable");
        let e = check_exec_file(Path::new("/nonexistent/kiln")).expect_err("missing");
        assert!(
            e.to_string().starts_with("--exec-file /nonexistent/kiln:"),
            "{e}"
        );
    }

    #[test]
    fn optional_devices_may_be_missing() {
        let d = std::env::temp_dir().join(format!("kiln-jailer-dev-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        let e = host_devices_in(&d).expect_err("no kvm").to_string();
        assert!(e.contains("kvm"), "{e}");
        std::fs::remove_dir_all(&d).expect("cleanup");
    }
}
