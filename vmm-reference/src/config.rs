//! Command-line flags and their parsing; [`crate::vm::VmSpec::from_cli`] validates them into a
//! [`crate::vm::VmSpec`].
//!
//! Every error names the flag at fault, since that is what the user has to change.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use kiln_memory::{Backing, HugePageSize, MemoryConfig, MemoryPolicy};

/// Errors in the user's configuration; each names the flag at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--memory` could not be parsed.
    #[error("--memory {value:?}: {why} (examples: 128, 512M, 2G)")]
    MemorySyntax {
        /// What the user gave.
        value: String,
        /// Why it is wrong.
        why: &'static str,
    },
    /// `--serial` could not be parsed.
    #[error("--serial {0:?}: expected stdio, null or file:PATH")]
    Serial(String),
    /// `--cpu-affinity` could not be parsed or names a vCPU or host CPU that isn't there.
    #[error("--cpu-affinity {value:?}: {why}")]
    CpuAffinity {
        /// What the user gave.
        value: String,
        /// Why it is wrong.
        why: String,
    },
    /// `--vcpu-priority` could not be parsed.
    #[error("--vcpu-priority {value:?}: {why}")]
    VcpuPriority {
        /// What the user gave.
        value: String,
        /// Why it is wrong.
        why: String,
    },
    /// A `KEY=VALUE,...` device option could not be parsed.
    #[error("{flag} {value:?}: {why}")]
    DeviceOption {
        /// The flag (`--disk`, `--rng`).
        flag: &'static str,
        /// What the user gave.
        value: String,
        /// Why it is wrong.
        why: String,
    },
}

/// How a guest kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BootProtocolArg {
    /// PVH if the ELF kernel has a PVH note, else the Linux 64-bit boot protocol.
    Auto,
    /// The Linux 64-bit boot protocol (boot_params).
    Linux,
    /// PVH (hvm_start_info); needs an ELF kernel with a PVH note.
    Pvh,
}

/// Where the guest's COM1 goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialArg {
    /// Output to stdout, input from stdin.
    Stdio,
    /// Output appended to a file, no input.
    File(PathBuf),
    /// Discarded.
    Null,
}

impl std::str::FromStr for SerialArg {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "stdio" => Ok(SerialArg::Stdio),
            "null" => Ok(SerialArg::Null),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(SerialArg::File(PathBuf::from(p))),
                _ => Err(ConfigError::Serial(s.to_string())),
            },
        }
    }
}

/// kiln: boot a guest on KVM.
///
/// With no --kernel, kiln boots its bundled conformance guest, which checks the virtual
/// machine and prints `KTEST <scenario> PASS|FAIL` lines on the serial console.
///
/// Exit status: 0 guest powered off (or migrated away); 1 error (message names the flag or resource);
/// 2 bad command line; 3 guest requested a reset; 4 guest crashed (triple fault, KVM internal
/// error; vCPU registers printed); 148 a thread made a system call its seccomp filter
/// forbids; 128+N stopped by signal N.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, long_about)]
pub struct Cli {
    /// Guest kernel: ELF vmlinux (PVH note optional) or bzImage. Default: the bundled
    /// conformance guest.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk loaded for the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line. Default for the bundled guest: `console=ttyS0 kiln.test=all`
    /// (kiln appends kiln.mem and kiln.cpus for it).
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cpus: u32,
    /// Guest memory: a size (MiB, or with a K, M or G suffix), or `KEY=VALUE,...` with
    /// `size=SIZE` (default 128M), `shared=on|off`, `hugepages=on`, `hugepage-size=2M|1G`,
    /// `file=PATH`, `prefault=on`, `mergeable=on` (KSM), `thp=on`, `host-numa-node=N`
    /// (see docs/resources.md).
    #[arg(long, default_value = "128M", value_name = "SIZE|OPTIONS")]
    pub memory: String,
    /// Pin a vCPU's thread (`VCPU` = its index) or the VMM's own threads (`vmm`: main, device
    /// event loop, stdin reader) to host CPUs, e.g. `0=2`, `1=0-1,3`, `vmm=0` (repeatable).
    #[arg(long, value_name = "VCPU=HOSTCPUS")]
    pub cpu_affinity: Vec<CpuAffinityArg>,
    /// Run vCPU threads under a real-time policy: `fifo:N` is SCHED_FIFO at priority N
    /// (1-99). Needs CAP_SYS_NICE or a high enough RLIMIT_RTPRIO.
    #[arg(long, value_name = "fifo:N")]
    pub vcpu_priority: Option<VcpuPriorityArg>,
    /// Serial console: stdio, null or file:PATH.
    #[arg(long, default_value = "stdio", value_name = "WHERE")]
    pub serial: SerialArg,
    /// Boot protocol.
    #[arg(long, value_enum, default_value_t = BootProtocolArg::Auto)]
    pub boot_protocol: BootProtocolArg,
    /// On SIGTERM, press the ACPI power button and wait this many seconds for the guest to
    /// power off before stopping it (0: stop at once). SIGINT always stops at once.
    #[arg(long, default_value_t = 3.0, value_name = "SECS", value_parser = parse_timeout)]
    pub shutdown_timeout: f64,
    /// Write the ACPI tables this VM would get (DSDT.aml, FACP.aml, APIC.aml, XSDT.aml,
    /// RSDP.bin) into DIR for `iasl -d`, then exit without starting a VM.
    #[arg(long, value_name = "DIR")]
    pub dump_acpi: Option<PathBuf>,
    /// A virtio-blk disk (repeatable): `path=PATH[,readonly=on][,id=ID]` plus optional rate
    /// limits `bw_size=BYTES,bw_refill_time=MS[,bw_one_time_burst=BYTES]` and
    /// `ops_size=N,ops_refill_time=MS[,ops_one_time_burst=N]`. PATH is a raw image file or a
    /// host block device.
    #[arg(long, value_name = "OPTIONS")]
    pub disk: Vec<DiskArg>,
    /// A virtio-net device on a host tap (repeatable): `tap=NAME[,mac=MAC][,mtu=N][,id=ID]`
    /// plus rate limits per direction as for --disk with an `rx_` or `tx_` prefix
    /// (`tx_bw_size=..,tx_bw_refill_time=..`). The tap is attached, or created if it doesn't
    /// exist (creating needs CAP_NET_ADMIN); without `mac` a random local address is used.
    #[arg(long, value_name = "OPTIONS")]
    pub net: Vec<NetArg>,
    /// The virtio entropy device (fed by the host's getrandom): `on` (default), `off`, or
    /// rate limits as for --disk (`bw_size=1024,bw_refill_time=1000` = 1 KiB/s).
    #[arg(long, default_value = "on", value_name = "on|off|OPTIONS")]
    pub rng: RngArg,
    /// Run without seccomp filters (by default every kiln thread installs an allow-list
    /// before it handles guest input; a forbidden call ends kiln with status 148).
    #[arg(long, conflicts_with = "seccomp_filter")]
    pub no_seccomp: bool,
    /// Use the seccomp filters in FILE (seccompiler JSON, one filter per thread kind: vmm,
    /// vcpu, device, stdin; optionally bench and api; see docs/security.md) instead of the
    /// built-in ones.
    #[arg(long, value_name = "FILE")]
    pub seccomp_filter: Option<PathBuf>,
    /// Test hook: make a forbidden system call on the named thread kind right after its
    /// filter is installed (the process must then exit with 148).
    #[arg(long, hide = true, value_name = "KIND")]
    pub seccomp_selftest: Option<SeccompSelftest>,
    /// A virtio memory balloon: `size=SIZE[,deflate-on-oom=on][,free-page-reporting=on]
    /// [,stats-interval=SECS]` (SIZE: the initial target, MiB or with a K/M/G suffix). The
    /// pages the guest gives up are returned to the host.
    #[arg(long, value_name = "OPTIONS")]
    pub balloon: Option<BalloonArg>,
    /// Restore a snapshot instead of booting: `DIR` (holding `state` and `memory`) or
    /// `state=PATH,mem=PATH[,diff-mem=PATH]` (a diff snapshot: its state, the full
    /// snapshot's memory file and the diff's). The machine (vCPUs, memory, disks, devices)
    /// comes from the snapshot; the memory file is mapped privately and must stay unchanged
    /// while the VM runs (see docs/snapshot.md).
    #[arg(
        long,
        value_name = "DIR|state=PATH,mem=PATH",
        conflicts_with_all = ["kernel", "initrd", "cmdline", "cpus", "memory", "disk", "rng",
                              "balloon", "net", "vsock", "boot_protocol", "dump_acpi"]
    )]
    pub restore: Option<String>,
    /// With --restore: stay paused after restoring (resume through --control-sock).
    #[arg(long, requires = "restore")]
    pub restore_paused: bool,
    /// Serve one-line commands on a Unix socket at PATH: `pause`, `resume`,
    /// `snapshot STATE MEM [diff]`; each is answered `ok ...` or `error ...` (a test hook
    /// until the API server exposes the same).
    #[arg(long, value_name = "PATH")]
    pub control_sock: Option<PathBuf>,
    /// A virtio-vsock device: `cid=N,uds=PATH[,id=NAME]`. The guest (context ID N, 3 or
    /// more) reaches host port P at the Unix socket `PATH_P`; host programs connect to the
    /// listener kiln creates at PATH and write `CONNECT <guest port>\n` (Firecracker's
    /// convention; see docs/guest-contract.md). PATH must not exist; kiln removes it at exit.
    #[arg(long, value_name = "OPTIONS")]
    pub vsock: Option<VsockArg>,
    /// Start the exit benchmark's irqfd injector thread, which the conformance guest's
    /// `bench-exits` scenario asks for timed interrupts (used by `kiln-bench exits`).
    #[arg(long)]
    pub exit_bench: bool,
    /// Boot nothing: wait on `tcp:HOST:PORT` or `unix:PATH` for one VM migrated from another
    /// kiln (`migrate` on its control socket), then run it. The guest's memory size, vCPUs
    /// and devices come from the source; the other flags (`--memory` backing options,
    /// `--serial`, seccomp, ...) from this command line. See docs/migration.md.
    #[arg(long, value_name = "tcp:HOST:PORT|unix:PATH")]
    pub migrate_listen: Option<crate::migration::MigrateAddr>,

    // Firecracker's command line (docs/api.md). Invoked as `firecracker`, kiln always serves
    // the API (at /run/firecracker.socket unless --api-sock or --no-api).
    /// Serve the Firecracker-compatible REST API on this Unix socket; the VM is configured
    /// and started through it (`PUT /actions` InstanceStart).
    #[arg(long, value_name = "PATH", help_heading = "Firecracker API")]
    pub api_sock: Option<PathBuf>,
    /// The microVM's id (`GET /`, log lines).
    #[arg(
        long,
        default_value = "anonymous-instance",
        value_name = "ID",
        help_heading = "Firecracker API"
    )]
    pub id: String,
    /// Configure (and start) the VM from this JSON file: Firecracker's `FullVmConfiguration`
    /// with `boot-source` and `drives` required.
    #[arg(long, value_name = "FILE", help_heading = "Firecracker API")]
    pub config_file: Option<PathBuf>,
    /// Serve no API: run the VM of --config-file only.
    #[arg(long, requires = "config_file", help_heading = "Firecracker API")]
    pub no_api: bool,
    /// Log the time from start to the guest's boot-complete write (Firecracker's boot timer
    /// device; accepted, see docs/api.md).
    #[arg(long, help_heading = "Firecracker API")]
    pub boot_timer: bool,
    /// Log level: Off, Error, Warning, Info, Debug, Trace.
    #[arg(long, value_name = "LEVEL", value_parser = parse_log_level, help_heading = "Firecracker API")]
    pub level: Option<crate::api::models::LogLevel>,
    /// Write the log to this file or named pipe.
    #[arg(long, value_name = "PATH", help_heading = "Firecracker API")]
    pub log_path: Option<PathBuf>,
    /// Prefix log lines with their level.
    #[arg(long, help_heading = "Firecracker API")]
    pub show_level: bool,
    /// Prefix log lines with their origin.
    #[arg(long, help_heading = "Firecracker API")]
    pub show_log_origin: bool,
    /// Write metrics to this file or named pipe (every 60 s and on FlushMetrics).
    #[arg(long, value_name = "PATH", help_heading = "Firecracker API")]
    pub metrics_path: Option<PathBuf>,
    /// Largest API request body accepted, in bytes.
    #[arg(
        long,
        default_value_t = crate::api::DEFAULT_MAX_PAYLOAD,
        value_name = "BYTES",
        help_heading = "Firecracker API"
    )]
    pub http_api_max_payload_size: usize,
    /// Largest MMDS data store, in bytes (default: the payload limit).
    #[arg(long, value_name = "BYTES", help_heading = "Firecracker API")]
    pub mmds_size_limit: Option<usize>,
    /// Jailer hand-over: process start time (µs, monotonic); accepted.
    #[arg(long, hide = true, value_name = "US")]
    pub start_time_us: Option<u64>,
    /// Jailer hand-over: process start CPU time (µs); accepted.
    #[arg(long, hide = true, value_name = "US")]
    pub start_time_cpu_us: Option<u64>,
    /// Jailer hand-over: parent CPU time (µs); accepted.
    #[arg(long, hide = true, value_name = "US")]
    pub parent_cpu_time_us: Option<u64>,
    /// Write the bundled conformance guest (ELF) to this file and exit, so a Firecracker
    /// client can name it as `kernel_image_path`.
    #[arg(long, value_name = "PATH")]
    pub write_bundled_guest: Option<PathBuf>,
}

fn parse_log_level(s: &str) -> Result<crate::api::models::LogLevel, String> {
    s.parse()
}

/// Thread kinds for `--seccomp-selftest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SeccompSelftest {
    /// The main thread.
    Vmm,
    /// vCPU threads.
    Vcpu,
    /// The virtio event loop.
    Device,
    /// The stdin reader.
    Stdin,
    /// The exit benchmark's irqfd injector (needs --exit-bench).
    Bench,
    /// The API server thread (needs --api-sock, or kiln as `firecracker`).
    Api,
}

/// Splits `KEY=VALUE,...` (a bare `KEY` means `KEY=on`), rejecting empty and repeated keys.
fn split_options<'a>(
    flag: &'static str,
    value: &'a str,
) -> Result<Vec<(&'a str, &'a str)>, ConfigError> {
    let err = |why: String| ConfigError::DeviceOption {
        flag,
        value: value.to_string(),
        why,
    };
    let mut out: Vec<(&str, &str)> = Vec::new();
    for part in value.split(',') {
        let (k, v) = part.split_once('=').unwrap_or((part, "on"));
        if k.is_empty() {
            return Err(err("empty option (expected KEY=VALUE,...)".into()));
        }
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(err(format!("{k} given twice")));
        }
        out.push((k, v));
    }
    Ok(out)
}

fn parse_switch(flag: &'static str, whole: &str, key: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(ConfigError::DeviceOption {
            flag,
            value: whole.to_string(),
            why: format!("{key}={v}: expected on or off"),
        }),
    }
}

fn parse_u64(flag: &'static str, whole: &str, key: &str, v: &str) -> Result<u64, ConfigError> {
    v.parse().map_err(|_| ConfigError::DeviceOption {
        flag,
        value: whole.to_string(),
        why: format!("{key}={v}: expected a non-negative integer"),
    })
}

/// A token-bucket limit as given on the command line (Cloud Hypervisor's option names):
/// `bw_size` bytes (or `ops_size` requests) per `*_refill_time` milliseconds, plus a
/// one-time burst.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitArg {
    /// `bw_size`, `bw_one_time_burst`, `bw_refill_time`.
    pub bandwidth: Option<kiln_ratelimit::BucketConfig>,
    /// `ops_size`, `ops_one_time_burst`, `ops_refill_time`.
    pub ops: Option<kiln_ratelimit::BucketConfig>,
}

impl RateLimitArg {
    /// Takes the rate-limit keys out of `opts`; errors name `flag`.
    fn take(
        flag: &'static str,
        whole: &str,
        opts: &mut Vec<(&str, &str)>,
    ) -> Result<Self, ConfigError> {
        let mut bucket =
            |prefix: &str| -> Result<Option<kiln_ratelimit::BucketConfig>, ConfigError> {
                let mut size = None;
                let mut burst = 0;
                let mut refill = None;
                let mut rest = Vec::with_capacity(opts.len());
                for &(k, v) in opts.iter() {
                    match k.strip_prefix(prefix) {
                        Some("_size") => size = Some(parse_u64(flag, whole, k, v)?),
                        Some("_one_time_burst") => burst = parse_u64(flag, whole, k, v)?,
                        Some("_refill_time") => refill = Some(parse_u64(flag, whole, k, v)?),
                        _ => rest.push((k, v)),
                    }
                }
                *opts = rest;
                let err = |why: String| ConfigError::DeviceOption {
                    flag,
                    value: whole.to_string(),
                    why,
                };
                match (size, refill) {
                    (None, None) if burst == 0 => Ok(None),
                    (Some(0), _) => Err(err(format!("{prefix}_size must be more than 0"))),
                    (_, Some(0)) => {
                        Err(err(format!("{prefix}_refill_time must be more than 0 ms")))
                    }
                    (Some(size), Some(ms)) => Ok(Some(kiln_ratelimit::BucketConfig {
                        size,
                        one_time_burst: burst,
                        refill_time: std::time::Duration::from_millis(ms),
                    })),
                    _ => Err(err(format!(
                        "{prefix}_size and {prefix}_refill_time (ms) go together"
                    ))),
                }
            };
        let bandwidth = bucket("bw")?;
        let ops = bucket("ops")?;
        Ok(RateLimitArg { bandwidth, ops })
    }

    /// Whether any limit is set.
    pub fn is_set(&self) -> bool {
        self.bandwidth.is_some() || self.ops.is_some()
    }
}

fn unknown_options(
    flag: &'static str,
    whole: &str,
    opts: &[(&str, &str)],
    known: &str,
) -> Result<(), ConfigError> {
    match opts.first() {
        None => Ok(()),
        Some((k, _)) => Err(ConfigError::DeviceOption {
            flag,
            value: whole.to_string(),
            why: format!("unknown option {k:?} (known: {known})"),
        }),
    }
}

const RATE_LIMIT_KEYS: &str = "bw_size, bw_one_time_burst, bw_refill_time, ops_size, \
                               ops_one_time_burst, ops_refill_time";

/// One `--disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskArg {
    /// Raw image file or host block device.
    pub path: PathBuf,
    /// Read-only (`readonly=on`).
    pub read_only: bool,
    /// GET_ID string (at most 20 bytes).
    pub id: Option<String>,
    /// Throttling.
    pub rate_limit: RateLimitArg,
}

impl std::str::FromStr for DiskArg {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        const FLAG: &str = "--disk";
        let mut opts = split_options(FLAG, s)?;
        let rate_limit = RateLimitArg::take(FLAG, s, &mut opts)?;
        let mut path = None;
        let mut read_only = false;
        let mut id = None;
        let mut rest = Vec::new();
        for (k, v) in opts {
            match k {
                "path" => path = Some(PathBuf::from(v)).filter(|_| !v.is_empty()),
                "readonly" => read_only = parse_switch(FLAG, s, k, v)?,
                "id" => {
                    if v.len() > 20 {
                        return Err(ConfigError::DeviceOption {
                            flag: FLAG,
                            value: s.to_string(),
                            why: format!("id={v}: at most 20 bytes (virtio-blk GET_ID)"),
                        });
                    }
                    id = Some(v.to_string());
                }
                _ => rest.push((k, v)),
            }
        }
        unknown_options(
            FLAG,
            s,
            &rest,
            &format!("path, readonly, id, {RATE_LIMIT_KEYS}"),
        )?;
        let path = path.ok_or_else(|| ConfigError::DeviceOption {
            flag: FLAG,
            value: s.to_string(),
            why: "path=PATH is required".into(),
        })?;
        Ok(DiskArg {
            path,
            read_only,
            id,
            rate_limit,
        })
    }
}

/// One `--net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetArg {
    /// The host tap interface.
    pub tap: String,
    /// The guest's MAC address (`None`: a random locally administered one).
    pub mac: Option<[u8; 6]>,
    /// The MTU announced to the guest.
    pub mtu: u16,
    /// A name for logs.
    pub id: Option<String>,
    /// Throttling of what the guest receives (`rx_bw_size`, ...).
    pub rx_rate_limit: RateLimitArg,
    /// Throttling of what the guest sends (`tx_bw_size`, ...).
    pub tx_rate_limit: RateLimitArg,
}

/// Parses `aa:bb:cc:dd:ee:ff`; a multicast address can't be a NIC's.
pub fn parse_mac(v: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = v.split(':').collect();
    if parts.len() != 6 {
        return Err(format!(
            "mac={v}: expected six hex bytes like 52:54:00:12:34:56"
        ));
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(format!(
                "mac={v}: expected six hex bytes like 52:54:00:12:34:56"
            ));
        }
        *b = u8::from_str_radix(p, 16)
            .map_err(|_| format!("mac={v}: expected six hex bytes like 52:54:00:12:34:56"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "mac={v}: a multicast address (low bit of the first byte set)"
        ));
    }
    if mac == [0; 6] {
        return Err(format!("mac={v}: the all-zero address"));
    }
    Ok(mac)
}

/// Checks a host tap interface name (`tap=`, the API's `host_dev_name`).
pub fn check_tap_name(v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > kiln_virtio::net::tap::MAX_NAME_LEN {
        return Err(format!(
            "tap={v}: an interface name of 1 to {} bytes",
            kiln_virtio::net::tap::MAX_NAME_LEN
        ));
    }
    if v.contains(['/', ' ', ':']) {
        return Err(format!("tap={v}: not a valid interface name"));
    }
    Ok(())
}

impl std::str::FromStr for NetArg {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        const FLAG: &str = "--net";
        let err = |why: String| ConfigError::DeviceOption {
            flag: FLAG,
            value: s.to_string(),
            why,
        };
        let opts = split_options(FLAG, s)?;
        // rx_* and tx_* keys are rate limits in the --disk syntax.
        let mut rx: Vec<(&str, &str)> = Vec::new();
        let mut tx: Vec<(&str, &str)> = Vec::new();
        let mut rest = Vec::new();
        for (k, v) in opts {
            if let Some(k) = k.strip_prefix("rx_") {
                rx.push((k, v));
            } else if let Some(k) = k.strip_prefix("tx_") {
                tx.push((k, v));
            } else {
                rest.push((k, v));
            }
        }
        let rx_rate_limit = RateLimitArg::take(FLAG, s, &mut rx)?;
        let tx_rate_limit = RateLimitArg::take(FLAG, s, &mut tx)?;
        let known = format!("tap, mac, mtu, id, rx_/tx_ + {RATE_LIMIT_KEYS}");
        if let Some((k, _)) = rx.first() {
            return Err(err(format!("unknown option \"rx_{k}\" (known: {known})")));
        }
        if let Some((k, _)) = tx.first() {
            return Err(err(format!("unknown option \"tx_{k}\" (known: {known})")));
        }
        let (mut tap, mut mac, mut mtu, mut id) = (None, None, kiln_virtio::net::DEFAULT_MTU, None);
        let mut unknown = Vec::new();
        for (k, v) in rest {
            match k {
                "tap" => {
                    check_tap_name(v).map_err(err)?;
                    tap = Some(v.to_string());
                }
                "mac" => mac = Some(parse_mac(v).map_err(err)?),
                "mtu" => {
                    let (lo, hi) = (kiln_virtio::net::MIN_MTU, kiln_virtio::net::MAX_MTU);
                    mtu = v
                        .parse::<u16>()
                        .ok()
                        .filter(|m| (lo..=hi).contains(m))
                        .ok_or_else(|| err(format!("mtu={v}: expected {lo} to {hi}")))?;
                }
                "id" => id = Some(v.to_string()),
                _ => unknown.push((k, v)),
            }
        }
        unknown_options(FLAG, s, &unknown, &known)?;
        let tap = tap.ok_or_else(|| err("tap=NAME is required".into()))?;
        Ok(NetArg {
            tap,
            mac,
            mtu,
            id,
            rx_rate_limit,
            tx_rate_limit,
        })
    }
}

/// `--rng`: the virtio entropy device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RngArg {
    /// Whether the device exists.
    pub enabled: bool,
    /// Throttling.
    pub rate_limit: RateLimitArg,
}

impl Default for RngArg {
    fn default() -> Self {
        RngArg {
            enabled: true,
            rate_limit: RateLimitArg::default(),
        }
    }
}

impl std::str::FromStr for RngArg {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        const FLAG: &str = "--rng";
        match s {
            "on" => return Ok(RngArg::default()),
            "off" => {
                return Ok(RngArg {
                    enabled: false,
                    rate_limit: RateLimitArg::default(),
                })
            }
            _ => {}
        }
        let mut opts = split_options(FLAG, s)?;
        let rate_limit = RateLimitArg::take(FLAG, s, &mut opts)?;
        unknown_options(FLAG, s, &opts, &format!("on, off, {RATE_LIMIT_KEYS}"))?;
        Ok(RngArg {
            enabled: true,
            rate_limit,
        })
    }
}

/// `--balloon`: the virtio memory balloon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalloonArg {
    /// Initial target size in bytes (`size=`, MiB or with a K/M/G suffix; default 0).
    pub size: u64,
    /// `deflate-on-oom=on`: the guest may take pages back when it runs out of memory.
    pub deflate_on_oom: bool,
    /// `free-page-reporting=on`: the guest reports free pages, which go back to the host.
    pub free_page_reporting: bool,
    /// `stats-interval=SECS` (default 1; 0 = no statistics queue).
    pub stats_interval_s: u64,
}

impl std::str::FromStr for BalloonArg {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        const FLAG: &str = "--balloon";
        let mut b = BalloonArg {
            size: 0,
            deflate_on_oom: false,
            free_page_reporting: false,
            stats_interval_s: 1,
        };
        if s == "on" {
            return Ok(b);
        }
        let opts = split_options(FLAG, s)?;
        let mut rest = Vec::new();
        for (k, v) in opts {
            match k {
                "size" => {
                    b.size = parse_memory(v).or_else(|e| match v {
                        "0" => Ok(0),
                        _ => Err(ConfigError::DeviceOption {
                            flag: FLAG,
                            value: s.to_string(),
                            why: format!("size={v}: {e}"),
                        }),
                    })?
                }
                "deflate-on-oom" => b.deflate_on_oom = parse_switch(FLAG, s, k, v)?,
                "free-page-reporting" => b.free_page_reporting = parse_switch(FLAG, s, k, v)?,
                "stats-interval" => b.stats_interval_s = parse_u64(FLAG, s, k, v)?,
                _ => rest.push((k, v)),
            }
        }
        unknown_options(
            FLAG,
            s,
            &rest,
            "size, deflate-on-oom, free-page-reporting, stats-interval",
        )?;
        Ok(b)
    }
}

/// `--vsock`: the virtio socket device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockArg {
    /// The guest's context ID (`cid=`).
    pub cid: u64,
    /// The host listener (`uds=`); guest connections to port P go to `<uds>_P`.
    pub uds: PathBuf,
    /// A name for the device (`id=`), for messages.
    pub id: Option<String>,
}

impl std::str::FromStr for VsockArg {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        const FLAG: &str = "--vsock";
        let err = |why: String| ConfigError::DeviceOption {
            flag: FLAG,
            value: s.to_string(),
            why,
        };
        let (mut cid, mut uds, mut id) = (None, None, None);
        let mut rest = Vec::new();
        for (k, v) in split_options(FLAG, s)? {
            match k {
                "cid" => cid = Some(parse_u64(FLAG, s, k, v)?),
                "uds" => uds = Some(PathBuf::from(v)),
                "id" => id = Some(v.to_string()),
                _ => rest.push((k, v)),
            }
        }
        unknown_options(FLAG, s, &rest, "cid, uds, id")?;
        let cid = cid.ok_or_else(|| err("cid= is required".into()))?;
        let uds = uds.ok_or_else(|| err("uds= is required".into()))?;
        VsockArg::new(cid, uds, id).map_err(err)
    }
}

impl VsockArg {
    /// A checked vsock device (`--vsock`, the API's `PUT /vsock`): a CID a guest may have, and
    /// a listener path that fits a Unix socket address in an existing directory and is free.
    pub fn new(cid: u64, uds: PathBuf, id: Option<String>) -> Result<VsockArg, String> {
        if !kiln_virtio::vsock::valid_guest_cid(cid) {
            return Err(format!(
                "cid={cid}: 0, 1 and 2 are reserved (hypervisor, local, host) and the CID must \
                 be below 4294967295"
            ));
        }
        let dir = match uds.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(format!(
                "uds={}: the directory {} does not exist",
                uds.display(),
                dir.display()
            ));
        }
        // sun_path holds 107 bytes and a NUL; `_PORT` adds up to 11.
        if uds.as_os_str().len() + 11 > 107 {
            return Err(format!(
                "uds={}: too long for a Unix socket path with a _PORT suffix (at most 96 bytes)",
                uds.display()
            ));
        }
        if std::fs::symlink_metadata(&uds).is_ok() {
            return Err(format!(
                "uds={}: already exists (another VM's socket, or a stale one to remove)",
                uds.display()
            ));
        }
        Ok(VsockArg { cid, uds, id })
    }
}

fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=3600.0).contains(&v) => Ok(v),
        _ => Err("expected seconds between 0 and 3600".to_string()),
    }
}

/// The default command line for the bundled guest.
pub const BUNDLED_GUEST_CMDLINE: &str = "console=ttyS0 kiln.test=all";

/// Parses a `--memory` value into bytes: a plain number is MiB; K, M, G (or KiB, MiB, GiB)
/// suffixes are binary multiples. The result must be a whole number of 4 KiB pages.
pub fn parse_memory(value: &str) -> Result<u64, ConfigError> {
    parse_size(value).map_err(|why| ConfigError::MemorySyntax {
        value: value.to_string(),
        why,
    })
}

fn parse_size(value: &str) -> Result<u64, &'static str> {
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, suffix) = v.split_at(split);
    if digits.is_empty() {
        return Err("expected a number");
    }
    let n: u64 = digits.parse().map_err(|_| "number too large")?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => 20,
        "K" | "KB" | "KIB" => 10,
        "G" | "GB" | "GIB" => 30,
        _ => return Err("unknown unit"),
    };
    let bytes = n
        .checked_shl(shift)
        .filter(|b| b >> shift == n)
        .ok_or("too large")?;
    if bytes == 0 {
        return Err("must be more than zero");
    }
    if bytes % 4096 != 0 {
        return Err("must be a multiple of 4 KiB");
    }
    Ok(bytes)
}

/// The default guest memory size (the `--memory` default, and `size=` when left out).
pub const DEFAULT_MEMORY: u64 = 128 << 20;

/// A parsed `--memory`: what backs guest RAM and what the host does with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryArg {
    /// Size and backing.
    pub config: MemoryConfig,
    /// Prefault, KSM, THP, NUMA binding.
    pub policy: MemoryPolicy,
}

/// Parses `--memory`: a plain size (`512M`), or `KEY=VALUE,...` (see [`Cli::memory`]).
///
/// Rejects combinations [`kiln_memory`] can't even express (a hugepage size without
/// hugepages, hugepages in a file, a private file); the rest of the rules are
/// [`MemoryConfig::check`] and [`MemoryPolicy::check`], which [`crate::vm::VmSpec::from_cli`]
/// applies.
pub fn parse_memory_arg(value: &str) -> Result<MemoryArg, ConfigError> {
    const FLAG: &str = "--memory";
    if !value.contains('=') {
        return Ok(MemoryArg {
            config: MemoryConfig {
                size: parse_memory(value)?,
                backing: Backing::Anonymous,
            },
            policy: MemoryPolicy::default(),
        });
    }
    let err = |why: String| ConfigError::DeviceOption {
        flag: FLAG,
        value: value.to_string(),
        why,
    };
    let mut size = DEFAULT_MEMORY;
    let mut shared = None;
    let mut hugepages = false;
    let mut page_size = None;
    let mut file = None;
    let mut policy = MemoryPolicy::default();
    let mut rest = Vec::new();
    for (k, v) in split_options(FLAG, value)? {
        match k {
            "size" => size = parse_size(v).map_err(|why| err(format!("size={v}: {why}")))?,
            "shared" => shared = Some(parse_switch(FLAG, value, k, v)?),
            "hugepages" => hugepages = parse_switch(FLAG, value, k, v)?,
            "hugepage-size" => {
                page_size = Some(match v.to_ascii_uppercase().as_str() {
                    "2M" | "2MB" | "2MIB" => HugePageSize::Size2M,
                    "1G" | "1GB" | "1GIB" => HugePageSize::Size1G,
                    _ => return Err(err(format!("hugepage-size={v}: expected 2M or 1G"))),
                })
            }
            "file" if v.is_empty() => return Err(err("file=: the path is empty".into())),
            "file" => file = Some(PathBuf::from(v)),
            "prefault" => policy.prefault = parse_switch(FLAG, value, k, v)?,
            "mergeable" => policy.mergeable = parse_switch(FLAG, value, k, v)?,
            "thp" => policy.transparent_hugepages = parse_switch(FLAG, value, k, v)?,
            "host-numa-node" => {
                policy.host_numa_node = Some(
                    v.parse()
                        .map_err(|_| err(format!("host-numa-node={v}: expected a node number")))?,
                )
            }
            _ => rest.push((k, v)),
        }
    }
    unknown_options(
        FLAG,
        value,
        &rest,
        "size, shared, hugepages, hugepage-size, file, prefault, mergeable, thp, \
         host-numa-node",
    )?;
    if page_size.is_some() && !hugepages {
        return Err(err("hugepage-size= needs hugepages=on".into()));
    }
    let backing = match (file, hugepages) {
        (Some(_), true) => {
            return Err(err(
                "hugepages=on and file= don't go together: for a hugepage-backed file, put \
                 the file on a hugetlbfs mount and leave hugepages off"
                    .into(),
            ))
        }
        (Some(_), false) if shared == Some(false) => {
            return Err(err(
                "file= with shared=off: file memory is always MAP_SHARED, or the guest's \
                 writes would never reach the file"
                    .into(),
            ))
        }
        (Some(path), false) => Backing::File(path),
        (None, true) => Backing::Hugetlb {
            page_size: page_size.unwrap_or(HugePageSize::Size2M),
            shared: shared.unwrap_or(false),
        },
        (None, false) if shared == Some(true) => Backing::SharedMemfd,
        (None, false) => Backing::Anonymous,
    };
    Ok(MemoryArg {
        config: MemoryConfig { size, backing },
        policy,
    })
}

/// Host CPU numbers kiln accepts in a list (the kernel's `cpu_set_t` size).
pub const MAX_HOST_CPUS: usize = libc::CPU_SETSIZE as usize;

/// Parses a CPU list such as `2` or `0-1,3` into sorted, distinct CPU numbers.
pub fn parse_cpu_list(list: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    if list.is_empty() {
        return Err("empty CPU list (expected e.g. 2 or 0-1,3)".into());
    }
    for part in list.split(',') {
        let num = |s: &str| -> Result<usize, String> {
            let n: usize = s
                .parse()
                .map_err(|_| format!("{s:?} is not a CPU number (expected e.g. 2 or 0-1,3)"))?;
            if n >= MAX_HOST_CPUS {
                return Err(format!(
                    "CPU {n} is beyond the {MAX_HOST_CPUS} kiln supports"
                ));
            }
            Ok(n)
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("range {part} runs backwards"));
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(num(part)?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// Formats sorted CPU numbers as a list with ranges (`0-1,3`), as the kernel does.
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(&start) = cpus.get(i) {
        let mut end = start;
        while cpus.get(i + 1) == Some(&(end + 1)) {
            end += 1;
            i += 1;
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(",")
}

/// Whose threads a `--cpu-affinity` pins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AffinityTarget {
    /// The vCPU with this index.
    Vcpu(u32),
    /// The VMM's own threads: main, device event loop, stdin reader.
    Vmm,
}

/// One `--cpu-affinity VCPU=HOSTCPUS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuAffinityArg {
    /// Whose threads.
    pub target: AffinityTarget,
    /// Sorted, distinct host CPU numbers.
    pub host_cpus: Vec<usize>,
    /// What the user wrote, for error messages.
    pub text: String,
}

impl std::str::FromStr for CpuAffinityArg {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let err = |why: String| ConfigError::CpuAffinity {
            value: s.to_string(),
            why,
        };
        let (who, list) = s
            .split_once('=')
            .ok_or_else(|| err("expected VCPU=HOSTCPUS, e.g. 0=2 or vmm=0-1".into()))?;
        let target = match who {
            "vmm" => AffinityTarget::Vmm,
            n => AffinityTarget::Vcpu(n.parse().map_err(|_| {
                err(format!(
                    "{n:?} is neither a vCPU index nor vmm (expected VCPU=HOSTCPUS)"
                ))
            })?),
        };
        Ok(CpuAffinityArg {
            target,
            host_cpus: parse_cpu_list(list).map_err(err)?,
            text: s.to_string(),
        })
    }
}

/// `--vcpu-priority`: the scheduling policy of vCPU threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuPriorityArg {
    /// SCHED_FIFO at this priority (1-99).
    Fifo(u8),
}

impl std::str::FromStr for VcpuPriorityArg {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let err = |why: &str| ConfigError::VcpuPriority {
            value: s.to_string(),
            why: why.to_string(),
        };
        let n = s
            .strip_prefix("fifo:")
            .ok_or_else(|| err("expected fifo:N (SCHED_FIFO at priority N, 1-99)"))?;
        match n.parse::<u8>() {
            Ok(p @ 1..=99) => Ok(VcpuPriorityArg::Fifo(p)),
            _ => Err(err("the priority must be a number from 1 to 99")),
        }
    }
}

impl std::fmt::Display for VcpuPriorityArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuPriorityArg::Fifo(p) => write!(f, "fifo:{p}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_units() {
        assert_eq!(parse_memory("128").unwrap(), 128 << 20);
        assert_eq!(parse_memory("128M").unwrap(), 128 << 20);
        assert_eq!(parse_memory("2G").unwrap(), 2 << 30);
        assert_eq!(parse_memory("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_memory("65536K").unwrap(), 64 << 20);
        assert_eq!(parse_memory("64m").unwrap(), 64 << 20);
    }

    #[test]
    fn memory_errors_name_the_flag() {
        for bad in [
            "",
            "M",
            "0",
            "12X",
            "1K1",
            "3K",
            "99999999999999999999G",
            "18446744073709551615G",
        ] {
            let e = parse_memory(bad).expect_err(bad).to_string();
            assert!(e.starts_with("--memory"), "{bad}: {e}");
        }
    }

    #[test]
    fn memory_plain_and_keyed() {
        let m = parse_memory_arg("512M").unwrap();
        assert_eq!(m.config.size, 512 << 20);
        assert_eq!(m.config.backing, Backing::Anonymous);
        assert_eq!(m.policy, MemoryPolicy::default());
        let m = parse_memory_arg("size=1G,hugepages=on,hugepage-size=1G,shared=on").unwrap();
        assert_eq!(m.config.size, 1 << 30);
        assert_eq!(
            m.config.backing,
            Backing::Hugetlb {
                page_size: HugePageSize::Size1G,
                shared: true
            }
        );
        let m = parse_memory_arg("hugepages=on").unwrap();
        assert_eq!(m.config.size, DEFAULT_MEMORY);
        assert_eq!(
            m.config.backing,
            Backing::Hugetlb {
                page_size: HugePageSize::Size2M,
                shared: false
            }
        );
        let m = parse_memory_arg("size=64M,shared=on,thp=on,prefault=on").unwrap();
        assert_eq!(m.config.backing, Backing::SharedMemfd);
        assert!(m.policy.transparent_hugepages && m.policy.prefault && !m.policy.mergeable);
        let m = parse_memory_arg("size=64M,mergeable=on,host-numa-node=1,shared=off").unwrap();
        assert_eq!(m.config.backing, Backing::Anonymous);
        assert!(m.policy.mergeable);
        assert_eq!(m.policy.host_numa_node, Some(1));
        let m = parse_memory_arg("file=/var/vm/ram,size=2G,shared=on").unwrap();
        assert_eq!(m.config.backing, Backing::File("/var/vm/ram".into()));
    }

    #[test]
    fn memory_rejections_name_the_flag_and_reason() {
        for (bad, why) in [
            ("size=12X", "size=12X: unknown unit"),
            ("size=64M,hugepage-size=2M", "needs hugepages=on"),
            (
                "size=64M,hugepages=on,hugepage-size=4M",
                "expected 2M or 1G",
            ),
            ("hugepages=on,file=/x", "don't go together"),
            ("hugepages=on,hugepage-size=1G,file=/x", "don't go together"),
            ("file=/x,shared=off", "always MAP_SHARED"),
            ("file=", "path is empty"),
            ("file=/x,hugepage-size=1G", "needs hugepages=on"),
            ("size=64M,thp=maybe", "thp=maybe: expected on or off"),
            ("size=64M,host-numa-node=-1", "expected a node number"),
            ("size=64M,balloon=on", "unknown option \"balloon\""),
            ("size=64M,size=128M", "size given twice"),
        ] {
            let e = parse_memory_arg(bad).unwrap_err().to_string();
            assert!(e.starts_with("--memory"), "{bad}: {e}");
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("2").unwrap(), vec![2]);
        assert_eq!(parse_cpu_list("3,0-1,1").unwrap(), vec![0, 1, 3]);
        for bad in ["", "a", "1-", "-1", "3-1", "1,,2", "4096", "0-99999"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad}");
        }
        assert_eq!(format_cpu_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(format_cpu_list(&[]), "");
    }

    #[test]
    fn cpu_affinity_values() {
        let a: CpuAffinityArg = "1=0-1,3".parse().unwrap();
        assert_eq!(a.target, AffinityTarget::Vcpu(1));
        assert_eq!(a.host_cpus, vec![0, 1, 3]);
        let a: CpuAffinityArg = "vmm=0".parse().unwrap();
        assert_eq!(a.target, AffinityTarget::Vmm);
        for bad in ["0", "x=1", "=1", "0=", "-1=0", "0=1-0", "vcpu0=1"] {
            let e = bad.parse::<CpuAffinityArg>().unwrap_err().to_string();
            assert!(e.starts_with("--cpu-affinity"), "{bad}: {e}");
        }
    }

    #[test]
    fn vcpu_priority_values() {
        assert_eq!(
            "fifo:1".parse::<VcpuPriorityArg>().unwrap(),
            VcpuPriorityArg::Fifo(1)
        );
        assert_eq!(
            "fifo:99".parse::<VcpuPriorityArg>().unwrap().to_string(),
            "fifo:99"
        );
        for bad in [
            "fifo:0", "fifo:100", "fifo:", "fifo", "rr:5", "10", "fifo:-1",
        ] {
            let e = bad.parse::<VcpuPriorityArg>().unwrap_err().to_string();
            assert!(e.starts_with("--vcpu-priority"), "{bad}: {e}");
        }
    }

    #[test]
    fn disk_options() {
        let d: DiskArg = "path=/x.img,readonly=on,id=disk0".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/x.img"));
        assert!(d.read_only);
        assert_eq!(d.id.as_deref(), Some("disk0"));
        assert!(!d.rate_limit.is_set());
        let d: DiskArg = "path=/x,bw_size=1048576,bw_refill_time=100,ops_size=10,ops_refill_time=1000,ops_one_time_burst=5"
            .parse()
            .unwrap();
        let bw = d.rate_limit.bandwidth.unwrap();
        assert_eq!((bw.size, bw.refill_time.as_millis()), (1 << 20, 100));
        let ops = d.rate_limit.ops.unwrap();
        assert_eq!((ops.size, ops.one_time_burst), (10, 5));
        assert!("path=/x,readonly".parse::<DiskArg>().unwrap().read_only);
    }

    #[test]
    fn disk_errors_name_the_flag_and_option() {
        for (bad, why) in [
            ("readonly=on", "path=PATH is required"),
            ("path=", "path=PATH is required"),
            ("path=/x,readonly=maybe", "readonly=maybe"),
            ("path=/x,colour=red", "unknown option \"colour\""),
            ("path=/x,path=/y", "path given twice"),
            ("path=/x,id=123456789012345678901", "at most 20 bytes"),
            ("path=/x,bw_size=10", "go together"),
            (
                "path=/x,bw_size=0,bw_refill_time=1",
                "bw_size must be more than 0",
            ),
            ("path=/x,ops_size=1,ops_refill_time=0", "more than 0 ms"),
            (
                "path=/x,ops_size=-1,ops_refill_time=5",
                "non-negative integer",
            ),
            ("path=/x,,", "empty option"),
        ] {
            let e = bad.parse::<DiskArg>().unwrap_err().to_string();
            assert!(e.starts_with("--disk"), "{bad}: {e}");
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn net_options() {
        let n: NetArg = "tap=kt0,mac=02:00:00:aa:BB:01,mtu=9000,id=n0,rx_bw_size=1000,rx_bw_refill_time=10,tx_ops_size=5,tx_ops_refill_time=100"
            .parse()
            .unwrap();
        assert_eq!(n.tap, "kt0");
        assert_eq!(n.mac, Some([2, 0, 0, 0xaa, 0xbb, 1]));
        assert_eq!((n.mtu, n.id.as_deref()), (9000, Some("n0")));
        assert_eq!(n.rx_rate_limit.bandwidth.unwrap().size, 1000);
        assert!(n.rx_rate_limit.ops.is_none() && n.tx_rate_limit.bandwidth.is_none());
        assert_eq!(n.tx_rate_limit.ops.unwrap().size, 5);
        let d: NetArg = "tap=x".parse().unwrap();
        assert_eq!((d.mac, d.mtu), (None, 1500));
        for (bad, why) in [
            ("mac=02:00:00:00:00:01", "tap=NAME is required"),
            ("tap=", "1 to 15 bytes"),
            ("tap=0123456789abcdef", "1 to 15 bytes"),
            ("tap=a/b", "not a valid interface name"),
            ("tap=t,mac=02:00:00:00:00", "six hex bytes"),
            ("tap=t,mac=02:00:00:00:00:zz", "six hex bytes"),
            ("tap=t,mac=01:00:00:00:00:01", "multicast"),
            ("tap=t,mac=00:00:00:00:00:00", "all-zero"),
            ("tap=t,mtu=67", "mtu=67: expected 68 to 65517"),
            ("tap=t,mtu=70000", "expected 68 to"),
            ("tap=t,mtu=big", "expected 68 to"),
            ("tap=t,colour=red", "unknown option \"colour\""),
            ("tap=t,rx_colour=red", "unknown option \"rx_colour\""),
            ("tap=t,tx_bw_size=10", "go together"),
        ] {
            let e = bad.parse::<NetArg>().unwrap_err().to_string();
            assert!(e.starts_with("--net"), "{bad}: {e}");
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn vsock_options() {
        let dir = std::env::temp_dir();
        let uds = dir.join(format!("kiln-cfg-vsock-{}", std::process::id()));
        let v: VsockArg = format!("cid=3,uds={},id=v0", uds.display())
            .parse()
            .unwrap();
        assert_eq!(
            (v.cid, v.uds.as_path(), v.id.as_deref()),
            (3, uds.as_path(), Some("v0"))
        );
        std::fs::write(&uds, b"").unwrap();
        let in_use = format!("cid=3,uds={}", uds.display());
        for (bad, why) in [
            ("uds=/tmp/x".to_string(), "cid= is required"),
            ("cid=3".to_string(), "uds= is required"),
            ("cid=2,uds=/tmp/x".to_string(), "reserved"),
            ("cid=0,uds=/tmp/x".to_string(), "reserved"),
            ("cid=4294967295,uds=/tmp/x".to_string(), "below"),
            ("cid=x,uds=/tmp/x".to_string(), "non-negative integer"),
            (
                "cid=3,uds=/nonexistent/dir/v.sock".to_string(),
                "does not exist",
            ),
            ("cid=3,uds=/tmp/x,port=1".to_string(), "unknown option"),
            (format!("cid=3,uds=/tmp/{}", "a".repeat(100)), "too long"),
            (in_use, "already exists"),
        ] {
            let e = bad.parse::<VsockArg>().unwrap_err().to_string();
            assert!(e.starts_with("--vsock") && e.contains(why), "{bad}: {e}");
        }
        let _ = std::fs::remove_file(&uds);
    }

    #[test]
    fn balloon_options() {
        let b: BalloonArg = "size=64,deflate-on-oom=on,free-page-reporting=on,stats-interval=0"
            .parse()
            .unwrap();
        assert_eq!(b.size, 64 << 20);
        assert!(b.deflate_on_oom && b.free_page_reporting);
        assert_eq!(b.stats_interval_s, 0);
        let b: BalloonArg = "on".parse().unwrap();
        assert_eq!((b.size, b.stats_interval_s), (0, 1));
        assert_eq!("size=0".parse::<BalloonArg>().unwrap().size, 0);
        for (bad, why) in [
            ("size=lots", "size=lots"),
            ("size=1M,colour=red", "unknown option"),
            ("deflate-on-oom=perhaps", "expected on or off"),
            ("stats-interval=-1", "non-negative integer"),
        ] {
            let e = bad.parse::<BalloonArg>().unwrap_err().to_string();
            assert!(e.starts_with("--balloon") && e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn rng_options() {
        assert!("on".parse::<RngArg>().unwrap().enabled);
        assert!(!"off".parse::<RngArg>().unwrap().enabled);
        let r: RngArg = "bw_size=1024,bw_refill_time=1000".parse().unwrap();
        assert!(r.enabled && r.rate_limit.bandwidth.is_some());
        let e = "maybe".parse::<RngArg>().unwrap_err().to_string();
        assert!(
            e.starts_with("--rng") && e.contains("unknown option"),
            "{e}"
        );
    }

    #[test]
    fn serial_values() {
        assert_eq!("stdio".parse::<SerialArg>().unwrap(), SerialArg::Stdio);
        assert_eq!("null".parse::<SerialArg>().unwrap(), SerialArg::Null);
        assert_eq!(
            "file:/tmp/x".parse::<SerialArg>().unwrap(),
            SerialArg::File("/tmp/x".into())
        );
        for bad in ["file:", "tty", ""] {
            assert!(bad
                .parse::<SerialArg>()
                .unwrap_err()
                .to_string()
                .starts_with("--serial"));
        }
    }
}
