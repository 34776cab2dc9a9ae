//! The tap backend of virtio-net: a Linux tap interface opened through `/dev/net/tun` with
//! a 12-byte virtio-net header in front of every frame (`IFF_VNET_HDR`), nonblocking.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{NetBackend, HDR_LEN};
use crate::Error;

/// Longest interface name the kernel takes (`IFNAMSIZ` minus the NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// `TUN_F_*` offload bits the device may ask for in [`NetBackend::set_offload`].
pub mod offload {
    /// The host may hand over frames with a partial checksum (`NEEDS_CSUM`).
    pub const CSUM: u32 = libc::TUN_F_CSUM;
    /// TCP segmentation offload over IPv4.
    pub const TSO4: u32 = libc::TUN_F_TSO4;
    /// TCP segmentation offload over IPv6.
    pub const TSO6: u32 = libc::TUN_F_TSO6;
    /// TSO with ECN.
    pub const TSO_ECN: u32 = libc::TUN_F_TSO_ECN;
}

/// An open tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (a union in C, padded to
/// 24 bytes).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Opens the tap `name`, creating it if it doesn't exist (which needs `CAP_NET_ADMIN`),
    /// with a 12-byte virtio-net header and no offloads yet; the fd is nonblocking and
    /// close-on-exec.
    pub fn open(name: &str) -> crate::Result<Self> {
        let err = |what: &'static str, source: io::Error| Error::Tap {
            name: name.to_string(),
            what,
            source,
        };
        if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains(['/', '\0', ' ']) {
            return Err(err(
                "invalid interface name",
                io::Error::from(io::ErrorKind::InvalidInput),
            ));
        }
        let file = File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| err("opening /dev/net/tun", e))?;
        let fd = file.as_raw_fd();
        let mut features: libc::c_uint = 0;
        // SAFETY: TUNGETFEATURES writes one unsigned int to the pointer, which is valid.
        if unsafe { libc::ioctl(fd, libc::TUNGETFEATURES, &mut features) } < 0 {
            return Err(err("TUNGETFEATURES", io::Error::last_os_error()));
        }
        if features & libc::IFF_VNET_HDR as libc::c_uint == 0 {
            return Err(err(
                "the kernel's tun driver lacks IFF_VNET_HDR",
                io::Error::from(io::ErrorKind::Unsupported),
            ));
        }
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and may update the name of) one `struct ifreq`; `req` has
        // its layout and size (40 bytes) and lives across the call.
        if unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            let what = if e.raw_os_error() == Some(libc::EPERM) {
                "attaching (TUNSETIFF): the tap doesn't exist or isn't ours, and creating it \
                 needs CAP_NET_ADMIN"
            } else {
                "attaching (TUNSETIFF)"
            };
            return Err(err(what, e));
        }
        let hdr_len = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which is valid.
        if unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(err("TUNSETVNETHDRSZ", io::Error::last_os_error()));
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        tap.offload(0).map_err(|e| err("TUNSETOFFLOAD", e))?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl NetBackend for Tap {
    unsafe fn readv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller guarantees the iovecs are valid writable memory; the count fits
        // an int (callers cap it at IOV_MAX).
        let n = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    unsafe fn writev(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: as for readv, readable memory.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn supports_offloads(&self) -> bool {
        true
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.offload(flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_a_tap_in_a_private_netns() {
        // A thread of its own in a new network namespace: the tap (not persistent) goes away
        // with its fd, and the host's namespace never sees it.
        let r = std::thread::spawn(|| {
            // SAFETY: unshare takes no pointers; CLONE_NEWNET affects only this thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!("unshare: {}", io::Error::last_os_error()));
            }
            let mut tap = Tap::open("kt-unit").map_err(|e| e.to_string())?;
            assert_eq!(tap.name(), "kt-unit");
            tap.set_offload(offload::CSUM | offload::TSO4 | offload::TSO6)
                .map_err(|e| format!("TUNSETOFFLOAD: {e}"))?;
            let mut buf = [0u8; 64];
            let iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }];
            // SAFETY: the iovec points at `buf`, alive for the call.
            let e = unsafe { tap.readv(&iov) }.expect_err("no frame yet");
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "nonblocking");
            Ok(())
        })
        .join()
        .expect("tap thread");
        if let Err(e) = r {
            if std::env::var_os("KILN_SKIP_KVM").is_some_and(|v| v == "1") {
                eprintln!("SKIPPED creates_a_tap_in_a_private_netns: {e}");
                return;
            }
            panic!("{e} (needs root and /dev/net/tun; KILN_SKIP_KVM=1 skips)");
        }
    }

    #[test]
    fn rejects_bad_names_before_any_syscall() {
        for n in ["", "a/b", "0123456789abcdefXX", "a b"] {
            let e = Tap::open(n).unwrap_err().to_string();
            assert!(e.contains("invalid interface name"), "{n}: {e}");
        }
    }
}
