//! Drives COM1 and the power device through a `PioBus` the way a guest would: prints a banner,
//! reads a line of host input with LSR polling, echoes it, then powers off.
//!
//! Run with `cargo run -p kiln-legacy --example serial_echo -- 'some input'`.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kiln_bus::{PioAddress, PioBus};
use kiln_irq::EventFdLine;
use kiln_legacy::consts::*;
use kiln_legacy::{PowerDevice, PowerEvents, SerialDevice};

const LSR: u16 = COM1_PORT + 5;
const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;

#[derive(Default)]
struct Power {
    off: AtomicBool,
}

impl PowerEvents for Power {
    fn power_off(&self) {
        self.off.store(true, Ordering::Relaxed);
    }
    fn reset(&self) {}
}

/// The "guest" side: port accesses only.
struct Guest<'a>(&'a PioBus);

impl Guest<'_> {
    fn inb(&self, port: u16) -> u8 {
        let mut b = [0xff];
        // An unclaimed port reads all ones, as on real hardware.
        let _ = self.0.read(PioAddress(port), &mut b);
        b[0]
    }

    fn outb(&self, port: u16, v: u8) {
        if let Err(e) = self.0.write(PioAddress(port), &[v]) {
            eprintln!("guest: {e}");
        }
    }

    fn print(&self, s: &[u8]) {
        for &c in s {
            while self.inb(LSR) & LSR_THR_EMPTY == 0 {}
            self.outb(COM1_PORT, c);
        }
    }

    fn read_line(&self) -> Vec<u8> {
        let mut line = Vec::new();
        while self.inb(LSR) & LSR_DATA_READY != 0 {
            match self.inb(COM1_PORT) {
                b'\n' => break,
                c => line.push(c),
            }
        }
        line
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let input = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "hello".to_owned());

    let irq = Arc::new(EventFdLine::new()?);
    let com1 = Arc::new(SerialDevice::new(irq.clone(), io::stdout()));
    let power = Arc::new(Power::default());
    let mut bus = PioBus::new();
    bus.insert(PioAddress(COM1_PORT), COM1_PORT_SIZE, com1.clone())?;
    bus.insert(
        PioAddress(POWER_PORT),
        POWER_PORT_SIZE,
        Arc::new(PowerDevice::new(power.clone())),
    )?;
    let bus = Arc::new(bus);

    let guest = Guest(&bus);
    guest.outb(COM1_PORT + 1, 0x01); // IER: RX data interrupt
    guest.print(b"KTEST-SERIAL-READY\n");

    // The host side: feed the line, keeping what the FIFO does not take yet.
    let mut pending = input.into_bytes();
    pending.push(b'\n');
    let mut echoed = Vec::new();
    while !pending.is_empty() {
        let n = com1.enqueue_input(&pending);
        pending.drain(..n);
        echoed.extend(guest.read_line());
    }
    echoed.extend(guest.read_line());
    eprintln!("(RX interrupts raised: {})", irq.take_count());

    guest.print(b"KTEST-ECHO ");
    guest.print(&echoed);
    guest.print(b"\n");
    guest.outb(POWER_PORT, POWER_OFF_VALUE);
    eprintln!("(powered off: {})", power.off.load(Ordering::Relaxed));
    Ok(())
}
