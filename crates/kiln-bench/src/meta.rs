//! Host metadata recorded with every result: what the numbers were measured on.

use std::fs;
use std::path::Path;

use serde_json::{json, Map, Value};

fn read_trim(p: impl AsRef<Path>) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

/// The loaded KVM modules (`kvm`, `kvm_intel`, `kvm_amd`, `kvm_pvm`, ...) and their
/// parameters, from /sys/module.
pub fn kvm_modules() -> Map<String, Value> {
    let mut out = Map::new();
    let Ok(dir) = fs::read_dir("/sys/module") else {
        return out;
    };
    let mut names: Vec<String> = dir
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n == "kvm" || n.starts_with("kvm_"))
        .collect();
    names.sort();
    for name in names {
        let mut params = Map::new();
        if let Ok(ps) = fs::read_dir(format!("/sys/module/{name}/parameters")) {
            let mut ps: Vec<_> = ps.flatten().collect();
            ps.sort_by_key(|e| e.file_name());
            for p in ps {
                if let (Ok(k), Some(v)) = (p.file_name().into_string(), read_trim(p.path())) {
                    params.insert(k, Value::String(v));
                }
            }
        }
        out.insert(name, Value::Object(params));
    }
    out
}

/// Kernel release, CPU model, CPU count, KVM modules.
pub fn host() -> Value {
    let cpu_model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    json!({
        "kernel": read_trim("/proc/sys/kernel/osrelease").unwrap_or_default(),
        "kernel_version": read_trim("/proc/sys/kernel/version").unwrap_or_default(),
        "cpu_model": cpu_model,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kvm_modules": Value::Object(kvm_modules()),
        "exit_clock": exit_clock(),
    })
}

/// The clock the VMM-side per-exit times use (kiln's vCPU threads and the floor alike).
fn exit_clock() -> Value {
    let c = kiln_vcpu::ExitClock::get();
    json!({ "clock": c.name(), "tsc_ghz": c.tsc_ghz() })
}

/// A one-line description for the table header.
pub fn summary(host: &Value) -> String {
    let mods: Vec<&str> = host["kvm_modules"]
        .as_object()
        .map(|m| m.keys().map(String::as_str).collect())
        .unwrap_or_default();
    format!(
        "{} | {} CPUs | Linux {} | KVM modules: {}",
        host["cpu_model"].as_str().unwrap_or("?"),
        host["cpus"],
        host["kernel"].as_str().unwrap_or("?"),
        if mods.is_empty() {
            "none".to_string()
        } else {
            mods.join(", ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_metadata_has_the_kernel_and_cpu() {
        let h = host();
        assert!(!h["kernel"].as_str().unwrap().is_empty());
        assert!(h["cpus"].as_u64().unwrap() >= 1);
        let s = summary(&h);
        assert!(s.contains("Linux "), "{s}");
        // On a KVM host the kvm module is listed with its parameters.
        if Path::new("/sys/module/kvm").exists() {
            assert!(h["kvm_modules"]["kvm"].is_object());
        }
    }
}
