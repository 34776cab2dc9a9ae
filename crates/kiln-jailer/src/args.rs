//! The command line (Firecracker's jailer flags) and the checks that need no host access.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use clap::Parser;

use crate::{Error, Result};

/// Default `--chroot-base-dir`, as in Firecracker.
pub const DEFAULT_CHROOT_BASE: &str = "/srv/jailer";
/// `RLIMIT_NOFILE` when `--resource-limit no-file` isn't given (Firecracker's default).
pub const DEFAULT_NOFILE: u64 = 2048;
/// Longest `--id`.
pub const MAX_ID_LEN: usize = 64;

/// `kiln-jailer`'s command line. Flag names and meanings follow Firecracker's jailer.
#[derive(Debug, Parser)]
#[command(
    name = "kiln-jailer",
    version,
    about = "Run a VMM in a chroot, cgroups and namespaces as an unprivileged user (Firecracker-jailer compatible).",
    long_about = "Run a VMM in a chroot, cgroups and namespaces as an unprivileged user \
(Firecracker-jailer compatible).\n\nBuilds CHROOT-BASE-DIR/EXEC-NAME/ID/root, copies \
--exec-file into it, creates /dev/kvm, /dev/net/tun, /dev/urandom (and /dev/userfaultfd when \
the host has it), joins the --cgroup cgroups, pivots into the chroot, drops to --uid/--gid and \
execs the VMM with the arguments after `--`. Files the VMM needs (kernel, disks) must be put \
into the chroot by the caller beforehand. Must run as root."
)]
pub struct Cli {
    /// Unique VM id: 1-64 characters, ASCII letters, digits and `-`.
    #[arg(long)]
    pub id: String,
    /// The VMM binary, copied into the jail and exec'd there. It must be statically linked
    /// (there is no dynamic loader in the jail).
    #[arg(long, value_name = "PATH")]
    pub exec_file: PathBuf,
    /// User id the VMM runs as.
    #[arg(long)]
    pub uid: u32,
    /// Group id the VMM runs as (supplementary groups are dropped).
    #[arg(long)]
    pub gid: u32,
    /// Existing directory under which jails are built.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_CHROOT_BASE)]
    pub chroot_base_dir: PathBuf,
    /// Network namespace to join (e.g. /var/run/netns/NAME).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Call setsid() and point stdin, stdout and stderr at /dev/null before exec.
    #[arg(long)]
    pub daemonize: bool,
    /// Run the VMM as init of a new PID namespace; its pid (as the host sees it) is written
    /// to CHROOT/EXEC-NAME.pid and the jailer exits once it has started.
    #[arg(long)]
    pub new_pid_ns: bool,
    /// Which cgroup hierarchy --cgroup applies to.
    #[arg(long, value_name = "1|2", default_value = "1", value_parser = ["1", "2"])]
    pub cgroup_version: String,
    /// A cgroup file to write, e.g. cpu.cfs_quota_us=50000 (repeatable). The controller is
    /// the part of KEY before the first dot.
    #[arg(long = "cgroup", value_name = "KEY=VALUE")]
    pub cgroups: Vec<String>,
    /// Where under each hierarchy the VM's cgroup ID goes (default: the exec file's name).
    #[arg(long, value_name = "PATH")]
    pub parent_cgroup: Option<String>,
    /// fsize=BYTES or no-file=N (repeatable); no-file defaults to 2048.
    #[arg(long = "resource-limit", value_name = "RESOURCE=N")]
    pub resource_limits: Vec<String>,
    /// Arguments for the VMM, after `--`.
    #[arg(last = true, value_name = "VMM ARGS")]
    pub vmm_args: Vec<OsString>,
}

/// Which cgroup hierarchy to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// One hierarchy per controller (or group of controllers).
    V1,
    /// The unified hierarchy.
    V2,
}

/// One `--cgroup KEY=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupSetting {
    /// The file name, e.g. `cpu.cfs_quota_us`.
    pub key: String,
    /// The controller: `key` up to its first dot.
    pub controller: String,
    /// What to write.
    pub value: String,
}

/// Resource limits to set before exec (soft and hard alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `RLIMIT_FSIZE`, when given.
    pub fsize: Option<u64>,
    /// `RLIMIT_NOFILE`.
    pub nofile: u64,
    /// Whether `nofile` came from the command line (for error messages).
    pub nofile_given: bool,
}

/// The validated command line.
#[derive(Debug, Clone)]
pub struct Config {
    /// The VM id.
    pub id: String,
    /// `--exec-file` as given.
    pub exec_file: PathBuf,
    /// Its last path component: the name of the copy inside the jail.
    pub exec_name: String,
    /// Target uid.
    pub uid: u32,
    /// Target gid.
    pub gid: u32,
    /// `--chroot-base-dir` as given (checked against the host later).
    pub chroot_base: PathBuf,
    /// `--netns`.
    pub netns: Option<PathBuf>,
    /// `--daemonize`.
    pub daemonize: bool,
    /// `--new-pid-ns`.
    pub new_pid_ns: bool,
    /// `--cgroup-version`.
    pub cgroup_version: CgroupVersion,
    /// The `--cgroup` settings, in command-line order.
    pub cgroups: Vec<CgroupSetting>,
    /// `--parent-cgroup`, or the exec file's name.
    pub parent_cgroup: PathBuf,
    /// The `--resource-limit`s.
    pub limits: Limits,
    /// Arguments after `--`.
    pub vmm_args: Vec<OsString>,
}

impl Config {
    /// Checks everything that doesn't need the host: id, uid/gid, cgroup and limit syntax.
    pub fn from_cli(cli: Cli) -> Result<Self> {
        check_id(&cli.id)?;
        let exec_name = exec_name(&cli.exec_file)?;
        // (uid_t)-1 means "leave unchanged" to setresuid: it would silently keep root.
        if cli.uid == u32::MAX {
            return Err(Error::flag("--uid", "4294967295 (-1) is not a usable uid"));
        }
        if cli.gid == u32::MAX {
            return Err(Error::flag("--gid", "4294967295 (-1) is not a usable gid"));
        }
        let cgroups = cli
            .cgroups
            .iter()
            .map(|c| parse_cgroup(c))
            .collect::<Result<Vec<_>>>()?;
        let parent_cgroup = match &cli.parent_cgroup {
            Some(p) => parse_parent_cgroup(p)?,
            None => PathBuf::from(&exec_name),
        };
        let limits = parse_limits(&cli.resource_limits)?;
        Ok(Config {
            id: cli.id,
            exec_file: cli.exec_file,
            exec_name,
            uid: cli.uid,
            gid: cli.gid,
            chroot_base: cli.chroot_base_dir,
            netns: cli.netns,
            daemonize: cli.daemonize,
            new_pid_ns: cli.new_pid_ns,
            cgroup_version: if cli.cgroup_version == "2" {
                CgroupVersion::V2
            } else {
                CgroupVersion::V1
            },
            cgroups,
            parent_cgroup,
            limits,
            vmm_args: cli.vmm_args,
        })
    }

    /// `<base>/<exec name>/<id>/root` for a given (canonical) base directory.
    pub fn chroot_dir(&self, base: &Path) -> PathBuf {
        base.join(&self.exec_name).join(&self.id).join("root")
    }
}

/// `--id`: 1-64 ASCII letters, digits and hyphens (it becomes a directory name twice).
pub fn check_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(Error::flag(
            format!("--id {id:?}"),
            format!(
                "must be 1 to {MAX_ID_LEN} characters long (is {})",
                id.len()
            ),
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(Error::flag(
            format!("--id {id:?}"),
            format!("{c:?} is not allowed: use ASCII letters, digits and '-'"),
        ));
    }
    Ok(())
}

/// The last component of `--exec-file`: the copy's name in the jail and the default parent
/// cgroup.
fn exec_name(path: &Path) -> Result<String> {
    let flag = || format!("--exec-file {}", path.display());
    let name = path
        .file_name()
        .ok_or_else(|| Error::flag(flag(), "names no file"))?;
    let name = name
        .to_str()
        .ok_or_else(|| Error::flag(flag(), "the file name is not UTF-8"))?;
    // The jail's root also holds /dev and <name>.pid.
    if name == "dev" || name.ends_with(".pid") {
        return Err(Error::flag(
            flag(),
            format!("the file name {name:?} clashes with the jail's own entries"),
        ));
    }
    Ok(name.to_string())
}

/// Parses one `--cgroup KEY=VALUE`.
pub fn parse_cgroup(arg: &str) -> Result<CgroupSetting> {
    let Some((key, value)) = arg.split_once('=') else {
        return Err(Error::flag(
            format!("--cgroup {arg}"),
            "expected KEY=VALUE, e.g. cpu.cfs_quota_us=50000",
        ));
    };
    let flag = || format!("--cgroup {key}");
    // The key becomes a file name inside the cgroup directory: no '/', no "..".
    if key.is_empty()
        || key.starts_with('.')
        || key.contains("..")
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(Error::flag(
            flag(),
            "not a cgroup file name (ASCII letters, digits, '.', '_', '-')",
        ));
    }
    let Some((controller, rest)) = key.split_once('.') else {
        return Err(Error::flag(
            flag(),
            "expected <controller>.<file>, e.g. cpu.cfs_quota_us",
        ));
    };
    if rest.is_empty() {
        return Err(Error::flag(flag(), "names no file after the controller"));
    }
    if value.is_empty() {
        return Err(Error::flag(flag(), "empty value"));
    }
    Ok(CgroupSetting {
        key: key.to_string(),
        controller: controller.to_string(),
        value: value.to_string(),
    })
}

/// `--parent-cgroup`: a relative path of plain components.
pub fn parse_parent_cgroup(arg: &str) -> Result<PathBuf> {
    let p = Path::new(arg);
    let plain = !arg.is_empty()
        && p.components().all(|c| matches!(c, Component::Normal(_)))
        && !arg.contains("//");
    if !plain {
        return Err(Error::flag(
            format!("--parent-cgroup {arg:?}"),
            "must be a relative path without '.' or '..' components, e.g. vms/external",
        ));
    }
    Ok(p.to_path_buf())
}

/// Parses the `--resource-limit`s; later ones win.
pub fn parse_limits(args: &[String]) -> Result<Limits> {
    let mut limits = Limits {
        fsize: None,
        nofile: DEFAULT_NOFILE,
        nofile_given: false,
    };
    for arg in args {
        let flag = || format!("--resource-limit {arg}");
        let Some((res, n)) = arg.split_once('=') else {
            return Err(Error::flag(flag(), "expected fsize=N or no-file=N"));
        };
        let n: u64 = n
            .parse()
            .map_err(|_| Error::flag(flag(), format!("{n:?} is not a number")))?;
        match res {
            "fsize" => limits.fsize = Some(n),
            "no-file" => {
                limits.nofile = n;
                limits.nofile_given = true;
            }
            _ => {
                return Err(Error::flag(
                    flag(),
                    format!("unknown resource {res:?} (known: fsize, no-file)"),
                ))
            }
        }
    }
    Ok(limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(extra: &[&str]) -> std::result::Result<Cli, clap::Error> {
        let mut v = vec![
            "kiln-jailer",
            "--id",
            "vm-1",
            "--exec-file",
            "/usr/bin/kiln",
            "--uid",
            "123",
            "--gid",
            "100",
        ];
        v.extend_from_slice(extra);
        Cli::try_parse_from(v)
    }

    fn config(extra: &[&str]) -> Result<Config> {
        Config::from_cli(cli(extra).expect("parses"))
    }

    fn err(extra: &[&str]) -> String {
        config(extra).expect_err("must fail").to_string()
    }

    #[test]
    fn defaults_match_firecracker() {
        let c = config(&[]).expect("valid");
        assert_eq!(c.chroot_base, Path::new("/srv/jailer"));
        assert_eq!(c.cgroup_version, CgroupVersion::V1);
        assert_eq!(c.parent_cgroup, Path::new("kiln"));
        assert_eq!(c.exec_name, "kiln");
        assert_eq!(c.limits.nofile, 2048);
        assert_eq!(c.limits.fsize, None);
        assert!(!c.daemonize && !c.new_pid_ns && c.netns.is_none());
        assert_eq!(
            c.chroot_dir(Path::new("/srv/jailer")),
            Path::new("/srv/jailer/kiln/vm-1/root")
        );
    }

    #[test]
    fn everything_given() {
        let c = config(&[
            "--chroot-base-dir",
            "/tmp/j",
            "--netns",
            "/run/netns/a",
            "--daemonize",
            "--new-pid-ns",
            "--cgroup-version",
            "2",
            "--cgroup",
            "memory.max=1G",
            "--cgroup",
            "cpu.max=50000 100000",
            "--parent-cgroup",
            "vms/ext",
            "--resource-limit",
            "fsize=1000",
            "--resource-limit",
            "no-file=64",
            "--",
            "--kernel",
            "/vmlinux",
        ])
        .expect("valid");
        assert_eq!(c.cgroup_version, CgroupVersion::V2);
        assert_eq!(c.cgroups[1].controller, "cpu");
        assert_eq!(c.cgroups[1].value, "50000 100000");
        assert_eq!(c.parent_cgroup, Path::new("vms/ext"));
        assert_eq!(c.limits.fsize, Some(1000));
        assert_eq!(c.limits.nofile, 64);
        assert_eq!(c.vmm_args, ["--kernel", "/vmlinux"]);
        assert!(c.daemonize && c.new_pid_ns);
    }

    #[test]
    fn ids() {
        for ok in ["a", "551e7604-e35c-42b3-b825-416853441234", &"x".repeat(64)] {
            check_id(ok).expect(ok);
        }
        for bad in ["", "a/b", "a_b", "a.b", "..", "a b", "é", &"x".repeat(65)] {
            let e = check_id(bad).expect_err(bad).to_string();
            assert!(e.starts_with("--id "), "{e}");
        }
    }

    #[test]
    fn cgroup_keys() {
        let s = parse_cgroup("cpuset.cpus=0-1").expect("valid");
        assert_eq!((s.controller.as_str(), s.value.as_str()), ("cpuset", "0-1"));
        let s = parse_cgroup("hugetlb.2MB.max=0").expect("valid");
        assert_eq!(s.controller, "hugetlb");
        for (bad, flag) in [
            ("cpu.shares", "--cgroup cpu.shares"),
            ("cpushares=1", "--cgroup cpushares"),
            ("cpu.=1", "--cgroup cpu."),
            ("../tasks=1", "--cgroup ../tasks"),
            ("cpu/x.y=1", "--cgroup cpu/x.y"),
            (".cpu=1", "--cgroup .cpu"),
            ("cpu.shares=", "--cgroup cpu.shares"),
        ] {
            let e = parse_cgroup(bad).expect_err(bad).to_string();
            assert!(e.starts_with(&format!("{flag}:")), "{bad}: {e}");
        }
    }

    #[test]
    fn parent_cgroups() {
        assert!(parse_parent_cgroup("a/b-c").is_ok());
        for bad in ["", "/abs", "a/../b", "./a", "a//b", ".."] {
            let e = parse_parent_cgroup(bad).expect_err(bad).to_string();
            assert!(e.starts_with("--parent-cgroup"), "{e}");
        }
    }

    #[test]
    fn limits() {
        assert!(err(&["--resource-limit", "nofile=3"]).contains("unknown resource"));
        assert!(err(&["--resource-limit", "fsize=x"]).starts_with("--resource-limit fsize=x"));
        assert!(err(&["--resource-limit", "fsize"]).starts_with("--resource-limit fsize:"));
        let l = parse_limits(&["no-file=10".into(), "no-file=20".into()]).expect("valid");
        assert_eq!(l.nofile, 20);
    }

    /// A command line with `exec` and `uid` in place of the defaults.
    fn with(exec: &str, uid: &str) -> Result<Config> {
        let cli = Cli::try_parse_from([
            "kiln-jailer",
            "--id",
            "a",
            "--exec-file",
            exec,
            "--uid",
            uid,
            "--gid",
            "1",
        ])
        .expect("parses");
        Config::from_cli(cli)
    }

    #[test]
    fn ids_and_names() {
        let e = with("/bin/kiln", "4294967295").expect_err("-1");
        assert!(e.to_string().starts_with("--uid"), "{e}");
        let neg = [
            "j",
            "--id",
            "a",
            "--exec-file",
            "/k",
            "--uid",
            "1",
            "--gid",
            "-1",
        ];
        assert!(Cli::try_parse_from(neg).is_err());
        for bad in ["/x/dev", "/x/kiln.pid", "/"] {
            let e = with(bad, "1").expect_err(bad).to_string();
            assert!(e.starts_with("--exec-file"), "{e}");
        }
        assert!(cli(&["--cgroup-version", "3"]).is_err());
    }
}
