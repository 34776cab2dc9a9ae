//! virtio-mmio (version 2, "modern" only) driver logic and the `virtio-*` / `blk-bench`
//! scenarios.
//!
//! Everything here is generic over [`Platform`]: the guest binary implements it with its
//! identity map, MMIO, kvmclock and the IOAPIC (`src/virtio.rs` of the binary); the host
//! tests implement it over kiln-virtio's device models, so the scenarios run end to end in
//! `cargo test`.
//!
//! - [`discover`]: `LNRO0005` devices from the DSDT, `virtio_mmio.device=` tokens.
//! - [`transport`]: registers, the status handshake, feature negotiation, queue setup.
//! - [`ring`]: split virtqueues in guest memory.
//! - [`layout`]: the fixed guest-physical region the driver uses (docs/guest-contract.md).
//! - [`blk`], [`rng`], [`reset`], [`evil`], [`bench`](mod@bench), [`counter`]: the scenarios.
//! - [`net`]: virtio-net and the `virtio-net`, `net-evil`, `net-bench` scenarios.

pub mod balloon;
pub mod bench;
pub mod blk;
pub mod counter;
pub mod discover;
pub mod evil;
pub mod layout;
pub mod net;
pub mod reset;
pub mod ring;
pub mod rng;
pub mod transport;
pub mod vsock;

#[cfg(test)]
mod host;

use crate::cmdline::Cmdline;
use crate::line::LineBuf;
use crate::memmap::MemMap;

pub use discover::{DevList, MmioDev};

/// What the driver needs from the machine.
///
/// Memory accessors take guest-physical addresses inside [`layout`]'s region; register
/// accessors take addresses inside a device's window. Implementations may stop the run on
/// anything else (the guest does: it never dereferences an address it did not check).
pub trait Platform {
    /// Reads a byte of guest memory.
    fn read8(&self, addr: u64) -> u8;
    /// Reads a little-endian u16 of guest memory.
    fn read16(&self, addr: u64) -> u16;
    /// Reads a little-endian u32 of guest memory.
    fn read32(&self, addr: u64) -> u32;
    /// Reads a little-endian u64 of guest memory.
    fn read64(&self, addr: u64) -> u64;
    /// Writes a byte of guest memory.
    fn write8(&self, addr: u64, v: u8);
    /// Writes a u16 of guest memory.
    fn write16(&self, addr: u64, v: u16);
    /// Writes a u32 of guest memory.
    fn write32(&self, addr: u64, v: u32);
    /// Writes a u64 of guest memory.
    fn write64(&self, addr: u64, v: u64);
    /// 32-bit read of a device register.
    fn reg_read(&self, addr: u64) -> u32;
    /// 32-bit write of a device register.
    fn reg_write(&self, addr: u64, v: u32);
    /// Monotonic nanoseconds (kvmclock in the guest).
    fn now_ns(&self) -> u64;
    /// Routes `dev`'s interrupt to a handler that reads `InterruptStatus`, writes it to
    /// `InterruptAck` and counts; enables interrupts. False if it can't be routed.
    fn irq_enable(&self, dev: &MmioDev) -> bool;
    /// Masks `dev`'s interrupt again (and disables interrupts).
    fn irq_disable(&self, dev: &MmioDev);
    /// Interrupts the handler took for `dev` since boot.
    fn irq_count(&self, dev: &MmioDev) -> u32;
    /// Prints one line (`KTEST-INFO ...`, `KBENCH ...`).
    fn info(&self, line: &[u8]);
    /// Stops here for good (`kiln.blk.hold=1`): the guest spins until the host kills the
    /// VMM. Host tests return.
    fn hold(&self);
    /// Reads the u64 at `addr` in a page of free RAM outside the driver's region (from
    /// [`crate::freeram::FreeRam`] with the floor at [`layout::END`]: the pages `balloon`
    /// gives to the device and the rest it touches). The default is [`Platform::read64`],
    /// for machines where all memory is alike.
    fn page_read64(&self, addr: u64) -> u64 {
        self.read64(addr)
    }
    /// Writes the u64 at `addr` in such a page (see [`Platform::page_read64`]).
    fn page_write64(&self, addr: u64, v: u64) {
        self.write64(addr, v)
    }
    /// Waits for one line of console input (`kiln.balloon.hold=1`: the host reads the VMM's
    /// RSS meanwhile). The default, for host tests, returns at once.
    fn wait_line(&self) {}
    /// APs that [`Platform::counter_aps_start`] could start (0: none; host tests).
    fn counter_ap_count(&self) -> u32 {
        0
    }
    /// `counter` with `kiln.counter.aps=1`: starts the APs, AP `i` (APIC ID) dirtying and
    /// checking its own `pages` pages from `base + (i - 1) * pages * 4096` at `rate_pages`
    /// pages per second (0: as fast as it goes) until [`Platform::counter_aps_stop`].
    /// Returns how many started.
    fn counter_aps_start(&self, _base: u64, _pages: u64, _rate_pages: u64) -> u32 {
        0
    }
    /// Pages the APs stepped over so far and the mismatches they found.
    fn counter_aps_status(&self) -> (u64, u64) {
        (0, 0)
    }
    /// Stops the APs' counter loops.
    fn counter_aps_stop(&self) {}
}

/// What every virtio scenario gets.
#[derive(Clone, Copy)]
pub struct Env<'a> {
    /// Devices found by [`discover`].
    pub devs: &'a [MmioDev],
    /// Where they were found: `"dsdt"`, `"cmdline"` or `"none"`.
    pub source: &'static str,
    /// The command line (`kiln.blk.*`, `kiln.evil.*`).
    pub cmdline: Cmdline<'a>,
    /// The memory map: the driver's region must be RAM.
    pub memmap: &'a MemMap,
    /// Ranges the region must not overlap (initrd, command line), `(start, end)`.
    pub reserved: [(u64, u64); 2],
}

impl Env<'_> {
    /// The first device with `id` for which `accept` says yes, with its transport.
    pub fn find<P: Platform>(
        &self,
        p: &P,
        id: u32,
        mut accept: impl FnMut(&P, &MmioDev) -> bool,
    ) -> Option<MmioDev> {
        self.devs
            .iter()
            .copied()
            .find(|d| transport::Transport::new(d.base).identify(p) == Ok(id) && accept(p, d))
    }

    /// Says whether `[start, end)` is usable by the driver: inside one RAM entry of the map
    /// and clear of the reserved ranges. Explains in `out` when it is not.
    pub fn region_ok(&self, start: u64, end: u64, out: &mut LineBuf) -> bool {
        let in_ram = self
            .memmap
            .as_slice()
            .iter()
            .any(|e| e.kind == crate::memmap::E820_RAM && e.addr <= start && end <= e.end());
        let clash = self
            .reserved
            .iter()
            .find(|&&(s, e)| s < e && s < end && start < e);
        if in_ram && clash.is_none() {
            return true;
        }
        out.push_str("the driver's memory [");
        out.push_hex(start);
        out.push_str(",");
        out.push_hex(end);
        match clash {
            Some(&(s, e)) => {
                out.push_str(") overlaps [");
                out.push_hex(s);
                out.push_str(",");
                out.push_hex(e);
                out.push_str(") (initrd or command line)");
            }
            None => out.push_str(") is not RAM in the memory map"),
        }
        false
    }

    /// `key` as a decimal number, `default` when absent; None (reason in `out`) when bad.
    pub fn num(&self, key: &'static str, default: u64, out: &mut LineBuf) -> Option<u64> {
        match self.cmdline.get_u64(key) {
            Ok(v) => Some(v.unwrap_or(default)),
            Err(e) => {
                out.push_str("bad value for ");
                out.push_str(e.key);
                None
            }
        }
    }

    /// Says in `out` that no device with `what` was found, where the guest looked and what
    /// each device it found is.
    pub fn none_found<P: Platform>(&self, p: &P, what: &str, out: &mut LineBuf) {
        out.push_str("no ");
        out.push_str(what);
        out.push_str(" (");
        out.push_dec(self.devs.len() as u64);
        out.push_str(" virtio-mmio devices from ");
        out.push_str(self.source);
        for d in self.devs {
            out.push_str("; ");
            out.push_hex(d.base);
            match transport::Transport::new(d.base).identify(p) {
                Ok(id) => {
                    out.push_str(" device id ");
                    out.push_dec(u64::from(id));
                }
                Err(e) => {
                    out.push_str(" ");
                    crate::line::Describe::describe(&e, out);
                }
            }
        }
        out.push_str(")");
    }
}

/// Polls `done` until it returns true or `timeout_ns` pass; true if it did.
pub fn wait_until<P: Platform>(p: &P, timeout_ns: u64, mut done: impl FnMut() -> bool) -> bool {
    let start = p.now_ns();
    loop {
        if done() {
            return true;
        }
        if p.now_ns().wrapping_sub(start) > timeout_ns {
            return done();
        }
        core::hint::spin_loop();
    }
}

/// Starts a `KTEST-INFO <scenario> ` line.
pub fn info_line(scenario: &str) -> LineBuf {
    let mut l = LineBuf::new();
    l.push_str("KTEST-INFO ");
    l.push_str(scenario);
    l.push_str(" ");
    l
}

/// One second in nanoseconds.
pub const SECOND: u64 = 1_000_000_000;
