//! `kiln-jailer`: runs a VMM (the `kiln` binary, or any statically linked program) inside a
//! jail, with the same command line and chroot layout as Firecracker's `jailer`.
//!
//! The jailer validates everything first, then builds `<base>/<exec name>/<id>/root`, copies
//! the VMM in, creates the device nodes it needs, puts itself into the requested cgroups,
//! pivots into the chroot in a new mount namespace, joins a network namespace, optionally
//! forks into a new PID namespace, sets resource limits, drops to the given uid/gid and execs
//! the VMM. If a step fails, what it created (directories, files, cgroups) is removed again.
//! See `docs/jailer.md` for the flags, the layout and the differences from Firecracker.
//!
//! The library is the binary's implementation, split so each piece can be unit tested:
//! [`args`] (command line and its validation), [`cgroup`] (hierarchy discovery, creation),
//! [`chroot`] (the jail's files), [`undo`] (cleanup on failure) and [`jail`] (the steps).
#![warn(missing_docs)]

pub mod args;
pub mod cgroup;
pub mod chroot;
pub mod jail;
pub mod undo;

mod sys;

use std::io;
use std::path::PathBuf;

pub use args::{Cli, Config};
pub use jail::run;

/// Everything that can stop the jailer. Validation errors name the flag at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag's value is malformed, or names something that can't be used.
    #[error("{flag}: {reason}")]
    Flag {
        /// The flag, often with its value (`--cgroup cpu.nosuch`).
        flag: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A file system operation while building the jail failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path (as the host sees it, or as the jail sees it once inside).
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating, configuring or joining a cgroup failed.
    #[error("--cgroup {key}: {what} {}: {source}", path.display())]
    Cgroup {
        /// The `--cgroup` key being applied (or the controller, for directory steps).
        key: String,
        /// What was being done.
        what: &'static str,
        /// The cgroup file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A system call that builds the jail (namespaces, mounts, credentials) failed.
    #[error("{what}: {source}")]
    Sys {
        /// The step, e.g. `pivot_root into /srv/jailer/kiln/a/root`.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `execve` of the VMM failed after privileges were dropped, when the jail can no longer
    /// be removed by the jailer.
    #[error(
        "--exec-file: exec {} inside the jail: {source}; left behind (remove them as root): {}",
        path.display(),
        left.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    Exec {
        /// The path inside the jail.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
        /// What the jailer created and could not remove.
        left: Vec<PathBuf>,
    },
}

impl Error {
    /// A validation error for `flag`.
    pub fn flag(flag: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Flag {
            flag: flag.into(),
            reason: reason.into(),
        }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
