//! Firecracker-style metrics: counters and gauges in statics, written as one JSON object per
//! flush to `--metrics-path` / `PUT /metrics` (a file or named pipe) on `FlushMetrics` and
//! every 60 s. Counters report what happened since the previous flush, as Firecracker's do.
//!
//! vCPU exit counts come from KVM's own per-vCPU binary statistics (`KVM_GET_STATS_FD`), so
//! the exit path counts nothing itself.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Serialize, Serializer};

/// How often metrics are written without being asked.
pub const PERIOD: Duration = Duration::from_secs(60);

/// A counter reported as its increase since the previous flush.
#[derive(Debug)]
pub struct Counter {
    value: AtomicU64,
    flushed: AtomicU64,
}

impl Counter {
    /// Zero.
    pub const fn new() -> Self {
        Counter {
            value: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
        }
    }

    /// Adds one.
    pub fn inc(&self) {
        self.value.fetch_add(1, Ordering::Relaxed);
    }

    /// The total so far.
    pub fn total(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

impl Default for Counter {
    fn default() -> Self {
        Self::new()
    }
}

impl Serialize for Counter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let now = self.value.load(Ordering::Relaxed);
        let before = self.flushed.swap(now, Ordering::Relaxed);
        s.serialize_u64(now.wrapping_sub(before))
    }
}

/// A value reported as it is (a latency, a time).
#[derive(Debug)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Zero.
    pub const fn new() -> Self {
        Gauge(AtomicU64::new(0))
    }

    /// Sets the value.
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// The value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Default for Gauge {
    fn default() -> Self {
        Self::new()
    }
}

impl Serialize for Gauge {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.get())
    }
}

macro_rules! group {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $f:ident: $t:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Serialize)]
        pub struct $name { $($(#[$fm])* pub $f: $t),* }
        impl $name {
            const fn new() -> Self { $name { $($f: $t::new()),* } }
        }
    };
}

group!(
    /// The API server.
    ApiServerMetrics {
        /// Process start to API ready, µs.
        process_startup_time_us: Gauge,
        /// Requests the VM failed or didn't answer.
        sync_response_fails: Counter,
        /// Requests the VM didn't answer in time.
        sync_vmm_send_timeout_count: Counter,
        /// Requests refused before routing (malformed HTTP, too large).
        bad_requests: Counter,
    }
);

group!(
    /// GET requests.
    GetRequestsMetrics {
        /// `GET /`.
        instance_info_count: Counter,
        /// `GET /machine-config`.
        machine_cfg_count: Counter,
        /// `GET /mmds`.
        mmds_count: Counter,
        /// `GET /version`.
        vmm_version_count: Counter,
    }
);

group!(
    /// PUT requests and their failures.
    PutRequestsMetrics {
        /// `PUT /actions`.
        actions_count: Counter,
        /// Failed.
        actions_fails: Counter,
        /// `PUT /boot-source`.
        boot_source_count: Counter,
        /// Failed.
        boot_source_fails: Counter,
        /// `PUT /drives`.
        drive_count: Counter,
        /// Failed.
        drive_fails: Counter,
        /// `PUT /logger`.
        logger_count: Counter,
        /// Failed.
        logger_fails: Counter,
        /// `PUT /machine-config`.
        machine_cfg_count: Counter,
        /// Failed.
        machine_cfg_fails: Counter,
        /// `PUT /metrics`.
        metrics_count: Counter,
        /// Failed.
        metrics_fails: Counter,
        /// `PUT /network-interfaces`.
        network_count: Counter,
        /// Failed.
        network_fails: Counter,
        /// `PUT /mmds`.
        mmds_count: Counter,
        /// Failed.
        mmds_fails: Counter,
        /// `PUT /vsock`.
        vsock_count: Counter,
        /// Failed.
        vsock_fails: Counter,
    }
);

group!(
    /// PATCH requests and their failures.
    PatchRequestsMetrics {
        /// `PATCH /drives`.
        drive_count: Counter,
        /// Failed.
        drive_fails: Counter,
        /// `PATCH /network-interfaces`.
        network_count: Counter,
        /// Failed.
        network_fails: Counter,
        /// `PATCH /machine-config`.
        machine_cfg_count: Counter,
        /// Failed.
        machine_cfg_fails: Counter,
        /// `PATCH /mmds`.
        mmds_count: Counter,
        /// Failed.
        mmds_fails: Counter,
    }
);

group!(
    /// Latencies of VM operations, µs (the latest one).
    LatenciesMetrics {
        /// `InstanceStart`: boot request to vCPUs running.
        instance_start: Gauge,
        /// `PATCH /vm` Paused.
        pause_vm: Gauge,
        /// `PATCH /vm` Resumed.
        resume_vm: Gauge,
        /// `PUT /snapshot/create`.
        full_create_snapshot: Gauge,
        /// `PUT /snapshot/load`.
        load_snapshot: Gauge,
    }
);

/// Every metric.
#[derive(Debug, Serialize)]
pub struct Metrics {
    /// The API server.
    pub api_server: ApiServerMetrics,
    /// GET requests.
    pub get_api_requests: GetRequestsMetrics,
    /// PUT requests.
    pub put_api_requests: PutRequestsMetrics,
    /// PATCH requests.
    pub patch_api_requests: PatchRequestsMetrics,
    /// Latencies.
    pub latencies_us: LatenciesMetrics,
}

/// The process's metrics.
pub static METRICS: Metrics = Metrics {
    api_server: ApiServerMetrics::new(),
    get_api_requests: GetRequestsMetrics::new(),
    put_api_requests: PutRequestsMetrics::new(),
    patch_api_requests: PatchRequestsMetrics::new(),
    latencies_us: LatenciesMetrics::new(),
};

struct Sink {
    file: File,
}

static SINK: Mutex<Option<Sink>> = Mutex::new(None);

/// Guest port and MMIO accesses one thread (a vCPU) handed to kiln's devices.
#[derive(Debug, Default)]
struct ThreadExits {
    io_in: AtomicU64,
    io_out: AtomicU64,
    mmio_read: AtomicU64,
    mmio_write: AtomicU64,
}

static THREAD_EXITS: Mutex<Vec<Arc<ThreadExits>>> = Mutex::new(Vec::new());

thread_local! {
    // Each vCPU thread counts into its own cache line; the registry's lock is taken once per
    // thread, on its first exit.
    static EXITS: Arc<ThreadExits> = {
        let c = Arc::new(ThreadExits::default());
        if let Ok(mut all) = THREAD_EXITS.lock() {
            all.push(c.clone());
        }
        c
    };
}

/// This thread's exit counts (io_in, io_out, mmio_read, mmio_write), for tests.
#[cfg(test)]
pub(crate) fn thread_exit_counts() -> [u64; 4] {
    EXITS.with(|c| {
        [&c.io_in, &c.io_out, &c.mmio_read, &c.mmio_write].map(|a| a.load(Ordering::Relaxed))
    })
}

/// Exits handled by kiln's devices, summed over threads, since the previous flush.
static EXITS_FLUSHED: Mutex<[u64; 4]> = Mutex::new([0; 4]);

fn exit_deltas() -> [u64; 4] {
    let mut now = [0u64; 4];
    if let Ok(all) = THREAD_EXITS.lock() {
        for c in all.iter() {
            now[0] += c.io_in.load(Ordering::Relaxed);
            now[1] += c.io_out.load(Ordering::Relaxed);
            now[2] += c.mmio_read.load(Ordering::Relaxed);
            now[3] += c.mmio_write.load(Ordering::Relaxed);
        }
    }
    let Ok(mut before) = EXITS_FLUSHED.lock() else {
        return [0; 4];
    };
    let d = std::array::from_fn(|i| now[i].wrapping_sub(before[i]));
    *before = now;
    d
}

/// Which exit counter a device access adds to (`exit_io_in`, ... in the metrics).
#[derive(Debug, Clone, Copy)]
pub(crate) enum ExitCount {
    /// A PIO read.
    IoIn,
    /// A PIO write.
    IoOut,
    /// An MMIO read.
    MmioRead,
    /// An MMIO write.
    MmioWrite,
}

/// Counts one device access as a vCPU exit of its kind: one relaxed increment of a
/// per-thread counter, nothing shared between vCPUs. Out of line: with metrics off it is
/// never called, and its thread-local setup would only crowd the exit loop's code.
#[inline(never)]
pub(crate) fn count_exit(kind: ExitCount) {
    // `try_with` fails only while the thread is being torn down.
    let _ = EXITS.try_with(|c| {
        let counter = match kind {
            ExitCount::IoIn => &c.io_in,
            ExitCount::IoOut => &c.io_out,
            ExitCount::MmioRead => &c.mmio_read,
            ExitCount::MmioWrite => &c.mmio_write,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    });
}

/// Whether device accesses are counted: only when a metrics destination is set. It can only
/// be set before boot (`--metrics-path`, or `PUT /metrics`, a pre-boot call), so devices
/// built without one are never counted and the exit path of a VM without metrics keeps no
/// counter (the exit benchmark measures that path).
pub(crate) fn counting() -> bool {
    SINK.lock().is_ok_and(|s| s.is_some())
}

/// One vCPU's KVM statistics: the fd and where each wanted counter sits.
struct VcpuStats {
    fd: OwnedFd,
    /// (name, file offset) of each u64 counter.
    fields: Vec<(String, u64)>,
}

static VCPUS: Mutex<Vec<VcpuStats>> = Mutex::new(Vec::new());

/// The KVM exit counters reported under `vcpu` (KVM's names).
const VCPU_FIELDS: &[&str] = &[
    "exits",
    "io_exits",
    "mmio_exits",
    "halt_exits",
    "irq_exits",
    "signal_exits",
    "irq_window_exits",
    "nmi_window_exits",
    "request_irq_exits",
    "insn_emulation",
    "insn_emulation_fail",
    "hypercalls",
];

/// `KVM_GET_STATS_FD` (`_IO(KVMIO, 0xce)`).
const KVM_GET_STATS_FD: libc::c_ulong = 0xaece;

/// Registers a vCPU's statistics (call once per vCPU, before seccomp filters are in place).
/// Hosts without binary statistics (Linux < 5.14) just report no vCPU counters.
pub fn register_vcpu(vcpu: &impl AsRawFd) {
    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1.
    let fd = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_STATS_FD as _) };
    if fd < 0 {
        return;
    }
    // SAFETY: a fresh fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let file = File::from(fd);
    let Some(fields) = stats_layout(&file) else {
        return;
    };
    if let Ok(mut v) = VCPUS.lock() {
        v.push(VcpuStats {
            fd: file.into(),
            fields,
        });
    }
}

/// Reads the descriptors of a KVM stats fd: where each wanted u64 counter lives.
fn stats_layout(f: &File) -> Option<Vec<(String, u64)>> {
    let mut h = [0u8; 24];
    f.read_exact_at(&mut h, 0).ok()?;
    let u32_at = |b: &[u8], o: usize| -> Option<u32> {
        Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
    };
    let name_size = u32_at(&h, 4)? as usize;
    let num_desc = u32_at(&h, 8)? as usize;
    let desc_offset = u64::from(u32_at(&h, 16)?);
    let data_offset = u64::from(u32_at(&h, 20)?);
    let desc_len = 16 + name_size;
    if name_size > 4096 || num_desc > 4096 {
        return None;
    }
    let mut descs = vec![0u8; desc_len * num_desc];
    f.read_exact_at(&mut descs, desc_offset).ok()?;
    let mut out = Vec::new();
    for d in descs.chunks_exact(desc_len) {
        let offset = u64::from(u32_at(d, 8)?);
        let name = &d[16..];
        let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
        let name = String::from_utf8_lossy(name).into_owned();
        if VCPU_FIELDS.contains(&name.as_str()) {
            out.push((name, data_offset + offset));
        }
    }
    Some(out)
}

/// Sums each KVM counter over every vCPU.
fn vcpu_totals() -> serde_json::Map<String, serde_json::Value> {
    let mut totals = serde_json::Map::new();
    let Ok(vcpus) = VCPUS.lock() else {
        return totals;
    };
    for v in vcpus.iter() {
        let f = v.fd.as_raw_fd();
        for (name, off) in &v.fields {
            let mut b = [0u8; 8];
            // SAFETY: reading 8 bytes into an 8-byte buffer from an fd we own.
            let n = unsafe { libc::pread(f, b.as_mut_ptr().cast(), 8, *off as libc::off_t) };
            if n == 8 {
                let e = totals.entry(name.clone()).or_insert(0u64.into());
                *e = (e.as_u64().unwrap_or(0) + u64::from_le_bytes(b)).into();
            }
        }
    }
    totals
}

/// Sends metrics to `path` (a file, appended to, or a named pipe) from now on, and writes them
/// every [`PERIOD`]. Only once per process, as in Firecracker.
pub fn init(path: &Path) -> Result<(), String> {
    let mut sink = SINK
        .lock()
        .map_err(|_| "metrics lock poisoned".to_string())?;
    if sink.is_some() {
        return Err("Reinitialization of metrics not allowed.".into());
    }
    let file = open_sink(path).map_err(|e| format!("metrics_path {}: {e}", path.display()))?;
    *sink = Some(Sink { file });
    drop(sink);
    // Spawned from a filtered thread (an API connection), the flusher inherits that filter;
    // from the unfiltered main thread (`--metrics-path`) it installs the API threads' own.
    let inherited = kiln_seccomp::current_kind();
    let filter = FLUSHER_FILTER
        .get()
        .cloned()
        .filter(|_| inherited.is_none());
    let _ = std::thread::Builder::new()
        .name("fc_metrics".into())
        .spawn(move || {
            if let Some(kind) = inherited {
                kiln_seccomp::note_inherited(kind);
            } else if let Some(f) = filter {
                if let Err(e) = f.install(kiln_seccomp::ThreadKind::Api) {
                    eprintln!("kiln: metrics flusher: {e}; periodic flushes are off");
                    return;
                }
            }
            loop {
                std::thread::sleep(PERIOD);
                let _ = flush();
            }
        });
    Ok(())
}

/// The seccomp filters the periodic metrics flusher installs (its `api` filter), set once at
/// start-up before [`init`]. Without them the flusher runs unfiltered (`--no-seccomp`).
static FLUSHER_FILTER: std::sync::OnceLock<std::sync::Arc<kiln_seccomp::Filters>> =
    std::sync::OnceLock::new();

/// Sets the filters the metrics flusher thread installs (see [`init`]); only the first call
/// counts.
pub fn set_flusher_filter(filters: std::sync::Arc<kiln_seccomp::Filters>) {
    let _ = FLUSHER_FILTER.set(filters);
}

/// Opens a log or metrics destination: appended if a file, without blocking if a FIFO (read
/// and write, so opening never waits for a reader).
pub fn open_sink(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// The metrics now, as one JSON object (counters since the previous call).
pub fn snapshot() -> serde_json::Value {
    let mut v = serde_json::to_value(&METRICS).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        o.insert("utc_timestamp_ms".into(), ms.into());
        let [io_in, io_out, mmio_read, mmio_write] = exit_deltas();
        let mut vcpu = serde_json::Map::new();
        vcpu.insert("exit_io_in".into(), io_in.into());
        vcpu.insert("exit_io_out".into(), io_out.into());
        vcpu.insert("exit_mmio_read".into(), mmio_read.into());
        vcpu.insert("exit_mmio_write".into(), mmio_write.into());
        vcpu.insert("kvm".into(), serde_json::Value::Object(vcpu_totals()));
        o.insert("vcpu".into(), serde_json::Value::Object(vcpu));
    }
    v
}

/// Writes the metrics now (`FlushMetrics`).
pub fn flush() -> Result<(), String> {
    let mut sink = SINK
        .lock()
        .map_err(|_| "metrics lock poisoned".to_string())?;
    let Some(s) = sink.as_mut() else {
        return Err("The metrics system is not initialized.".into());
    };
    let mut line = snapshot().to_string();
    line.push('\n');
    s.file
        .write_all(line.as_bytes())
        .map_err(|e| format!("writing metrics: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_report_increments_since_the_last_flush() {
        let c = Counter::new();
        c.inc();
        c.inc();
        assert_eq!(serde_json::to_value(&c).unwrap(), 2);
        assert_eq!(serde_json::to_value(&c).unwrap(), 0);
        c.inc();
        assert_eq!(serde_json::to_value(&c).unwrap(), 1);
        assert_eq!(c.total(), 3);
    }

    #[test]
    fn vcpu_exit_counters_come_from_kvm_statistics() {
        if std::env::var_os("KILN_SKIP_KVM").is_some_and(|v| v == "1") {
            return;
        }
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm (KILN_SKIP_KVM=1 to skip)");
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        register_vcpu(&vcpu);
        let totals = vcpu_totals();
        // Every host this project supports has binary statistics (Linux >= 5.14).
        assert!(totals.contains_key("exits"), "{totals:?}");
        assert!(totals.contains_key("io_exits"), "{totals:?}");
        assert!(totals.contains_key("mmio_exits"), "{totals:?}");
    }

    #[test]
    fn exits_are_counted_by_kind_per_thread() {
        let _ = exit_deltas();
        let threads: Vec<_> = (0..3)
            .map(|_| {
                std::thread::spawn(|| {
                    count_exit(ExitCount::IoIn);
                    count_exit(ExitCount::IoOut);
                    count_exit(ExitCount::IoOut);
                    count_exit(ExitCount::MmioRead);
                    count_exit(ExitCount::MmioWrite);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Other tests may count concurrently in this process: at least ours are there.
        let d = exit_deltas();
        assert!(d[0] >= 3 && d[1] >= 6 && d[2] >= 3 && d[3] >= 3, "{d:?}");
    }

    #[test]
    fn snapshot_has_the_firecracker_groups() {
        let v = snapshot();
        for k in [
            "api_server",
            "get_api_requests",
            "put_api_requests",
            "patch_api_requests",
            "latencies_us",
            "vcpu",
            "utc_timestamp_ms",
        ] {
            assert!(v.get(k).is_some(), "{k} missing: {v}");
        }
    }
}
