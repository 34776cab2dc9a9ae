//! The kiln power device: the FADT's hardware-reduced sleep control, sleep status and reset
//! registers.

use std::sync::Arc;

use kiln_bus::{PioAddress, PioDevice, RateLimitedWarn};

use crate::consts::{
    POWER_PORT_SIZE, POWER_RESET_OFFSET, POWER_SLEEP_CONTROL_OFFSET, RESET_VALUE, SLP_EN,
    SLP_TYP_MASK, SLP_TYP_S5, SLP_TYP_SHIFT,
};
use crate::{lane_register, PowerEvents};

static UNSUPPORTED_SLEEP: RateLimitedWarn = RateLimitedWarn::new();
static UNKNOWN_RESET_VALUE: RateLimitedWarn = RateLimitedWarn::new();

/// The ACPI hardware-reduced power registers at 0x600..0x603 (register = port − base).
///
/// - offset 0, sleep control: a write with SLP_EN set and SLP_TYP = 5 (S5) powers off
///   ([`POWER_OFF_VALUE`](crate::consts::POWER_OFF_VALUE) = 0x34); other sleep types are not
///   supported and are ignored with a rate-limited warning; writes without SLP_EN are ignored.
/// - offset 1, sleep status: reads 0 (the VM never wakes from sleep), writes ignored.
/// - offset 2, reset register: writing [`RESET_VALUE`] (0x01) resets; other values are
///   ignored.
///
/// Reads of every register return 0.
pub struct PowerDevice {
    events: Arc<dyn PowerEvents>,
}

impl PowerDevice {
    /// A power device reporting to `events`.
    pub fn new(events: Arc<dyn PowerEvents>) -> Self {
        PowerDevice { events }
    }

    fn write_register(&self, reg: u64, value: u8) {
        match u16::try_from(reg) {
            Ok(POWER_SLEEP_CONTROL_OFFSET) if value & SLP_EN != 0 => {
                let slp_typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if slp_typ == SLP_TYP_S5 {
                    self.events.power_off();
                } else {
                    UNSUPPORTED_SLEEP.warn(format_args!(
                        "power device: guest requested unsupported sleep type {slp_typ} \
                         (sleep control value {value:#04x}); ignored"
                    ));
                }
            }
            Ok(POWER_RESET_OFFSET) => {
                if value == RESET_VALUE {
                    self.events.reset();
                } else {
                    UNKNOWN_RESET_VALUE.warn(format_args!(
                        "power device: reset register written with {value:#04x}, not \
                         {RESET_VALUE:#04x}; ignored"
                    ));
                }
            }
            // Sleep control without SLP_EN, sleep status (write-1-to-clear of bits we never
            // set), and anything else.
            _ => {}
        }
    }
}

impl PioDevice for PowerDevice {
    fn pio_read(&self, _base: PioAddress, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&self, _base: PioAddress, offset: u16, data: &[u8]) {
        for (lane, &value) in data.iter().enumerate() {
            if let Some(reg) = lane_register(offset.into(), lane, POWER_PORT_SIZE.into()) {
                self.write_register(reg, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consts::{POWER_OFF_VALUE, POWER_PORT, POWER_SLEEP_STATUS_OFFSET};
    use crate::test_util::CountingPower;

    const BASE: PioAddress = PioAddress(POWER_PORT);

    fn setup() -> (Arc<CountingPower>, PowerDevice) {
        let power = Arc::new(CountingPower::default());
        (power.clone(), PowerDevice::new(power))
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (power, dev) = setup();
        dev.pio_write(BASE, POWER_SLEEP_CONTROL_OFFSET, &[0x34]);
        assert_eq!(power.offs(), 1);
        assert_eq!(power.resets(), 0);
        // SLP_TYP is bits 2..4 only: bits 0, 1, 6, 7 don't change the meaning.
        dev.pio_write(BASE, POWER_SLEEP_CONTROL_OFFSET, &[POWER_OFF_VALUE | 0xc3]);
        assert_eq!(power.offs(), 2);
    }

    #[test]
    fn other_sleep_values_do_not_power_off() {
        let (power, dev) = setup();
        for v in 0..=u8::MAX {
            let is_s5 = v & SLP_EN != 0 && (v >> 2) & 7 == 5;
            if !is_s5 {
                dev.pio_write(BASE, POWER_SLEEP_CONTROL_OFFSET, &[v]);
            }
        }
        // S5 without SLP_EN.
        dev.pio_write(BASE, POWER_SLEEP_CONTROL_OFFSET, &[5 << 2]);
        assert_eq!(power.offs(), 0);
        assert_eq!(power.resets(), 0);
        // The same value on the sleep status register is not a power-off either.
        dev.pio_write(BASE, POWER_SLEEP_STATUS_OFFSET, &[0x34]);
        assert_eq!(power.offs(), 0);
    }

    #[test]
    fn reset_register_resets_on_0x01_only() {
        let (power, dev) = setup();
        for v in [0x00, 0x02, 0x06, 0x0e, 0xfe, 0xff] {
            dev.pio_write(BASE, POWER_RESET_OFFSET, &[v]);
        }
        assert_eq!(power.resets(), 0);
        dev.pio_write(BASE, POWER_RESET_OFFSET, &[0x01]);
        assert_eq!(power.resets(), 1);
        assert_eq!(power.offs(), 0);
    }

    #[test]
    fn reads_are_zero_and_hostile_accesses_are_harmless() {
        let (power, dev) = setup();
        let mut d = [0xaau8; 8];
        for offset in [0u16, 1, 2, 3, 0x100, u16::MAX] {
            dev.pio_read(BASE, offset, &mut d);
            assert_eq!(d, [0; 8]);
            d = [0xaa; 8];
        }
        // Offsets past the device: nothing happens even with "magic" values.
        dev.pio_write(BASE, 3, &[0x01; 8]);
        dev.pio_write(BASE, u16::MAX, &[0x34; 8]);
        dev.pio_write(BASE, 0, &[]);
        assert_eq!((power.offs(), power.resets()), (0, 0));
        // A 4-byte write at 0x600 lands lane 0 on sleep control and lane 2 on reset.
        dev.pio_write(BASE, 0, &[0x34, 0x00, 0x01, 0x01]);
        assert_eq!((power.offs(), power.resets()), (1, 1));
    }

    #[test]
    fn works_through_the_bus() {
        let (power, dev) = setup();
        let mut bus = kiln_bus::PioBus::new();
        bus.insert(BASE, POWER_PORT_SIZE, Arc::new(dev)).unwrap();
        bus.write(PioAddress(0x600), &[0x34]).unwrap();
        bus.write(PioAddress(0x602), &[0x01]).unwrap();
        assert_eq!((power.offs(), power.resets()), (1, 1));
        assert!(bus.write(PioAddress(0x603), &[0x01]).is_err());
        assert!(bus.write(PioAddress(0x602), &[0x01, 0x00]).is_err());
    }
}
