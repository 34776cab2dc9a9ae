//! Requests to a running VM from other threads (the API server, a control socket, the
//! migration sender): a channel plus an eventfd the VM's main thread polls beside its own
//! events, so a request never takes a lock a vCPU holds and never blocks a vCPU.
//!
//! The requester blocks on a reply channel (with a timeout); the main thread executes
//! requests one at a time, in order, between guest events.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What a caller can ask of a running VM.
#[derive(Debug)]
pub enum VmRequest {
    /// Stop every vCPU at a consistent point and quiesce the devices (no queue processing,
    /// no interrupt injection). Pausing a paused VM succeeds.
    Pause,
    /// Let a paused VM run again, exactly where it stopped. Resuming a running VM succeeds.
    Resume,
    /// Press Ctrl+Alt+Del on the guest's keyboard (Firecracker's `SendCtrlAltDel`).
    CtrlAltDel,
    /// Write a snapshot of the (paused) VM.
    Snapshot(SnapshotParams),
    /// Move the running VM to another kiln process (live migration).
    Migrate(MigrateParams),
    /// Set the balloon's target size, in bytes.
    BalloonTarget(u64),
    /// Read the balloon's size and latest statistics (answered with a JSON
    /// [`VmResponse::Report`] in Firecracker's `BalloonStats` format).
    BalloonStats,
}

/// Where and how to write a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotParams {
    /// The VM state file (vCPUs, interrupt controller, devices).
    pub state_path: PathBuf,
    /// The guest memory file.
    pub mem_path: PathBuf,
    /// Write only the pages dirtied since the previous snapshot (needs dirty tracking).
    pub diff: bool,
}

/// Where to migrate to and within what limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateParams {
    /// `tcp:HOST:PORT` or `unix:PATH` of a `kiln --migrate-listen` process.
    pub to: String,
    /// Pre-copy stops iterating once the rest would go in this long.
    pub max_downtime: Duration,
    /// Pre-copy gives up iterating after this many rounds and moves anyway.
    pub max_iterations: u32,
}

/// What a request produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmResponse {
    /// Done; nothing to report.
    Done,
    /// Done, with a human-readable report (sizes, times) for logs and the caller.
    Report(String),
}

/// Why a request did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The VM has ended (or never started); nobody will answer.
    #[error("the VM is not running")]
    VmGone,
    /// The VM did not answer within the caller's timeout.
    #[error("the VM did not answer within {0:?}")]
    Timeout(Duration),
    /// The VM refused or failed the request; the message says why.
    #[error("{0}")]
    Failed(String),
}

type Envelope = (VmRequest, mpsc::SyncSender<Result<VmResponse, String>>);

/// The requesting end; cheap to clone, one per thread that needs it.
#[derive(Debug, Clone)]
pub struct VmController {
    tx: mpsc::Sender<Envelope>,
    wake: Arc<EventFd>,
}

/// The VM's end: its main thread polls [`ControlReceiver::fd`] and calls
/// [`ControlReceiver::drain`].
#[derive(Debug)]
pub struct ControlReceiver {
    rx: mpsc::Receiver<Envelope>,
    wake: Arc<EventFd>,
}

/// A new, connected controller/receiver pair.
pub fn channel() -> io::Result<(VmController, ControlReceiver)> {
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    let (tx, rx) = mpsc::channel();
    Ok((
        VmController {
            tx,
            wake: wake.clone(),
        },
        ControlReceiver { rx, wake },
    ))
}

impl VmController {
    /// Sends `request` and waits up to `timeout` for its answer.
    pub fn call(&self, request: VmRequest, timeout: Duration) -> Result<VmResponse, ControlError> {
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        self.tx
            .send((request, reply_tx))
            .map_err(|_| ControlError::VmGone)?;
        // Can only fail on counter overflow, when the VM is already woken.
        let _ = self.wake.write(1);
        match reply_rx.recv_timeout(timeout) {
            Ok(r) => r.map_err(ControlError::Failed),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(ControlError::Timeout(timeout)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(ControlError::VmGone),
        }
    }
}

impl ControlReceiver {
    /// The fd that becomes readable when a request waits.
    pub fn fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Runs `handle` on each waiting request, in order, and sends each answer back (a caller
    /// that gave up waiting is no error).
    pub fn drain(&self, mut handle: impl FnMut(VmRequest) -> Result<VmResponse, String>) {
        let _ = self.wake.read();
        while let Ok((request, reply)) = self.rx.try_recv() {
            let _ = reply.send(handle(request));
        }
    }

    /// Answers every waiting request with `why` (the VM is ending).
    pub fn refuse_all(&self, why: &str) {
        while let Ok((_, reply)) = self.rx.try_recv() {
            let _ = reply.send(Err(why.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_answered_in_order() {
        let (ctl, rx) = channel().unwrap();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while seen.len() < 2 {
                // What the VM's main loop does: wait for the fd, then drain.
                let mut pfd = libc::pollfd {
                    fd: rx.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 5000) };
                rx.drain(|r| {
                    seen.push(format!("{r:?}"));
                    match r {
                        VmRequest::Pause => Ok(VmResponse::Done),
                        _ => Err("no".into()),
                    }
                });
            }
            seen
        });
        let t = Duration::from_secs(5);
        assert_eq!(ctl.call(VmRequest::Pause, t).unwrap(), VmResponse::Done);
        let e = ctl.call(VmRequest::Resume, t).unwrap_err();
        assert_eq!(e.to_string(), "no");
        assert_eq!(server.join().unwrap(), vec!["Pause", "Resume"]);
        // The receiver is gone: callers learn it at once.
        assert!(matches!(
            ctl.call(VmRequest::Pause, t),
            Err(ControlError::VmGone)
        ));
    }

    #[test]
    fn a_silent_vm_times_out() {
        let (ctl, _rx) = channel().unwrap();
        let e = ctl
            .call(VmRequest::Pause, Duration::from_millis(20))
            .unwrap_err();
        assert!(matches!(e, ControlError::Timeout(_)), "{e}");
    }
}
