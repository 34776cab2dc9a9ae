//! The request and response bodies of the Firecracker API (firecracker.yaml v1.16.1), as
//! serde types. Every body rejects unknown fields, as Firecracker's do.

use serde::{Deserialize, Serialize};

/// `TokenBucket`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// Tokens per `refill_time`.
    pub size: u64,
    /// Extra tokens available once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill an empty bucket.
    pub refill_time: u64,
}

/// `RateLimiter`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// `HugePages`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// Normal pages.
    #[default]
    None,
    /// 2 MiB pages.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// `MachineConfiguration` (PUT, GET).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vCPUs (1..=32).
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading (x86: only false is honoured).
    #[serde(default)]
    pub smt: bool,
    /// Deprecated CPU template name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Dirty page tracking for diff snapshots.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Huge page backing.
    #[serde(default)]
    pub huge_pages: HugePages,
}

impl Default for MachineConfig {
    fn default() -> Self {
        // Firecracker's defaults before any PUT.
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            cpu_template: None,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
        }
    }
}

/// PATCH `/machine-config`: every field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// vCPUs.
    pub vcpu_count: Option<u8>,
    /// Memory in MiB.
    pub mem_size_mib: Option<u64>,
    /// SMT.
    pub smt: Option<bool>,
    /// CPU template.
    pub cpu_template: Option<String>,
    /// Dirty page tracking.
    pub track_dirty_pages: Option<bool>,
    /// Huge pages.
    pub huge_pages: Option<HugePages>,
}

/// `BootSource`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Kernel image (ELF or bzImage).
    pub kernel_image_path: String,
    /// Initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `cache_type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flush requests are acknowledged without syncing.
    #[default]
    Unsafe,
    /// Flush requests sync to the host.
    Writeback,
}

/// `io_engine`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Synchronous I/O.
    #[default]
    Sync,
    /// io_uring.
    Async,
}

/// `Drive`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Identifier (matches the path's `{drive_id}`).
    pub drive_id: String,
    /// Partition UUID of the root device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Whether this is the root device.
    pub is_root_device: bool,
    /// Flush semantics.
    #[serde(default)]
    pub cache_type: CacheType,
    /// Read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// Backing file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// Rate limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    /// I/O engine.
    #[serde(default)]
    pub io_engine: IoEngine,
    /// vhost-user-blk socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `PartialDrive` (PATCH).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// Identifier.
    pub drive_id: String,
    /// New backing file.
    pub path_on_host: Option<String>,
    /// New rate limits.
    pub rate_limiter: Option<RateLimiter>,
}

/// `NetworkInterface`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// Identifier.
    pub iface_id: String,
    /// Host tap device.
    pub host_dev_name: String,
    /// Guest MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// MTU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Receive rate limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Transmit rate limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PartialNetworkInterface` (PATCH).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// Identifier.
    pub iface_id: String,
    /// Receive rate limits.
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Transmit rate limits.
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `Vsock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// Guest context id (>= 3).
    pub guest_cid: u32,
    /// Host Unix socket.
    pub uds_path: String,
    /// Deprecated; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `EntropyDevice`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entropy {
    /// Rate limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `SerialDevice`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Serial {
    /// Where guest output goes (default: stdout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<String>,
    /// Output rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<TokenBucket>,
}

/// Log levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors.
    Error,
    /// Warnings.
    Warning,
    /// Information.
    Info,
    /// Debugging.
    Debug,
    /// Everything.
    Trace,
}

impl std::str::FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        // Firecracker accepts the names case-insensitively, and `Warn` too.
        match s.to_ascii_lowercase().as_str() {
            "off" => Ok(LogLevel::Off),
            "error" => Ok(LogLevel::Error),
            "warning" | "warn" => Ok(LogLevel::Warning),
            "info" => Ok(LogLevel::Info),
            "debug" => Ok(LogLevel::Debug),
            "trace" => Ok(LogLevel::Trace),
            _ => Err(format!(
                "invalid log level {s:?} (Off, Error, Warning, Info, Debug, Trace)"
            )),
        }
    }
}

/// `Logger`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// Level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// File or named pipe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// Prefix lines with the level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Prefix lines with the source location.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only this module's messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `Metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// File or named pipe.
    pub metrics_path: String,
}

/// `Balloon`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    /// Target size in MiB.
    pub amount_mib: u32,
    /// Deflate when the guest is out of memory.
    pub deflate_on_oom: bool,
    /// Statistics interval (0: off).
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Free page hinting.
    #[serde(default)]
    pub free_page_hinting: bool,
    /// Free page reporting.
    #[serde(default)]
    pub free_page_reporting: bool,
}

/// `BalloonUpdate`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// New target in MiB.
    pub amount_mib: u32,
}

/// `BalloonStatsUpdate`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    /// New statistics interval.
    pub stats_polling_interval_s: u16,
}

/// `Vm` state for PATCH `/vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum VmState {
    /// Pause every vCPU.
    Paused,
    /// Run again.
    Resumed,
}

/// `Vm`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// Wanted state.
    pub state: VmState,
}

/// `action_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ActionType {
    /// Write the metrics now.
    FlushMetrics,
    /// Boot.
    InstanceStart,
    /// Press Ctrl+Alt+Del.
    SendCtrlAltDel,
}

/// `InstanceActionInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// What to do.
    pub action_type: ActionType,
}

/// `snapshot_type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum SnapshotType {
    /// All of memory.
    #[default]
    Full,
    /// Pages dirtied since the last snapshot.
    Diff,
}

/// `SnapshotCreateParams`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// Guest memory file.
    pub mem_file_path: String,
    /// VM state file.
    pub snapshot_path: String,
    /// Full or diff.
    #[serde(default)]
    pub snapshot_type: SnapshotType,
}

/// `MemoryBackend`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// `File` or `Uffd`.
    pub backend_type: MemoryBackendType,
    /// File or socket.
    pub backend_path: String,
}

/// `backend_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MemoryBackendType {
    /// A memory file.
    File,
    /// A userfaultfd handler's socket.
    Uffd,
}

/// `NetworkOverride`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// Interface.
    pub iface_id: String,
    /// New tap.
    pub host_dev_name: String,
}

/// `VsockOverride`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// New socket.
    pub uds_path: String,
}

/// `SnapshotLoadParams`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    /// VM state file.
    pub snapshot_path: String,
    /// Guest memory file (or `mem_backend`).
    pub mem_file_path: Option<String>,
    /// Guest memory backend (or `mem_file_path`).
    pub mem_backend: Option<MemoryBackend>,
    /// Deprecated alias of `track_dirty_pages`.
    pub enable_diff_snapshots: Option<bool>,
    /// Dirty page tracking.
    pub track_dirty_pages: Option<bool>,
    /// Resume after loading.
    pub resume_vm: Option<bool>,
    /// Tap overrides.
    pub network_overrides: Option<Vec<NetworkOverride>>,
    /// Vsock override.
    pub vsock_override: Option<VsockOverride>,
    /// KVM_CLOCK_REALTIME.
    pub clock_realtime: Option<bool>,
}

/// `MmdsConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    /// `V1` or `V2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<MmdsVersion>,
    /// Interfaces that may reach MMDS.
    pub network_interfaces: Vec<String>,
    /// MMDS address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<String>,
    /// EC2 IMDS compatibility.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imds_compat: Option<bool>,
}

/// MMDS version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    /// Version 1.
    V1,
    /// Version 2 (session tokens).
    V2,
}

/// `FullVmConfiguration`, also the `--config-file` format (kebab-case top-level keys).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Balloon.
    #[serde(default)]
    pub balloon: Option<Balloon>,
    /// Drives, in order.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// Kernel.
    #[serde(rename = "boot-source", default)]
    pub boot_source: Option<BootSource>,
    /// CPU template (not honoured; refused when set).
    #[serde(rename = "cpu-config", default)]
    pub cpu_config: Option<serde_json::Value>,
    /// Logger.
    #[serde(default)]
    pub logger: Option<Logger>,
    /// Machine.
    #[serde(rename = "machine-config", default)]
    pub machine_config: Option<MachineConfig>,
    /// Metrics.
    #[serde(default)]
    pub metrics: Option<Metrics>,
    /// Memory hotplug (not honoured; refused when set).
    #[serde(rename = "memory-hotplug", default)]
    pub memory_hotplug: Option<serde_json::Value>,
    /// MMDS.
    #[serde(rename = "mmds-config", default)]
    pub mmds_config: Option<MmdsConfig>,
    /// Network interfaces.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// Persistent memory (not honoured; refused when non-empty).
    #[serde(default)]
    pub pmem: Vec<serde_json::Value>,
    /// Vsock.
    #[serde(default)]
    pub vsock: Option<Vsock>,
    /// Entropy device.
    #[serde(default)]
    pub entropy: Option<Entropy>,
    /// Serial console.
    #[serde(default)]
    pub serial: Option<Serial>,
}

/// `InstanceInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceInfo {
    /// Always `Firecracker`, for clients that check it.
    pub app_name: String,
    /// `--id`.
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    /// The Firecracker version kiln implements.
    pub vmm_version: String,
}
