//! The 16550A UART (COM1), on vm-superio's serial state machine.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kiln_bus::{PioAddress, PioDevice, RateLimitedWarn};
use kiln_irq::InterruptLine;
use vm_superio::serial::{Error as UartError, NoEvents, SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};

use crate::consts::COM1_PORT_SIZE;
use crate::{lane_register, Error, Result};

static IRQ_FAILED: RateLimitedWarn = RateLimitedWarn::new();
static OUTPUT_FAILED: RateLimitedWarn = RateLimitedWarn::new();

/// Adapts a [`kiln_irq::InterruptLine`] to vm-superio's [`Trigger`].
#[derive(Clone)]
pub struct LineTrigger(pub Arc<dyn InterruptLine>);

impl Trigger for LineTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

type Uart<EV, W> = Serial<LineTrigger, EV, W>;

/// A 16550A UART on the port-I/O bus: 8 one-byte registers (register = port − base).
///
/// Guest output goes to `W` (stdout, a file, [`std::io::Sink`] for no output); interrupts to an
/// [`InterruptLine`]; host input comes in through [`enqueue_input`](Self::enqueue_input). The
/// UART state is behind a mutex that is held for one guest access at most, including the
/// write of one output byte to `W`.
///
/// ```
/// use std::sync::Arc;
/// use kiln_bus::{PioAddress, PioBus};
/// use kiln_irq::EventFdLine;
/// use kiln_legacy::consts::{COM1_PORT, COM1_PORT_SIZE};
/// use kiln_legacy::SerialDevice;
///
/// let irq = Arc::new(EventFdLine::new().unwrap());
/// let com1 = Arc::new(SerialDevice::new(irq.clone(), Vec::new()));
/// let mut bus = PioBus::new();
/// bus.insert(PioAddress(COM1_PORT), COM1_PORT_SIZE, com1.clone()).unwrap();
///
/// for b in b"hi" {
///     bus.write(PioAddress(COM1_PORT), &[*b]).unwrap(); // THR
/// }
/// assert_eq!(com1.with_writer(|out| out.clone()), b"hi");
///
/// assert_eq!(com1.enqueue_input(b"x"), 1);
/// let mut lsr = [0u8];
/// bus.read(PioAddress(COM1_PORT + 5), &mut lsr).unwrap();
/// assert_eq!(lsr[0] & 1, 1); // data ready
/// ```
pub struct SerialDevice<W = Box<dyn Write + Send>, EV = NoEvents>
where
    W: Write + Send,
    EV: SerialEvents + Send,
{
    uart: Mutex<Uart<EV, W>>,
}

impl<W: Write + Send> SerialDevice<W, NoEvents> {
    /// A UART in its reset state, raising `irq` and writing guest output to `out`.
    pub fn new(irq: Arc<dyn InterruptLine>, out: W) -> Self {
        Self::with_events(irq, NoEvents, out)
    }
}

impl<W: Write + Send, EV: SerialEvents + Send> SerialDevice<W, EV> {
    /// Like [`new`](SerialDevice::new), also reporting UART events (bytes out, bytes lost, RX
    /// FIFO drained: the cue to retry [`enqueue_input`](Self::enqueue_input)) to `events`.
    pub fn with_events(irq: Arc<dyn InterruptLine>, events: EV, out: W) -> Self {
        SerialDevice {
            uart: Mutex::new(Serial::with_events(LineTrigger(irq), events, out)),
        }
    }

    /// Rebuilds a UART from a [`state`](Self::state) snapshot; re-raises `irq` if the saved
    /// state had an enabled interrupt pending.
    pub fn from_state(
        state: &SerialState,
        irq: Arc<dyn InterruptLine>,
        events: EV,
        out: W,
    ) -> Result<Self> {
        let uart = Serial::from_state(state, LineTrigger(irq), events, out).map_err(|source| {
            Error::SerialRestore {
                fifo_len: state.in_buffer.len(),
                source,
            }
        })?;
        Ok(SerialDevice {
            uart: Mutex::new(uart),
        })
    }

    /// Snapshot of the UART registers and RX FIFO.
    pub fn state(&self) -> SerialState {
        self.lock().state()
    }

    /// Feeds host input into the RX FIFO and raises the RX interrupt if the guest enabled it.
    ///
    /// Returns how many bytes were accepted: the FIFO holds 64 bytes, so callers keep the
    /// rest and retry once the guest has read some (0 also while the guest has the UART in
    /// loopback mode, where it ignores external input).
    pub fn enqueue_input(&self, bytes: &[u8]) -> usize {
        let mut uart = self.lock();
        let accepted = bytes.len().min(uart.fifo_capacity());
        if accepted == 0 {
            return 0;
        }
        match uart.enqueue_raw_bytes(&bytes[..accepted]) {
            Ok(n) => n,
            // The bytes are in the FIFO; only the interrupt failed. The guest sees them on its
            // next LSR poll.
            Err(UartError::Trigger(e)) => {
                IRQ_FAILED.warn(format_args!("serial: raising the RX interrupt failed: {e}"));
                accepted
            }
            Err(UartError::FullFifo | UartError::IOError(_)) => 0,
        }
    }

    /// Free space in the RX FIFO, in bytes.
    pub fn fifo_capacity(&self) -> usize {
        self.lock().fifo_capacity()
    }

    /// Runs `f` on the output writer (to flush it, or to inspect a `Vec<u8>` in tests) with the
    /// UART locked.
    pub fn with_writer<R>(&self, f: impl FnOnce(&mut W) -> R) -> R {
        f(self.lock().writer_mut())
    }

    /// Consumes the device, returning its output writer.
    pub fn into_writer(self) -> W {
        self.uart
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
            .into_writer()
    }

    fn lock(&self) -> MutexGuard<'_, Uart<EV, W>> {
        // A panic while holding the lock leaves plain register values behind, still a valid
        // UART state, so keep going rather than propagating the poison.
        self.uart.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn report(result: std::result::Result<(), UartError<io::Error>>) {
    match result {
        Ok(()) => {}
        Err(UartError::Trigger(e)) => {
            IRQ_FAILED.warn(format_args!("serial: raising the interrupt failed: {e}"));
        }
        Err(UartError::IOError(e)) => {
            OUTPUT_FAILED.warn(format_args!("serial: writing guest output failed: {e}"));
        }
        Err(UartError::FullFifo) => {}
    }
}

impl<W: Write + Send, EV: SerialEvents + Send> PioDevice for SerialDevice<W, EV> {
    fn pio_read(&self, _base: PioAddress, offset: u16, data: &mut [u8]) {
        let mut uart = self.lock();
        for (lane, byte) in data.iter_mut().enumerate() {
            *byte = match lane_register(offset.into(), lane, COM1_PORT_SIZE.into()) {
                // lane_register keeps the register below 8.
                Some(reg) => uart.read(reg as u8),
                None => 0,
            };
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: u16, data: &[u8]) {
        let mut uart = self.lock();
        for (lane, &byte) in data.iter().enumerate() {
            if let Some(reg) = lane_register(offset.into(), lane, COM1_PORT_SIZE.into()) {
                report(uart.write(reg as u8, byte));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_irq::EventFdLine;

    const THR: u16 = 0;
    const RBR: u16 = 0;
    const IER: u16 = 1;
    const IIR: u16 = 2;
    const LCR: u16 = 3;
    const MCR: u16 = 4;
    const LSR: u16 = 5;
    const SCR: u16 = 7;
    const IER_RDA: u8 = 0x01;
    const IER_THRE: u8 = 0x02;
    const LSR_DR: u8 = 0x01;
    const LSR_THRE: u8 = 0x20;
    const BASE: PioAddress = PioAddress(crate::consts::COM1_PORT);

    fn setup() -> (Arc<EventFdLine>, SerialDevice<Vec<u8>>) {
        let irq = Arc::new(EventFdLine::new().unwrap());
        let dev = SerialDevice::new(irq.clone(), Vec::new());
        (irq, dev)
    }

    fn rd(dev: &impl PioDevice, reg: u16) -> u8 {
        let mut b = [0u8];
        dev.pio_read(BASE, reg, &mut b);
        b[0]
    }

    fn wr(dev: &impl PioDevice, reg: u16, v: u8) {
        dev.pio_write(BASE, reg, &[v]);
    }

    #[test]
    fn thr_write_reaches_output_and_raises_thre_interrupt() {
        let (irq, dev) = setup();
        // THRE interrupt disabled: output, no interrupt.
        assert_ne!(rd(&dev, LSR) & LSR_THRE, 0, "THR always empty");
        wr(&dev, THR, b'a');
        assert_eq!(irq.take_count(), 0);

        wr(&dev, IER, IER_THRE);
        // Enabling THRE with an empty THR asserts it at once.
        assert_eq!(irq.take_count(), 1);
        assert_eq!(rd(&dev, IIR) & 0x0f, 0x02, "IIR says THR empty");
        // Reading IIR acknowledged it; the next byte raises it again.
        wr(&dev, THR, b'b');
        assert_eq!(irq.take_count(), 1);
        assert_eq!(rd(&dev, IIR) & 0x0f, 0x02);
        assert_eq!(rd(&dev, IIR) & 0x0f, 0x01, "nothing pending after the ack");

        assert_eq!(dev.with_writer(|w| w.clone()), b"ab");
        assert_eq!(dev.into_writer(), b"ab");
    }

    #[test]
    fn rx_input_raises_interrupt_and_is_read_through_rbr() {
        let (irq, dev) = setup();
        wr(&dev, IER, IER_RDA);
        assert_eq!(irq.take_count(), 0, "no data yet, no interrupt");
        assert_eq!(rd(&dev, LSR) & LSR_DR, 0);

        assert_eq!(dev.enqueue_input(b"ok\n"), 3);
        assert_eq!(irq.take_count(), 1);
        assert_eq!(rd(&dev, IIR) & 0x0f, 0x04, "IIR says RX data available");
        let mut got = Vec::new();
        while rd(&dev, LSR) & LSR_DR != 0 {
            got.push(rd(&dev, RBR));
        }
        assert_eq!(got, b"ok\n");
        assert_eq!(dev.fifo_capacity(), 64);
        // Empty input is accepted trivially and raises nothing.
        assert_eq!(dev.enqueue_input(b""), 0);
        assert_eq!(irq.take_count(), 0);
    }

    #[test]
    fn enqueue_input_respects_fifo_capacity() {
        let (_irq, dev) = setup();
        let input: Vec<u8> = (0..100u8).collect();
        assert_eq!(dev.enqueue_input(&input), 64);
        assert_eq!(dev.fifo_capacity(), 0);
        assert_eq!(
            dev.enqueue_input(&input[64..]),
            0,
            "full FIFO accepts nothing"
        );
        assert_eq!(rd(&dev, RBR), 0);
        assert_eq!(dev.enqueue_input(&input[64..]), 1);
        let mut got = Vec::new();
        while rd(&dev, LSR) & LSR_DR != 0 {
            got.push(rd(&dev, RBR));
        }
        let mut want: Vec<u8> = (1..64u8).collect();
        want.push(64);
        assert_eq!(got, want);
    }

    #[test]
    fn state_round_trips() {
        let (_irq, dev) = setup();
        wr(&dev, LCR, 0x03);
        wr(&dev, SCR, 0x5a);
        wr(&dev, IER, IER_RDA);
        dev.enqueue_input(b"xyz");
        let state = dev.state();
        assert_eq!(state.in_buffer, b"xyz");

        let irq2 = Arc::new(EventFdLine::new().unwrap());
        let restored =
            SerialDevice::from_state(&state, irq2.clone(), NoEvents, Vec::new()).unwrap();
        assert_eq!(irq2.take_count(), 1, "pending RX interrupt re-raised");
        assert_eq!(restored.state(), state);
        assert_eq!(rd(&restored, SCR), 0x5a);
        assert_eq!(rd(&restored, RBR), b'x');

        let mut bad = state.clone();
        bad.in_buffer = vec![0; 65];
        let err = SerialDevice::from_state(&bad, irq2, NoEvents, Vec::new())
            .err()
            .unwrap();
        assert!(
            matches!(err, Error::SerialRestore { fifo_len: 65, .. }),
            "{err}"
        );
    }

    #[test]
    fn wide_accesses_split_into_byte_lanes() {
        let (_irq, dev) = setup();
        // 2-byte write at THR: lane 0 -> THR, lane 1 -> IER.
        dev.pio_write(BASE, THR, &[b'q', IER_RDA]);
        assert_eq!(rd(&dev, IER), IER_RDA);
        assert_eq!(dev.with_writer(|w| w.clone()), b"q");
        // 4-byte read at LCR: LCR, MCR, LSR, MSR.
        let mut d = [0u8; 4];
        dev.pio_read(BASE, LCR, &mut d);
        assert_eq!(d[0], rd(&dev, LCR));
        assert_eq!(d[1], rd(&dev, MCR));
        assert_ne!(d[2] & LSR_THRE, 0);
    }

    #[test]
    fn hostile_accesses_never_panic() {
        let (_irq, dev) = setup();
        let before = dev.state();
        for offset in [8u16, 9, 0xff, u16::MAX] {
            let mut d = [0xaau8; 8];
            dev.pio_read(BASE, offset, &mut d);
            assert_eq!(d, [0; 8], "registers past the UART read 0");
            dev.pio_write(BASE, offset, &[0xff; 8]);
        }
        assert_eq!(dev.state(), before, "writes past the UART are ignored");
        // 8 bytes at offset 6: lanes 6 and 7 land, the rest fall off the end.
        let mut d = [0xaau8; 8];
        dev.pio_read(BASE, 6, &mut d);
        assert_eq!(&d[2..], &[0; 6]);
        dev.pio_write(BASE, 6, &[0x11; 8]);
        assert_eq!(rd(&dev, SCR), 0x11);
        dev.pio_read(BASE, 0, &mut []);
        dev.pio_write(BASE, 0, &[]);
        // Reading an empty RX FIFO gives 0.
        assert_eq!(rd(&dev, RBR), 0);
    }

    struct FailingLine;
    impl InterruptLine for FailingLine {
        fn trigger(&self) -> io::Result<()> {
            Err(io::Error::other("line broken"))
        }
    }

    struct FailingWriter;
    impl Write for FailingWriter {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("disk full"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn broken_interrupt_line_and_output_are_survived() {
        let dev = SerialDevice::new(Arc::new(FailingLine), FailingWriter);
        wr(&dev, IER, IER_RDA | IER_THRE);
        wr(&dev, THR, b'a');
        // The byte still reaches the FIFO even though its interrupt could not be raised.
        assert_eq!(dev.enqueue_input(b"in"), 2);
        assert_eq!(rd(&dev, RBR), b'i');
        assert_ne!(rd(&dev, LSR) & LSR_THRE, 0);
    }

    #[test]
    fn works_through_the_bus_with_boxed_writer() {
        let irq = Arc::new(EventFdLine::new().unwrap());
        let dev: Arc<SerialDevice> = Arc::new(SerialDevice::new(irq, Box::new(io::sink())));
        let mut bus = kiln_bus::PioBus::new();
        bus.insert(BASE, COM1_PORT_SIZE, dev.clone()).unwrap();
        bus.write(PioAddress(BASE.0 + SCR), &[0x42]).unwrap();
        let mut b = [0u8];
        bus.read(PioAddress(BASE.0 + SCR), &mut b).unwrap();
        assert_eq!(b, [0x42]);
        // 0x400 is past COM1.
        assert!(bus.read(PioAddress(0x400), &mut b).is_err());
    }
}
