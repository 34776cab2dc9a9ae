//! kvmclock: enable it (per vCPU), read it, measure its rate against an independent clock,
//! the i8254 PIT, and compare readings across vCPUs.
//!
//! The PIT is read the way Linux calibrates with it: channel 2 gated through port 0x61,
//! waiting for its output (port 0x61 bit 5). VMMs without the port 0x61 speaker/gate logic
//! (QEMU microvm) get channel 0 polled through counter latches instead.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use kiln_testguest::apic::MAX_APS;
use kiln_testguest::pvclock::{
    ns_at, PitCounter, TimeInfo, KVM_FEATURE_CLOCKSOURCE, KVM_FEATURE_CLOCKSOURCE2,
    MSR_KVM_SYSTEM_TIME, MSR_KVM_SYSTEM_TIME_NEW,
};

use crate::io;
use crate::smp::rdtsc;

/// `pvclock_vcpu_time_info`, written by the hypervisor.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct PvClock {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

const ZERO: PvClock = PvClock {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
};

/// One area per vCPU, indexed by APIC ID (the BSP is 0).
static mut CLOCKS: [PvClock; MAX_APS + 1] = [ZERO; MAX_APS + 1];

/// The enable MSR chosen from CPUID 0x40000001 EAX (0: no kvmclock); APs use the BSP's
/// choice.
static MSR: AtomicU32 = AtomicU32::new(0);

fn wrmsr(msr: u32, value: u64) {
    // SAFETY: writing a kvmclock MSR only tells the hypervisor where to publish time.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") value as u32,
            in("edx") (value >> 32) as u32, options(nostack, preserves_flags));
    }
}

fn area(idx: usize) -> *const PvClock {
    // SAFETY: only the address is taken; `idx` is bounds-checked by the caller (`min`).
    unsafe { core::ptr::addr_of!(CLOCKS[idx.min(MAX_APS)]) }
}

/// Enables kvmclock on this vCPU into area `idx` (its APIC ID) if CPUID leaf 0x40000001
/// (`kvm_features`, or 0 to reuse the BSP's choice) offers it; waits (bounded) for the
/// hypervisor's first update. Returns false if there is no kvmclock or it never updates.
pub fn enable(idx: usize, kvm_features: u32) -> bool {
    if kvm_features != 0 {
        let msr = if kvm_features & KVM_FEATURE_CLOCKSOURCE2 != 0 {
            MSR_KVM_SYSTEM_TIME_NEW
        } else if kvm_features & KVM_FEATURE_CLOCKSOURCE != 0 {
            MSR_KVM_SYSTEM_TIME
        } else {
            0
        };
        MSR.store(msr, Ordering::SeqCst);
    }
    let msr = MSR.load(Ordering::SeqCst);
    if msr == 0 || idx > MAX_APS {
        return false;
    }
    let p = area(idx);
    wrmsr(msr, p as u64 | 1);
    let t = rdtsc();
    // SAFETY: `p` is a static the hypervisor writes; a volatile read of its version.
    while unsafe { core::ptr::addr_of!((*p).version).read_volatile() } == 0 {
        if rdtsc().wrapping_sub(t) > 1_000_000_000 {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// `flags` of area `idx` (bit 0: PVCLOCK_TSC_STABLE_BIT).
pub fn flags(idx: usize) -> u8 {
    // SAFETY: volatile read of a byte of a static.
    unsafe { core::ptr::addr_of!((*area(idx)).flags).read_volatile() }
}

/// A consistent copy of area `idx` and a TSC reading taken inside the same version window.
fn snapshot(idx: usize) -> (TimeInfo, u64) {
    let p = area(idx);
    loop {
        // SAFETY: `p` points at the static the hypervisor updates; volatile reads of its
        // fields, bracketed by the version protocol (odd = update in progress).
        unsafe {
            let v1 = core::ptr::addr_of!((*p).version).read_volatile();
            if v1 & 1 != 0 {
                continue;
            }
            let t = TimeInfo {
                tsc_timestamp: core::ptr::addr_of!((*p).tsc_timestamp).read_volatile(),
                system_time: core::ptr::addr_of!((*p).system_time).read_volatile(),
                tsc_to_system_mul: core::ptr::addr_of!((*p).tsc_to_system_mul).read_volatile(),
                tsc_shift: core::ptr::addr_of!((*p).tsc_shift).read_volatile(),
            };
            let tsc = rdtsc();
            if core::ptr::addr_of!((*p).version).read_volatile() == v1 {
                return (t, tsc);
            }
        }
    }
}

/// The TSC-to-ns scale of area `idx`: convert TSC deltas with
/// [`kiln_testguest::pvclock::ns_at`] (its `tsc_timestamp` and `system_time` are zero).
pub fn scale(idx: usize) -> TimeInfo {
    let (t, _) = snapshot(idx);
    TimeInfo {
        tsc_timestamp: 0,
        system_time: 0,
        ..t
    }
}

/// Current kvmclock time in ns from area `idx` (version-checked read).
pub fn now(idx: usize) -> u64 {
    let (t, tsc) = snapshot(idx);
    ns_at(&t, tsc)
}

/// Which PIT channel [`measure`] used.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum PitMethod {
    /// Channel 2 as a square wave, gate and output through port 0x61 (Linux's PIT
    /// calibration uses the same port).
    Ch2Gate,
    /// Channel 0 polled with counter-latch commands.
    Ch0Latch,
}

/// Whether port 0x61 shows channel 2's output: arms it in mode 0 (output low until the
/// count runs out) with a long count; VMMs without the port 0x61 gate logic read back 1s.
fn ch2_usable() -> bool {
    let gate = io::inb(0x61) & !0x03;
    io::outb(0x61, gate); // gate low, speaker off
    io::outb(0x43, 0b1011_0000); // channel 2, lo/hi byte, mode 0, binary
    io::outb(0x42, 0xff);
    io::outb(0x42, 0xff);
    io::outb(0x61, gate | 0x01); // gate high: count
    io::inb(0x61) & 0x20 == 0
}

fn ch0_read() -> u16 {
    io::outb(0x43, 0x00); // latch channel 0
    let lo = io::inb(0x40);
    let hi = io::inb(0x40);
    u16::from_le_bytes([lo, hi])
}

/// Measures kvmclock (area `idx`) against about `ticks` PIT input clocks; returns
/// (kvmclock ns, PIT ticks measured, method), or None if the PIT never advanced.
///
/// Channel 2 runs as a one-shot (mode 0) of 50 ms, re-armed for as many windows as `ticks`
/// covers; each window is timed with kvmclock at both ends and the *shortest* is reported.
/// A vCPU that is descheduled when the output rises only sees it late, which can only
/// lengthen that window — on a busy host (CI builds beside the test) counting edges of a
/// free-running wave missed whole periods and read 5% off.
pub fn measure(idx: usize, ticks: u64) -> Option<(u64, u64, PitMethod)> {
    const PERIOD: u16 = 59_659; // 50 ms
    if ch2_usable() {
        let windows = ticks.div_ceil(u64::from(PERIOD)).max(1);
        let mut best = u64::MAX;
        for _ in 0..windows {
            let gate = io::inb(0x61) & !0x03;
            io::outb(0x61, gate); // gate low, speaker off
            io::outb(0x43, 0b1011_0000); // channel 2, lo/hi byte, mode 0, binary
                                         // Read the clock *before* the count is written and the gate raised: a vCPU
                                         // descheduled around those writes then only lengthens the window (as a late end
                                         // does), so the shortest window is the best estimate. Which write starts the count
                                         // is up to the PIT model (KVM's starts mode 0 at the count write and ignores the
                                         // gate), so the clock is read before both: reading it between them let a vCPU
                                         // delayed there shorten a window (seen 3% short on a busy host), and the minimum
                                         // picked exactly that outlier. The three writes' exits (~10 µs each here) bias the
                                         // rate by ~600 ppm, well inside 1%.
            let start = now(idx);
            io::outb(0x42, PERIOD as u8);
            io::outb(0x42, (PERIOD >> 8) as u8);
            io::outb(0x61, gate | 0x01); // gate high: count
            let mut polls = 0u64;
            while io::inb(0x61) & 0x20 == 0 {
                polls += 1;
                if polls > 50_000_000 {
                    return None;
                }
            }
            best = best.min(now(idx).wrapping_sub(start));
        }
        io::outb(0x61, io::inb(0x61) & !0x03); // gate off
        return Some((best, u64::from(PERIOD), PitMethod::Ch2Gate));
    }
    // Channel 0, mode 2 (rate generator), full 16-bit period; interrupts are off and the
    // IRQ 0 line stays masked, so nothing sees its output.
    io::outb(0x43, 0b0011_0100);
    io::outb(0x40, 0);
    io::outb(0x40, 0);
    let mut pit = PitCounter::new(ch0_read());
    let start = now(idx);
    let mut polls = 0u64;
    while pit.ticks() < ticks {
        pit.update(ch0_read());
        polls += 1;
        // A PIT that never moves must not hang the guest (~10 s of emulated polling).
        if polls > 1_000_000 && pit.ticks() == 0 {
            return None;
        }
    }
    let kvm = now(idx).wrapping_sub(start);
    Some((kvm, pit.ticks(), PitMethod::Ch0Latch))
}

/// Ping-pong state: the BSP posts its time and an odd sequence number, the AP answers with
/// its own time and the next even one.
static PP_SEQ: AtomicU32 = AtomicU32::new(0);
static PP_TIME: AtomicU64 = AtomicU64::new(0);
/// The AP's kvmclock could not be enabled.
static PP_AP_FAILED: AtomicU32 = AtomicU32::new(0);

/// Rounds per AP.
pub const PING_ROUNDS: u32 = 200;
/// TSC cycles either side waits for the other's move.
const PING_TIMEOUT: u64 = 3_000_000_000;

/// AP side (from `smp::ap_main` with `TASK_CLOCK`): enables this vCPU's kvmclock and answers
/// [`PING_ROUNDS`] requests, each with a fresh reading.
pub fn ap_pingpong(apic_id: u32) {
    let idx = apic_id as usize;
    if !enable(idx, 0) {
        PP_AP_FAILED.store(1, Ordering::SeqCst);
        return;
    }
    'rounds: for r in 0..PING_ROUNDS {
        let t = rdtsc();
        while PP_SEQ.load(Ordering::SeqCst) != 2 * r + 1 {
            if rdtsc().wrapping_sub(t) > PING_TIMEOUT {
                break 'rounds;
            }
            core::hint::spin_loop();
        }
        PP_TIME.store(now(idx), Ordering::SeqCst);
        PP_SEQ.store(2 * r + 2, Ordering::SeqCst);
    }
    // Stop the hypervisor updating this area: the AP is about to halt.
    wrmsr(MSR.load(Ordering::SeqCst), 0);
}

/// Why a cross-vCPU comparison failed.
#[derive(Clone, Copy)]
pub enum PingFail {
    /// The AP did not check in.
    NotStarted,
    /// The AP could not enable kvmclock.
    NoClock,
    /// The AP stopped answering in this round.
    Timeout(u32),
    /// Readings out of order: BSP before, AP, BSP after (ns).
    Backwards(u32, u64, u64, u64),
}

/// BSP side: starts AP `apic_id` on the ping-pong task and checks, every round, that
/// BSP time before ≤ AP time ≤ BSP time after.
pub fn cross_check(apic_id: u8) -> Result<(), PingFail> {
    PP_SEQ.store(0, Ordering::SeqCst);
    PP_AP_FAILED.store(0, Ordering::SeqCst);
    if !crate::smp::start_ap(apic_id, crate::smp::TASK_CLOCK, 10_000_000_000) {
        return Err(PingFail::NotStarted);
    }
    for r in 0..PING_ROUNDS {
        let before = now(0);
        PP_TIME.store(before, Ordering::SeqCst);
        PP_SEQ.store(2 * r + 1, Ordering::SeqCst);
        let t = rdtsc();
        while PP_SEQ.load(Ordering::SeqCst) != 2 * r + 2 {
            if PP_AP_FAILED.load(Ordering::SeqCst) != 0 {
                return Err(PingFail::NoClock);
            }
            if rdtsc().wrapping_sub(t) > PING_TIMEOUT {
                return Err(PingFail::Timeout(r));
            }
            core::hint::spin_loop();
        }
        let ap = PP_TIME.load(Ordering::SeqCst);
        let after = now(0);
        if !(before <= ap && ap <= after) {
            return Err(PingFail::Backwards(r, before, ap, after));
        }
    }
    Ok(())
}
