//! `--control-sock PATH`: a Unix socket taking one-line commands for the running VM and
//! forwarding them to its [`VmController`]. A test and scripting hook; the Firecracker API
//! (`--api-sock`) exposes the same requests.
//!
//! Commands (one per line; each answered with one line, `ok[ REPORT]` or `error MESSAGE`):
//! `pause`, `resume`, `snapshot STATE MEM [diff]`, `migrate ADDR [MAX_DOWNTIME_MS
//! [MAX_ITERATIONS]]` (docs/migration.md). Connections are served one at a time.
//!
//! The thread is started before the VM's threads install their seccomp filters and runs
//! without one (it parses only what the local user who owns the socket sends); the API
//! server's threads have their own (`api`).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::control::{self, ControlReceiver, SnapshotParams, VmController, VmRequest, VmResponse};

/// How long a command waits for the VM (a snapshot of a large guest takes seconds).
const CALL_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest command line accepted.
const MAX_LINE: usize = 8192;

/// Parses one command line into a request.
pub fn parse_command(line: &str) -> Result<VmRequest, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["pause"] => Ok(VmRequest::Pause),
        ["resume"] => Ok(VmRequest::Resume),
        ["snapshot", state, mem, rest @ ..] => {
            let diff = match rest {
                [] => false,
                ["diff"] => true,
                _ => return Err("usage: snapshot STATE MEM [diff]".into()),
            };
            Ok(VmRequest::Snapshot(SnapshotParams {
                state_path: PathBuf::from(state),
                mem_path: PathBuf::from(mem),
                diff,
            }))
        }
        ["migrate", to, rest @ ..] => {
            let num = |v: Option<&&str>, default: u64, what: &str| -> Result<u64, String> {
                v.map_or(Ok(default), |v| {
                    v.parse()
                        .map_err(|_| format!("migrate: {what} must be a number, not {v:?}"))
                })
            };
            if rest.len() > 2 {
                return Err("usage: migrate ADDR [MAX_DOWNTIME_MS [MAX_ITERATIONS]]".into());
            }
            let ms = num(rest.first(), 300, "MAX_DOWNTIME_MS")?;
            let it = num(rest.get(1), 30, "MAX_ITERATIONS")?;
            to.parse::<crate::migration::MigrateAddr>()
                .map_err(|e| format!("migrate: {e}"))?;
            Ok(VmRequest::Migrate(control::MigrateParams {
                to: to.to_string(),
                max_downtime: Duration::from_millis(ms),
                max_iterations: u32::try_from(it).unwrap_or(u32::MAX),
            }))
        }
        _ => Err(format!(
            "unknown command {line:?} (pause, resume, snapshot STATE MEM [diff], \
             migrate ADDR [MAX_DOWNTIME_MS [MAX_ITERATIONS]])"
        )),
    }
}

fn answer(ctl: &VmController, line: &str) -> String {
    match parse_command(line) {
        Err(e) => format!("error {e}"),
        Ok(req) => match ctl.call(req, CALL_TIMEOUT) {
            Ok(VmResponse::Done) => "ok".into(),
            Ok(VmResponse::Report(r)) => format!("ok {r}"),
            Err(e) => format!("error {e}"),
        },
    }
}

fn serve_connection(ctl: &VmController, stream: UnixStream) -> io::Result<()> {
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut reader).take(MAX_LINE as u64).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n >= MAX_LINE {
            writeln!(out, "error command longer than {MAX_LINE} bytes")?;
            return Ok(());
        }
        let reply = answer(ctl, line.trim());
        // One line per answer, whatever the report holds.
        writeln!(out, "{}", reply.replace('\n', " "))?;
    }
}

fn block_signals() {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset/sigaddset; the mask only
    // applies to this thread, so SIGINT/SIGTERM go to the main thread's signalfd.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Binds `path` (which must not exist) and serves it on a `kiln-control` thread; returns
/// the receiving end for the VM's main loop.
pub fn serve(path: &Path) -> Result<ControlReceiver, String> {
    let err = |e: io::Error| format!("--control-sock {}: {e}", path.display());
    let listener = UnixListener::bind(path).map_err(err)?;
    let (ctl, rx) = control::channel().map_err(err)?;
    std::thread::Builder::new()
        .name("kiln-control".into())
        .spawn(move || {
            block_signals();
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        // A client that goes away mid-answer is no error of ours.
                        let _ = serve_connection(&ctl, s);
                    }
                    Err(e) => {
                        eprintln!("kiln: --control-sock: accept: {e}");
                        return;
                    }
                }
            }
        })
        .map_err(err)?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert!(matches!(parse_command("pause"), Ok(VmRequest::Pause)));
        assert!(matches!(parse_command(" resume "), Ok(VmRequest::Resume)));
        match parse_command("snapshot /a/s /a/m diff") {
            Ok(VmRequest::Snapshot(p)) => {
                assert_eq!(p.state_path, PathBuf::from("/a/s"));
                assert_eq!(p.mem_path, PathBuf::from("/a/m"));
                assert!(p.diff);
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            "",
            "snapshot",
            "snapshot /a",
            "snapshot /a /b full",
            "reboot",
        ] {
            assert!(parse_command(bad).is_err(), "{bad}");
        }
    }
}
