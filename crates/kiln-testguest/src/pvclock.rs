//! kvmclock (pvclock) arithmetic: nanoseconds from a TSC reading and the hypervisor's
//! `pvclock_vcpu_time_info`, done in integer code (the guest has no SSE).

/// MSR that enables kvmclock ("new" numbering, KVM_FEATURE_CLOCKSOURCE2).
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// MSR for the original kvmclock (KVM_FEATURE_CLOCKSOURCE).
pub const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
/// CPUID 0x40000001 EAX: kvmclock at MSR 0x12.
pub const KVM_FEATURE_CLOCKSOURCE: u32 = 1 << 0;
/// CPUID 0x40000001 EAX: kvmclock at MSR 0x4b564d01.
pub const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;

/// The fields of `pvclock_vcpu_time_info` the formula uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeInfo {
    /// TSC at the last update.
    pub tsc_timestamp: u64,
    /// Guest nanoseconds at the last update.
    pub system_time: u64,
    /// TSC → ns multiplier (32.32 fixed point).
    pub tsc_to_system_mul: u32,
    /// Power-of-two pre-shift of the TSC delta.
    pub tsc_shift: i8,
}

/// Nanoseconds at `tsc`, per the pvclock ABI.
pub fn ns_at(t: &TimeInfo, tsc: u64) -> u64 {
    let mut delta = tsc.wrapping_sub(t.tsc_timestamp);
    if t.tsc_shift >= 0 {
        delta <<= t.tsc_shift.min(63);
    } else {
        delta >>= (-i16::from(t.tsc_shift)).min(63);
    }
    let scaled = ((u128::from(delta) * u128::from(t.tsc_to_system_mul)) >> 32) as u64;
    t.system_time.wrapping_add(scaled)
}

/// Parts per million by which `measured` differs from `reference` (absolute).
pub fn ppm_off(measured: u64, reference: u64) -> u64 {
    if reference == 0 {
        return u64::MAX;
    }
    let diff = measured.abs_diff(reference);
    ((u128::from(diff) * 1_000_000) / u128::from(reference)) as u64
}

/// PIT input clock, Hz.
pub const PIT_HZ: u64 = 1_193_182;

/// Nanoseconds of `ticks` PIT input clocks.
pub fn pit_ticks_to_ns(ticks: u64) -> u64 {
    ((u128::from(ticks) * 1_000_000_000) / u128::from(PIT_HZ)) as u64
}

/// Accumulates elapsed input clocks from successive readings of a PIT counter that counts
/// down through the full 16-bit range and reloads (mode 2 or 3 with count 0). Readings must
/// come less than one period (65536 ticks, 55 ms) apart.
#[derive(Clone, Copy, Debug)]
pub struct PitCounter {
    last: u16,
    ticks: u64,
}

impl PitCounter {
    /// Starts from a first reading.
    pub fn new(first: u16) -> Self {
        PitCounter {
            last: first,
            ticks: 0,
        }
    }

    /// Adds the ticks since the previous reading (the counter counts down, modulo 2^16).
    pub fn update(&mut self, reading: u16) {
        self.ticks += u64::from(self.last.wrapping_sub(reading));
        self.last = reading;
    }

    /// Ticks so far.
    pub fn ticks(&self) -> u64 {
        self.ticks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula() {
        // 2 GHz TSC: mul = 0.5 * 2^32, no shift.
        let t = TimeInfo {
            tsc_timestamp: 1000,
            system_time: 5_000,
            tsc_to_system_mul: 1 << 31,
            tsc_shift: 0,
        };
        assert_eq!(ns_at(&t, 1000), 5_000);
        assert_eq!(ns_at(&t, 3000), 6_000);
        let s = TimeInfo {
            tsc_shift: -1,
            tsc_to_system_mul: 1 << 31,
            ..t
        };
        assert_eq!(ns_at(&s, 5000), 6_000);
        let l = TimeInfo {
            tsc_shift: 1,
            tsc_to_system_mul: 1 << 30,
            ..t
        };
        assert_eq!(ns_at(&l, 3000), 6_000);
        // Extreme shifts don't panic.
        let x = TimeInfo {
            tsc_shift: -128,
            ..t
        };
        let _ = ns_at(&x, u64::MAX);
        let y = TimeInfo {
            tsc_shift: 127,
            ..t
        };
        let _ = ns_at(&y, u64::MAX);
    }

    #[test]
    fn ppm_and_pit() {
        assert_eq!(ppm_off(1_010_000, 1_000_000), 10_000);
        assert_eq!(ppm_off(990_000, 1_000_000), 10_000);
        assert_eq!(ppm_off(5, 0), u64::MAX);
        assert_eq!(pit_ticks_to_ns(PIT_HZ), 1_000_000_000);
        assert_eq!(pit_ticks_to_ns(59_659), 49_999_916);
    }

    #[test]
    fn pit_counter_wraps() {
        let mut c = PitCounter::new(100);
        c.update(40);
        assert_eq!(c.ticks(), 60);
        c.update(0); // count 0 stands for 65536
        c.update(65_000);
        c.update(64_990);
        assert_eq!(c.ticks(), 60 + 40 + 536 + 10);
        c.update(64_990);
        assert_eq!(c.ticks(), 646, "no movement, no ticks");
    }
}
