//! Scenario names and the `kiln.test=` selection.

use crate::cmdline::Cmdline;

/// One conformance scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Boot information, memory map, command line, initrd.
    Boot,
    /// CPUID identity and topology.
    Cpuid,
    /// Serial echo (needs input on COM1).
    Serial,
    /// PIO and MMIO exits through the kiln exit-test device.
    Exits,
    /// ACPI tables: RSDP both ways, checksums, FADT, MADT, DSDT.
    Acpi,
    /// Start every AP with INIT/SIPI/SIPI; each reports its APIC ID.
    Smp,
    /// COM1 RX/THRE and LAPIC timer interrupts through IOAPIC/LAPIC (needs input).
    Irq,
    /// kvmclock: present, monotonic, and at the PIT's rate within 1%.
    Clock,
    /// Power off through the FADT sleep control register (ends the VM).
    Poweroff,
    /// Reset through the FADT reset register (ends the VM).
    Reset,
    /// virtio-blk: reads, writes, flush, discard, write zeroes, errors, ID (needs a disk).
    VirtioBlk,
    /// virtio-rng: three requests answered with varied, distinct bytes.
    VirtioRng,
    /// Resetting virtio devices with requests in flight, then using them again (needs a
    /// disk).
    VirtioReset,
    /// Malformed chains, rings and register sequences; the devices must stay safe and
    /// recover (needs a disk).
    VirtioEvil,
    /// virtio-blk IOPS and throughput (needs a disk).
    BlkBench,
    /// virtio-balloon: inflate by the device's target, touch the rest, deflate, report
    /// statistics (needs `--balloon`).
    Balloon,
    /// virtio-vsock: 1 MiB each way with a host listener, a refused port, host-initiated
    /// connections echoed (needs `--vsock` and the host side in docs/guest-contract.md).
    Vsock,
    /// virtio-vsock hostile packets and credit abuse, then a normal connection.
    VsockEvil,
    /// virtio-vsock throughput each way.
    VsockBench,
    /// Touch all RAM with a pattern and verify it.
    MemoryStress,
    /// VM-exit latency histograms for each exit kind (`kiln-bench exits`).
    BenchExits,
    /// Keeps dirtying and checking memory (and disk blocks) while printing a kvmclock-stamped
    /// sequence, for pause, snapshot and migration tests.
    Counter,
    /// virtio-net: ARP and pings to the host (needs `--net` and `kiln.net=`).
    VirtioNet,
    /// virtio-net: malformed transmit and receive chains, then pings (needs `--net`).
    NetEvil,
    /// virtio-net transmit throughput to a host UDP sink (needs `--net`).
    NetBench,
    /// Waits for the host to press Ctrl+Alt+Del (Firecracker's `SendCtrlAltDel`): keyboard
    /// IRQ 1 through the IOAPIC and the scan codes from the i8042, then resets through the
    /// i8042 as Linux does (needs input; ends the VM).
    CtrlAltDel,
}

/// Every scenario, in the order `all` would run them if they needed no input.
pub const SCENARIOS: [Scenario; 26] = [
    Scenario::Boot,
    Scenario::Cpuid,
    Scenario::Serial,
    Scenario::Exits,
    Scenario::Acpi,
    Scenario::Smp,
    Scenario::Irq,
    Scenario::Clock,
    Scenario::Poweroff,
    Scenario::Reset,
    Scenario::VirtioBlk,
    Scenario::VirtioRng,
    Scenario::VirtioReset,
    Scenario::VirtioEvil,
    Scenario::BlkBench,
    Scenario::Balloon,
    Scenario::Vsock,
    Scenario::VsockEvil,
    Scenario::VsockBench,
    Scenario::MemoryStress,
    Scenario::BenchExits,
    Scenario::Counter,
    Scenario::VirtioNet,
    Scenario::NetEvil,
    Scenario::NetBench,
    Scenario::CtrlAltDel,
];

impl Scenario {
    /// The name used in `kiln.test=` and in `KTEST <name>` lines.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Boot => "boot",
            Scenario::Cpuid => "cpuid",
            Scenario::Serial => "serial",
            Scenario::Exits => "exits",
            Scenario::Acpi => "acpi",
            Scenario::Smp => "smp",
            Scenario::Irq => "irq",
            Scenario::Clock => "clock",
            Scenario::Poweroff => "poweroff",
            Scenario::Reset => "reset",
            Scenario::VirtioBlk => "virtio-blk",
            Scenario::VirtioRng => "virtio-rng",
            Scenario::VirtioReset => "virtio-reset",
            Scenario::VirtioEvil => "virtio-evil",
            Scenario::BlkBench => "blk-bench",
            Scenario::Balloon => "balloon",
            Scenario::Vsock => "vsock",
            Scenario::VsockEvil => "vsock-evil",
            Scenario::VsockBench => "vsock-bench",
            Scenario::MemoryStress => "memory-stress",
            Scenario::BenchExits => "bench-exits",
            Scenario::Counter => "counter",
            Scenario::VirtioNet => "virtio-net",
            Scenario::NetEvil => "net-evil",
            Scenario::NetBench => "net-bench",
            Scenario::CtrlAltDel => "ctrl-alt-del",
        }
    }

    /// Looks a scenario up by name.
    pub fn from_name(name: &[u8]) -> Option<Scenario> {
        SCENARIOS
            .iter()
            .copied()
            .find(|s| s.name().as_bytes() == name)
    }

    /// Scenarios that wait for input are left out of `all`.
    pub fn needs_input(self) -> bool {
        matches!(
            self,
            Scenario::Serial | Scenario::Irq | Scenario::CtrlAltDel
        )
    }

    /// Scenarios that end the VM themselves are left out of `all` too.
    pub fn ends_vm(self) -> bool {
        matches!(
            self,
            Scenario::Poweroff | Scenario::Reset | Scenario::CtrlAltDel
        )
    }

    /// Scenarios that need a device kiln adds only on request (`--balloon`), take long
    /// (`memory-stress`) or are benchmarks are left out of `all`.
    pub fn on_request(self) -> bool {
        matches!(
            self,
            Scenario::Balloon
                | Scenario::Counter
                | Scenario::MemoryStress
                | Scenario::BenchExits
                | Scenario::VirtioNet
                | Scenario::NetEvil
                | Scenario::NetBench
                | Scenario::Vsock
                | Scenario::VsockEvil
                | Scenario::VsockBench
        )
    }

    /// Scenarios that need a disk image in the contract's pattern are left out of `all`
    /// (kiln always has an entropy device, so `virtio-rng` is in).
    pub fn needs_disk(self) -> bool {
        matches!(
            self,
            Scenario::VirtioBlk | Scenario::VirtioReset | Scenario::VirtioEvil | Scenario::BlkBench
        )
    }
}

/// Most scenarios one `kiln.test=` list may name.
pub const MAX_SELECTED: usize = 16;

/// The scenarios to run, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selection {
    list: [Scenario; MAX_SELECTED],
    len: usize,
}

impl Selection {
    fn new() -> Self {
        Selection {
            list: [Scenario::Boot; MAX_SELECTED],
            len: 0,
        }
    }

    fn push(&mut self, s: Scenario) -> bool {
        if self.len == MAX_SELECTED {
            return false;
        }
        self.list[self.len] = s;
        self.len += 1;
        true
    }

    /// The selected scenarios.
    pub fn as_slice(&self) -> &[Scenario] {
        &self.list[..self.len]
    }

    /// `all`: every scenario that needs no input or disk and doesn't end the VM.
    pub fn all() -> Self {
        let mut s = Selection::new();
        for sc in SCENARIOS
            .iter()
            .filter(|s| !s.needs_input() && !s.ends_vm() && !s.needs_disk() && !s.on_request())
        {
            s.push(*sc);
        }
        s
    }
}

/// Why `kiln.test=` could not be understood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectError<'a> {
    /// A name that is not a scenario.
    Unknown(&'a [u8]),
    /// More than [`MAX_SELECTED`] names.
    TooMany,
}

/// Reads `kiln.test=`: absent or `all` means [`Selection::all`]; otherwise one name or a
/// comma-separated list of names (an extension for test drivers that want fewer boots).
pub fn select<'a>(c: &Cmdline<'a>) -> Result<Selection, SelectError<'a>> {
    let v = match c.get("kiln.test") {
        None => return Ok(Selection::all()),
        Some(v) => v,
    };
    let mut sel = Selection::new();
    for name in v.split(|&b| b == b',') {
        if name == b"all" {
            for sc in Selection::all().as_slice() {
                if !sel.push(*sc) {
                    return Err(SelectError::TooMany);
                }
            }
            continue;
        }
        let sc = Scenario::from_name(name).ok_or(SelectError::Unknown(name))?;
        if !sel.push(sc) {
            return Err(SelectError::TooMany);
        }
    }
    Ok(sel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(line: &[u8]) -> Result<Vec<&'static str>, String> {
        let c = Cmdline::new(line);
        select(&c)
            .map(|s| s.as_slice().iter().map(|x| x.name()).collect())
            .map_err(|e| format!("{e:?}"))
    }

    #[test]
    fn default_and_all_skip_input_scenarios() {
        let all = [
            "boot",
            "cpuid",
            "exits",
            "acpi",
            "smp",
            "clock",
            "virtio-rng",
        ];
        assert_eq!(sel(b"").unwrap(), all);
        assert_eq!(sel(b"kiln.test=all").unwrap(), all);
    }

    #[test]
    fn single_and_lists() {
        assert_eq!(sel(b"kiln.test=serial").unwrap(), ["serial"]);
        assert_eq!(sel(b"kiln.test=exits,boot").unwrap(), ["exits", "boot"]);
        assert_eq!(
            sel(b"kiln.test=virtio-blk,virtio-rng,virtio-reset,virtio-evil,blk-bench").unwrap(),
            [
                "virtio-blk",
                "virtio-rng",
                "virtio-reset",
                "virtio-evil",
                "blk-bench"
            ]
        );
    }

    #[test]
    fn unknown_names_are_errors() {
        assert!(sel(b"kiln.test=bogus").unwrap_err().contains("Unknown"));
        assert!(sel(b"kiln.test=").is_err());
        assert!(sel(b"kiln.test=boot,").is_err());
        let many = b"kiln.test=all,all,all,all,all,all".to_vec();
        assert_eq!(sel(&many).unwrap_err(), "TooMany");
    }
}
