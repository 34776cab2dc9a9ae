//! The jailer's steps, in order. Everything is validated ([`check_host`]) before the first
//! change; from then on each change is logged in an [`Undo`] and removed again if a later step
//! fails, up to the point where privileges are dropped.

use std::convert::Infallible;
use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::args::{Config, Limits};
use crate::cgroup::{self, Hierarchy, HostCgroups};
use crate::chroot::{self, Device};
use crate::sys::{cstr, cvt};
use crate::undo::Undo;
use crate::{Error, Result};

/// What [`check_host`] found: everything the steps need, checked.
#[derive(Debug)]
pub struct Checked {
    /// `--chroot-base-dir`, canonical.
    pub base: PathBuf,
    /// `<base>/<exec name>/<id>/root`.
    pub chroot: PathBuf,
    /// The device nodes to create.
    pub devices: Vec<Device>,
    /// `--netns`, opened.
    pub netns: Option<OwnedFd>,
    /// The cgroup hierarchies to join.
    pub hierarchies: Vec<Hierarchy>,
}

/// Builds the jail and execs the VMM in it. Returns only on failure, after removing what it
/// created (what it couldn't remove is printed to stderr).
pub fn run(cfg: &Config) -> Result<Infallible> {
    // First, before the jailer opens anything of its own: nothing the caller leaked may
    // reach the VMM. Everything the jailer opens later is close-on-exec.
    close_inherited_fds();
    let checked = check_host(cfg)?;
    let mut undo = Undo::default();
    let err = match setup(cfg, &checked, &mut undo) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    for f in undo.run() {
        eprintln!("kiln-jailer: cleanup after the error below: could not remove {f}");
    }
    Err(err)
}

/// Closes every file descriptor above 2; makes sure 0, 1 and 2 are open (on /dev/null) so
/// files the jailer opens never land on them.
pub fn close_inherited_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            // SAFETY: a constant C string; the lowest free descriptor (this one) is used. It
            // is deliberately not owned by anything: it stays open as stdio.
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
    }
    // SAFETY: close_range only closes descriptors; nothing in this process uses any above 2
    // yet (no threads, no open files).
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r == 0 {
        return;
    }
    // Kernels before 5.9: walk /proc/self/fd (still the host's /proc at this point).
    let fds: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => d
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|fd| *fd > 2)
            .collect(),
        Err(_) => return,
    };
    for fd in fds {
        // SAFETY: closing a descriptor the jailer doesn't use (the directory handle of the
        // walk above is closed already and just fails with EBADF).
        unsafe { libc::close(fd) };
    }
}

/// Validates everything that needs the host, before anything is changed.
pub fn check_host(cfg: &Config) -> Result<Checked> {
    // SAFETY: geteuid has no failure modes or memory effects.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(Error::flag(
            "--uid/--gid",
            format!(
                "switching to uid {} and gid {} needs root (as do mknod, cgroups and pivot_root), \
                 but kiln-jailer runs as uid {euid}; run it as root",
                cfg.uid, cfg.gid
            ),
        ));
    }
    let interp = chroot::check_exec_file(&cfg.exec_file)?;

    let base_flag = || format!("--chroot-base-dir {}", cfg.chroot_base.display());
    let base = std::fs::canonicalize(&cfg.chroot_base).map_err(|e| {
        Error::flag(
            base_flag(),
            format!("{e}; it must be an existing directory"),
        )
    })?;
    if !base.is_dir() {
        return Err(Error::flag(base_flag(), "not a directory"));
    }
    check_mount_flags(&base).map_err(|why| Error::flag(base_flag(), why))?;
    let chroot = cfg.chroot_dir(&base);

    if let Some(interp) = interp {
        // The caller may have put a loader into an existing chroot; otherwise exec would fail
        // with a bare ENOENT after privileges are dropped.
        let inside = chroot.join(interp.strip_prefix("/").unwrap_or(&interp));
        if !inside.exists() {
            return Err(Error::flag(
                format!("--exec-file {}", cfg.exec_file.display()),
                format!(
                    "dynamically linked (it needs {}, which the jail doesn't have); build it \
                     statically, e.g. RUSTFLAGS='-C target-feature=+crt-static' or the \
                     x86_64-unknown-linux-musl target",
                    interp.display()
                ),
            ));
        }
    }

    let devices = chroot::host_devices()?;

    let netns = match &cfg.netns {
        Some(p) => Some(
            open_netns(p).map_err(|why| Error::flag(format!("--netns {}", p.display()), why))?,
        ),
        None => None,
    };

    let hierarchies = if cfg.cgroups.is_empty() {
        Vec::new()
    } else {
        cgroup::plan(cfg.cgroup_version, &cfg.cgroups, &HostCgroups::read()?)?
    };

    // SAFETY: getpgrp and getpid have no failure modes or memory effects.
    if cfg.daemonize && unsafe { libc::getpgrp() == libc::getpid() } {
        return Err(Error::flag(
            "--daemonize",
            "kiln-jailer leads its process group (e.g. it was started as a shell job), so \
             setsid() would fail, as with Firecracker's jailer; start it from another process",
        ));
    }

    Ok(Checked {
        base,
        chroot,
        devices,
        netns,
        hierarchies,
    })
}

/// Device nodes and executables must work on the jail's filesystem.
fn check_mount_flags(dir: &Path) -> std::result::Result<(), String> {
    let c = cstr(dir).map_err(|e| e.to_string())?;
    // SAFETY: an all-zero statvfs is a valid value for statvfs to overwrite.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid, writable statvfs.
    cvt(unsafe { libc::statvfs(c.as_ptr(), &mut st) }).map_err(|e| e.to_string())?;
    if st.f_flag & libc::ST_NODEV != 0 {
        return Err(
            "its filesystem is mounted nodev, so /dev/kvm in the jail couldn't be opened".into(),
        );
    }
    if st.f_flag & libc::ST_NOEXEC != 0 {
        return Err("its filesystem is mounted noexec, so the VMM couldn't run from it".into());
    }
    Ok(())
}

/// Opens `path` and checks it is a network namespace.
fn open_netns(path: &Path) -> std::result::Result<OwnedFd, String> {
    let f = File::open(path).map_err(|e| e.to_string())?;
    // SAFETY: NS_GET_NSTYPE takes no argument and only returns a value.
    let t = unsafe { libc::ioctl(f.as_raw_fd(), libc::NS_GET_NSTYPE) };
    if t < 0 {
        return Err(format!(
            "not a namespace file ({})",
            io::Error::last_os_error()
        ));
    }
    if t != libc::CLONE_NEWNET {
        return Err("a namespace file, but not a network namespace".into());
    }
    Ok(OwnedFd::from(f))
}

fn sys(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Sys { what, source }
}

/// The steps after validation. Returns only on failure.
fn setup(cfg: &Config, c: &Checked, undo: &mut Undo) -> Result<Infallible> {
    chroot::build(
        &c.chroot,
        &cfg.exec_file,
        &cfg.exec_name,
        &c.devices,
        (cfg.uid, cfg.gid),
        undo,
    )?;

    let mut leaves = Vec::new();
    for h in &c.hierarchies {
        leaves.push(cgroup::create(h, &cfg.parent_cgroup, &cfg.id, undo)?);
    }
    // Join only once every value is written: the jailer never runs under half the limits.
    for (h, leaf) in c.hierarchies.iter().zip(&leaves) {
        cgroup::join(h, leaf, undo)?;
    }

    // Opened while the host's /dev is still there.
    let dev_null = if cfg.daemonize {
        Some(
            File::options()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(sys("--daemonize: opening /dev/null"))?,
        )
    } else {
        None
    };

    enter_chroot(&c.chroot)?;

    if let Some(ns) = &c.netns {
        // SAFETY: `ns` is an open network namespace file; setns has no memory effects.
        cvt(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }).map_err(sys(format!(
            "--netns {}: setns",
            cfg.netns.as_deref().unwrap_or(Path::new("")).display()
        )))?;
    }

    if let Some(null) = dev_null {
        daemonize(null)?;
    }

    if cfg.new_pid_ns {
        // Returns in the child (pid 1 of the new namespace) only.
        fork_into_pid_ns(&cfg.exec_name, undo)?;
    }

    set_limits(&cfg.limits)?;

    // Everything exec needs is built while the jailer can still clean up.
    let exec_path = Path::new("/").join(&cfg.exec_name);
    let argv: Vec<CString> = std::iter::once(exec_path.as_os_str().to_owned())
        .chain(cfg.vmm_args.iter().cloned())
        .map(|a: OsString| CString::new(a.as_bytes()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::flag("-- <VMM ARGS>", "an argument contains a NUL byte"))?;
    let path_c = cstr(&exec_path).map_err(sys("--exec-file"))?;

    drop_privileges(cfg.uid, cfg.gid)?;

    let source = exec(&path_c, &argv);
    // As uid/gid, the jailer may no longer remove what root created: say what is left.
    let left = undo.created();
    undo.forget();
    Err(Error::Exec {
        path: exec_path,
        source,
        left,
    })
}

/// A new mount namespace whose root is `root`; the host's tree is detached from it.
fn enter_chroot(root: &Path) -> Result<()> {
    let shown = root.display();
    let r = cstr(root).map_err(sys(format!("entering the jail {shown}")))?;
    // SAFETY: unshare has no memory effects; the jailer is single-threaded.
    cvt(unsafe { libc::unshare(libc::CLONE_NEWNS) }).map_err(sys("unshare(CLONE_NEWNS)"))?;
    // Nothing done below may propagate back to the host's mounts.
    // SAFETY: constant C strings and null optional arguments, as mount(2) allows.
    cvt(unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_PRIVATE | libc::MS_REC,
            std::ptr::null(),
        )
    })
    .map_err(sys("making / recursively private"))?;
    // pivot_root needs the new root to be a mount point; MS_REC keeps anything the caller
    // mounted inside the jail.
    // SAFETY: `r` is a valid C string; the other arguments are null as mount(2) allows.
    cvt(unsafe {
        libc::mount(
            r.as_ptr(),
            r.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    })
    .map_err(sys(format!("bind-mounting {shown} on itself")))?;
    std::env::set_current_dir(root).map_err(sys(format!("chdir {shown}")))?;
    // pivot_root(".", ".") stacks the old root on top of the new one; unmounting "." then
    // detaches it, with no old_root directory left in the jail.
    // SAFETY: constant C strings; pivot_root has no memory effects.
    cvt(unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) } as i32)
        .map_err(sys(format!("pivot_root into {shown}")))?;
    // SAFETY: a constant C string.
    cvt(unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) })
        .map_err(sys("detaching the host's root"))?;
    std::env::set_current_dir("/").map_err(sys("chdir / in the jail"))
}

/// setsid(), then stdin, stdout and stderr on /dev/null.
fn daemonize(null: File) -> Result<()> {
    // SAFETY: setsid has no memory effects.
    cvt(unsafe { libc::setsid() }).map_err(sys("--daemonize: setsid"))?;
    for fd in 0..3 {
        // SAFETY: `null` is open; dup2 replaces a standard descriptor.
        cvt(unsafe { libc::dup2(null.as_raw_fd(), fd) })
            .map_err(sys("--daemonize: redirecting stdio to /dev/null"))?;
    }
    Ok(())
}

/// A pipe whose ends are close-on-exec.
fn pipe() -> Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })
        .map_err(sys("--new-pid-ns: pipe"))?;
    // SAFETY: pipe2 returned two new descriptors that nothing else owns.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// Forks into a new PID namespace. The child, pid 1 there, returns and goes on to exec the
/// VMM. The parent writes the child's pid (as the host sees it) to `/<exec name>.pid` in
/// the jail, then waits until the child has exec'd (exit 0) or failed and cleaned up (exit
/// with the child's status), so the caller learns whether the VMM started.
fn fork_into_pid_ns(exec_name: &str, undo: &mut Undo) -> Result<()> {
    // SAFETY: unshare has no memory effects; it only affects children created from now on.
    cvt(unsafe { libc::unshare(libc::CLONE_NEWPID) })
        .map_err(sys("--new-pid-ns: unshare(CLONE_NEWPID)"))?;
    let (mut go_rx, go_tx) = pipe()?;
    let (mut failed_rx, failed_tx) = pipe()?;
    let pid_file = PathBuf::from(format!("/{exec_name}.pid"));
    // SAFETY: the jailer is single-threaded, so the child may run arbitrary code after fork.
    let pid = cvt(unsafe { libc::fork() }).map_err(sys("--new-pid-ns: fork"))?;
    if pid == 0 {
        drop((go_tx, failed_rx));
        // Wait until the parent has written the pid file (or died): then the file is ours to
        // remove if a later step fails.
        let _ = go_rx.read(&mut [0u8; 1]);
        undo.report_failure_to(failed_tx);
        return undo
            .expect_file(&pid_file)
            .map_err(sys("--new-pid-ns: opening the jail's root"));
    }
    drop((go_rx, failed_tx));
    // The child keeps the VM's cgroups; the parent must not count against their limits nor
    // keep them from being removed if the child fails.
    for f in undo.leave_cgroups() {
        eprintln!("kiln-jailer: --new-pid-ns: {f}");
    }
    let written = File::options()
        .write(true)
        .create_new(true)
        .open(&pid_file)
        .and_then(|mut f| f.write_all(pid.to_string().as_bytes()));
    if let Err(e) = written {
        // SAFETY: `pid` is this process's child; kill and waitpid have no memory effects.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        return Err(Error::Io {
            what: "--new-pid-ns: writing the pid file (in the jail)",
            path: pid_file,
            source: e,
        });
    }
    drop(go_tx);
    // End of file: the child's exec closed its end. A byte: it failed and has cleaned up
    // (or is about to: wait for it).
    let mut b = [0u8; 1];
    let failed = loop {
        match failed_rx.read(&mut b) {
            Ok(n) => break n > 0,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break false,
        }
    };
    if !failed {
        std::process::exit(0);
    }
    let mut status = 0;
    // SAFETY: `pid` is this process's child and `status` a valid int to write.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        1
    };
    // The child printed its error and removed the jail; nothing is left for this process.
    undo.forget();
    std::process::exit(if code == 0 { 1 } else { code });
}

/// `--resource-limit`s, soft and hard alike.
fn set_limits(l: &Limits) -> Result<()> {
    let set = |res, n: u64, flag: String| {
        let lim = libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        };
        // SAFETY: `lim` is a valid rlimit that setrlimit only reads.
        cvt(unsafe { libc::setrlimit(res, &lim) })
            .map(drop)
            .map_err(|e| {
                Error::flag(
                    flag,
                    format!("setrlimit: {e} (is no-file above fs.nr_open?)"),
                )
            })
    };
    if let Some(n) = l.fsize {
        set(libc::RLIMIT_FSIZE, n, format!("--resource-limit fsize={n}"))?;
    }
    let flag = if l.nofile_given {
        format!("--resource-limit no-file={}", l.nofile)
    } else {
        format!("--resource-limit no-file (default {})", l.nofile)
    };
    set(libc::RLIMIT_NOFILE, l.nofile, flag)
}

/// No supplementary groups, then gid, then uid (real, effective and saved).
fn drop_privileges(uid: u32, gid: u32) -> Result<()> {
    // SAFETY: an empty list; setgroups reads nothing.
    cvt(unsafe { libc::setgroups(0, std::ptr::null()) })
        .map_err(sys("--gid: dropping supplementary groups"))?;
    // SAFETY: setresgid has no memory effects.
    cvt(unsafe { libc::setresgid(gid, gid, gid) })
        .map_err(sys(format!("--gid {gid}: setresgid")))?;
    // SAFETY: setresuid has no memory effects.
    cvt(unsafe { libc::setresuid(uid, uid, uid) })
        .map_err(sys(format!("--uid {uid}: setresuid")))?;
    Ok(())
}

/// execve with an empty environment (as Firecracker's jailer); returns only on failure.
fn exec(path: &CString, argv: &[CString]) -> io::Error {
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: `path` and every `argv` entry are valid C strings that outlive the call, and
    // both arrays are null-terminated.
    unsafe { libc::execve(path.as_ptr(), ptrs.as_ptr(), envp.as_ptr()) };
    io::Error::last_os_error()
}
