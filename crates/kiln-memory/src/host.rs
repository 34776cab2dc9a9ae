//! The host side of guest RAM: what sysfs says about hugepage pools, transparent hugepages
//! and NUMA nodes, and the system calls that apply a [`MemoryPolicy`] to a mapping.
//!
//! The sysfs readers take the sysfs root as a parameter so tests can point them at a fake
//! tree.

use std::io;
use std::path::Path;

use crate::{Error, HugePageSize, MemoryPolicy, Result};

/// Where sysfs is mounted.
pub(crate) const SYSFS: &str = "/sys";

fn read_trimmed(path: &Path) -> io::Result<String> {
    std::fs::read_to_string(path).map(|s| s.trim().to_string())
}

fn read_count(path: &Path) -> Result<u64> {
    let text = read_trimmed(path).map_err(|e| Error::HostQuery(io_context(path, e)))?;
    text.parse().map_err(|_| {
        Error::HostQuery(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: expected a number, found {text:?}", path.display()),
        ))
    })
}

fn io_context(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Fails unless the pool of `page_size` pages can supply `needed` more pages.
///
/// Free pages already reserved by other mappings (`resv_hugepages`) don't count; surplus
/// pages the kernel may still create (`nr_overcommit_hugepages - surplus_hugepages`) do.
pub(crate) fn check_hugepage_pool(
    sysfs: &Path,
    page_size: HugePageSize,
    needed: u64,
) -> Result<()> {
    let dir = sysfs
        .join("kernel/mm/hugepages")
        .join(page_size.sysfs_name());
    if !dir.is_dir() {
        return Err(Error::NoHugePagePool { page_size, dir });
    }
    let free = read_count(&dir.join("free_hugepages"))?;
    let reserved = read_count(&dir.join("resv_hugepages"))?;
    // Older kernels lack neither file, but a missing one only means no overcommit.
    let overcommit = read_count(&dir.join("nr_overcommit_hugepages"))
        .unwrap_or(0)
        .saturating_sub(read_count(&dir.join("surplus_hugepages")).unwrap_or(0));
    let available = free.saturating_sub(reserved) + overcommit;
    if available < needed {
        return Err(Error::NotEnoughHugePages {
            page_size,
            needed,
            available,
            free,
            reserved,
            overcommit,
            dir,
        });
    }
    Ok(())
}

/// The selected word of a sysfs switch such as `always [madvise] never`.
fn selected(setting: &str) -> Option<&str> {
    let start = setting.find('[')? + 1;
    let end = start + setting.get(start..)?.find(']')?;
    setting.get(start..end)
}

/// Fails if `MADV_HUGEPAGE` can't give PMD-sized transparent hugepages to anonymous memory
/// (`shmem` false) or to a shared memfd (`shmem` true).
pub(crate) fn check_thp(sysfs: &Path, shmem: bool) -> Result<()> {
    let base = sysfs.join("kernel/mm/transparent_hugepage");
    let name = if shmem { "shmem_enabled" } else { "enabled" };
    // Since Linux 6.8 each size has its own switch; PMD size is the one MADV_HUGEPAGE
    // is about, and "inherit" defers to the top-level switch.
    let per_size = base.join("hugepages-2048kB").join(name);
    let top = base.join(name);
    let mut knob = top.clone();
    let mut setting = match read_trimmed(&per_size) {
        Ok(s) if selected(&s) != Some("inherit") => {
            knob = per_size;
            s
        }
        _ => read_trimmed(&top).unwrap_or_default(),
    };
    if setting.is_empty() {
        setting = "missing (kernel without CONFIG_TRANSPARENT_HUGEPAGE)".into();
    }
    let ok = if shmem {
        ["always", "within_size", "advise", "force"].as_slice()
    } else {
        ["always", "madvise"].as_slice()
    };
    match selected(&setting) {
        Some(s) if ok.contains(&s) => Ok(()),
        _ => Err(Error::ThpDisabled { knob, setting }),
    }
}

/// Parses a sysfs list such as `0-3,5`.
fn parse_list(text: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

/// Fails unless host NUMA node `node` exists and has memory.
pub(crate) fn check_numa_node(sysfs: &Path, node: u32) -> Result<()> {
    let list = read_trimmed(&sysfs.join("devices/system/node/has_memory")).unwrap_or_default();
    let nodes = parse_list(&list).unwrap_or_default();
    if nodes.contains(&node) {
        Ok(())
    } else {
        Err(Error::NoSuchNumaNode {
            node,
            available: list,
        })
    }
}

fn madvise(addr: *mut u8, len: u64, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: the advice used here (DONTDUMP, MERGEABLE, HUGEPAGE, POPULATE_WRITE) never
    // changes what memory holds, and the kernel checks the range; callers pass their own
    // mapping (see `apply_policy`).
    let rc = unsafe { libc::madvise(addr.cast(), len as usize, advice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `mbind(addr, len, MPOL_BIND, {node})`, through the raw system call (glibc has no
/// wrapper; libnuma would be a dependency for one call).
fn mbind(addr: *mut u8, len: u64, node: u32) -> io::Result<()> {
    let words = node as usize / 64 + 1;
    let mut mask = vec![0u64; words];
    mask[node as usize / 64] |= 1 << (node % 64);
    // The kernel reads `maxnode - 1` bits (a historical off-by-one every caller
    // compensates for, libnuma included).
    let maxnode = (words * 64 + 1) as libc::c_ulong;
    // SAFETY: `mask` is `words` u64s, exactly the bits the kernel reads for `maxnode`.
    // Without MPOL_MF_MOVE, mbind only changes where future pages of the range come from,
    // never what memory holds; callers pass their own mapping (see `apply_policy`).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr as libc::c_ulong,
            len as libc::c_ulong,
            libc::MPOL_BIND as libc::c_ulong,
            mask.as_ptr(),
            maxnode,
            0 as libc::c_ulong,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Writes every page once, keeping its contents: the prefault for kernels without
/// `MADV_POPULATE_WRITE` (before 5.14).
///
/// # Safety
///
/// `addr .. addr + len` must be a live, writable mapping that no other thread accesses.
unsafe fn touch_pages(addr: *mut u8, len: u64, page: u64) {
    let mut off = 0;
    while off < len {
        // SAFETY: `off < len`, inside the mapping the caller vouches for; nobody else reads
        // or writes it, so writing back the byte just read changes nothing.
        unsafe {
            let p = addr.add(off as usize);
            p.write_volatile(p.read_volatile());
        }
        off += page;
    }
}

/// Applies `policy` (and `MADV_DONTDUMP`) to one freshly mapped region; `page` is its page
/// size. On failure returns what was being done and the error.
///
/// # Safety
///
/// `addr .. addr + len` must be one live, writable mapping created by the caller, which no
/// other thread (and no guest) uses yet.
pub(crate) unsafe fn apply_policy(
    addr: *mut u8,
    len: u64,
    page: u64,
    policy: &MemoryPolicy,
    private_anon: bool,
) -> std::result::Result<(), (String, io::Error)> {
    // Bind first: the policy applies to pages allocated after it.
    if let Some(node) = policy.host_numa_node {
        mbind(addr, len, node).map_err(|e| (format!("mbind(MPOL_BIND, node {node})"), e))?;
    }
    madvise(addr, len, libc::MADV_DONTDUMP).map_err(|e| ("madvise(MADV_DONTDUMP)".into(), e))?;
    if policy.mergeable {
        madvise(addr, len, libc::MADV_MERGEABLE).map_err(|e| {
            let why = if e.raw_os_error() == Some(libc::EINVAL) {
                "madvise(MADV_MERGEABLE) (kernel without CONFIG_KSM?)"
            } else {
                "madvise(MADV_MERGEABLE)"
            };
            (why.to_string(), e)
        })?;
    }
    if policy.transparent_hugepages {
        madvise(addr, len, libc::MADV_HUGEPAGE)
            .map_err(|e| ("madvise(MADV_HUGEPAGE)".into(), e))?;
    }
    if private_anon {
        // Best effort (CONFIG_ANON_VMA_NAME, Linux 5.17): it only helps people and tests
        // find guest RAM in /proc/PID/maps and smaps.
        // SAFETY: the name is a NUL-terminated string that outlives the call (the kernel
        // copies it); the range is the caller's mapping.
        let _ = unsafe {
            libc::prctl(
                libc::PR_SET_VMA,
                libc::PR_SET_VMA_ANON_NAME as libc::c_ulong,
                addr as libc::c_ulong,
                len as libc::c_ulong,
                c"kiln-guest-ram".as_ptr() as libc::c_ulong,
            )
        };
    }
    if policy.prefault {
        match madvise(addr, len, libc::MADV_POPULATE_WRITE) {
            Ok(()) => {}
            // EINVAL: a kernel before 5.14 doesn't know the advice.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // SAFETY: per this function's contract.
                unsafe { touch_pages(addr, len, page) }
            }
            Err(e) => return Err(("prefault (madvise(MADV_POPULATE_WRITE))".into(), e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A scratch sysfs tree for one test, removed when dropped.
    struct FakeSysfs(PathBuf);

    impl std::ops::Deref for FakeSysfs {
        type Target = PathBuf;
        fn deref(&self) -> &PathBuf {
            &self.0
        }
    }

    impl Drop for FakeSysfs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn fake_sysfs(name: &str, files: &[(&str, &str)]) -> FakeSysfs {
        let root =
            std::env::temp_dir().join(format!("kiln-memory-sysfs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (path, text) in files {
            let p = root.join(path);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, text).expect("write");
        }
        FakeSysfs(root)
    }

    const POOL: &str = "kernel/mm/hugepages/hugepages-2048kB";

    fn pool(name: &str, free: &str, resv: &str, over: &str, surplus: &str) -> FakeSysfs {
        fake_sysfs(
            name,
            &[
                (&format!("{POOL}/free_hugepages"), free),
                (&format!("{POOL}/resv_hugepages"), resv),
                (&format!("{POOL}/nr_overcommit_hugepages"), over),
                (&format!("{POOL}/surplus_hugepages"), surplus),
            ],
        )
    }

    #[test]
    fn hugepage_pool_counts_reserved_and_overcommit() {
        let root = pool("pool", "40\n", "8\n", "0\n", "0\n");
        check_hugepage_pool(&root, HugePageSize::Size2M, 32).unwrap();
        let err = check_hugepage_pool(&root, HugePageSize::Size2M, 33).unwrap_err();
        assert!(
            matches!(
                err,
                Error::NotEnoughHugePages {
                    needed: 33,
                    available: 32,
                    free: 40,
                    reserved: 8,
                    ..
                }
            ),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("needs 33 2 MiB hugepages"), "{msg}");
        assert!(msg.contains("nr_hugepages"), "{msg}");
        // Overcommit makes up the difference.
        let root = pool("overcommit", "0", "0", "10", "4");
        check_hugepage_pool(&root, HugePageSize::Size2M, 6).unwrap();
        assert!(check_hugepage_pool(&root, HugePageSize::Size2M, 7).is_err());
    }

    #[test]
    fn missing_hugepage_pool_names_the_directory() {
        let root = pool("no1g", "0", "0", "0", "0");
        let err = check_hugepage_pool(&root, HugePageSize::Size1G, 1).unwrap_err();
        assert!(matches!(err, Error::NoHugePagePool { .. }), "{err}");
        assert!(err.to_string().contains("hugepages-1048576kB"), "{err}");
    }

    #[test]
    fn thp_switches() {
        let thp = "kernel/mm/transparent_hugepage";
        let root = fake_sysfs(
            "thp",
            &[
                (&format!("{thp}/enabled"), "always [madvise] never\n"),
                (
                    &format!("{thp}/shmem_enabled"),
                    "always within_size advise [never] deny force\n",
                ),
            ],
        );
        check_thp(&root, false).unwrap();
        let err = check_thp(&root, true).unwrap_err();
        assert!(err.to_string().contains("shmem_enabled"), "{err}");
        assert!(err.to_string().contains("[never]"), "{err}");
        // A per-size switch overrides the top-level one unless it says inherit.
        let root = fake_sysfs(
            "thp-per-size",
            &[
                (&format!("{thp}/enabled"), "always madvise [never]\n"),
                (
                    &format!("{thp}/hugepages-2048kB/enabled"),
                    "always inherit [madvise] never\n",
                ),
            ],
        );
        check_thp(&root, false).unwrap();
        let root = fake_sysfs(
            "thp-inherit",
            &[
                (&format!("{thp}/enabled"), "always madvise [never]\n"),
                (
                    &format!("{thp}/hugepages-2048kB/enabled"),
                    "always [inherit] madvise never\n",
                ),
            ],
        );
        assert!(check_thp(&root, false).is_err());
        // No THP support at all.
        let root = fake_sysfs("no-thp", &[]);
        let err = check_thp(&root, false).unwrap_err();
        assert!(
            err.to_string().contains("CONFIG_TRANSPARENT_HUGEPAGE"),
            "{err}"
        );
    }

    #[test]
    fn numa_nodes() {
        let root = fake_sysfs("numa", &[("devices/system/node/has_memory", "0-1,3\n")]);
        for n in [0, 1, 3] {
            check_numa_node(&root, n).unwrap();
        }
        let err = check_numa_node(&root, 2).unwrap_err();
        assert!(
            matches!(err, Error::NoSuchNumaNode { node: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("0-1,3"), "{err}");
        assert!(check_numa_node(&fake_sysfs("no-numa", &[]), 0).is_err());
    }

    #[test]
    fn lists_and_switches_parse() {
        assert_eq!(parse_list("0-2,5"), Some(vec![0, 1, 2, 5]));
        assert_eq!(parse_list(""), Some(vec![]));
        assert_eq!(parse_list("x"), None);
        assert_eq!(selected("always [madvise] never"), Some("madvise"));
        assert_eq!(selected("madvise"), None);
    }
}
