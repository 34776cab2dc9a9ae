//! kvmclock: enable it, check it is monotonic and that it runs at the rate of an
//! independent clock, the i8254 PIT (channel 2, gated through port 0x61, as Linux's
//! calibration does).

use kiln_testguest::pvclock::{
    ns_at, pit_ticks_to_ns, TimeInfo, KVM_FEATURE_CLOCKSOURCE, KVM_FEATURE_CLOCKSOURCE2,
    MSR_KVM_SYSTEM_TIME, MSR_KVM_SYSTEM_TIME_NEW,
};

use crate::io;

/// `pvclock_vcpu_time_info`, written by the hypervisor.
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

static mut CLOCK: PvClock = PvClock {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
};

fn wrmsr(msr: u32, value: u64) {
    // SAFETY: writing a kvmclock MSR only tells the hypervisor where to publish time.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") value as u32,
            in("edx") (value >> 32) as u32, options(nostack, preserves_flags));
    }
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Enables kvmclock if CPUID leaf 0x40000001 offers it; returns false if not.
pub fn enable(kvm_features: u32) -> bool {
    let msr = if kvm_features & KVM_FEATURE_CLOCKSOURCE2 != 0 {
        MSR_KVM_SYSTEM_TIME_NEW
    } else if kvm_features & KVM_FEATURE_CLOCKSOURCE != 0 {
        MSR_KVM_SYSTEM_TIME
    } else {
        return false;
    };
    let addr = core::ptr::addr_of!(CLOCK) as u64;
    wrmsr(msr, addr | 1);
    true
}

/// Current kvmclock time in ns (version-checked read).
pub fn now() -> u64 {
    let p = core::ptr::addr_of!(CLOCK);
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
                return ns_at(&t, tsc);
            }
        }
    }
}

/// Runs PIT channel 2 once for `count` ticks (mode 0, gate via port 0x61) and waits for
/// its output to go high. Returns false if it never does within `max_polls` polls.
fn pit_oneshot(count: u16, max_polls: u64) -> bool {
    let gate = io::inb(0x61) & !0x03;
    io::outb(0x61, gate); // gate low, speaker off
    io::outb(0x43, 0b1011_0000); // channel 2, lo/hi byte, mode 0, binary
    io::outb(0x42, count as u8);
    io::outb(0x42, (count >> 8) as u8);
    io::outb(0x61, gate | 0x01); // gate high: count
    for _ in 0..max_polls {
        if io::inb(0x61) & 0x20 != 0 {
            return true;
        }
    }
    false
}

/// Measures kvmclock against `periods` PIT periods of `count` ticks; returns
/// (kvmclock ns, PIT ns) or None if the PIT never fired.
pub fn measure(periods: u32, count: u16) -> Option<(u64, u64)> {
    let start = now();
    for _ in 0..periods {
        if !pit_oneshot(count, 50_000_000) {
            return None;
        }
    }
    let kvm = now().wrapping_sub(start);
    let pit = pit_ticks_to_ns(u64::from(periods) * u64::from(count));
    Some((kvm, pit))
}
