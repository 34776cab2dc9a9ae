//! Turns the API's configuration ([`VmConfig`], from requests or `--config-file`) into a
//! [`VmSpec`]: the native command line kiln was started with, with the API's settings
//! applied over it, validated by [`VmSpec::from_cli`] like any command line.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::Parser;

use super::http::Response;
use super::models::*;
use crate::config::{BalloonArg, Cli, DiskArg, NetArg, RateLimitArg, RngArg, SerialArg, VsockArg};
use crate::vm::VmSpec;

/// Firecracker's kernel command line when `boot_args` is absent.
pub const DEFAULT_BOOT_ARGS: &str = "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux \
                                     i8042.nomux i8042.dumbkbd swiotlb=noforce";

/// Most vCPUs Firecracker accepts.
const MAX_VCPUS: u8 = 32;

fn fault(msg: impl AsRef<str>) -> Response {
    Response::fault(msg)
}

/// Checks a machine configuration as Firecracker does, and refuses what kiln can't honour.
pub fn check_machine(m: &MachineConfig) -> Result<(), Response> {
    if m.vcpu_count == 0 || m.vcpu_count > MAX_VCPUS {
        return Err(fault(format!(
            "The vCPU number is invalid! The vCPU number can only be 1 or an even number when \
             SMT is enabled (1 to {MAX_VCPUS})."
        )));
    }
    if m.mem_size_mib == 0 || m.mem_size_mib > (1 << 24) {
        return Err(fault("The memory size (MiB) is invalid."));
    }
    if m.smt {
        return Err(fault(
            "smt: simultaneous multithreading is not supported by kiln.",
        ));
    }
    if m.cpu_template.as_deref().is_some_and(|t| t != "None") {
        return Err(fault(
            "cpu_template: CPU templates are not supported by kiln (use \"None\").",
        ));
    }
    if m.huge_pages == HugePages::Hugetlbfs2M && m.mem_size_mib % 2 != 0 {
        return Err(fault(
            "mem_size_mib must be a multiple of 2 MiB when huge_pages is 2M.",
        ));
    }
    Ok(())
}

/// Checks one drive.
pub fn check_drive(d: &Drive) -> Result<(), Response> {
    if d.socket.is_some() {
        return Err(fault(
            "socket: vhost-user-blk drives are not supported by kiln.",
        ));
    }
    if d.path_on_host.is_none() {
        return Err(fault(format!(
            "Unable to create the block device {}: path_on_host is required.",
            d.drive_id
        )));
    }
    if d.io_engine == IoEngine::Async {
        return Err(fault(
            "io_engine: Async (io_uring) is not supported by kiln; use Sync.",
        ));
    }
    rate_limit("rate_limiter", d.rate_limiter.as_ref())?;
    Ok(())
}

fn bucket(
    what: &str,
    b: Option<&TokenBucket>,
) -> Result<Option<kiln_ratelimit::BucketConfig>, Response> {
    let Some(b) = b else { return Ok(None) };
    // Firecracker: a bucket with a zero size or refill time does not limit.
    if b.size == 0 || b.refill_time == 0 {
        return Ok(None);
    }
    let cfg = kiln_ratelimit::BucketConfig {
        size: b.size,
        one_time_burst: b.one_time_burst.unwrap_or(0),
        refill_time: std::time::Duration::from_millis(b.refill_time),
    };
    kiln_ratelimit::TokenBucket::new(cfg).map_err(|e| fault(format!("{what}: {e}")))?;
    Ok(Some(cfg))
}

/// A `RateLimiter` as kiln's [`RateLimitArg`]; errors name `what`.
pub fn rate_limit(what: &str, r: Option<&RateLimiter>) -> Result<RateLimitArg, Response> {
    let Some(r) = r else {
        return Ok(RateLimitArg::default());
    };
    Ok(RateLimitArg {
        bandwidth: bucket(&format!("{what}.bandwidth"), r.bandwidth.as_ref())?,
        ops: bucket(&format!("{what}.ops"), r.ops.as_ref())?,
    })
}

/// A `NetworkInterface` as kiln's `--net` ([`NetArg`]); errors name the API field.
pub fn net_arg(n: &NetworkInterface) -> Result<NetArg, Response> {
    let field = |f: &str| format!("network-interfaces[{}].{f}", n.iface_id);
    crate::config::check_tap_name(&n.host_dev_name)
        .map_err(|e| fault(format!("{}: {e}", field("host_dev_name"))))?;
    let mac = n
        .guest_mac
        .as_deref()
        .map(crate::config::parse_mac)
        .transpose()
        .map_err(|e| fault(format!("{}: {e}", field("guest_mac"))))?;
    let mtu = match n.mtu {
        None => kiln_virtio::net::DEFAULT_MTU,
        Some(m) => {
            let (lo, hi) = (kiln_virtio::net::MIN_MTU, kiln_virtio::net::MAX_MTU);
            if !(lo..=hi).contains(&m) {
                return Err(fault(format!(
                    "{}: {m} is not between {lo} and {hi}",
                    field("mtu")
                )));
            }
            m
        }
    };
    Ok(NetArg {
        tap: n.host_dev_name.clone(),
        mac,
        mtu,
        id: Some(n.iface_id.clone()),
        rx_rate_limit: rate_limit(&field("rx_rate_limiter"), n.rx_rate_limiter.as_ref())?,
        tx_rate_limit: rate_limit(&field("tx_rate_limiter"), n.tx_rate_limiter.as_ref())?,
    })
}

/// A `Vsock` as kiln's `--vsock` ([`VsockArg`]); the deprecated `vsock_id` names the device.
pub fn vsock_arg(v: &Vsock) -> Result<VsockArg, Response> {
    VsockArg::new(
        u64::from(v.guest_cid),
        PathBuf::from(&v.uds_path),
        v.vsock_id.clone(),
    )
    .map_err(|e| {
        fault(format!(
            "vsock (guest_cid {}, uds_path {:?}): {e}",
            v.guest_cid, v.uds_path
        ))
    })
}

/// The [`VmSpec`] for `config` over the native command line `base_args`.
pub fn spec(base_args: &[OsString], config: &VmConfig) -> Result<VmSpec, Response> {
    let mut cli = Cli::try_parse_from(base_args)
        .map_err(|e| fault(format!("the command line: {}", e.kind())))?;
    let Some(boot) = &config.boot_source else {
        return Err(fault(
            "Cannot start microvm without kernel configuration: PUT /boot-source first.",
        ));
    };
    if config.cpu_config.is_some() {
        return Err(fault("cpu-config is not supported by kiln."));
    }
    if config.memory_hotplug.is_some() {
        return Err(fault("memory-hotplug is not supported by kiln."));
    }
    if !config.pmem.is_empty() {
        return Err(fault("pmem is not supported by kiln."));
    }
    cli.net = config
        .network_interfaces
        .iter()
        .map(net_arg)
        .collect::<Result<_, _>>()?;
    cli.vsock = config.vsock.as_ref().map(vsock_arg).transpose()?;
    let m = config.machine_config.clone().unwrap_or_default();
    check_machine(&m)?;
    cli.kernel = Some(PathBuf::from(&boot.kernel_image_path));
    cli.initrd = boot.initrd_path.as_ref().map(PathBuf::from);
    let mut cmdline = boot
        .boot_args
        .clone()
        .unwrap_or_else(|| DEFAULT_BOOT_ARGS.to_string());
    cli.cpus = u32::from(m.vcpu_count);
    cli.memory = match m.huge_pages {
        HugePages::None => format!("{}M", m.mem_size_mib),
        HugePages::Hugetlbfs2M => {
            format!("size={}M,hugepages=on,hugepage-size=2M", m.mem_size_mib)
        }
    };
    // Firecracker puts the root device first and names it on the command line.
    let mut drives: Vec<&Drive> = config.drives.iter().collect();
    drives.sort_by_key(|d| !d.is_root_device);
    cli.disk = Vec::with_capacity(drives.len());
    for d in drives {
        check_drive(d)?;
        let read_only = d.is_read_only.unwrap_or(false);
        if d.is_root_device {
            match &d.partuuid {
                Some(u) => cmdline.push_str(&format!(" root=PARTUUID={u}")),
                None => cmdline.push_str(" root=/dev/vda"),
            }
            cmdline.push_str(if read_only { " ro" } else { " rw" });
        }
        cli.disk.push(DiskArg {
            path: PathBuf::from(d.path_on_host.clone().unwrap_or_default()),
            read_only,
            id: Some(d.drive_id.clone()),
            rate_limit: rate_limit(
                &format!("drives[{}].rate_limiter", d.drive_id),
                d.rate_limiter.as_ref(),
            )?,
        });
    }
    // Firecracker has an entropy device only when asked.
    cli.rng = match &config.entropy {
        None => RngArg {
            enabled: false,
            rate_limit: RateLimitArg::default(),
        },
        Some(e) => RngArg {
            enabled: true,
            rate_limit: rate_limit("entropy.rate_limiter", e.rate_limiter.as_ref())?,
        },
    };
    cli.balloon = match &config.balloon {
        None => None,
        Some(b) => {
            if b.free_page_hinting {
                return Err(fault("balloon.free_page_hinting is not supported by kiln."));
            }
            Some(BalloonArg {
                size: u64::from(b.amount_mib) << 20,
                deflate_on_oom: b.deflate_on_oom,
                free_page_reporting: b.free_page_reporting,
                stats_interval_s: u64::from(b.stats_polling_interval_s),
            })
        }
    };
    if let Some(p) = config
        .serial
        .as_ref()
        .and_then(|s| s.serial_out_path.as_ref())
    {
        cli.serial = SerialArg::File(PathBuf::from(p));
    }
    cli.cmdline = Some(cmdline);
    VmSpec::from_cli(cli).map_err(|e| fault(e.to_string()))
}

/// Reads a `--config-file`: Firecracker's `FullVmConfiguration` with `boot-source` and
/// `drives` required.
pub fn read_config_file(path: &Path) -> Result<VmConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--config-file {}: {e}", path.display()))?;
    parse_config(&text).map_err(|e| format!("--config-file {}: {e}", path.display()))
}

/// Parses a configuration file's text.
pub fn parse_config(text: &str) -> Result<VmConfig, String> {
    let raw: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    for key in ["boot-source", "drives"] {
        if raw.get(key).is_none() {
            return Err(format!("missing field `{key}`"));
        }
    }
    let c: VmConfig = serde_json::from_value(raw).map_err(|e| e.to_string())?;
    if let Some(m) = &c.machine_config {
        check_machine(m).map_err(|r| super::fault_text(&r))?;
    }
    for d in &c.drives {
        super::check_id(&d.drive_id).map_err(|r| super::fault_text(&r))?;
        check_drive(d).map_err(|r| super::fault_text(&r))?;
    }
    if c.drives.iter().filter(|d| d.is_root_device).count() > 1 {
        return Err("drives: more than one root device".into());
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_needs_boot_source_and_drives() {
        let e = parse_config(r#"{"drives": []}"#).unwrap_err();
        assert!(e.contains("boot-source"), "{e}");
        let e = parse_config(r#"{"boot-source": {"kernel_image_path": "/k"}}"#).unwrap_err();
        assert!(e.contains("drives"), "{e}");
        let e = parse_config(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "drives": [], "extra": 1}"#,
        )
        .unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
        let c = parse_config(
            r#"{"boot-source": {"kernel_image_path": "/k"}, "drives": [],
                "machine-config": {"vcpu_count": 2, "mem_size_mib": 64}}"#,
        )
        .unwrap();
        assert_eq!(c.machine_config.unwrap().vcpu_count, 2);
    }

    #[test]
    fn spec_applies_the_configuration() {
        let c = parse_config(
            r#"{"boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0"},
                "drives": [
                  {"drive_id": "data", "is_root_device": false, "path_on_host": "/d",
                   "rate_limiter": {"ops": {"size": 10, "refill_time": 100}}},
                  {"drive_id": "root", "is_root_device": true, "path_on_host": "/r",
                   "is_read_only": true}],
                "machine-config": {"vcpu_count": 2, "mem_size_mib": 64},
                "entropy": {}}"#,
        )
        .unwrap();
        let s = spec(&["kiln".into(), "--no-seccomp".into()], &c).unwrap();
        assert_eq!(s.cpus, 2);
        assert_eq!(s.memory, 64 << 20);
        assert_eq!(s.cmdline, "console=ttyS0 root=/dev/vda ro");
        assert_eq!(s.disks[0].id.as_deref(), Some("root"));
        assert!(s.disks[0].read_only);
        assert_eq!(s.disks[1].rate_limit.ops.unwrap().size, 10);
        assert!(s.rng.enabled);
        assert!(s.seccomp.is_none(), "the native flags stay");
    }

    #[test]
    fn spec_maps_network_interfaces_and_vsock() {
        let uds = std::env::temp_dir().join(format!("kiln-build-vsock-{}", std::process::id()));
        let c = parse_config(&format!(
            r#"{{"boot-source": {{"kernel_image_path": "/k"}}, "drives": [],
                "network-interfaces": [
                  {{"iface_id": "eth0", "host_dev_name": "tap7", "guest_mac": "52:54:00:00:00:07",
                    "rx_rate_limiter": {{"bandwidth": {{"size": 1000, "refill_time": 10}}}}}},
                  {{"iface_id": "eth1", "host_dev_name": "tap8", "mtu": 9000}}],
                "vsock": {{"guest_cid": 9, "uds_path": "{}", "vsock_id": "v"}}}}"#,
            uds.display()
        ))
        .unwrap();
        let s = spec(&["kiln".into()], &c).unwrap();
        assert_eq!(s.nets.len(), 2);
        assert_eq!(s.nets[0].tap, "tap7");
        assert_eq!(s.nets[0].mac, Some([0x52, 0x54, 0, 0, 0, 7]));
        assert_eq!(s.nets[0].id.as_deref(), Some("eth0"));
        assert_eq!(s.nets[0].rx_rate_limit.bandwidth.unwrap().size, 1000);
        assert!(s.nets[0].tx_rate_limit.bandwidth.is_none());
        assert_eq!((s.nets[1].mac, s.nets[1].mtu), (None, 9000));
        let v = s.vsock.unwrap();
        assert_eq!((v.cid, v.uds, v.id.as_deref()), (9, uds, Some("v")));
        let mut bad = c.clone();
        bad.network_interfaces[1].guest_mac = Some("zz:54:00:00:00:07".into());
        let e = super::super::fault_text(&spec(&["kiln".into()], &bad).unwrap_err());
        assert!(e.starts_with("network-interfaces[eth1].guest_mac: "), "{e}");
    }
}
