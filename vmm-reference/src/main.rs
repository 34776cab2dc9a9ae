//! `kiln`: the Kiln reference VMM. See `kiln --help`. Invoked as `firecracker` (a symlink)
//! it is a drop-in for Firecracker: its API, command line, exit codes and thread names
//! (docs/api.md).

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

use kiln::api::{self, models::VmConfig};
use kiln::config::Cli;
use kiln::vm::{self, Outcome, Vm, VmSpec};

/// Firecracker's exit codes.
const FC_EXIT_OK: u8 = 0;
const FC_EXIT_GENERIC: u8 = 1;
const FC_EXIT_BAD_CONFIGURATION: u8 = 152;
const FC_EXIT_ARG_PARSING: u8 = 153;

/// Firecracker's default API socket.
const FC_DEFAULT_SOCKET: &str = "/run/firecracker.socket";

fn invoked_as_firecracker(argv0: Option<&OsString>) -> bool {
    argv0
        .and_then(|a| Path::new(a).file_name().map(|n| n.to_owned()))
        .is_some_and(|n| n == "firecracker")
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let fc = invoked_as_firecracker(args.first());
    if fc && args.iter().skip(1).any(|a| a == "--version" || a == "-V") {
        // The first line is what the SDKs parse (`Firecracker vX.Y.Z`).
        println!(
            "Firecracker v{}\n\nkiln {} (Firecracker API compatible)",
            api::FIRECRACKER_VERSION,
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ if fc => FC_EXIT_ARG_PARSING,
                _ => 2,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if let Some(path) = &cli.write_bundled_guest {
        return match std::fs::write(path, kiln::guest::ELF) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kiln: --write-bundled-guest {}: {e}", path.display());
                ExitCode::from(vm::EXIT_ERROR)
            }
        };
    }
    if fc || cli.api_sock.is_some() || cli.config_file.is_some() {
        return ExitCode::from(run_firecracker(cli, args, fc));
    }
    run_native(cli)
}

/// kiln's own command line: the VM the flags describe.
fn run_native(cli: Cli) -> ExitCode {
    let control = match &cli.control_sock {
        Some(path) => match kiln::control_sock::serve(path) {
            Ok(rx) => Some(rx),
            Err(e) => {
                eprintln!("kiln: {e}");
                return ExitCode::from(vm::EXIT_ERROR);
            }
        },
        None => None,
    };
    if cli.restore.is_some() {
        return finish(kiln::snapshot::run_restore(cli, control));
    }
    if cli.migrate_listen.is_some() {
        return finish(kiln::migration::run_incoming(cli, control));
    }
    let dump_acpi = cli.dump_acpi.clone();
    let spec = match vm::VmSpec::from_cli(cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kiln: {e}");
            return ExitCode::from(vm::EXIT_ERROR);
        }
    };
    if let Some(dir) = dump_acpi {
        return match vm::dump_acpi(&spec, &dir) {
            Ok(files) => {
                for f in files {
                    println!("{}", f.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("kiln: {e}");
                ExitCode::from(vm::EXIT_ERROR)
            }
        };
    }
    finish(vm::run_with(spec, control))
}

fn finish(result: Result<Outcome, vm::VmmError>) -> ExitCode {
    match result {
        Ok(outcome) => {
            if let Outcome::Crashed(report) = &outcome {
                eprintln!("kiln: guest crashed:\n{report}");
            }
            ExitCode::from(outcome.exit_code())
        }
        Err(e) => {
            eprintln!("kiln: {e}");
            ExitCode::from(vm::EXIT_ERROR)
        }
    }
}

/// The Firecracker command line: the API, `--config-file`, Firecracker's exit codes.
fn run_firecracker(cli: Cli, args: Vec<OsString>, fc: bool) -> u8 {
    let started_at = std::time::Instant::now();
    kiln::logger::set_id(&cli.id);
    // The API server and metrics threads get their own filter (the `api` thread kind).
    let api_filters = match vm::api_filters(&cli) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("kiln: {e}");
            return FC_EXIT_BAD_CONFIGURATION;
        }
    };
    if let Some(f) = &api_filters {
        kiln::metrics::set_flusher_filter(f.clone());
    }
    if cli.boot_timer {
        eprintln!(
            "kiln: --boot-timer is accepted but not honoured (kiln has no boot-timer device)"
        );
    }
    if cli.log_path.is_some() || cli.level.is_some() || cli.show_level || cli.show_log_origin {
        let l = api::models::Logger {
            level: cli.level,
            log_path: cli.log_path.as_ref().map(|p| p.display().to_string()),
            show_level: Some(cli.show_level),
            show_log_origin: Some(cli.show_log_origin),
            module: None,
        };
        if let Err(e) = kiln::logger::configure(&l) {
            eprintln!("kiln: --log-path: {e}");
            return FC_EXIT_BAD_CONFIGURATION;
        }
    }
    if let Some(p) = &cli.metrics_path {
        if let Err(e) = kiln::metrics::init(p) {
            eprintln!("kiln: --metrics-path: {e}");
            return FC_EXIT_BAD_CONFIGURATION;
        }
    }
    let config = match &cli.config_file {
        Some(p) => match api::build::read_config_file(p) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("kiln: {e}");
                return FC_EXIT_BAD_CONFIGURATION;
            }
        },
        None => None,
    };
    // Before any thread exists, so every thread inherits the blocked signals.
    let signals = match vm::signal_fd() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kiln: {e}");
            return FC_EXIT_GENERIC;
        }
    };
    let fix_spec = |mut spec: VmSpec| {
        if fc {
            // Firecracker has no graceful SIGTERM, and names its vCPU threads so.
            spec.shutdown_timeout = std::time::Duration::ZERO;
            spec.vcpu_thread_prefix = Some("fc_vcpu ".into());
        }
        spec
    };
    // Validate the file's configuration before anything serves or runs.
    let file_spec = match &config {
        Some(c) => match api::build::spec(&args, c) {
            Ok(s) => Some(fix_spec(s)),
            Err(r) => {
                eprintln!("kiln: --config-file: {}", fault_of(&r));
                return FC_EXIT_BAD_CONFIGURATION;
            }
        },
        None => None,
    };
    let (controller, control) = match kiln::control::channel() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("kiln: control channel: {e}");
            return FC_EXIT_GENERIC;
        }
    };
    let (starter, start_rx) = match api::start_channel() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("kiln: start channel: {e}");
            return FC_EXIT_GENERIC;
        }
    };
    // As `firecracker` the API is on unless --no-api (at Firecracker's default path); as
    // `kiln` only with --api-sock.
    if !cli.no_api && (fc || cli.api_sock.is_some()) {
        let path = cli
            .api_sock
            .clone()
            .unwrap_or_else(|| PathBuf::from(FC_DEFAULT_SOCKET));
        let listener = match std::os::unix::net::UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "kiln: Failed to open the API socket at {}: {e}",
                    path.display()
                );
                return FC_EXIT_GENERIC;
            }
        };
        // Left in place at exit, as Firecracker does (the VMM thread's seccomp filter
        // allows no unlink; the orchestrator or jailer owns the directory).
        let opts = api::ApiOptions {
            id: cli.id.clone(),
            max_payload: cli.http_api_max_payload_size,
            base_args: args.clone(),
            mmds_limit: cli.mmds_size_limit.unwrap_or(cli.http_api_max_payload_size),
        };
        let state = api::ApiState::new(
            opts,
            config.clone().unwrap_or_else(VmConfig::default),
            file_spec.is_some(),
            controller,
            starter,
        );
        let selftest = cli.seccomp_selftest == Some(kiln::config::SeccompSelftest::Api);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name("fc_api".into())
            .spawn(move || {
                // The connection threads it spawns inherit this filter.
                let installed = match &api_filters {
                    Some(f) => f
                        .install(kiln_seccomp::ThreadKind::Api)
                        .map_err(|e| e.to_string()),
                    None => Ok(()),
                };
                let failed = installed.is_err();
                let _ = ready_tx.send(installed);
                if failed {
                    return;
                }
                if selftest {
                    kiln_seccomp::forbidden_call_for_tests();
                }
                api::serve(listener, state)
            });
        if let Err(e) = spawned {
            eprintln!("kiln: spawning the API thread: {e}");
            return FC_EXIT_GENERIC;
        }
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("kiln: API thread: {e}");
                return FC_EXIT_GENERIC;
            }
            Err(_) => {
                eprintln!("kiln: the API thread ended while starting");
                return FC_EXIT_GENERIC;
            }
        }
        kiln::metrics::METRICS
            .api_server
            .process_startup_time_us
            .set(started_at.elapsed().as_micros() as u64);
    }
    // Booting installs the VMM thread's seccomp filter: every fd and thread this thread
    // makes comes first (above).
    let booted = match file_spec {
        Some(spec) => match Vm::boot(spec) {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("kiln: --config-file: {e}");
                return FC_EXIT_BAD_CONFIGURATION;
            }
        },
        None => None,
    };
    let mut vm = match booted {
        Some(v) => v,
        None => match wait_for_start(&signals, &start_rx, &fix_spec) {
            Ok(v) => v,
            Err(sig) => return end_by_signal(sig, fc),
        },
    };
    kiln::logger::info(format_args!("microVM running"));
    let outcome = vm.wait(&signals, Some(&control));
    control.refuse_all("the VM has ended");
    vm.shutdown();
    match outcome {
        // Firecracker exits 0 when the guest powers off or reboots (Ctrl+Alt+Del).
        Ok(Outcome::PowerOff) | Ok(Outcome::Reset) => FC_EXIT_OK,
        // The VM runs on in another process.
        Ok(Outcome::Migrated) => FC_EXIT_OK,
        Ok(Outcome::Crashed(report)) => {
            eprintln!("kiln: guest crashed:\n{report}");
            FC_EXIT_GENERIC
        }
        Ok(Outcome::Signal(sig)) => end_by_signal(sig, fc),
        Err(e) => {
            eprintln!("kiln: {e}");
            FC_EXIT_GENERIC
        }
    }
}

fn fault_of(r: &api::http::Response) -> String {
    r.body.clone().unwrap_or_default()
}

/// Before `InstanceStart` or `PUT /snapshot/load`: waits for the API's start request
/// (building each one's VM, answering whether it worked) or a signal (returned).
fn wait_for_start(
    signals: &OwnedFd,
    start: &api::StartReceiver,
    fix_spec: &dyn Fn(VmSpec) -> VmSpec,
) -> Result<Vm, i32> {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: signals.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: start.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            continue;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            if let Some(sig) = vm::read_signal(signals) {
                return Err(sig);
            }
        }
        if fds[1].revents & libc::POLLIN != 0 {
            while let Some((request, reply)) = start.try_recv() {
                let built = match request {
                    api::StartRequest::Boot(spec) => Vm::boot(fix_spec(*spec)),
                    api::StartRequest::Restore { cli, arg, paused } => {
                        // The same checks and spec as `--restore`.
                        kiln::snapshot::prepare_restore(*cli, &arg).and_then(|p| {
                            Vm::restore_from(fix_spec(p.spec), p.state, p.mem, paused)
                        })
                    }
                };
                match built {
                    Ok(vm) => {
                        let _ = reply.send(Ok(()));
                        return Ok(vm);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.to_string()));
                    }
                }
            }
        }
    }
}

/// Ends on signal `sig`: as Firecracker (killed by it: default action) or as kiln (128+N).
fn end_by_signal(sig: i32, fc: bool) -> u8 {
    if fc {
        // SAFETY: the action of SIGINT/SIGTERM was never changed (a signalfd only reads
        // blocked signals), so unblocking `sig` in this thread and raising it ends the process
        // as if it had never been handled, as Firecracker's does. Only rt_sigprocmask and
        // tgkill, which the VMM thread's seccomp filter allows.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::raise(sig);
        }
    }
    128u8.saturating_add(u8::try_from(sig).unwrap_or(0))
}
