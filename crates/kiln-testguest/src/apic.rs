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
