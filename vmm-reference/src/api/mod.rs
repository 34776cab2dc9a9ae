//! The Firecracker-compatible REST API (firecracker.yaml v1.16.1) on a Unix socket.
//!
//! The server runs on its own threads ([`http`]); before boot it only collects the
//! configuration ([`models::VmConfig`]). `InstanceStart` turns that into a
//! [`crate::vm::VmSpec`] ([`build`]) and hands it to the main thread through a [`Starter`],
//! which boots the VM and serves it; after boot every request that touches the VM goes through
//! the [`VmController`] and is executed by the VM's main thread between guest events, so no
//! API call ever takes a lock a vCPU holds.

pub mod build;
pub mod http;
pub mod models;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::control::{SnapshotParams, VmController, VmRequest, VmResponse};
use crate::metrics::METRICS;
use http::{Request, Response};
use models::*;

/// The Firecracker version whose API kiln implements (`GET /version`, `--version`).
pub const FIRECRACKER_VERSION: &str = "1.16.1";
/// Firecracker's default `--http-api-max-payload-size`.
pub const DEFAULT_MAX_PAYLOAD: usize = 51200;
/// How long an API call waits for the VM's main thread.
const VM_CALL_TIMEOUT: Duration = Duration::from_secs(30);

const PRE_BOOT: &str = "The requested operation is not supported before starting the microVM.";
const POST_BOOT: &str = "The requested operation is not supported after starting the microVM.";

/// What the main thread is asked to build before it serves a VM.
#[derive(Debug)]
pub enum StartRequest {
    /// `InstanceStart`: boot this VM.
    Boot(Box<crate::vm::VmSpec>),
    /// `PUT /snapshot/load`: restore the snapshot `arg` over the command line `cli`, as
    /// `--restore` does, `paused` or running.
    Restore {
        /// The native command line (serial, seccomp, ...) the snapshot's machine goes over.
        cli: Box<crate::config::Cli>,
        /// The state and memory files.
        arg: crate::snapshot::RestoreArg,
        /// Stay paused after restoring (`resume_vm` false).
        paused: bool,
    },
}

/// A start request, and where the answer goes.
pub type StartMsg = (StartRequest, mpsc::SyncSender<Result<(), String>>);

/// The API's end of the boot hand-over.
#[derive(Debug)]
pub struct Starter {
    tx: mpsc::Sender<StartMsg>,
    wake: Arc<EventFd>,
}

/// The main thread's end: poll [`StartReceiver::fd`], then [`StartReceiver::try_recv`].
#[derive(Debug)]
pub struct StartReceiver {
    rx: mpsc::Receiver<StartMsg>,
    wake: Arc<EventFd>,
}

/// A connected starter/receiver pair.
pub fn start_channel() -> io::Result<(Starter, StartReceiver)> {
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    let (tx, rx) = mpsc::channel();
    Ok((
        Starter {
            tx,
            wake: wake.clone(),
        },
        StartReceiver { rx, wake },
    ))
}

impl StartReceiver {
    /// Readable when a start request waits.
    pub fn fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// The waiting start request, if any.
    pub fn try_recv(&self) -> Option<StartMsg> {
        let _ = self.wake.read();
        self.rx.try_recv().ok()
    }
}

/// Where the VM is in its life, as `GET /` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Configuring.
    NotStarted,
    /// Running.
    Running,
    /// Paused through `PATCH /vm`.
    Paused,
}

/// Settings of the server itself.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// `--id`.
    pub id: String,
    /// `--http-api-max-payload-size`.
    pub max_payload: usize,
    /// The native command line the API's configuration is applied over.
    pub base_args: Vec<std::ffi::OsString>,
    /// Largest MMDS data store, in bytes of JSON (`--mmds-size-limit`).
    pub mmds_limit: usize,
}

/// The API's state: the configuration before boot, the controller after.
#[derive(Debug)]
pub struct ApiState {
    opts: ApiOptions,
    phase: Phase,
    config: VmConfig,
    mmds: Option<serde_json::Value>,
    controller: VmController,
    starter: Starter,
}

impl ApiState {
    /// A server that boots through `starter` and then drives the VM through `controller`.
    /// `config` is what `--config-file` gave (default: nothing); `started` when it already
    /// booted.
    pub fn new(
        opts: ApiOptions,
        config: VmConfig,
        started: bool,
        controller: VmController,
        starter: Starter,
    ) -> Self {
        ApiState {
            opts,
            phase: if started {
                Phase::Running
            } else {
                Phase::NotStarted
            },
            config,
            mmds: None,
            controller,
            starter,
        }
    }
}

/// Serves the API on `listener` until the process ends.
pub fn serve(listener: std::os::unix::net::UnixListener, state: ApiState) {
    let max = state.opts.max_payload;
    let state = Arc::new(Mutex::new(state));
    let handler = move |req: &Request| {
        let started = Instant::now();
        let resp = match state.lock() {
            Ok(mut s) => s.handle(req),
            Err(_) => Response::fault("internal error: the API state is poisoned"),
        };
        crate::logger::debug(format_args!(
            "API {} {} -> {} in {} us",
            req.method,
            req.path,
            resp.status,
            started.elapsed().as_micros()
        ));
        resp
    };
    http::serve(listener, max, Arc::new(handler));
}

fn parse<T: DeserializeOwned>(req: &Request) -> Result<T, Response> {
    if req.body.is_empty() {
        return Err(Response::fault(format!("Empty {} request.", req.method)));
    }
    serde_json::from_slice(&req.body).map_err(|e| {
        Response::fault(format!(
            "An error occurred when deserializing the json body of a request: {e}."
        ))
    })
}

/// Firecracker's rule for ids in paths and bodies.
fn check_id(id: &str) -> Result<(), Response> {
    if id.is_empty() || id.len() > 64 {
        return Err(Response::fault(format!(
            "Invalid ID: {id:?} must be 1 to 64 characters long."
        )));
    }
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(Response::fault(format!(
            "Invalid ID: {id:?} may only contain alphanumeric characters and underscores."
        )));
    }
    Ok(())
}

fn path_matches_body(path_id: &str, body_id: &str) -> Result<(), Response> {
    if path_id != body_id {
        return Err(Response::fault(format!(
            "The id from the path [{path_id}] does not match the id from the body [{body_id}]!"
        )));
    }
    Ok(())
}

fn json(v: &impl serde::Serialize) -> Response {
    match serde_json::to_string(v) {
        Ok(s) => Response::ok(s),
        Err(e) => Response::fault(format!("internal error serialising the response: {e}")),
    }
}

fn not_in_kiln(what: &str) -> Response {
    Response::fault(format!("{what} is not supported by kiln yet."))
}

type R = Result<Response, Response>;

impl ApiState {
    fn pre_boot(&self) -> Result<(), Response> {
        match self.phase {
            Phase::NotStarted => Ok(()),
            _ => Err(Response::fault(POST_BOOT)),
        }
    }

    fn post_boot(&self) -> Result<(), Response> {
        match self.phase {
            Phase::NotStarted => Err(Response::fault(PRE_BOOT)),
            _ => Ok(()),
        }
    }

    fn call(&self, request: VmRequest) -> Result<VmResponse, Response> {
        self.controller.call(request, VM_CALL_TIMEOUT).map_err(|e| {
            if matches!(e, crate::control::ControlError::Timeout(_)) {
                METRICS.api_server.sync_vmm_send_timeout_count.inc();
            }
            METRICS.api_server.sync_response_fails.inc();
            Response::fault(e.to_string())
        })
    }

    /// Answers one request.
    pub fn handle(&mut self, req: &Request) -> Response {
        let r = self.route(req);
        let resp = r.unwrap_or_else(|e| e);
        if resp.status >= 400 {
            crate::logger::info(format_args!(
                "API {} {}: {}",
                req.method,
                req.path,
                resp.body.as_deref().unwrap_or("")
            ));
        }
        resp
    }

    fn route(&mut self, req: &Request) -> R {
        let segments: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
        let m = req.method.as_str();
        let counters = &METRICS;
        match (m, segments.as_slice()) {
            ("GET", [""]) => {
                counters.get_api_requests.instance_info_count.inc();
                Ok(json(&self.instance_info()))
            }
            ("GET", ["version"]) => {
                counters.get_api_requests.vmm_version_count.inc();
                Ok(json(
                    &serde_json::json!({ "firecracker_version": FIRECRACKER_VERSION }),
                ))
            }
            ("GET", ["vm", "config"]) => Ok(json(&self.full_config())),
            ("GET", ["machine-config"]) => {
                counters.get_api_requests.machine_cfg_count.inc();
                Ok(json(&self.machine_config()))
            }
            ("PUT", ["machine-config"]) => counted(
                &counters.put_api_requests.machine_cfg_count,
                &counters.put_api_requests.machine_cfg_fails,
                || self.put_machine_config(req),
            ),
            ("PATCH", ["machine-config"]) => counted(
                &counters.patch_api_requests.machine_cfg_count,
                &counters.patch_api_requests.machine_cfg_fails,
                || self.patch_machine_config(req),
            ),
            ("PUT", ["boot-source"]) => counted(
                &counters.put_api_requests.boot_source_count,
                &counters.put_api_requests.boot_source_fails,
                || self.put_boot_source(req),
            ),
            ("PUT", ["drives", id]) => counted(
                &counters.put_api_requests.drive_count,
                &counters.put_api_requests.drive_fails,
                || self.put_drive(id, req),
            ),
            ("PATCH", ["drives", id]) => counted(
                &counters.patch_api_requests.drive_count,
                &counters.patch_api_requests.drive_fails,
                || self.patch_drive(id, req),
            ),
            ("PUT", ["network-interfaces", id]) => counted(
                &counters.put_api_requests.network_count,
                &counters.put_api_requests.network_fails,
                || self.put_net(id, req),
            ),
            ("PATCH", ["network-interfaces", id]) => counted(
                &counters.patch_api_requests.network_count,
                &counters.patch_api_requests.network_fails,
                || self.patch_net(id, req),
            ),
            ("PUT", ["vsock"]) => counted(
                &counters.put_api_requests.vsock_count,
                &counters.put_api_requests.vsock_fails,
                || self.put_vsock(req),
            ),
            ("PUT", ["entropy"]) => {
                self.pre_boot()?;
                let e: Entropy = parse(req)?;
                build::rate_limit("entropy rate_limiter", e.rate_limiter.as_ref())?;
                self.config.entropy = Some(e);
                Ok(Response::no_content())
            }
            ("PUT", ["serial"]) => {
                self.pre_boot()?;
                let s: Serial = parse(req)?;
                if s.rate_limiter.is_some() {
                    return Err(not_in_kiln("serial rate_limiter"));
                }
                self.config.serial = Some(s);
                Ok(Response::no_content())
            }
            ("PUT", ["logger"]) => counted(
                &counters.put_api_requests.logger_count,
                &counters.put_api_requests.logger_fails,
                || self.put_logger(req),
            ),
            ("PUT", ["metrics"]) => counted(
                &counters.put_api_requests.metrics_count,
                &counters.put_api_requests.metrics_fails,
                || self.put_metrics(req),
            ),
            ("PUT", ["actions"]) => counted(
                &counters.put_api_requests.actions_count,
                &counters.put_api_requests.actions_fails,
                || self.put_action(req),
            ),
            ("PATCH", ["vm"]) => self.patch_vm(req),
            ("PUT", ["snapshot", "create"]) => self.snapshot_create(req),
            ("PUT", ["snapshot", "load"]) => self.snapshot_load(req),
            ("GET", ["balloon"]) => match &self.config.balloon {
                Some(b) => Ok(json(b)),
                None => Err(Response::fault("The balloon device is not configured.")),
            },
            ("PUT", ["balloon"]) => {
                self.pre_boot()?;
                let b: Balloon = parse(req)?;
                if b.free_page_hinting {
                    return Err(not_in_kiln("balloon free_page_hinting"));
                }
                self.config.balloon = Some(b);
                Ok(Response::no_content())
            }
            ("PATCH", ["balloon"]) => self.patch_balloon(req),
            ("GET", ["balloon", "statistics"]) => self.balloon_stats(),
            ("PATCH", ["balloon", "statistics"]) => {
                let _: BalloonStatsUpdate = parse(req)?;
                self.post_boot()?;
                self.balloon()?;
                Err(not_in_kiln(
                    "changing the balloon statistics interval after boot",
                ))
            }
            ("GET", ["mmds"]) => {
                counters.get_api_requests.mmds_count.inc();
                Ok(Response::ok(
                    self.mmds
                        .as_ref()
                        .map_or_else(|| "{}".to_string(), |v| v.to_string()),
                ))
            }
            ("PUT", ["mmds"]) => counted(
                &counters.put_api_requests.mmds_count,
                &counters.put_api_requests.mmds_fails,
                || {
                    let v: serde_json::Value = parse(req)?;
                    if !v.is_object() {
                        return Err(Response::fault(
                            "The MMDS data store must be a JSON object.",
                        ));
                    }
                    self.check_mmds_size(&v)?;
                    self.mmds = Some(v);
                    Ok(Response::no_content())
                },
            ),
            ("PATCH", ["mmds"]) => counted(
                &counters.patch_api_requests.mmds_count,
                &counters.patch_api_requests.mmds_fails,
                || {
                    let patch: serde_json::Value = parse(req)?;
                    let Some(store) = self.mmds.as_ref() else {
                        return Err(Response::fault("The MMDS data store is not initialized."));
                    };
                    if !patch.is_object() {
                        return Err(Response::fault(
                            "The MMDS data store must be a JSON object.",
                        ));
                    }
                    let mut merged = store.clone();
                    merge_patch(&mut merged, &patch);
                    self.check_mmds_size(&merged)?;
                    self.mmds = Some(merged);
                    Ok(Response::no_content())
                },
            ),
            ("PUT", ["mmds", "config"]) => {
                self.pre_boot()?;
                let c: MmdsConfig = parse(req)?;
                self.check_mmds_config(&c)?;
                self.config.mmds_config = Some(c);
                Ok(Response::no_content())
            }
            ("PUT", ["cpu-config"]) => {
                self.pre_boot()?;
                let _: serde_json::Value = parse(req)?;
                Err(not_in_kiln("PUT /cpu-config (custom CPU templates)"))
            }
            ("PUT" | "PATCH", ["pmem", _]) => Err(not_in_kiln("virtio-pmem")),
            ("GET" | "PUT" | "PATCH", ["hotplug", "memory"]) => {
                Err(not_in_kiln("memory hotplug (virtio-mem)"))
            }
            ("GET" | "PATCH", ["balloon", "hinting", _]) => {
                Err(not_in_kiln("balloon free page hinting"))
            }
            _ => Err(Response::fault(format!(
                "Invalid request method and/or path: {} {}.",
                req.method, req.path
            ))),
        }
    }

    fn instance_info(&self) -> InstanceInfo {
        InstanceInfo {
            app_name: "Firecracker".into(),
            id: self.opts.id.clone(),
            state: match self.phase {
                Phase::NotStarted => "Not started",
                Phase::Running => "Running",
                Phase::Paused => "Paused",
            }
            .into(),
            vmm_version: FIRECRACKER_VERSION.into(),
        }
    }

    fn machine_config(&self) -> MachineConfig {
        self.config.machine_config.clone().unwrap_or_default()
    }

    /// `GET /vm/config`: every section, configured or not, as Firecracker reports it.
    fn full_config(&self) -> serde_json::Value {
        let mut c = self.config.clone();
        c.machine_config = Some(self.machine_config());
        let mut v = serde_json::to_value(&c).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            // Firecracker spells out absent sections as null.
            for k in [
                "balloon",
                "logger",
                "metrics",
                "mmds-config",
                "vsock",
                "entropy",
            ] {
                o.entry(k).or_insert(serde_json::Value::Null);
            }
            o.remove("cpu-config");
            o.remove("memory-hotplug");
            o.remove("serial");
        }
        v
    }

    fn put_machine_config(&mut self, req: &Request) -> R {
        self.pre_boot()?;
        let m: MachineConfig = parse(req)?;
        build::check_machine(&m)?;
        self.config.machine_config = Some(m);
        Ok(Response::no_content())
    }

    fn patch_machine_config(&mut self, req: &Request) -> R {
        self.pre_boot()?;
        let u: MachineConfigUpdate = parse(req)?;
        if u == MachineConfigUpdate::default() {
            return Err(Response::fault("Empty PATCH request."));
        }
        let mut m = self.machine_config();
        if let Some(v) = u.vcpu_count {
            m.vcpu_count = v;
        }
        if let Some(v) = u.mem_size_mib {
            m.mem_size_mib = v;
        }
        if let Some(v) = u.smt {
            m.smt = v;
        }
        if let Some(v) = u.cpu_template {
            m.cpu_template = Some(v);
        }
        if let Some(v) = u.track_dirty_pages {
            m.track_dirty_pages = v;
        }
        if let Some(v) = u.huge_pages {
            m.huge_pages = v;
        }
        build::check_machine(&m)?;
        self.config.machine_config = Some(m);
        Ok(Response::no_content())
    }

    fn put_boot_source(&mut self, req: &Request) -> R {
        self.pre_boot()?;
        let b: BootSource = parse(req)?;
        self.config.boot_source = Some(b);
        Ok(Response::no_content())
    }

    fn put_drive(&mut self, id: &str, req: &Request) -> R {
        self.pre_boot()?;
        check_id(id)?;
        let d: Drive = parse(req)?;
        path_matches_body(id, &d.drive_id)?;
        build::check_drive(&d)?;
        if d.is_root_device
            && self
                .config
                .drives
                .iter()
                .any(|o| o.is_root_device && o.drive_id != d.drive_id)
        {
            return Err(Response::fault("A root block device already exists!"));
        }
        match self
            .config
            .drives
            .iter_mut()
            .find(|o| o.drive_id == d.drive_id)
        {
            Some(o) => *o = d,
            None => self.config.drives.push(d),
        }
        Ok(Response::no_content())
    }

    fn patch_drive(&mut self, id: &str, req: &Request) -> R {
        check_id(id)?;
        let d: PartialDrive = parse(req)?;
        path_matches_body(id, &d.drive_id)?;
        self.post_boot()?;
        if !self.config.drives.iter().any(|o| o.drive_id == d.drive_id) {
            return Err(Response::fault(format!(
                "Invalid block device ID: {}",
                d.drive_id
            )));
        }
        Err(not_in_kiln("Updating a drive after boot"))
    }

    fn put_net(&mut self, id: &str, req: &Request) -> R {
        self.pre_boot()?;
        check_id(id)?;
        let n: NetworkInterface = parse(req)?;
        path_matches_body(id, &n.iface_id)?;
        build::net_arg(&n)?;
        let others = || {
            self.config
                .network_interfaces
                .iter()
                .filter(|o| o.iface_id != n.iface_id)
        };
        if others().any(|o| o.host_dev_name == n.host_dev_name) {
            return Err(Response::fault(format!(
                "The host device name {} is already in use by another interface.",
                n.host_dev_name
            )));
        }
        if n.guest_mac.is_some() && others().any(|o| o.guest_mac == n.guest_mac) {
            return Err(Response::fault(format!(
                "The guest MAC address {} is already in use by another interface.",
                n.guest_mac.as_deref().unwrap_or_default()
            )));
        }
        match self
            .config
            .network_interfaces
            .iter_mut()
            .find(|o| o.iface_id == n.iface_id)
        {
            Some(o) => *o = n,
            None => self.config.network_interfaces.push(n),
        }
        Ok(Response::no_content())
    }

    fn patch_net(&mut self, id: &str, req: &Request) -> R {
        check_id(id)?;
        let n: PartialNetworkInterface = parse(req)?;
        path_matches_body(id, &n.iface_id)?;
        self.post_boot()?;
        if !self
            .config
            .network_interfaces
            .iter()
            .any(|o| o.iface_id == n.iface_id)
        {
            return Err(Response::fault(format!(
                "Invalid network interface ID: {}",
                n.iface_id
            )));
        }
        build::rate_limit("rx_rate_limiter", n.rx_rate_limiter.as_ref())?;
        build::rate_limit("tx_rate_limiter", n.tx_rate_limiter.as_ref())?;
        Err(not_in_kiln(
            "Updating a network interface's rate limiters after boot",
        ))
    }

    fn put_vsock(&mut self, req: &Request) -> R {
        self.pre_boot()?;
        let v: Vsock = parse(req)?;
        if v.guest_cid < 3 {
            return Err(Response::fault(format!(
                "Invalid guest_cid {}: context ids 0, 1 and 2 are reserved.",
                v.guest_cid
            )));
        }
        build::vsock_arg(&v)?;
        self.config.vsock = Some(v);
        Ok(Response::no_content())
    }

    fn put_logger(&mut self, req: &Request) -> R {
        self.pre_boot()?;
        let l: Logger = parse(req)?;
        crate::logger::configure(&l).map_err(Response::fault)?;
        self.config.logger = Some(l);
        Ok(Response::no_content())
    }

    fn put_metrics(&mut self, req: &Request) -> R {
        self.pre_boot()?;
        let m: Metrics = parse(req)?;
        crate::metrics::init(std::path::Path::new(&m.metrics_path)).map_err(Response::fault)?;
        self.config.metrics = Some(m);
        Ok(Response::no_content())
    }

    fn put_action(&mut self, req: &Request) -> R {
        let a: Action = parse(req)?;
        match a.action_type {
            ActionType::FlushMetrics => {
                crate::metrics::flush().map_err(Response::fault)?;
                Ok(Response::no_content())
            }
            ActionType::InstanceStart => {
                self.pre_boot()?;
                self.start()?;
                Ok(Response::no_content())
            }
            ActionType::SendCtrlAltDel => {
                self.post_boot()?;
                self.call(VmRequest::CtrlAltDel)?;
                Ok(Response::no_content())
            }
        }
    }

    fn start(&mut self) -> Result<(), Response> {
        let spec = build::spec(&self.opts.base_args, &self.config)?;
        let t0 = Instant::now();
        self.hand_off(StartRequest::Boot(Box::new(spec)))
            .map_err(|e| Response::fault(format!("Start microvm error: {e}")))?;
        METRICS
            .latencies_us
            .instance_start
            .set(t0.elapsed().as_micros() as u64);
        self.phase = Phase::Running;
        Ok(())
    }

    /// Hands `request` to the main thread and waits until it built the VM (or failed to).
    fn hand_off(&self, request: StartRequest) -> Result<(), String> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.starter
            .tx
            .send((request, tx))
            .map_err(|_| "the VMM is not accepting a start request".to_string())?;
        let _ = self.starter.wake.write(1);
        match rx.recv() {
            Ok(r) => r,
            Err(_) => Err("the VMM did not answer the start request".into()),
        }
    }

    /// `PUT /snapshot/load`: only before anything boot-specific is configured (Firecracker's
    /// rule); the main thread restores the VM as `--restore` does.
    fn snapshot_load(&mut self, req: &Request) -> R {
        let l: SnapshotLoad = parse(req)?;
        self.pre_boot()?;
        let mem_path = match (&l.mem_backend, &l.mem_file_path) {
            (Some(_), Some(_)) => {
                return Err(Response::fault(
                    "Load snapshot error: give either mem_backend or the deprecated \
                     mem_file_path, not both.",
                ))
            }
            (None, None) => {
                return Err(Response::fault(
                    "Load snapshot error: mem_backend (or the deprecated mem_file_path) is \
                     required.",
                ))
            }
            (None, Some(p)) => p.clone(),
            (Some(b), None) => match b.backend_type {
                MemoryBackendType::File => b.backend_path.clone(),
                MemoryBackendType::Uffd => {
                    return Err(not_in_kiln("mem_backend.backend_type Uffd"))
                }
            },
        };
        if l.network_overrides.as_ref().is_some_and(|o| !o.is_empty()) {
            return Err(not_in_kiln("network_overrides"));
        }
        if l.vsock_override.is_some() {
            return Err(not_in_kiln("vsock_override"));
        }
        if l.clock_realtime == Some(true) {
            return Err(not_in_kiln("clock_realtime"));
        }
        // Logging, metrics and MMDS settings belong to the process, not to the machine.
        let boot_specific = VmConfig {
            logger: None,
            metrics: None,
            mmds_config: None,
            ..self.config.clone()
        };
        if boot_specific != VmConfig::default() {
            return Err(Response::fault(
                "Loading a microVM snapshot not allowed after configuring boot-specific \
                 resources.",
            ));
        }
        let cli = clap::Parser::try_parse_from(&self.opts.base_args)
            .map_err(|e| Response::fault(format!("the command line: {}", e.kind())))?;
        let resume = l.resume_vm.unwrap_or(false);
        let t0 = Instant::now();
        self.hand_off(StartRequest::Restore {
            cli: Box::new(cli),
            arg: crate::snapshot::RestoreArg {
                state: l.snapshot_path.into(),
                mem: mem_path.into(),
                diff_mem: None,
            },
            paused: !resume,
        })
        .map_err(|e| Response::fault(format!("Load snapshot error: {e}")))?;
        METRICS
            .latencies_us
            .load_snapshot
            .set(t0.elapsed().as_micros() as u64);
        self.phase = if resume {
            Phase::Running
        } else {
            Phase::Paused
        };
        Ok(Response::no_content())
    }

    fn patch_vm(&mut self, req: &Request) -> R {
        let v: Vm = parse(req)?;
        self.post_boot()?;
        let t0 = Instant::now();
        match v.state {
            VmState::Paused => {
                self.call(VmRequest::Pause)?;
                METRICS
                    .latencies_us
                    .pause_vm
                    .set(t0.elapsed().as_micros() as u64);
                self.phase = Phase::Paused;
            }
            VmState::Resumed => {
                self.call(VmRequest::Resume)?;
                METRICS
                    .latencies_us
                    .resume_vm
                    .set(t0.elapsed().as_micros() as u64);
                self.phase = Phase::Running;
            }
        }
        Ok(Response::no_content())
    }

    fn snapshot_create(&mut self, req: &Request) -> R {
        let s: SnapshotCreate = parse(req)?;
        self.post_boot()?;
        if self.phase != Phase::Paused {
            return Err(Response::fault(
                "Create snapshot error: the microVM must be paused to create a snapshot.",
            ));
        }
        let t0 = Instant::now();
        self.call(VmRequest::Snapshot(SnapshotParams {
            state_path: s.snapshot_path.into(),
            mem_path: s.mem_file_path.into(),
            diff: s.snapshot_type == SnapshotType::Diff,
        }))
        .map_err(|e| Response::fault(format!("Create snapshot error: {}", fault_text(&e))))?;
        METRICS
            .latencies_us
            .full_create_snapshot
            .set(t0.elapsed().as_micros() as u64);
        Ok(Response::no_content())
    }

    fn balloon(&self) -> Result<&Balloon, Response> {
        self.config
            .balloon
            .as_ref()
            .ok_or_else(|| Response::fault("The balloon device is not configured."))
    }

    fn patch_balloon(&mut self, req: &Request) -> R {
        let u: BalloonUpdate = parse(req)?;
        self.post_boot()?;
        self.balloon()?;
        let mib = self.machine_config().mem_size_mib;
        if u64::from(u.amount_mib) > mib {
            return Err(Response::fault(format!(
                "Amount of pages requested is too large: {} MiB is more than the guest's \
                 {mib} MiB.",
                u.amount_mib
            )));
        }
        self.call(VmRequest::BalloonTarget(u64::from(u.amount_mib) << 20))?;
        if let Some(b) = self.config.balloon.as_mut() {
            b.amount_mib = u.amount_mib;
        }
        Ok(Response::no_content())
    }

    fn balloon_stats(&mut self) -> R {
        self.post_boot()?;
        let b = self.balloon()?;
        if b.stats_polling_interval_s == 0 {
            return Err(Response::fault(
                "Statistics for the balloon device are not enabled.",
            ));
        }
        match self.call(VmRequest::BalloonStats)? {
            VmResponse::Report(s) => Ok(Response::ok(s)),
            VmResponse::Done => Err(Response::fault("The balloon reported no statistics.")),
        }
    }

    fn check_mmds_size(&self, v: &serde_json::Value) -> Result<(), Response> {
        let size = v.to_string().len();
        if size > self.opts.mmds_limit {
            return Err(Response::fault(format!(
                "The MMDS data store would be {size} bytes, more than the limit of {} bytes \
                 (--mmds-size-limit).",
                self.opts.mmds_limit
            )));
        }
        Ok(())
    }

    fn check_mmds_config(&self, c: &MmdsConfig) -> Result<(), Response> {
        if c.network_interfaces.is_empty() {
            return Err(Response::fault(
                "The list of network interface IDs that allow forwarding MMDS requests is empty.",
            ));
        }
        if let Some(a) = &c.ipv4_address {
            let ip: std::net::Ipv4Addr = a
                .parse()
                .map_err(|_| Response::fault(format!("Invalid IPv4 address: {a}")))?;
            if !ip.is_link_local() {
                return Err(Response::fault(format!(
                    "The MMDS IPv4 address must be link-local (169.254.0.0/16): {a}"
                )));
            }
        }
        // Every id must name a configured interface.
        if c.network_interfaces.iter().any(|id| {
            !self
                .config
                .network_interfaces
                .iter()
                .any(|n| &n.iface_id == id)
        }) {
            return Err(Response::fault(
                "The list of network interface IDs provided contains at least one ID that does \
                 not correspond to any existing network interface.",
            ));
        }
        // Refused rather than stored: the guest would never reach the data store.
        Err(not_in_kiln("MMDS over the network (PUT /mmds/config)"))
    }
}

fn fault_text(r: &Response) -> String {
    r.body
        .as_deref()
        .and_then(|b| serde_json::from_str::<serde_json::Value>(b).ok())
        .and_then(|v| {
            v.get("fault_message")
                .and_then(|m| m.as_str().map(String::from))
        })
        .unwrap_or_default()
}

fn counted(
    count: &crate::metrics::Counter,
    fails: &crate::metrics::Counter,
    f: impl FnOnce() -> R,
) -> R {
    count.inc();
    let r = f();
    if r.is_err() {
        fails.inc();
    }
    r
}

/// RFC 7396 JSON merge-patch.
pub fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match patch {
        serde_json::Value::Object(p) => {
            if !target.is_object() {
                *target = serde_json::Value::Object(Default::default());
            }
            if let Some(t) = target.as_object_mut() {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc7396() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}}));
        let mut t = json!({"a": [1]});
        merge_patch(&mut t, &json!({"a": {"b": 1}, "n": null}));
        assert_eq!(t, json!({"a": {"b": 1}}));
    }

    fn state() -> (ApiState, StartReceiver, crate::control::ControlReceiver) {
        let (ctl, rx) = crate::control::channel().unwrap();
        let (st, srx) = start_channel().unwrap();
        let opts = ApiOptions {
            id: "t".into(),
            max_payload: DEFAULT_MAX_PAYLOAD,
            base_args: vec!["kiln".into()],
            mmds_limit: 64,
        };
        (
            ApiState::new(opts, VmConfig::default(), false, ctl, st),
            srx,
            rx,
        )
    }

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
        }
    }

    fn fault(r: &Response) -> String {
        assert_eq!(r.status, 400, "{r:?}");
        fault_text(r)
    }

    #[test]
    fn pre_boot_configuration_and_phase_errors() {
        let (mut s, _srx, _rx) = state();
        let r = s.handle(&req(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
        ));
        assert_eq!(r.status, 204);
        let r = s.handle(&req("GET", "/machine-config", ""));
        let v: serde_json::Value = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
        assert_eq!(v["vcpu_count"], 2);
        assert_eq!(v["huge_pages"], "None");
        let r = s.handle(&req("PATCH", "/vm", r#"{"state": "Paused"}"#));
        assert_eq!(fault(&r), PRE_BOOT);
        let r = s.handle(&req(
            "PUT",
            "/actions",
            r#"{"action_type": "SendCtrlAltDel"}"#,
        ));
        assert_eq!(fault(&r), PRE_BOOT);
        let r = s.handle(&req("PUT", "/nope", "{}"));
        assert!(fault(&r).contains("Invalid request method and/or path"));
        let r = s.handle(&req("DELETE", "/machine-config", ""));
        assert!(fault(&r).contains("Invalid request method and/or path"));
        s.phase = Phase::Running;
        let r = s.handle(&req(
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/k"}"#,
        ));
        assert_eq!(fault(&r), POST_BOOT);
    }

    #[test]
    fn bodies_are_checked() {
        let (mut s, _srx, _rx) = state();
        let r = s.handle(&req(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "bogus": 1}"#,
        ));
        assert!(fault(&r).contains("unknown field `bogus`"));
        let r = s.handle(&req("PUT", "/machine-config", r#"{"vcpu_count": "2"}"#));
        assert!(fault(&r).contains("deserializing"));
        let r = s.handle(&req("PUT", "/machine-config", ""));
        assert_eq!(fault(&r), "Empty PUT request.");
        let r = s.handle(&req(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 0, "mem_size_mib": 1}"#,
        ));
        assert!(fault(&r).contains("vCPU"));
        let r = s.handle(&req(
            "PUT",
            "/drives/a",
            r#"{"drive_id": "b", "is_root_device": false, "path_on_host": "/x"}"#,
        ));
        assert!(fault(&r).contains("does not match"));
        let r = s.handle(&req(
            "PUT",
            "/drives/a-b",
            r#"{"drive_id": "a-b", "is_root_device": false, "path_on_host": "/x"}"#,
        ));
        assert!(fault(&r).contains("Invalid ID"));
        let uds = std::env::temp_dir().join(format!("kiln-unit-vsock-{}", std::process::id()));
        let uds = uds.display();
        let r = s.handle(&req(
            "PUT",
            "/vsock",
            &format!(r#"{{"vsock_id": "v", "guest_cid": 3, "uds_path": "{uds}"}}"#),
        ));
        // The deprecated field is accepted.
        assert_eq!(r.status, 204, "{r:?}");
        assert_eq!(
            s.full_config()["vsock"],
            json!({"vsock_id": "v", "guest_cid": 3, "uds_path": uds.to_string()})
        );
        let mmds_cfg = r#"{"network_interfaces": ["eth0"]}"#;
        let r = s.handle(&req("PUT", "/mmds/config", mmds_cfg));
        assert!(fault(&r).contains("does not correspond"), "{r:?}");
        let r = s.handle(&req(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#,
        ));
        assert_eq!(r.status, 204, "{r:?}");
        // The interface exists now; MMDS itself isn't served to the guest.
        let r = s.handle(&req("PUT", "/mmds/config", mmds_cfg));
        assert!(fault(&r).contains("not supported by kiln"), "{r:?}");
        assert!(s.config.mmds_config.is_none());
        let r = s.handle(&req("PATCH", "/mmds", r#"{"a": 1}"#));
        assert!(fault(&r).contains("not initialized"));
        assert_eq!(
            s.handle(&req("PUT", "/mmds", r#"{"a": {"b": 1}}"#)).status,
            204
        );
        assert_eq!(
            s.handle(&req("PATCH", "/mmds", r#"{"a": {"c": 2}}"#))
                .status,
            204
        );
        let r = s.handle(&req("GET", "/mmds", ""));
        let v: serde_json::Value = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
        assert_eq!(v, json!({"a": {"b": 1, "c": 2}}));
        // The size limit holds for PUT and for what a PATCH would make; nothing changes.
        let r = s.handle(&req(
            "PATCH",
            "/mmds",
            &format!(r#"{{"d": "{}"}}"#, "x".repeat(60)),
        ));
        assert!(fault(&r).contains("limit of 64 bytes"));
        let r = s.handle(&req(
            "PUT",
            "/mmds",
            &format!(r#"{{"d": "{}"}}"#, "x".repeat(60)),
        ));
        assert!(fault(&r).contains("limit of 64 bytes"));
        let r = s.handle(&req("GET", "/mmds", ""));
        assert_eq!(r.body.as_deref(), Some(r#"{"a":{"b":1,"c":2}}"#));
    }

    #[test]
    fn instance_start_hands_a_spec_to_the_main_thread() {
        let (mut s, srx, _rx) = state();
        let r = s.handle(&req(
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#,
        ));
        assert!(fault(&r).contains("boot-source"), "{r:?}");
        let r = s.handle(&req(
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#,
        ));
        assert_eq!(r.status, 204);
        let main = std::thread::spawn(move || {
            let mut pfd = libc::pollfd {
                fd: srx.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 5000) };
            let (request, reply) = srx.try_recv().unwrap();
            reply.send(Ok(())).unwrap();
            match request {
                StartRequest::Boot(spec) => *spec,
                StartRequest::Restore { .. } => panic!("InstanceStart asked for a restore"),
            }
        });
        let r = s.handle(&req(
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#,
        ));
        assert_eq!(r.status, 204, "{r:?}");
        let spec = main.join().unwrap();
        assert_eq!(spec.cmdline, "console=ttyS0");
        assert_eq!(spec.memory, 128 << 20);
        assert!(!spec.rng.enabled, "no entropy device unless configured");
        let r = s.handle(&req("GET", "/", ""));
        assert!(r.body.unwrap().contains("\"Running\""));
    }
}
