//! cgroups: finding the hierarchies that hold the `--cgroup` controllers, and creating and
//! joining `<mount>/<parent cgroup>/<id>` in each.
//!
//! cgroup v1: each controller's hierarchy is found in `/proc/self/mountinfo` (controllers
//! mounted together share one directory). New `cpuset` cgroups start with no CPUs or memory
//! nodes, so every level inherits `cpuset.cpus`/`cpuset.mems` from its parent when empty,
//! as Firecracker does. The jailer joins through `tasks`.
//!
//! cgroup v2: one hierarchy; a controller must be listed in the root's `cgroup.controllers`
//! and is enabled in the `cgroup.subtree_control` of every ancestor of the new cgroup. The
//! jailer joins through `cgroup.procs`.
//!
//! Only hierarchies with a `--cgroup` setting are touched (no `--cgroup`, no cgroup).

use std::collections::BTreeSet;
use std::io;
use std::path::{Component, Path, PathBuf};

use crate::args::{CgroupSetting, CgroupVersion};
use crate::undo::Undo;
use crate::{Error, Result};

/// One line of `/proc/self/mountinfo`, the fields the jailer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The directory of the filesystem that is mounted (field 4).
    pub root: PathBuf,
    /// Where it is mounted.
    pub point: PathBuf,
    /// `cgroup`, `cgroup2`, ...
    pub fstype: String,
    /// Super-block options: for cgroup v1 these name the controllers.
    pub super_opts: Vec<String>,
}

/// Parses `/proc/self/mountinfo` text (lines that don't parse are skipped).
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(Mount {
                root: PathBuf::from(unescape(l.get(3)?)),
                point: PathBuf::from(unescape(l.get(4)?)),
                fstype: (*r.first()?).to_string(),
                super_opts: r.get(2)?.split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line of `/proc/self/cgroup`: `<id>:<controllers>:<path>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// The controllers of a v1 hierarchy; empty for v2 (`0::/path`).
    pub controllers: Vec<String>,
    /// The cgroup's path from the hierarchy's root.
    pub path: PathBuf,
}

/// Parses `/proc/self/cgroup` text.
pub fn parse_proc_cgroup(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|line| {
            let mut it = line.splitn(3, ':');
            let _id = it.next()?;
            let controllers = it.next()?;
            let path = it.next()?;
            Some(Membership {
                controllers: controllers
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect(),
                path: PathBuf::from(path),
            })
        })
        .collect()
}

/// One hierarchy the jail gets a cgroup in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Where it is mounted.
    pub mount: PathBuf,
    /// v1 or v2.
    pub version: CgroupVersion,
    /// The needed controllers that live here.
    pub controllers: Vec<String>,
    /// The settings to write, in command-line order.
    pub settings: Vec<CgroupSetting>,
    /// The jailer's cgroup directory here now (to move back to if a later step fails).
    pub origin: PathBuf,
}

/// What the host offers, read once so [`plan`] is a pure function.
#[derive(Debug, Clone, Default)]
pub struct HostCgroups {
    /// `/proc/self/mountinfo`, parsed.
    pub mounts: Vec<Mount>,
    /// `/proc/self/cgroup`, parsed.
    pub membership: Vec<Membership>,
    /// The v2 root's `cgroup.controllers`, when a v2 hierarchy is mounted.
    pub v2_controllers: Vec<String>,
}

impl HostCgroups {
    /// Reads the running system's cgroup mounts and the jailer's membership.
    pub fn read() -> Result<Self> {
        let read = |p: &str| {
            std::fs::read_to_string(p).map_err(|e| Error::Io {
                what: "reading",
                path: p.into(),
                source: e,
            })
        };
        let mounts = parse_mountinfo(&read("/proc/self/mountinfo")?);
        let membership = parse_proc_cgroup(&read("/proc/self/cgroup")?);
        let v2_controllers = match mounts.iter().find(|m| m.fstype == "cgroup2") {
            Some(m) => {
                let p = m.point.join("cgroup.controllers");
                std::fs::read_to_string(&p)
                    .map_err(|e| Error::Io {
                        what: "reading",
                        path: p,
                        source: e,
                    })?
                    .split_whitespace()
                    .map(str::to_string)
                    .collect()
            }
            None => Vec::new(),
        };
        Ok(HostCgroups {
            mounts,
            membership,
            v2_controllers,
        })
    }

    fn v1_mount(&self, controller: &str) -> Option<&Mount> {
        self.mounts
            .iter()
            .find(|m| m.fstype == "cgroup" && m.super_opts.iter().any(|o| o == controller))
    }

    fn v1_controllers(&self) -> BTreeSet<&str> {
        let known = known_v1_controllers();
        self.mounts
            .iter()
            .filter(|m| m.fstype == "cgroup")
            .flat_map(|m| m.super_opts.iter())
            .map(String::as_str)
            .filter(|o| known.contains(o))
            .collect()
    }

    /// The directory of the jailer's current cgroup in the hierarchy mounted as `m`.
    fn origin(&self, m: &Mount, version: CgroupVersion, controller: &str) -> PathBuf {
        let path = self.membership.iter().find(|x| match version {
            CgroupVersion::V1 => x.controllers.iter().any(|c| c == controller),
            CgroupVersion::V2 => x.controllers.is_empty(),
        });
        // The mount may show a subtree: strip its root from the membership path.
        let rel = path
            .and_then(|x| x.path.strip_prefix(&m.root).ok())
            .unwrap_or(Path::new(""));
        m.point.join(rel)
    }
}

/// Controller names of cgroup v1 (to tell them from mount options such as `rw`).
fn known_v1_controllers() -> BTreeSet<&'static str> {
    [
        "blkio",
        "cpu",
        "cpuacct",
        "cpuset",
        "devices",
        "freezer",
        "hugetlb",
        "memory",
        "misc",
        "net_cls",
        "net_prio",
        "perf_event",
        "pids",
        "rdma",
    ]
    .into_iter()
    .collect()
}

fn list<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let v: Vec<&str> = names.into_iter().collect();
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}

/// Decides which hierarchies the `settings` go to, failing (naming the `--cgroup` key) when
/// a controller isn't available in the chosen version.
pub fn plan(
    version: CgroupVersion,
    settings: &[CgroupSetting],
    host: &HostCgroups,
) -> Result<Vec<Hierarchy>> {
    let mut out: Vec<Hierarchy> = Vec::new();
    for s in settings {
        let flag = || format!("--cgroup {}", s.key);
        let mount = match version {
            CgroupVersion::V1 => host.v1_mount(&s.controller).ok_or_else(|| {
                let hint = if host.v2_controllers.contains(&s.controller) {
                    " (it is in the cgroup v2 hierarchy: use --cgroup-version 2)"
                } else {
                    ""
                };
                Error::flag(
                    flag(),
                    format!(
                        "unknown controller {:?}: no cgroup v1 hierarchy has it{hint}; v1 controllers here: {}",
                        s.controller,
                        list(host.v1_controllers())
                    ),
                )
            })?,
            CgroupVersion::V2 => {
                let m = host
                    .mounts
                    .iter()
                    .find(|m| m.fstype == "cgroup2")
                    .ok_or_else(|| Error::flag(flag(), "no cgroup v2 hierarchy is mounted"))?;
                if !host.v2_controllers.contains(&s.controller) {
                    let hint = if host.v1_mount(&s.controller).is_some() {
                        " (it is bound to a cgroup v1 hierarchy: use --cgroup-version 1)"
                    } else {
                        ""
                    };
                    return Err(Error::flag(
                        flag(),
                        format!(
                            "unknown controller {:?}: not available in the cgroup v2 hierarchy at {}{hint}; available there: {}",
                            s.controller,
                            m.point.display(),
                            list(host.v2_controllers.iter().map(String::as_str))
                        ),
                    ));
                }
                m
            }
        };
        match out.iter_mut().find(|h| h.mount == mount.point) {
            Some(h) => {
                if !h.controllers.contains(&s.controller) {
                    h.controllers.push(s.controller.clone());
                }
                h.settings.push(s.clone());
            }
            None => out.push(Hierarchy {
                mount: mount.point.clone(),
                version,
                controllers: vec![s.controller.clone()],
                settings: vec![s.clone()],
                origin: host.origin(mount, version, &s.controller),
            }),
        }
    }
    Ok(out)
}

fn cg_err(key: &str, what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let (key, path) = (key.to_string(), path.to_path_buf());
    move |source| Error::Cgroup {
        key,
        what,
        path,
        source,
    }
}

fn read(path: &Path, key: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(cg_err(key, "reading", path))
}

fn write(path: &Path, value: &str, key: &str) -> Result<()> {
    use std::io::Write;
    // cgroup files exist already; never create one.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(cg_err(key, "opening", path))?;
    f.write_all(value.as_bytes())
        .map_err(cg_err(key, "writing", path))
}

/// Creates `<mount>/<parent>/<id>` (logging each new directory in `undo`), checks that every
/// setting's file exists there and writes the values. Returns the new cgroup's directory.
pub fn create(h: &Hierarchy, parent: &Path, id: &str, undo: &mut Undo) -> Result<PathBuf> {
    let ctl = h.controllers.join(",");
    let mut dir = h.mount.clone();
    let levels = parent
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .chain(std::iter::once(std::ffi::OsStr::new(id)));
    for name in levels {
        if h.version == CgroupVersion::V2 {
            enable_controllers(&dir, &h.controllers, undo)?;
        }
        let next = dir.join(name);
        match std::fs::symlink_metadata(&next) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::Cgroup {
                    key: ctl,
                    what: "creating",
                    path: next,
                    source: io::Error::from(io::ErrorKind::AlreadyExists),
                })
            }
            Err(_) => undo
                .create_dir(&next, 0o755)
                .map_err(cg_err(&ctl, "creating", &next))?,
        }
        if h.version == CgroupVersion::V1 && h.controllers.iter().any(|c| c == "cpuset") {
            for f in ["cpuset.cpus", "cpuset.mems"] {
                if read(&next.join(f), "cpuset")?.trim().is_empty() {
                    let v = read(&dir.join(f), "cpuset")?;
                    write(&next.join(f), v.trim(), "cpuset")?;
                }
            }
        }
        dir = next;
    }
    for s in &h.settings {
        let file = dir.join(&s.key);
        if !file.is_file() {
            return Err(Error::flag(
                format!("--cgroup {}", s.key),
                format!(
                    "{} does not exist: not a file of the {} controller{}",
                    file.display(),
                    s.controller,
                    match h.version {
                        CgroupVersion::V1 => " in cgroup v1",
                        CgroupVersion::V2 => " in cgroup v2",
                    }
                ),
            ));
        }
    }
    for s in &h.settings {
        write(
            &dir.join(&s.key),
            &s.value,
            &format!("{}={}", s.key, s.value),
        )?;
    }
    Ok(dir)
}

/// v2: lets `dir`'s children use `controllers` (logging how to turn them off again).
fn enable_controllers(dir: &Path, controllers: &[String], undo: &mut Undo) -> Result<()> {
    let file = dir.join("cgroup.subtree_control");
    let on = read(&file, &controllers.join(","))?;
    let on: Vec<&str> = on.split_whitespace().collect();
    for c in controllers {
        if !on.contains(&c.as_str()) {
            write(&file, &format!("+{c}"), c)?;
            undo.write_on_undo(&file, &format!("-{c}"))
                .map_err(cg_err(c, "opening", &file))?;
        }
    }
    Ok(())
}

/// Moves the jailer into `leaf` (logging how to move back in `undo`).
pub fn join(h: &Hierarchy, leaf: &Path, undo: &mut Undo) -> Result<()> {
    let ctl = h.controllers.join(",");
    let back = h.origin.join("cgroup.procs");
    undo.leaving_cgroup(&back)
        .map_err(cg_err(&ctl, "opening", &back))?;
    let file = leaf.join(match h.version {
        CgroupVersion::V1 => "tasks",
        CgroupVersion::V2 => "cgroup.procs",
    });
    write(&file, &std::process::id().to_string(), &ctl)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::parse_cgroup;

    // This project's CI host: v1 controllers on their own mounts, a v2 hierarchy with only
    // hugetlb free, the jailer in a nested memory cgroup.
    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
33 30 0:29 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
34 30 0:30 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
35 30 0:31 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
36 30 0:32 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
37 30 0:33 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
38 30 0:34 /sub /sys/fs/cgroup/net\\040cls rw - cgroup cgroup rw,net_cls,net_prio
";
    const PROC_CGROUP: &str = "\
9:name=systemd:/
8:pids:/
4:memory:/process_api/abc
3:cpuset:/
1:cpu:/
10:net_cls,net_prio:/sub/x
0::/
";

    fn host() -> HostCgroups {
        HostCgroups {
            mounts: parse_mountinfo(MOUNTINFO),
            membership: parse_proc_cgroup(PROC_CGROUP),
            v2_controllers: vec!["hugetlb".into()],
        }
    }

    fn settings(keys: &[&str]) -> Vec<CgroupSetting> {
        keys.iter()
            .map(|k| parse_cgroup(k).expect("valid"))
            .collect()
    }

    #[test]
    fn mountinfo() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 10);
        assert_eq!(m[2].point, Path::new("/sys/fs/cgroup/cpu"));
        assert_eq!(m[2].super_opts, ["rw", "cpu"]);
        assert_eq!(m[8].fstype, "cgroup2");
        assert_eq!(m[9].point, Path::new("/sys/fs/cgroup/net cls"));
        assert_eq!(m[9].root, Path::new("/sub"));
    }

    #[test]
    fn v1_plan_groups_by_mount() {
        let p = plan(
            CgroupVersion::V1,
            &settings(&[
                "cpu.cfs_quota_us=50000",
                "memory.limit_in_bytes=1G",
                "cpu.shares=10",
                "net_prio.ifpriomap=lo 1",
                "net_cls.classid=1",
            ]),
            &host(),
        )
        .expect("plan");
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].mount, Path::new("/sys/fs/cgroup/cpu"));
        assert_eq!(p[0].settings.len(), 2);
        assert_eq!(p[0].origin, Path::new("/sys/fs/cgroup/cpu"));
        assert_eq!(
            p[1].origin,
            Path::new("/sys/fs/cgroup/memory/process_api/abc")
        );
        assert_eq!(p[2].controllers, ["net_prio", "net_cls"]);
        assert_eq!(p[2].origin, Path::new("/sys/fs/cgroup/net cls/x"));
    }

    #[test]
    fn v2_plan() {
        let p = plan(
            CgroupVersion::V2,
            &settings(&["hugetlb.2MB.max=0"]),
            &host(),
        )
        .expect("plan");
        assert_eq!(p[0].mount, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(p[0].origin, Path::new("/sys/fs/cgroup/unified"));
    }

    #[test]
    fn unknown_controllers_name_the_key() {
        let e = plan(CgroupVersion::V1, &settings(&["nosuch.x=1"]), &host())
            .expect_err("unknown")
            .to_string();
        assert!(
            e.starts_with("--cgroup nosuch.x: unknown controller"),
            "{e}"
        );
        assert!(
            e.contains("cpu, cpuacct, cpuset, memory, net_cls, net_prio, pids"),
            "{e}"
        );
        let e = plan(
            CgroupVersion::V1,
            &settings(&["hugetlb.2MB.max=1"]),
            &host(),
        )
        .expect_err("v2 only")
        .to_string();
        assert!(e.contains("--cgroup-version 2"), "{e}");
        let e = plan(CgroupVersion::V2, &settings(&["memory.max=1"]), &host())
            .expect_err("v1 only")
            .to_string();
        assert!(
            e.starts_with("--cgroup memory.max: unknown controller"),
            "{e}"
        );
        assert!(
            e.contains("--cgroup-version 1") && e.contains("available there: hugetlb"),
            "{e}"
        );
        let no_v2 = HostCgroups {
            mounts: parse_mountinfo(MOUNTINFO)
                .into_iter()
                .filter(|m| m.fstype != "cgroup2")
                .collect(),
            ..host()
        };
        let e = plan(CgroupVersion::V2, &settings(&["cpu.max=1"]), &no_v2)
            .expect_err("no v2")
            .to_string();
        assert!(e.contains("no cgroup v2 hierarchy"), "{e}");
    }
}
