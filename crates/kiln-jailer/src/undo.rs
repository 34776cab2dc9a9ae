//! What the jailer created, so a failed run can remove it again.
//!
//! Every entry holds an `O_PATH` handle on the directory that contains it, not a path: after
//! `pivot_root` the host's paths are gone, but the handles still reach the host's directories,
//! so a step that fails inside the jail can still clean up outside it. Entries are undone in
//! reverse order and only with `unlinkat`/`rmdir`, never recursively: a directory that
//! someone else put a file into is reported as left behind rather than emptied.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::sys::{cvt, open_dir};

/// One thing to undo.
#[derive(Debug)]
enum Step {
    /// Remove a file, device node, directory or cgroup that the jailer created.
    Remove {
        dir: OwnedFd,
        name: CString,
        is_dir: bool,
        shown: PathBuf,
    },
    /// Move the jailer back to the cgroup it came from (so its new cgroup can be removed).
    Rejoin { procs: File, shown: PathBuf },
    /// Write `value` to an (already open) file, e.g. `-cpu` to a `cgroup.subtree_control`.
    Write {
        file: File,
        value: String,
        shown: PathBuf,
    },
}

/// The undo log. It does nothing when dropped: call [`Undo::run`] on failure.
#[derive(Debug, Default)]
pub struct Undo {
    steps: Vec<Step>,
    /// Told (one byte) once a failure has been handled: the `--new-pid-ns` parent waits on
    /// it to exit with an error rather than 0.
    failure_pipe: Option<File>,
}

impl Undo {
    /// Creates the directory `path` (which must not exist) and logs it.
    pub fn create_dir(&mut self, path: &Path, mode: u32) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        let (dir, name) = parent_and_name(path)?;
        std::fs::DirBuilder::new().mode(mode).create(path)?;
        self.steps.push(Step::Remove {
            dir,
            name,
            is_dir: true,
            shown: path.to_path_buf(),
        });
        Ok(())
    }

    /// Runs `make`, which creates the non-directory `path`, and logs it.
    pub fn create_file(
        &mut self,
        path: &Path,
        make: impl FnOnce(&Path) -> io::Result<()>,
    ) -> io::Result<()> {
        let (dir, name) = parent_and_name(path)?;
        make(path)?;
        self.steps.push(Step::Remove {
            dir,
            name,
            is_dir: false,
            shown: path.to_path_buf(),
        });
        Ok(())
    }

    /// Logs a file that another process creates at `path` (the `--new-pid-ns` pid file).
    pub fn expect_file(&mut self, path: &Path) -> io::Result<()> {
        let (dir, name) = parent_and_name(path)?;
        self.steps.push(Step::Remove {
            dir,
            name,
            is_dir: false,
            shown: path.to_path_buf(),
        });
        Ok(())
    }

    /// Logs that the jailer is about to leave the cgroup whose `cgroup.procs` is `procs`.
    /// Opened now, while the host's paths are still reachable.
    pub fn leaving_cgroup(&mut self, procs: &Path) -> io::Result<()> {
        let f = std::fs::OpenOptions::new().write(true).open(procs)?;
        self.steps.push(Step::Rejoin {
            procs: f,
            shown: procs.to_path_buf(),
        });
        Ok(())
    }

    /// Logs that undoing needs `value` written to `path` (opened now, while it's reachable).
    pub fn write_on_undo(&mut self, path: &Path, value: &str) -> io::Result<()> {
        let f = std::fs::OpenOptions::new().write(true).open(path)?;
        self.steps.push(Step::Write {
            file: f,
            value: value.to_string(),
            shown: path.to_path_buf(),
        });
        Ok(())
    }

    /// Sets the pipe that [`Undo::run`] writes one byte to when it is done.
    pub fn report_failure_to(&mut self, pipe: File) {
        self.failure_pipe = Some(pipe);
    }

    /// Moves the jailer back to the cgroups it came from now, forgetting those steps (the
    /// `--new-pid-ns` parent, so it doesn't hold the VM's cgroups). Returns what failed.
    pub fn leave_cgroups(&mut self) -> Vec<String> {
        let mut failed = Vec::new();
        let steps = std::mem::take(&mut self.steps);
        for step in steps {
            match step {
                Step::Rejoin { procs, shown } => failed.extend(rejoin(procs, &shown)),
                other => self.steps.push(other),
            }
        }
        failed
    }

    /// The paths this log would remove, newest first.
    pub fn created(&self) -> Vec<PathBuf> {
        self.steps
            .iter()
            .rev()
            .filter_map(|s| match s {
                Step::Remove { shown, .. } => Some(shown.clone()),
                Step::Rejoin { .. } | Step::Write { .. } => None,
            })
            .collect()
    }

    /// Forgets every step (when they can't be undone any more); a failure is still reported.
    pub fn forget(&mut self) {
        self.steps.clear();
    }

    /// Undoes everything, newest first. Returns what could not be undone, with why; a path
    /// that is already gone counts as undone.
    pub fn run(&mut self) -> Vec<String> {
        let mut failed = Vec::new();
        while let Some(step) = self.steps.pop() {
            match step {
                Step::Remove {
                    dir,
                    name,
                    is_dir,
                    shown,
                } => {
                    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
                    // SAFETY: `dir` is an open directory handle and `name` a valid C string.
                    let r = cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) });
                    match r {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => {
                            failed.push(format!("{}: {e}", shown.display()));
                        }
                        _ => {}
                    }
                }
                Step::Rejoin { procs, shown } => failed.extend(rejoin(procs, &shown)),
                Step::Write {
                    mut file,
                    value,
                    shown,
                } => {
                    if let Err(e) = file.write_all(value.as_bytes()) {
                        failed.push(format!("writing {value:?} to {}: {e}", shown.display()));
                    }
                }
            }
        }
        if let Some(mut pipe) = self.failure_pipe.take() {
            let _ = pipe.write_all(b"!");
        }
        failed
    }
}

/// Writes this process's pid to a `cgroup.procs` (in a new PID namespace that is 1, which is
/// what the kernel expects there).
fn rejoin(mut procs: File, shown: &Path) -> Option<String> {
    let pid = std::process::id().to_string();
    procs
        .write_all(pid.as_bytes())
        .err()
        .map(|e| format!("moving back to {}: {e}", shown.display()))
}

/// An `O_PATH` handle on `path`'s directory and its last component.
fn parent_and_name(path: &Path) -> io::Result<(OwnedFd, CString)> {
    let invalid = || io::Error::new(io::ErrorKind::InvalidInput, "path has no parent");
    let parent = path.parent().ok_or_else(invalid)?;
    let name = path.file_name().ok_or_else(invalid)?;
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    Ok((open_dir(parent)?, cname(name)?))
}

fn cname(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL byte"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("kiln-jailer-undo-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch");
        d
    }

    #[test]
    fn removes_what_it_created_newest_first() {
        let d = scratch("basic");
        let mut u = Undo::default();
        u.create_dir(&d.join("a"), 0o755).expect("a");
        u.create_dir(&d.join("a/b"), 0o755).expect("b");
        u.create_file(&d.join("a/b/f"), |p| std::fs::write(p, b"x"))
            .expect("f");
        assert_eq!(u.created()[0], d.join("a/b/f"));
        assert!(u.run().is_empty());
        assert!(!d.join("a").exists());
        std::fs::remove_dir(&d).expect("only ours was removed");
    }

    #[test]
    fn leaves_foreign_files_and_says_so() {
        let d = scratch("foreign");
        let mut u = Undo::default();
        u.create_dir(&d.join("a"), 0o755).expect("a");
        std::fs::write(d.join("a/theirs"), b"x").expect("theirs");
        let failed = u.run();
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(failed[0].contains("/a:"), "{failed:?}");
        assert!(d.join("a/theirs").exists());
        std::fs::remove_dir_all(&d).expect("cleanup");
    }

    #[test]
    fn works_after_the_path_moved() {
        // Handles, not paths: renaming the parent (as pivot_root hides it) doesn't matter.
        let d = scratch("moved");
        let mut u = Undo::default();
        u.create_dir(&d.join("a"), 0o755).expect("a");
        u.create_file(&d.join("a/f"), |p| std::fs::write(p, b"x"))
            .expect("f");
        std::fs::rename(&d, d.with_extension("renamed")).expect("rename");
        assert!(u.run().is_empty());
        let moved = d.with_extension("renamed");
        assert!(!moved.join("a").exists());
        std::fs::remove_dir(&moved).expect("cleanup");
    }

    #[test]
    fn failed_creation_is_not_logged() {
        let d = scratch("exists");
        let mut u = Undo::default();
        assert!(u.create_dir(&d, 0o755).is_err());
        assert!(u.created().is_empty());
        std::fs::remove_dir(&d).expect("cleanup");
    }
}
