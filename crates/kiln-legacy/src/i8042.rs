//! A minimal i8042 keyboard controller: the CPU-reset command, and a keyboard that can press
//! Ctrl+Alt+Del (Firecracker's `SendCtrlAltDel`).

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

use kiln_bus::{PioAddress, PioDevice};
use kiln_irq::InterruptLine;

use crate::consts::{I8042_CMD_RESET_CPU, I8042_COMMAND_PORT, I8042_DATA_PORT, I8042_STATUS};
use crate::PowerEvents;

/// Status bit: the output buffer holds a byte for the guest.
pub const I8042_STATUS_OBF: u8 = 0x01;

/// Ctrl+Alt+Del as make codes of scan code set 2: left Ctrl, left Alt, Delete (extended).
pub const CTRL_ALT_DEL_SCANCODES: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];

/// Most bytes waiting for the guest; further key presses are dropped, as a full keyboard
/// buffer would.
const BUFFER_LEN: usize = 16;

/// The i8042 at ports 0x60 (data) and 0x64 (status/command).
///
/// Register it at both ports (two 1-byte ranges, or one range covering both; it works out the
/// port from `base + offset`). Writing [`I8042_CMD_RESET_CPU`] to the command port requests a
/// reset through [`PowerEvents::reset`]; other commands and data writes are ignored. The status
/// port reads [`I8042_STATUS`], plus [`I8042_STATUS_OBF`] while key bytes wait; the data port
/// hands them out one at a time (0 when none). With a keyboard interrupt line
/// ([`with_keyboard_irq`](Self::with_keyboard_irq), IRQ 1), each byte made available raises it.
pub struct I8042Device {
    power: Arc<dyn PowerEvents>,
    keyboard_irq: Option<Arc<dyn InterruptLine>>,
    buffer: Mutex<VecDeque<u8>>,
}

impl I8042Device {
    /// A controller reporting resets to `power`.
    pub fn new(power: Arc<dyn PowerEvents>) -> Self {
        I8042Device {
            power,
            keyboard_irq: None,
            buffer: Mutex::new(VecDeque::with_capacity(BUFFER_LEN)),
        }
    }

    /// Raises `irq` (the keyboard's IRQ 1) whenever a byte is ready for the guest.
    pub fn with_keyboard_irq(mut self, irq: Arc<dyn InterruptLine>) -> Self {
        self.keyboard_irq = Some(irq);
        self
    }

    /// Presses Ctrl+Alt+Del: queues [`CTRL_ALT_DEL_SCANCODES`] and raises the keyboard
    /// interrupt. The guest decides what to do (Linux reboots, i.e. resets through the i8042).
    pub fn trigger_ctrl_alt_del(&self) -> io::Result<()> {
        {
            let mut b = self
                .buffer
                .lock()
                .map_err(|_| io::Error::other("i8042 lock poisoned"))?;
            if b.len() + CTRL_ALT_DEL_SCANCODES.len() > BUFFER_LEN {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "the keyboard buffer is full (the guest is not reading it)",
                ));
            }
            b.extend(CTRL_ALT_DEL_SCANCODES);
        }
        self.raise()
    }

    fn raise(&self) -> io::Result<()> {
        match &self.keyboard_irq {
            Some(irq) => irq.trigger(),
            None => Ok(()),
        }
    }

    /// Bytes waiting for the guest.
    pub fn pending(&self) -> usize {
        self.buffer.lock().map_or(0, |b| b.len())
    }

    fn pop(&self) -> u8 {
        let (byte, more) = match self.buffer.lock() {
            Ok(mut b) => {
                let byte = b.pop_front().unwrap_or(0);
                (byte, !b.is_empty())
            }
            Err(_) => (0, false),
        };
        if more {
            // Edge-triggered: one interrupt per byte. Nothing to report to a guest read if it
            // fails; the status port still shows the byte.
            let _ = self.raise();
        }
        byte
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
                Some(I8042_COMMAND_PORT) => {
                    if self.pending() > 0 {
                        I8042_STATUS | I8042_STATUS_OBF
                    } else {
                        I8042_STATUS
                    }
                }
                Some(I8042_DATA_PORT) => self.pop(),
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

    #[derive(Default)]
    struct CountingIrq(std::sync::atomic::AtomicU32);
    impl InterruptLine for CountingIrq {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn ctrl_alt_del_queues_scancodes_and_raises_irq1_per_byte() {
        let power = Arc::new(CountingPower::default());
        let irq = Arc::new(CountingIrq::default());
        let dev = Arc::new(I8042Device::new(power.clone()).with_keyboard_irq(irq.clone()));
        let mut bus = PioBus::new();
        bus.insert(PioAddress(I8042_DATA_PORT), 1, dev.clone())
            .unwrap();
        bus.insert(PioAddress(I8042_COMMAND_PORT), 1, dev.clone())
            .unwrap();
        let read = |port| {
            let mut b = [0u8];
            bus.read(PioAddress(port), &mut b).unwrap();
            b[0]
        };
        assert_eq!(read(I8042_COMMAND_PORT) & I8042_STATUS_OBF, 0);
        dev.trigger_ctrl_alt_del().unwrap();
        let mut got = Vec::new();
        while read(I8042_COMMAND_PORT) & I8042_STATUS_OBF != 0 {
            got.push(read(I8042_DATA_PORT));
        }
        assert_eq!(got, CTRL_ALT_DEL_SCANCODES);
        // One interrupt when queued, one more for each byte left after a read.
        assert_eq!(irq.0.load(std::sync::atomic::Ordering::SeqCst), 4);
        assert_eq!(read(I8042_DATA_PORT), 0);
        // A guest that never reads fills the buffer; the press is refused, not grown.
        for _ in 0..4 {
            dev.trigger_ctrl_alt_del().unwrap();
        }
        assert!(dev.trigger_ctrl_alt_del().is_err());
        assert_eq!(dev.pending(), BUFFER_LEN);
    }
}
