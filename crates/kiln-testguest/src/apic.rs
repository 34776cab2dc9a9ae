//! Local-APIC command encodings and SMP bring-up constants (pure; the guest binary's
//! `smp` module does the hardware side).

/// Most APs the guest starts (one stack each); kiln supports up to 255 vCPUs, the guest
/// checks up to this many.
pub const MAX_APS: usize = 16;
/// Stack per AP.
pub const AP_STACK_SIZE: usize = 8192;

/// ICR delivery mode INIT (bits 8..10 = 101), level assert (bit 14), shorthand "all
/// excluding self" (bits 18..19 = 11).
pub fn icr_init_all_but_self() -> u32 {
    (0b11 << 18) | (1 << 14) | (0b101 << 8)
}

/// ICR STARTUP (bits 8..10 = 110) to all but self, vector = the trampoline's page number.
/// `trampoline` must be page-aligned and below 1 MiB; other values are clamped into range.
pub fn icr_sipi_all_but_self(trampoline: u64) -> u32 {
    let vector = ((trampoline >> 12) & 0xff) as u32;
    (0b11 << 18) | (1 << 14) | (0b110 << 8) | vector
}

/// ICR (high, low) for INIT to one CPU: physical destination `apic_id` in high bits 24..31,
/// no shorthand, level assert.
pub fn icr_init_to(apic_id: u8) -> (u32, u32) {
    (u32::from(apic_id) << 24, (1 << 14) | (0b101 << 8))
}

/// ICR (high, low) for STARTUP to one CPU, vector = the trampoline's page number.
pub fn icr_sipi_to(apic_id: u8, trampoline: u64) -> (u32, u32) {
    let vector = ((trampoline >> 12) & 0xff) as u32;
    (u32::from(apic_id) << 24, (1 << 14) | (0b110 << 8) | vector)
}

/// Checks that exactly the APIC IDs `1..cpus` checked in (`seen` is a 256-bit set) and
/// that `count == cpus - 1`.
pub fn aps_complete(cpus: u32, count: u32, seen: &[u64; 4]) -> bool {
    let aps = cpus.saturating_sub(1);
    if count != aps {
        return false;
    }
    (0..256u32).all(|id| {
        let bit = seen[(id / 64) as usize] & (1 << (id % 64)) != 0;
        bit == (id >= 1 && id < cpus)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn icr_encodings() {
        assert_eq!(icr_init_all_but_self(), 0x000c_4500);
        assert_eq!(icr_sipi_all_but_self(0x8000), 0x000c_4608);
        assert_eq!(icr_sipi_all_but_self(0x9f000), 0x000c_469f);
        assert_eq!(icr_init_to(3), (0x0300_0000, 0x0000_4500));
        assert_eq!(icr_sipi_to(15, 0x8000), (0x0f00_0000, 0x0000_4608));
    }

    #[test]
    fn ap_sets() {
        assert!(aps_complete(1, 0, &[0; 4]));
        assert!(aps_complete(4, 3, &[0b1110, 0, 0, 0]));
        assert!(
            !aps_complete(4, 3, &[0b1111, 0, 0, 0]),
            "the BSP is not an AP"
        );
        assert!(!aps_complete(4, 2, &[0b0110, 0, 0, 0]));
        assert!(!aps_complete(2, 1, &[0b100, 0, 0, 0]), "wrong ID");
    }
}

/// Local APIC MMIO base (xAPIC mode).
pub const LAPIC: u64 = 0xfee0_0000;
/// Local APIC ID register.
pub const LAPIC_ID: u64 = LAPIC + 0x20;
/// End-of-interrupt register.
pub const LAPIC_EOI: u64 = LAPIC + 0xb0;
/// Spurious-interrupt vector register (bit 8: APIC software enable).
pub const LAPIC_SVR: u64 = LAPIC + 0xf0;
/// Interrupt command register, low dword (writing it sends the IPI).
pub const LAPIC_ICR_LOW: u64 = LAPIC + 0x300;
/// Interrupt command register, high dword (destination).
pub const LAPIC_ICR_HIGH: u64 = LAPIC + 0x310;
/// LVT timer register.
pub const LAPIC_LVT_TIMER: u64 = LAPIC + 0x320;
/// Timer initial count.
pub const LAPIC_TIMER_INIT: u64 = LAPIC + 0x380;
/// Timer divide configuration.
pub const LAPIC_TIMER_DIV: u64 = LAPIC + 0x3e0;

/// IOAPIC MMIO base.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// IOAPIC register-select offset.
pub const IOAPIC_IOREGSEL: u64 = 0x00;
/// IOAPIC data-window offset.
pub const IOAPIC_IOWIN: u64 = 0x10;

/// IOAPIC register index of redirection entry `pin` (low dword; high is +1).
pub fn ioredtbl_index(pin: u8) -> u32 {
    0x10 + 2 * u32::from(pin)
}

/// Redirection entry, low dword: fixed delivery, physical destination, edge, active high,
/// unmasked, `vector`. With `masked`, bit 16 is set.
pub fn ioredtbl_low(vector: u8, masked: bool) -> u32 {
    u32::from(vector) | (u32::from(masked) << 16)
}

/// Redirection entry, low dword, for a source with the given trigger mode and polarity
/// (virtio-mmio: kiln's are edge/active-high, QEMU microvm's level/active-high): bit 15
/// level, bit 13 active low, bit 16 masked; fixed delivery to a physical destination.
pub fn ioredtbl_low_mode(vector: u8, masked: bool, level: bool, active_low: bool) -> u32 {
    ioredtbl_low(vector, masked) | (u32::from(level) << 15) | (u32::from(active_low) << 13)
}

/// IOAPIC register: version; bits 16..23 hold the highest redirection entry index.
pub const IOAPIC_REG_VERSION: u32 = 1;

/// Number of redirection entries from the IOAPIC version register.
pub fn ioapic_entries(version: u32) -> u32 {
    ((version >> 16) & 0xff) + 1
}

/// Redirection entry, high dword: destination APIC ID in bits 24..31.
pub fn ioredtbl_high(apic_id: u8) -> u32 {
    u32::from(apic_id) << 24
}

/// A 64-bit interrupt gate (16 bytes as two u64): present, DPL 0, type 0xE, `selector`,
/// no IST.
pub fn idt_gate(handler: u64, selector: u16) -> [u64; 2] {
    let low = (handler & 0xffff)
        | (u64::from(selector) << 16)
        | (0x8e << 40)
        | ((handler >> 16) & 0xffff) << 48;
    [low, handler >> 32]
}

#[cfg(test)]
mod irq_tests {
    use super::*;

    #[test]
    fn ioapic_encodings() {
        assert_eq!(ioredtbl_index(4), 0x18);
        assert_eq!(ioredtbl_low(0x34, false), 0x34);
        assert_eq!(ioredtbl_low(0x34, true), 0x1_0034);
        assert_eq!(ioredtbl_high(3), 0x0300_0000);
        assert_eq!(ioredtbl_low_mode(0x50, false, false, false), 0x50);
        assert_eq!(ioredtbl_low_mode(0x51, false, true, false), 0x8051);
        assert_eq!(ioredtbl_low_mode(0x51, true, true, true), 0x1_a051);
        assert_eq!(ioapic_entries(0x0017_0011), 24);
    }

    #[test]
    fn gate_layout() {
        let [lo, hi] = idt_gate(0x1234_5678_9abc_def0, 0x10);
        assert_eq!(lo & 0xffff, 0xdef0);
        assert_eq!((lo >> 16) & 0xffff, 0x10);
        assert_eq!((lo >> 40) & 0xff, 0x8e);
        assert_eq!(lo >> 48, 0x9abc);
        assert_eq!(hi, 0x1234_5678);
    }
}
