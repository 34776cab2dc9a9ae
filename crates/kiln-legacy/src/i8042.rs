//! A minimal i8042 keyboard controller: enough for the CPU-reset command.

use std::sync::Arc;

use kiln_bus::{PioAddress, PioDevice};

use crate::consts::{I8042_CMD_RESET_CPU, I8042_COMMAND_PORT, I8042_STATUS};
use crate::PowerEvents;

/// The i8042 at ports 0x60 (data) and 0x64 (status/command).
///
/// Register it at both ports (two 1-byte ranges, or one range covering both; it works out the
/// port from `base + offset`). Writing [`I8042_CMD_RESET_CPU`] to the command port requests a
/// reset through [`PowerEvents::reset`]; other commands and data writes are ignored. The status
/// port reads [`I8042_STATUS`] (nothing pending) and the data port reads 0: there is no
/// keyboard behind it.
pub struct I8042Device {
    power: Arc<dyn PowerEvents>,
}

impl I8042Device {
    /// A controller reporting resets to `power`.
    pub fn new(power: Arc<dyn PowerEvents>) -> Self {
        I8042Device { power }
    }
}

/// The port byte `lane` of an access lands on, if it is a port at all.
fn port_of(base: PioAddress, offset: u16, lane: usize) -> Option<u16> {
    u16::try_from(usize::from(base.0) + usize::from(offset) + lane).ok()
}

impl PioDevice for I8042Device {
    fn pio_read(&self, base: PioAddress, offset: u16, data: &mut [u8]) {
        for (lane, byte) in data.iter_mut().enumerate() {
            *byte = match port_of(base, offset, lane) {
                Some(I8042_COMMAND_PORT) => I8042_STATUS,
                _ => 0,
            };
        }
    }

    fn pio_write(&self, base: PioAddress, offset: u16, data: &[u8]) {
        for (lane, &byte) in data.iter().enumerate() {
            if port_of(base, offset, lane) == Some(I8042_COMMAND_PORT)
                && byte == I8042_CMD_RESET_CPU
            {
                self.power.reset();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consts::I8042_DATA_PORT;
    use crate::test_util::CountingPower;
    use kiln_bus::PioBus;

    fn setup() -> (Arc<CountingPower>, PioBus) {
        let power = Arc::new(CountingPower::default());
        let dev = Arc::new(I8042Device::new(power.clone()));
        let mut bus = PioBus::new();
        bus.insert(PioAddress(I8042_DATA_PORT), 1, dev.clone())
            .unwrap();
        bus.insert(PioAddress(I8042_COMMAND_PORT), 1, dev).unwrap();
        (power, bus)
    }

    #[test]
    fn reset_command_requests_reset() {
        let (power, bus) = setup();
        bus.write(PioAddress(I8042_COMMAND_PORT), &[0xfe]).unwrap();
        assert_eq!(power.resets(), 1);
        assert_eq!(power.offs(), 0);
    }

    #[test]
    fn other_commands_and_data_writes_are_ignored() {
        let (power, bus) = setup();
        for v in [0x00, 0x20, 0x60, 0xaa, 0xad, 0xd1, 0xfd, 0xff] {
            bus.write(PioAddress(I8042_COMMAND_PORT), &[v]).unwrap();
        }
        // 0xfe on the data port is not a reset.
        bus.write(PioAddress(I8042_DATA_PORT), &[0xfe]).unwrap();
        assert_eq!(power.resets(), 0);
    }

    #[test]
    fn status_reports_nothing_pending_and_data_reads_zero() {
        let (_power, bus) = setup();
        let mut b = [0xffu8];
        bus.read(PioAddress(I8042_COMMAND_PORT), &mut b).unwrap();
        assert_eq!(b[0], I8042_STATUS);
        assert_eq!(b[0] & 0x03, 0, "no output or input pending");
        bus.read(PioAddress(I8042_DATA_PORT), &mut b).unwrap();
        assert_eq!(b[0], 0);
    }

    #[test]
    fn one_range_over_both_ports_and_hostile_accesses() {
        let power = Arc::new(CountingPower::default());
        let dev = I8042Device::new(power.clone());
        // Registered as 0x60..0x65: a 4-byte write at 0x61 puts its last lane on 0x64.
        dev.pio_write(PioAddress(0x60), 1, &[0xfe, 0xfe, 0xfe, 0xfe]);
        assert_eq!(power.resets(), 1, "only the lane on 0x64 is a command");
        let mut d = [0xaau8; 8];
        dev.pio_read(PioAddress(0x60), 0, &mut d);
        assert_eq!(d, [0, 0, 0, 0, I8042_STATUS, 0, 0, 0]);
        // Lanes past port 0xffff go nowhere.
        dev.pio_write(PioAddress(0xffff), u16::MAX, &[0xfe; 8]);
        dev.pio_read(PioAddress(0xffff), u16::MAX, &mut d);
        assert_eq!(d, [0; 8]);
        dev.pio_write(PioAddress(0x64), 0, &[]);
        assert_eq!(power.resets(), 1);
    }
}
