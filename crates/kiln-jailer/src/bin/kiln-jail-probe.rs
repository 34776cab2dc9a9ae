//! `kiln-jail-probe`: a test helper run by the jailer instead of a VMM. It prints, one
//! `key=value` per line, what a jailed process sees: ids, resource limits, the root and
//! `/dev` entries, open descriptors, network interfaces, and whether host paths reach it.
//! It needs no /proc (the jail has none).
//!
//! `--out PATH` writes the report there instead of stdout (for `--daemonize`, where stdout
//! is /dev/null); `--wait-file PATH` prints `ready`, then waits (up to 60 s) until PATH
//! exists, so a test can look at the process from the host meanwhile. The report ends with
//! `end`.

use std::fmt::Write as _;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    // Before opening --out, so the descriptor list is the one the jailer handed over.
    let r = report(&args);
    let mut out: Box<dyn Write> = match opt("--out") {
        Some(p) => match std::fs::File::create(&p) {
            Ok(f) => Box::new(f),
            Err(e) => {
                eprintln!("kiln-jail-probe: --out {p}: {e}");
                std::process::exit(1);
            }
        },
        None => Box::new(std::io::stdout()),
    };
    let _ = out.write_all(r.as_bytes());
    let _ = out.flush();
    if let Some(p) = opt("--wait-file") {
        let _ = writeln!(out, "ready");
        let _ = out.flush();
        let start = Instant::now();
        while !Path::new(&p).exists() && start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let _ = writeln!(out, "end");
    let _ = out.flush();
}

fn report(args: &[String]) -> String {
    let mut s = String::new();
    let (mut ru, mut eu, mut su) = (0, 0, 0);
    let (mut rg, mut eg, mut sg) = (0, 0, 0);
    let mut groups = [0 as libc::gid_t; 64];
    // SAFETY: these calls only write into the locals passed to them; `groups` has room for
    // the 64 entries getgroups may write.
    let (n, sid, pid, ppid) = unsafe {
        libc::getresuid(&mut ru, &mut eu, &mut su);
        libc::getresgid(&mut rg, &mut eg, &mut sg);
        (
            libc::getgroups(64, groups.as_mut_ptr()),
            libc::getsid(0),
            libc::getpid(),
            libc::getppid(),
        )
    };
    let ids = [ru, eu, su, rg, eg, sg];
    let groups: Vec<String> = groups[..usize::try_from(n).unwrap_or(0)]
        .iter()
        .map(|g| g.to_string())
        .collect();
    let groups = groups.join(",");
    let _ = writeln!(s, "args={}", args[1..].join(" "));
    let _ = writeln!(s, "pid={pid}");
    let _ = writeln!(s, "ppid={ppid}");
    let _ = writeln!(s, "sid={sid}");
    let _ = writeln!(s, "uid={},{},{}", ids[0], ids[1], ids[2]);
    let _ = writeln!(s, "gid={},{},{}", ids[3], ids[4], ids[5]);
    let _ = writeln!(s, "groups={groups}");
    for (name, res) in [
        ("fsize", libc::RLIMIT_FSIZE),
        ("nofile", libc::RLIMIT_NOFILE),
    ] {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `l` is a valid, writable rlimit.
        unsafe { libc::getrlimit(res, &mut l) };
        let _ = writeln!(s, "rlimit_{name}={},{}", l.rlim_cur, l.rlim_max);
    }
    let _ = writeln!(s, "env={}", std::env::vars_os().count());
    let _ = writeln!(s, "root={}", list_dir(Path::new("/")).join(","));
    let mut dev = Vec::new();
    walk_dev(Path::new("/dev"), "", &mut dev);
    let _ = writeln!(s, "dev={}", dev.join(","));
    // Descriptors without /proc: ask each number.
    let fds: Vec<String> = (0..4096)
        // SAFETY: F_GETFD only queries the descriptor table.
        .filter(|fd| unsafe { libc::fcntl(*fd, libc::F_GETFD) } >= 0)
        .map(|fd: i32| fd.to_string())
        .collect();
    let _ = writeln!(s, "fds={}", fds.join(","));
    for fd in 0..3 {
        // SAFETY: an all-zero stat is valid for fstat to overwrite.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is a valid, writable stat.
        let kind = if unsafe { libc::fstat(fd, &mut st) } < 0 {
            "closed".to_string()
        } else if st.st_mode & libc::S_IFMT == libc::S_IFCHR {
            format!(
                "chr:{}:{}",
                libc::major(st.st_rdev),
                libc::minor(st.st_rdev)
            )
        } else if st.st_mode & libc::S_IFMT == libc::S_IFIFO {
            "fifo".to_string()
        } else {
            format!("mode:{:o}", st.st_mode & libc::S_IFMT)
        };
        let _ = writeln!(s, "fd{fd}={kind}");
    }
    for p in [
        "/etc/passwd",
        "/work",
        "/proc/self/status",
        "/sys/fs/cgroup",
        "/../../etc/passwd",
        "/tmp",
    ] {
        let r = match std::fs::File::open(p) {
            Ok(_) => "opened".to_string(),
            Err(e) => e.raw_os_error().map_or(e.to_string(), errno_name),
        };
        let _ = writeln!(s, "open {p}={r}");
    }
    let _ = writeln!(s, "ifaces={}", interfaces().join(","));
    // Whether the jail's root is writable for the VMM (Firecracker chowns it for the API
    // socket).
    let w = std::fs::write("/probe-write-test", b"x").is_ok();
    let _ = std::fs::remove_file("/probe-write-test");
    let _ = writeln!(s, "root_writable={w}");
    s
}

fn errno_name(e: i32) -> String {
    match e {
        libc::ENOENT => "ENOENT".into(),
        libc::EACCES => "EACCES".into(),
        libc::EPERM => "EPERM".into(),
        e => format!("errno {e}"),
    }
}

fn list_dir(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .map(|d| {
            d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `name:c<major>:<minor>:<uid>:<gid>:<mode>` for each device, `name/` for directories.
fn walk_dev(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    for name in list_dir(dir) {
        let p = dir.join(&name);
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let shown = format!("{prefix}{name}");
        if m.is_dir() {
            out.push(format!("{shown}/"));
            walk_dev(&p, &format!("{shown}/"), out);
        } else if m.file_type().is_char_device() {
            out.push(format!(
                "{shown}:c{}:{}:{}:{}:{:o}",
                libc::major(m.rdev()),
                libc::minor(m.rdev()),
                m.uid(),
                m.gid(),
                m.mode() & 0o7777
            ));
        } else {
            out.push(format!("{shown}:other"));
        }
    }
}

/// Network interface names (netlink, no /proc or /sys needed).
fn interfaces() -> Vec<String> {
    let mut v = Vec::new();
    // SAFETY: if_nameindex returns null or an array ending in a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return vec!["error".into()];
        }
        let mut p = list;
        while (*p).if_index != 0 {
            v.push(
                std::ffi::CStr::from_ptr((*p).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    v.sort();
    v
}
